"""A restart that keeps the session, against a service manager of the test's own: a datagram
NOTIFY_SOCKET that keeps what `sugard run` hands it (FDSTORE=1, FDSTOREREMOVE=1, BARRIER=1)
as systemd's fd store does, and a restart that passes the kept fds back in LISTEN_FDS, as
systemd does (tests/test_fdstore.py's launcher). The real user manager does the same in
tests/test_user_service.py."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.daemon import PASSWORD, SUGARD, USER, instance, write_config
from support.service_manager import FdStore, start, token
from support.wait import wait_for

from sugard.config import InstanceConfig, SecretRef, parse_config
from sugard.daemon import fdstore as handoff
from sugard.secret import Secret
from sugard.sugar import Grant
from sugard.testing import FakeSugar

NAME = "store.session.prod"  # what sugard names the session of instance `prod`


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
