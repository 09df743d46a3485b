"""A password Sugar rejected is not sent again by the next sugard either: the rejection goes to
the service manager's fd store the moment it is made, so a crash (kill -9, then
Restart=on-failure) or a restart starts a sugard that refuses to send it. Against the test's
own fd store (tests/test_handoff.py's `FdStore`, which keeps fds as systemd does); the real
user manager does the same in tests/test_user_service.py."""

from __future__ import annotations

import json
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.daemon import PASSWORD, instance, sugarctl, write_config
from support.service_manager import FdStore, Started, start
from support.wait import wait_for

from sugard.config import SecretRef, parse_config
from sugard.daemon import fdstore as kept_rejections
from sugard.keeper import Rejection
from sugard.secret import Secret
from sugard.sugar.errors import CredentialsRejected
from sugard.testing import FakeSugar

WRONG = "wrong-password-kept"
STORED = "store.rejected.prod"  # what sugard names the rejection of instance `prod`


def crash(started: Started) -> None:
    """kill -9: no chance to hand anything over at stop."""
    started.proc.send_signal(signal.SIGKILL)
    started.proc.wait(30)


def restart(config: Path, store: FdStore, short_dir: Path) -> Started:
    """Start sugard with what the store kept, once the last one is gone; wait until it
    answers (after a crash, the store's last message may still be the old one's READY=1)."""
    started = start(config, store, short_dir)
    wait_for(lambda: 0 == sugarctl(started.socket, "ping").returncode, "the new sugard")
    return started


def refused(sock: Path) -> str:
    done = sugarctl(sock, "token", "prod", "--wait", "5")
    assert 6 == done.returncode, (done.stdout, done.stderr)
    return done.stderr


@pytest.mark.slow
def test_a_crash_and_a_restart_do_not_resend_a_rejected_password(
    fake: FakeSugar,
    short_dir: Path,
    manager: FdStore,
) -> None:
    """One rejected login, then kill -9 and start, then SIGTERM and start: still one
    password login at Sugar, each new sugard saying why it refuses; the record in the store
    holds no password; fixing the password file gets exactly one login, and the record goes."""
    config = write_config(short_dir, {"prod": instance(fake, password=WRONG)})
    first = start(config, manager, short_dir)
    assert "Sugar rejected the credentials" in refused(first.socket)
    wait_for(lambda: STORED in manager.names(), "the rejection in the fd store")
    assert 1 == fake.calls["password"]
    record = manager.content(STORED)
    assert WRONG.encode() not in record and PASSWORD.encode() not in record

    crash(first)
    second = restart(config, manager, short_dir)
    assert "rejected the password of 'prod' and it has not changed since" in refused(second.socket)
    assert 1 == fake.calls["password"]
    assert "Sugar rejected its password before the restart" in second.log()
    assert [STORED] == manager.names()  # stored again, for the next crash

    second.stop()
    third = restart(config, manager, short_dir)
    refused(third.socket)
    assert 1 == fake.calls["password"]

    (short_dir / "prod.password").write_text(PASSWORD + "\n")
    fixed = sugarctl(third.socket, "refresh", "prod")
    assert 0 == fixed.returncode, fixed.stderr
    assert fake.valid(fixed.stdout.strip())
    assert 2 == fake.calls["password"]
    wait_for(lambda: STORED not in manager.names(), "the rejection gone from the fd store")
    assert WRONG not in third.log()


@pytest.mark.slow
def test_a_password_changed_while_sugard_was_down_gets_its_one_try(
    fake: FakeSugar,
    short_dir: Path,
    manager: FdStore,
) -> None:
    """The record is for the very password rejected: a start with another one logs in."""
    config = write_config(short_dir, {"prod": instance(fake, password=WRONG)})
    first = start(config, manager, short_dir)
    refused(first.socket)
    wait_for(lambda: STORED in manager.names(), "the rejection in the fd store")
    crash(first)
    (short_dir / "prod.password").write_text(PASSWORD + "\n")
    second = restart(config, manager, short_dir)
    done = sugarctl(second.socket, "token", "prod")
    assert 0 == done.returncode, done.stderr
    assert 2 == fake.calls["password"]
    assert "prod: the secret Sugar rejected before the restart changed since" in second.log()
    assert STORED not in manager.names()


def test_a_removed_instance_takes_its_rejection_with_it(
    fake: FakeSugar,
    short_dir: Path,
    manager: FdStore,
) -> None:
    """A reload that removes the instance drops its record from the store."""
    other = instance(fake, username="admin", password="admin-pw")
    config = write_config(short_dir, {"prod": instance(fake, password=WRONG), "other": other})
    started = start(config, manager, short_dir)
    refused(started.socket)
    wait_for(lambda: STORED in manager.names(), "the rejection in the fd store")
    write_config(short_dir, {"other": other})
    assert 0 == sugarctl(started.socket, "reload").returncode
    assert STORED not in manager.names()


CONFIG = parse_config(
    {
        "instances": {
            "prod": {"url": "https://crm.example.com", "username": "u", "password": "the-password"}
        }
    }
).instances["prod"]


@pytest.mark.parametrize(
    "changed",
    [
        {"password": SecretRef("inline", "", Secret("another-password"))},
        {"username": "bob"},
        {"url": "https://other.example.com"},
    ],
)
def test_a_record_applies_only_to_what_was_sent(changed: dict[str, Any]) -> None:
    """Read back for the same site, user and password it is the same rejection; for any of
    them changed, none."""
    config = CONFIG
    rejection = Rejection.of(CredentialsRejected("refused"), config)
    assert rejection is not None
    data = kept_rejections.dump_rejection(rejection)
    assert b"the-password" not in data
    assert rejection == kept_rejections.load_rejection(config, data)
    assert kept_rejections.load_rejection(replace(config, **changed), data) is None


def test_a_record_sugard_did_not_write_is_refused_without_quoting_it() -> None:
    for data in (b"the-password", json.dumps({"format": 1, "field": "x"}).encode()):
        with pytest.raises(ValueError) as caught:
            kept_rejections.load_rejection(CONFIG, data)
        assert "the-password" not in str(caught.value) and "not a rejection" in str(caught.value)
