"""The benchmark suite's harness: sizes, the report table, the daemon and the reference
server as processes, the load generator, configs and formatting. Each section is a module of
its own (bench/throughput.py, ...); bench/run.py runs them and prints the table."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sugard.client import DaemonUnreachable, SugardClient

HERE = Path(__file__).resolve().parent
SUGARD = Path(sys.executable).parent / "sugard"
PASSWORD = "bench-password"  # noqa: S105 (the fake's users', nobody else's)
NAME = "bench"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    """How big each experiment is; `--quick` shrinks every one so the suite runs in seconds."""

    connections: tuple[int, ...] = (1, 32, 256)
    seconds: float = 5.0  # measured per throughput run
    rounds: int = 3  # throughput runs per server, interleaved; the median is reported
    warmup: float = 1.0
    cold_requests: int = 1000
    cold_login_delay: float = 2.0  # the fake's answer time, so requests meet a cold instance
    steady_rate: float = 100.0
    steady_seconds: float = 60.0
    steady_lifetime: float = 10.0
    reporters: int = 100
    refresh_delay: float = 0.2
    refresh_lifetime: float = 6.0  # short tokens: a refresh every ~3 s
    refresh_rate: float = 400.0
    refresh_seconds: float = 30.0
    settle: float = 2.0  # before reading an idle daemon's memory
    instances: int = 1000
    max_parallel_logins: int = 4
    client_runs: int = 100
    client_calls: int = 5000


QUICK = Sizes(
    seconds=0.3,
    rounds=1,
    warmup=0.1,
    cold_requests=50,
    cold_login_delay=1.0,
    steady_rate=50.0,
    steady_seconds=3.0,
    steady_lifetime=2.0,
    reporters=20,
    refresh_lifetime=2.0,
    refresh_rate=200.0,
    refresh_seconds=2.5,
    settle=0.3,
    instances=40,
    client_runs=3,
    client_calls=100,
)


@dataclass
class Row:
    """One line of the table. Figures are strings that start with a number (or are `-`)."""

    section: str
    measure: str
    sugard: str
    baseline: str
    ratio: str = "-"
    target: str = "-"
    met: str = "-"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # figures one section lends another

    def add(self, *args: str, **kwargs: str) -> None:
        self.rows.append(Row(*args, **kwargs))

    def markdown(self) -> str:
        lines = [
            "| # | measure | sugard | baseline | sugard / baseline | target | met |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.section} | {r.measure} | {r.sugard} | {r.baseline} | {r.ratio} "
                f"| {r.target} | {r.met} |"
            )
        return "\n".join(lines)


class BenchError(Exception):
    """Something is broken (not slow): a wrong answer, a daemon that does not start."""


# Processes: the daemon, the baseline server, the load generator


class Daemon:
    """`sugard run` as a subprocess on its own socket; its log goes to a file."""

    def __init__(self, workdir: Path, config: Path, tag: str, *, own_host: bool = False) -> None:
        """`own_host`: as if on a host of its own (SUGARD_HOST_SCOPE), so that daemons of one
        session on this machine may stand for several hosts."""
        self.socket = workdir / f"{tag}.sock"
        self.log_path = workdir / f"{tag}.log"
        self._log = self.log_path.open("wb")
        self.started = time.perf_counter()
        env = {**os.environ, "SUGARD_HOST_SCOPE": str(workdir)} if own_host else None
        self.proc = subprocess.Popen(
            [str(SUGARD), "run", "-c", str(config), "--socket", str(self.socket)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.pid = self.proc.pid

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with SugardClient(self.socket, timeout=5) as client:
                    client.health()
                return
            except DaemonUnreachable:
                if time.monotonic() > deadline:
                    raise BenchError(f"sugard did not answer within {timeout:g} s") from None
                time.sleep(0.01)

    def token(self, name: str = NAME, wait: float = 30.0) -> str:
        with SugardClient(self.socket, timeout=wait + 5) as client:
            return str(client.token(name, wait=wait)["access_token"])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"sugard exited with {self.proc.returncode}: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def daemon(workdir: Path, config: Path, tag: str) -> Iterator[Daemon]:
    d = Daemon(workdir, config, tag)
    try:
        yield d
    finally:
        d.stop()


@contextlib.contextmanager
def server(workdir: Path, script: str, tag: str) -> Iterator[tuple[Path, int]]:
    """A reference server from bench/ on its own socket: (socket, pid)."""
    sock = workdir / f"{tag}.sock"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), str(sock)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise BenchError(f"{script} did not start")
        yield sock, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def load(target: Path | str, **options: Any) -> dict[str, Any]:
    """Run `bench/load.py` against a Unix socket (a Path) or HOST:PORT; its JSON summary."""
    argv = [sys.executable, str(HERE / "load.py")]
    argv += ["--unix", str(target)] if isinstance(target, Path) else ["--tcp", target]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value not in (None, False):
            argv += [flag, str(value)]
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    if out.returncode != 0:
        raise BenchError(f"load.py failed ({out.returncode}): {out.stderr.strip()[-1000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` from /proc/PID/status (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MIB
    raise BenchError(f"no VmRSS for pid {pid}")


# Configs


def write_config(
    workdir: Path,
    url: str,
    instances: dict[str, str],
    *,
    daemon: dict[str, Any] | None = None,
    name: str = "config.toml",
) -> Path:
    """A config of `instances` (name -> username), all with the bench password."""
    secret = workdir / "password"
    if not secret.exists():
        secret.write_text(PASSWORD + "\n")
        secret.chmod(0o600)
    lines = ["[daemon]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in (daemon or {}).items()]
    lines += ["", "[defaults]", f'password_file = "{secret}"', ""]
    for instance, user in instances.items():
        lines += [f"[instances.{instance}]", f'url = "{url}"', f'username = "{user}"', ""]
    path = workdir / name
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def token_path(name: str = NAME, wait: float | None = None) -> str:
    return f"/v1/instances/{name}/token" + (f"?wait={wait:g}" if wait is not None else "")


def short_hash(token: str) -> str:
    """As load.py names tokens: the access token itself never leaves the processes that need it."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def statuses_ok(result: dict[str, Any]) -> bool:
    return set(result["statuses"]) <= {"200"}


# Formatting


def num(value: float, unit: str = "", digits: int = 0) -> str:
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"
