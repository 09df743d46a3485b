"""How fast scripts get a token: `sugarctl token NAME` against the bare interpreter and curl.

Starts its own fake SugarCRM on 127.0.0.1 and a real `sugard run` on a private socket, then
times, side by side in one run (interleaved, so that load on the machine hits every command
alike):

- `python -I -S -c pass`: the bare interpreter the console script uses (read from its `#!`);
- `python -c pass`: the same with `site`, which every console script pays before any of
  sugarctl's code runs (an editable install's import finder is loaded here);
- `sugarctl token NAME`: the installed console script, socket from `$SUGARD_SOCKET`;
- `curl --unix-socket SOCK http://sugard/v1/instances/NAME/token`: the floor for a process
  that asks the daemon (curl is C and starts in a few milliseconds);

then the in-process `SugardClient.token()` calls per second on one kept connection. Prints a
markdown table. Target: sugarctl at most 2.5x the bare interpreter.

    .venv/bin/python bench/bench_client.py [--runs 100] [--calls 5000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sugard.client import DaemonUnreachable, SugardClient
from sugard.testing import running_fake

NAME = "bench"
USER, PASSWORD = "bench", "bench-password"
TARGET = 2.5


@dataclass(frozen=True)
class Figures:
    """What one run measured: each command's times, and the in-process client's rate."""

    times: dict[str, list[float]]
    python: str
    sugarctl: Path
    runs: int
    calls: int
    seconds: float
    connections: int

    def median(self, index: int) -> float:
        return statistics.median(list(self.times.values())[index])

    @property
    def median_bare(self) -> float:
        return self.median(0)

    @property
    def median_sugarctl(self) -> float:
        return self.median(2)

    @property
    def median_curl(self) -> float:
        return self.median(3)

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=100, help="timed runs of each command")
    parser.add_argument("--calls", type=int, default=5000, help="in-process token() calls")
    parser.add_argument(
        "--sugarctl",
        default=str(Path(sys.executable).parent / "sugarctl"),
        help="the console script to time (default: next to this Python; another install's "
        "sugarctl works too, e.g. a regular `pip install .` in another venv)",
    )
    args = parser.parse_args(argv)
    if not shutil.which("curl"):
        print("bench: curl is needed (apt-get install curl)", file=sys.stderr)
        return 2
    figures = measure(args.runs, args.calls, Path(args.sugarctl))
    print(
        report(
            figures.times,
            figures.python,
            figures.sugarctl,
            figures.runs,
            figures.calls,
            figures.seconds,
            figures.connections,
        )
    )
    return 0


def measure(runs: int, calls: int, sugarctl: Path | None = None) -> Figures:
    """Start a fake and a daemon, time each command `runs` times and the client `calls` times."""
    sugarctl = sugarctl or Path(sys.executable).parent / "sugarctl"
    python = interpreter_of(sugarctl)
    sugard = Path(sys.executable).parent / "sugard"  # the daemon of this environment
    workdir = Path(tempfile.mkdtemp(prefix="sdb-"))
    try:
        with running_fake(users={USER: PASSWORD}) as fake:
            sock = workdir / "s.sock"
            config = write_config(workdir, fake.url)
            daemon = subprocess.Popen(
                [str(sugard), "run", "-c", str(config), "--socket", str(sock)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                token = wait_for_token(sock, daemon)
                commands = {
                    "`python -I -S -c pass` (bare interpreter)": [python, "-I", "-S", "-c", "pass"],
                    "`python -c pass` (with site, as console scripts start)": [
                        python,
                        "-c",
                        "pass",
                    ],
                    f"`sugarctl token {NAME}`": [str(sugarctl), "token", NAME],
                    "`curl --unix-socket`": [
                        "curl",
                        "-sS",
                        "--fail",
                        "--unix-socket",
                        str(sock),
                        f"http://sugard/v1/instances/{NAME}/token",
                    ],
                }
                env = bench_env(sock)
                check_outputs(commands, env, token)
                times = time_commands(commands, env, runs)
                done, seconds, connections = in_process(sock, calls)
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(15)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Figures(times, python, sugarctl, runs, done, seconds, connections)


def interpreter_of(script: Path) -> str:
    """The interpreter in the script's `#!` line: the one whose start-up sugarctl pays."""
    try:
        first = script.read_bytes().split(b"\n", 1)[0].decode()
    except OSError:
        return sys.executable
    return first[2:].split()[0] if first.startswith("#!") else sys.executable


def write_config(workdir: Path, url: str) -> Path:
    secret = workdir / "bench.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    config = workdir / "config.toml"
    config.write_text(
        f'[instances.{NAME}]\nurl = "{url}"\nusername = "{USER}"\npassword_file = "{secret}"\n'
    )
    config.chmod(0o600)
    return config


def wait_for_token(sock: Path, daemon: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 30
    while True:
        if daemon.poll() is not None:
            raise SystemExit(f"bench: sugard exited with status {daemon.returncode}")
        try:
            with SugardClient(sock) as client:
                return str(client.token(NAME, wait=20)["access_token"])
        except DaemonUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def bench_env(sock: Path) -> dict[str, str]:
    env = dict(os.environ, SUGARD_SOCKET=str(sock))
    # Time what users get: an installed package with its bytecode cached.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def check_outputs(commands: dict[str, list[str]], env: dict[str, str], token: str) -> None:
    """Each command works (twice, which also writes bytecode caches) before any is timed."""
    for label, argv in commands.items():
        for _ in range(2):
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"bench: {label} failed ({out.returncode}): {out.stderr.strip()}")
        if "sugarctl" in label and out.stdout != token + "\n":
            raise SystemExit("bench: sugarctl printed something other than the token")
        if "curl" in label and token not in out.stdout:
            raise SystemExit("bench: curl got no token")


def time_commands(
    commands: dict[str, list[str]], env: dict[str, str], runs: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, argv in commands.items():
            started = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
            times[label].append(time.perf_counter() - started)
    return times


def in_process(sock: Path, calls: int) -> tuple[int, float, int]:
    with SugardClient(sock) as client:
        client.token(NAME)
        started = time.perf_counter()
        for _ in range(calls):
            client.token(NAME)
        seconds = time.perf_counter() - started
        return calls, seconds, client.connections_opened


def report(
    times: dict[str, list[float]],
    python: str,
    sugarctl: Path,
    runs: int,
    calls: int,
    seconds: float,
    connections: int,
) -> str:
    medians = {label: statistics.median(values) for label, values in times.items()}
    labels = list(medians)
    bare, site, ctl, curl = (medians[label] for label in labels)
    lines = [
        f"sugarctl: {sugarctl}; interpreter: {python} (Python {sys.version.split()[0]}); "
        f"{runs} runs each, interleaved",
        "",
        "| command | median | p90 | x bare python | x curl |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in labels:
        values = sorted(times[label])
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        lines.append(
            f"| {label} | {medians[label] * 1000:.1f} ms | {p90 * 1000:.1f} ms "
            f"| {medians[label] / bare:.2f} | {medians[label] / curl:.2f} |"
        )
    rate = calls / seconds if seconds > 0 else float("inf")
    lines += [
        "",
        f"In process: `SugardClient.token()` x {calls}: {rate:,.0f} calls/s "
        f"({seconds / max(calls, 1) * 1e6:.0f} us per call) on {connections} connection(s).",
        "",
        f"sugarctl / bare interpreter: {ctl / bare:.2f} (target <= {TARGET}: "
        f"{'met' if ctl / bare <= TARGET else 'missed'}); sugarctl / curl: {ctl / curl:.2f}; "
        f"sugarctl's own share after site: {(ctl - site) * 1000:.1f} ms.",
    ]
    if site / bare > 1.6:
        lines.append(
            f"Note: site alone costs {site / bare:.2f}x the bare interpreter here. An editable "
            "install (pip install -e) loads setuptools' import finder in every console script; "
            "a regular install (pip install .) does not."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
