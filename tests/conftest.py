"""Shared fixtures: the fake SugarCRM on 127.0.0.1, configs, and the real daemon as a process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import tomli_w

from sugard.client import DaemonUnreachable, SugardClient
from sugard.testing import FakeSugar, running_fake

BIN = Path(sys.executable).parent
SUGARD = str(BIN / "sugard")
SUGARCTL = str(BIN / "sugarctl")
USER, PASSWORD = "alice", "alice-secret-pw"
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str = "", timeout: float = 30.0) -> T:
    """Poll `predicate` until it is true, and return its value. The deadline is generous (the
    machine may be busy with other suites): a test waits for a signal, never a fixed time."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(0.02)
    return value


def curl(socket: Path, path: str, *args: str, timeout: float = 60.0) -> tuple[int, str]:
    """`curl --unix-socket SOCKET [ARGS] http://sugard PATH`, as a script would run it: the
    HTTP status and the body."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            str(socket),
            *args,
            f"http://sugard{path}",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


def curl_json(socket: Path, path: str, *args: str, timeout: float = 60.0) -> tuple[int, Any]:
    """`curl` over the socket, the body read as JSON."""
    status, body = curl(socket, path, *args, timeout=timeout)
    return status, json.loads(body)


def accepted_connections(socket: Path) -> dict[str, int]:
    """The connections the daemon on `socket` has accepted (`ss`): inode -> bytes sent on it
    that the daemon has not read yet."""
    out = subprocess.run(
        ["ss", "-xnH", "state", "established"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    found = {}
    for line in out.splitlines():
        fields = line.split()
        # Netid Recv-Q Send-Q Local-Address Inode Peer-Address Peer-Inode
        if len(fields) >= 5 and fields[3] == str(socket):
            found[fields[4]] = int(fields[1])
    return found


def wait_until_read(socket: Path, before: Mapping[str, int], what: str = "the request") -> None:
    """Until the daemon on `socket` has accepted a connection not in `before` (a snapshot of
    `accepted_connections`) and read all that was sent on it: the request is in the daemon's
    hands, not on its way (its client may still be starting, on a busy machine)."""
    wait_for(
        lambda: any(
            unread == 0
            for inode, unread in accepted_connections(socket).items()
            if inode not in before
        ),
        what=f"{what} to reach the daemon",
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private (0700) directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake() -> Iterator[FakeSugar]:
    """The fake SugarCRM on 127.0.0.1 in a background thread, with one user."""
    with running_fake(users={USER: PASSWORD, "admin": "admin-pw"}) as server:
        yield server


def write_config(
    directory: Path,
    instances: dict[str, dict[str, Any]],
    daemon: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
    name: str = "config.toml",
) -> Path:
    """Write a config; each instance's `password` goes to its own 0600 file."""
    tables: dict[str, Any] = {}
    for instance, table in instances.items():
        table = dict(table)
        if "password" in table:
            secret = directory / f"{instance}.password"
            secret.write_text(table.pop("password") + "\n")
            secret.chmod(0o600)
            table["password_file"] = str(secret)
        tables[instance] = table
    document: dict[str, Any] = {"daemon": daemon or {}, "instances": tables}
    if defaults:
        document["defaults"] = defaults
    path = directory / name
    path.write_text(tomli_w.dumps(document))
    path.chmod(0o600)
    return path


def instance(fake: FakeSugar, **overrides: Any) -> dict[str, Any]:
    """An instance table pointing at `fake`, logging in as alice; fast backoff for tests."""
    table: dict[str, Any] = {
        "url": fake.url,
        "username": USER,
        "password": PASSWORD,
        "backoff_max": 0.2,
    }
    table.update(overrides)
    return table


class DaemonProcess:
    """`sugard run` as a real subprocess; its stderr goes to a file tests can read."""

    def __init__(self, config: Path, socket: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.socket = socket
        self.log_path = socket.parent / "sugard.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [SUGARD, "run", "-c", str(config), "--socket", str(socket), "--log-level", "debug"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sugard exited with {self.proc.returncode}: {self.log()}")
            try:
                with SugardClient(self.socket, timeout=2) as client:
                    client.health()
                return
            except DaemonUnreachable:
                time.sleep(0.05)
        raise AssertionError(f"sugard did not answer within {timeout} s: {self.log()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def client(self) -> SugardClient:
        return SugardClient(self.socket)


@pytest.fixture
def start_daemon(short_dir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start `sugard run` on a config; stopped (SIGTERM) at the end of the test."""
    started: list[DaemonProcess] = []

    def start(
        config: Path, *, wait: bool = True, env: dict[str, str] | None = None
    ) -> DaemonProcess:
        daemon = DaemonProcess(config, short_dir / "s.sock", env)
        started.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def sugarctl(
    socket: Path, *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `sugarctl` console script."""
    return subprocess.run(
        [SUGARCTL, "--socket", str(socket), *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="session")
def foreign_sugarctl() -> Iterator[str]:
    """The real `sugarctl` code, launchable by another uid (65534) wherever the checkout lives.

    Why a copy: a checkout inside a 0700 home directory is unreadable to uid 65534, so the
    venv's console script (and its interpreter symlink) cannot be run by it. sugarctl is
    standard-library only, so the package's files and the base interpreter are all it needs.
    """
    import sugard

    home = Path(tempfile.mkdtemp(prefix="sd-foreign-"))
    home.chmod(0o755)
    shutil.copytree(
        Path(sugard.__file__).parent,
        home / "sugard",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    script = home / "sugarctl"
    script.write_text(
        f"#!{python} -I\n"
        "import sys\n"
        f"sys.path.insert(0, {str(home)!r})\n"
        "from sugard.client.ctl import main\n"
        "sys.exit(main())\n"
    )
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path == script else 0o644)
    yield str(script)
    shutil.rmtree(home, ignore_errors=True)


# The TOKEN object of the design's socket API.
TOKEN_KEYS = {
    "instance",
    "url",
    "access_token",
    "token_type",
    "expires_at",
    "expires_in",
    "download_token",
}


@pytest.fixture
def daemon(fake: FakeSugar, short_dir: Path, start_daemon) -> DaemonProcess:
    """A daemon with one instance, `prod`, ready with a token."""
    started: DaemonProcess = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    with started.client() as client:
        client.token("prod", wait=20)
    return started


class InFlight:
    """`sugarctl ARGS` in a thread, so the test can signal or reload the daemon while it waits."""

    def __init__(self, socket_path: Path, *args: str) -> None:
        self.result: subprocess.CompletedProcess[str] | None = None
        self._thread = threading.Thread(target=self._run, args=(socket_path, args))
        self._thread.start()

    def _run(self, socket_path: Path, args: tuple[str, ...]) -> None:
        self.result = sugarctl(socket_path, *args)

    def join(self, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        self._thread.join(timeout)
        assert self.result is not None
        return self.result


def fake_profile(version: str) -> dict[str, Any]:
    """FakeSugar keyword arguments that make it behave like Sugar `version`: the fake's own
    version profile (how long a rotated or evicted token lives on, docs/sugarcrm.md)."""
    return {"sugar_version": version}


@pytest.fixture
def redis_server() -> Iterator[Any]:
    """A real redis-server of the test's own on a unix socket (no disk): see redis_server.py."""
    from redis_server import RedisServer

    directory = Path(tempfile.mkdtemp(prefix="sd-redis-"))
    server = RedisServer(directory)
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)
