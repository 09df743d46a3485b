"""The real daemon as a process, its config, and the real `sugarctl`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

from sugard.client import DaemonUnreachable, SugardClient
from sugard.testing import FakeSugar

BIN = Path(sys.executable).parent
SUGARD = str(BIN / "sugard")
SUGARCTL = str(BIN / "sugarctl")
USER, PASSWORD = "alice", "alice-secret-pw"


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


def proxy_url(daemon: DaemonProcess, name: str = "prod") -> str:
    """The site URL `sugarctl proxy-url NAME` prints: `name`'s loopback listener."""
    result = sugarctl(daemon.socket, "proxy-url", name)
    assert 0 == result.returncode, result.stderr
    return result.stdout.strip()


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


def current_token(daemon: DaemonProcess, name: str = "prod") -> str:
    """The access token the daemon serves for `name` now."""
    with daemon.client() as client:
        return str(client.token(name)["access_token"])


def status(daemon: DaemonProcess, name: str = "prod") -> dict[str, Any]:
    """The daemon's status object of instance `name`."""
    with daemon.client() as client:
        result: dict[str, Any] = client.status(name)
        return result
