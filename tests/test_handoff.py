"""A restart that keeps the session, against a service manager of the test's own: a datagram
NOTIFY_SOCKET that keeps what `sugard run` hands it (FDSTORE=1, FDSTOREREMOVE=1, BARRIER=1)
as systemd's fd store does, and a restart that passes the kept fds back in LISTEN_FDS, as
systemd does (tests/test_fdstore.py's launcher). The real user manager does the same in
tests/test_user_service.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSWORD, SUGARD, USER, instance, sugarctl, write_config
from test_fdstore import LAUNCHER
from test_metrics import wait_for

from sugard.config import InstanceConfig, SecretRef, parse_config
from sugard.daemon import fdstore as handoff
from sugard.daemon.systemd import read_memfd
from sugard.secret import Secret
from sugard.sugar import Grant
from sugard.testing import FakeSugar

NAME = "store.session.prod"  # what sugard names the session of instance `prod`


class FdStore:
    """The service manager's end of NOTIFY_SOCKET, keeping fds by FDNAME like systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.kept: dict[str, list[int]] = {}
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self.started: list[subprocess.Popen[bytes]] = []  # killed at the end if still running
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16)
            except OSError:
                return
            lines = data.decode().split("\n")
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            with self._lock:
                self.messages.append(data.decode())
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1":
                    self.kept.setdefault(name, []).extend(fds)
                    continue
                if fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.kept.pop(name, []):
                        os.close(fd)
                for fd in fds:  # BARRIER=1: closing its fd says "read up to here"
                    os.close(fd)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(name for name, fds in self.kept.items() if fds)

    def content(self, name: str) -> bytes:
        with self._lock:
            return read_memfd(self.kept[name][-1])

    def fds(self) -> tuple[list[int], str]:
        """What a restart passes: the kept fds (one per name) and LISTEN_FDNAMES."""
        with self._lock:
            named = [(name, fds[-1]) for name, fds in sorted(self.kept.items()) if fds]
        return [fd for _, fd in named], ":".join(name for name, _ in named)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.sock.close()
        for fds in self.kept.values():
            for fd in fds:
                os.close(fd)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[FdStore]:
    store = FdStore(short_dir / "notify")
    yield store
    store.close()


class Started:
    """`sugard run` started as systemd would: NOTIFY_SOCKET, and LISTEN_* for `fds`."""

    def __init__(self, config: Path, sock: Path, store: FdStore, fds: list[int], names: str):
        self.socket = sock
        self.log_path = sock.with_name(f"sugard-{len(store.messages)}.log")
        argv = ["sugard", "run", "-c", str(config), "--socket", str(sock), "--log-level", "debug"]
        program = f"import sys; sys.argv = {argv!r}; from sugard.cli import main; main()"
        env = {**os.environ, "NOTIFY_SOCKET": str(store.path)}
        if fds:
            env |= {"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": names}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, program, *map(str, fds)],
                pass_fds=fds,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        store.started.append(self.proc)
        wait_for(lambda: store_said(store, "READY=1", self), "READY=1")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert 0 == self.proc.wait(30), self.log()


def store_said(store: FdStore, what: str, started: Started) -> bool:
    assert started.proc.poll() is None, started.log()
    return any(what in message for message in store.messages[-3:])


def token(sock: Path) -> str:
    done = sugarctl(sock, "token", "prod")
    assert 0 == done.returncode, done.stderr
    return done.stdout.strip()


def start(config: Path, store: FdStore, short_dir: Path) -> Started:
    return Started(config, short_dir / "s.sock", store, *store.fds())


def test_a_restart_takes_the_session_back_with_no_login(
    fake: FakeSugar, short_dir: Path, manager: FdStore
) -> None:
    """Stop: the session goes to the store as a sealed 0600 memfd, without the password.
    Start: taken back after one probe, the same token served, no login; the store is emptied
    while sugard runs (a crash leaves nothing stale) and filled again at the next stop."""
    config = write_config(short_dir, {"prod": instance(fake, probe_interval=0)})
    first = start(config, manager, short_dir)
    served = token(first.socket)
    first.stop()
    assert [NAME] == manager.names()
    with manager._lock:
        fd = manager.kept[NAME][-1]
    assert 0o600 == stat.S_IMODE(os.fstat(fd).st_mode)
    assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:sugard-prod")
    kept = manager.content(NAME)
    assert served.encode() in kept
    assert PASSWORD.encode() not in kept
    assert "fd store: handed 1 session(s) to the service manager" in first.log()

    second = start(config, manager, short_dir)
    assert served == token(second.socket)
    assert (1, 1, 0) == (fake.calls["password"], fake.calls["ping"], fake.calls["refresh_token"])
    assert [] == manager.names()  # FDSTOREREMOVE=1 for what it took back
    assert "took back the session kept across the restart" in second.log()
    assert "fd store: 1 of 1 session(s) kept across the restart" in second.log()
    second.stop()
    assert [NAME] == manager.names()
    for secret in fake.issued:
        assert secret not in first.log() + second.log()


def test_a_changed_password_drops_the_kept_session(
    fake: FakeSugar, short_dir: Path, manager: FdStore
) -> None:
    """The password changed in the config (and at Sugar) between stop and start: the kept
    session is dropped unprobed and the instance logs in with the new one."""
    config = write_config(short_dir, {"prod": instance(fake, probe_interval=0)})
    first = start(config, manager, short_dir)
    before = token(first.socket)
    first.stop()
    fake.set_password(USER, "the-new-password")
    write_config(short_dir, {"prod": instance(fake, probe_interval=0, password="the-new-password")})
    second = start(config, manager, short_dir)
    after = token(second.socket)
    assert after != before and fake.valid(after)
    assert (2, 0) == (fake.calls["password"], fake.calls["ping"])
    assert "prod: its login settings changed since the session was kept; logging in" in (
        second.log()
    )
    second.stop()


def test_a_session_sugar_no_longer_takes_is_renewed_not_served(
    fake: FakeSugar, short_dir: Path, manager: FdStore
) -> None:
    """The kept access token died while sugard was down (here: Sugar says it expired): the
    probe finds it, and its refresh token brings a new one, still without a login."""
    config = write_config(short_dir, {"prod": instance(fake, probe_interval=0)})
    first = start(config, manager, short_dir)
    before = token(first.socket)
    first.stop()
    fake.expire_access_tokens()
    second = start(config, manager, short_dir)
    after = token(second.socket)
    assert after != before and fake.valid(after)
    assert (1, 1, 1) == (fake.calls["password"], fake.calls["ping"], fake.calls["refresh_token"])
    assert "Sugar no longer takes token" in second.log()
    second.stop()


def test_without_notify_socket_nothing_is_kept(fake: FakeSugar, short_dir: Path) -> None:
    """Not under systemd: a restart logs in again, and nothing is said of an fd store."""
    config = write_config(short_dir, {"prod": instance(fake, probe_interval=0)})
    for run in (1, 2):
        log = short_dir / f"run{run}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [SUGARD, "run", "-c", str(config), "--socket", str(short_dir / "s.sock")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
            )
        wait_for(lambda: (short_dir / "s.sock").exists(), "the socket")
        token(short_dir / "s.sock")
        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(30)
        assert "fd store" not in log.read_text()
    assert 2 == fake.calls["password"]


def kept_session() -> tuple[InstanceConfig, handoff.Session]:
    config = parse_config(
        {
            "instances": {
                "prod": {"url": "https://a.example", "username": "u", "password": "the-password"}
            }
        }
    ).instances["prod"]
    grant = Grant(
        access_token=Secret("access-0123"),
        refresh_token=Secret("refresh-4567"),
        download_token=Secret("download-89ab"),
        token_type="bearer",
        issued_at=1767225600.0,
        expires_at=1767229200.0,
        refresh_expires_at=None,
    )
    return config, handoff.Session(grant, "13.3.0")


@pytest.mark.parametrize(
    "changed",
    [
        {"url": "https://b.example"},
        {"username": "v"},
        {"platform": "other"},
        {"client_id": "another"},
        {"password": SecretRef("inline", "", Secret("new-pw"))},
    ],
    ids=lambda changed: next(iter(changed)),
)
def test_a_session_is_for_the_login_settings_it_was_made_with(changed: dict[str, Any]) -> None:
    """Each login setting, the password too, changes the keyed hash: the session is dropped
    (None). Unchanged, it comes back whole; the memfd's bytes hold no password."""
    config, session = kept_session()
    data = handoff.dump_session(config, session)
    assert b"the-password" not in data
    assert session == handoff.load_session(config, data)
    assert handoff.load_session(replace(config, **changed), data) is None


def test_a_memfd_sugard_did_not_write_is_refused_without_quoting_it() -> None:
    """Not JSON, another format, a missing field: a one-line ValueError naming no content."""
    config, session = kept_session()
    other_format = json.loads(handoff.dump_session(config, session))
    other_format["format"] = 99
    missing = json.loads(handoff.dump_session(config, session))
    del missing["refresh_token"]
    for data in (b"access-0123 not json", json.dumps(other_format), json.dumps(missing)):
        with pytest.raises(ValueError, match=r"^not a session sugard wrote") as caught:
            handoff.load_session(config, data.encode() if isinstance(data, str) else data)
        assert "0123" not in str(caught.value) and "4567" not in str(caught.value)
