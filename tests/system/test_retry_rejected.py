"""`sugarctl refresh NAME --retry-rejected` cannot lock the account: only the daemon's owner
(and root) may ask for it, it sends the rejected secret once per rejection, and another only
once the secret changed or a quiet minute passed (the refusal says when); and once Sugar said
the account is locked, no message says it is not."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.daemon import PASSWORD, USER, DaemonProcess, instance, status, sugarctl, write_config
from support.nobody import NOBODY, as_nobody
from support.wait import wait_for

from sugard.testing import FakeSugar, running_fake

NAME = "prod"
NOT_LOCKED = "so the account is not locked"


def failed_with(fake: FakeSugar, short_dir: Path, start: Callable[..., DaemonProcess], **daemon):
    """A daemon whose one login Sugar rejected (the file holds a wrong password)."""
    config = write_config(
        short_dir, {NAME: instance(fake, password="wrong-password")}, daemon=daemon or None
    )
    started: DaemonProcess = start(config)
    wait_for(lambda: status(started)["state"] == "failed")
    assert 1 == fake.calls["password"]
    return started


@pytest.fixture
def locks_after_three() -> Iterator[FakeSugar]:
    with running_fake(users={USER: PASSWORD}, lockout_after=3) as server:
        yield server


def test_only_the_owner_may_send_a_rejected_secret_again(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A uid in allowed_uids gets tokens, but `{"retry_rejected": true}` from it is a 403
    naming who may, and no login is made."""
    daemon = failed_with(fake, short_dir, start_daemon, allowed_uids=[NOBODY])
    daemon.socket.parent.chmod(0o755)
    daemon.socket.chmod(0o666)
    done = subprocess.run(
        as_nobody(
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
            "--unix-socket",
            str(daemon.socket),
            "-H",
            "Content-Type: application/json",
            "--data",
            '{"retry_rejected": true}',
            f"http://sugard/v1/instances/{NAME}/refresh",
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, _, code = done.stdout.rpartition("\n")
    assert "403" == code, done.stdout
    answer = json.loads(body)
    assert "forbidden" == answer["error"]
    assert f"uid {NOBODY} may not" in answer["message"]
    assert "only its owner and root may" in answer["message"]
    assert 1 == fake.calls["password"]


def test_a_loop_of_retry_rejected_sends_the_rejected_password_once(
    locks_after_three: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Ten `--retry-rejected` in a row send the rejected password once (two failed logins in
    all, under a lockout after three); the nine others are refused saying until when."""
    fake = locks_after_three
    daemon = failed_with(fake, short_dir, start_daemon)
    answers = [sugarctl(daemon.socket, "refresh", NAME, "--retry-rejected") for _ in range(10)]
    assert [6] * 10 == [done.returncode for done in answers]
    assert 2 == fake.calls["password"]
    for done in answers[1:]:
        assert "sent again at" in done.stderr, done.stderr
        assert "not sending it again before" in done.stderr
        assert "unless it changes" in done.stderr
        assert NOT_LOCKED not in done.stderr
    # The account is not locked: the right password logs in.
    (short_dir / f"{NAME}.password").write_text(PASSWORD + "\n")
    fixed = sugarctl(daemon.socket, "refresh", NAME)
    assert (0, "") == (fixed.returncode, fixed.stderr)
    assert 3 == fake.calls["password"]


def test_no_message_says_the_account_is_not_locked_once_sugar_said_it_is(
    short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A lockout after one failure: the retry meets Sugar's "Your account is locked"; the
    status, the retry's answer and the next refusal say it is locked, never that it is not."""
    with running_fake(users={USER: PASSWORD}, lockout_after=1) as fake:
        daemon = failed_with(fake, short_dir, start_daemon)
        retried = sugarctl(daemon.socket, "refresh", NAME, "--retry-rejected")
        assert 6 == retried.returncode
        assert [401, 401] == [r.status for r in fake.requests if r.grant_type == "password"]
        last = status(daemon)["last_error"]["message"]
        assert "Your account is locked" in last
        assert "Sugar says the account is locked" in last
        refused = sugarctl(daemon.socket, "refresh", NAME)
        assert 6 == refused.returncode
        for text in (retried.stderr, last, refused.stderr, daemon.log()):
            assert NOT_LOCKED not in text
