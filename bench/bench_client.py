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

`--baseline PATH` times another install's sugarctl in the same interleaved runs, e.g. one
of the previous version, so that a change's effect on start-up is measured side by side:

    .venv/bin/python bench/bench_client.py [--runs 100] [--calls 5000] [--baseline PATH]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    baseline: Path | None = None
    cpu: dict[str, list[float]] = field(default_factory=dict)  # CPU time of each run

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
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another sugarctl to time in the same runs (e.g. the previous version's)",
    )
    args = parser.parse_args(argv)
    if not shutil.which("curl"):
        print("bench: curl is needed (apt-get install curl)", file=sys.stderr)
        return 2
    figures = measure(args.runs, args.calls, Path(args.sugarctl), args.baseline)
    print(
        report(
            figures.times,
            figures.python,
            figures.sugarctl,
            figures.runs,
            figures.calls,
            figures.seconds,
            figures.connections,
            figures.cpu,
        )
    )
    return 0


def measure(
    runs: int, calls: int, sugarctl: Path | None = None, baseline: Path | None = None
) -> Figures:
    """Start a fake and a daemon, time each command `runs` times (and `baseline`'s sugarctl,
    last, if given) and the client `calls` times."""
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
                if baseline is not None:
                    commands[f"`sugarctl token {NAME}`, baseline {baseline}"] = [
                        str(baseline),
                        "token",
                        NAME,
                    ]
                env = bench_env(sock)
                check_outputs(commands, env, token)
                cpu: dict[str, list[float]] = {}
                times = time_commands(commands, env, runs, cpu)
                done, seconds, connections = in_process(sock, calls)
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(15)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Figures(times, python, sugarctl, runs, done, seconds, connections, baseline, cpu)


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
    commands: dict[str, list[str]],
    env: dict[str, str],
    runs: int,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall time of each run; also its CPU time (user + system) into `cpu`, if given: on a
    busy machine, CPU time moves less with the load than wall time does."""
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, argv in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
            times[label].append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if cpu is not None:
                used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                cpu.setdefault(label, []).append(used)
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
    cpu: dict[str, list[float]] | None = None,
) -> str:
    medians = {label: statistics.median(values) for label, values in times.items()}
    cpu_medians = {label: statistics.median(values) for label, values in (cpu or {}).items()}
    labels = list(medians)
    bare, site, ctl, curl = (medians[label] for label in labels[:4])
    lines = [
        f"sugarctl: {sugarctl}; interpreter: {python} (Python {sys.version.split()[0]}); "
        f"{runs} runs each, interleaved",
        "",
        "| command | median | p90 | x bare python | x curl | CPU, median |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label in labels:
        values = sorted(times[label])
        p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
        used = f"{cpu_medians[label] * 1000:.1f} ms" if label in cpu_medians else "-"
        lines.append(
            f"| {label} | {medians[label] * 1000:.1f} ms | {p90 * 1000:.1f} ms "
            f"| {medians[label] / bare:.2f} | {medians[label] / curl:.2f} | {used} |"
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
    if len(labels) > 4:
        base = medians[labels[4]]
        line = (
            f"sugarctl / baseline sugarctl: {ctl / base:.3f} "
            f"({(ctl - base) * 1000:+.2f} ms at the median)"
        )
        if cpu_medians:
            ctl_cpu, base_cpu = cpu_medians[labels[2]], cpu_medians[labels[4]]
            line += (
                f"; in CPU time {ctl_cpu / base_cpu:.3f} ({(ctl_cpu - base_cpu) * 1000:+.2f} ms)"
            )
        lines.append(line + ".")
    if site / bare > 1.6:
        lines.append(
            f"Note: site alone costs {site / bare:.2f}x the bare interpreter here. An editable "
            "install (pip install -e) loads setuptools' import finder in every console script; "
            "a regular install (pip install .) does not."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
