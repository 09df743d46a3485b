"""A password or client secret that Sugar rejected is never sent again, by anything: not by
`sugarctl refresh`, not by a reload, not by a new session for another platform; only once it
changed, or when a person insists (`retry_rejected`). And a reload whose only change to an
instance is its secret keeps the live session: the new secret waits for the next login."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import PASSWORD, USER, DaemonProcess, instance, status, sugarctl, write_config
from support.http import curl_json
from support.wait import wait_for

from sugard.client import SugardClient
from sugard.testing import FakeSugar, running_fake

NAME = "prod"


@pytest.fixture
def locking_fake() -> Iterator[FakeSugar]:
    """A fake Sugar that locks alice after three failed password logins."""
    with running_fake(users={USER: PASSWORD}, lockout_after=3) as server:
        yield server


def set_password(directory: Path, password: str) -> None:
    """Change the password in prod's password file (as `write_config` wrote it)."""
    (directory / f"{NAME}.password").write_text(password + "\n")


def refresh_by_curl(daemon: DaemonProcess, body: str) -> tuple[int, dict[str, Any]]:
    """`POST /v1/instances/prod/refresh` with `body`, through curl on the daemon's socket."""
    return curl_json(
        daemon.socket,
        f"/v1/instances/{NAME}/refresh",
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data",
        body,
    )


def failed_with_wrong_password(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> DaemonProcess:
    """A daemon whose one login Sugar rejected (the file holds a wrong password)."""
    daemon: DaemonProcess = start_daemon(
        write_config(short_dir, {NAME: instance(fake, password="wrong-password")})
    )
    wait_for(lambda: status(daemon)["state"] == "failed")
    assert 1 == fake.calls["password"]
    return daemon


def test_refresh_never_resends_a_rejected_password_and_tries_a_changed_one_once(
    locking_fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """`sugarctl refresh` after a rejection re-reads the password file: unchanged, it refuses
    (exit 6, saying what to do) without a login; changed, it makes exactly one login."""
    fake = locking_fake
    daemon = failed_with_wrong_password(fake, short_dir, start_daemon)
    first = status(daemon)["last_error"]["message"]
    assert "sugarctl refresh prod --retry-rejected" in first
    assert "run `sugarctl reload`" not in first

    for _ in range(5):
        refused = sugarctl(daemon.socket, "refresh", NAME)
        assert (6, "") == (refused.returncode, refused.stdout)
        assert refused.stderr.startswith(
            "sugarctl: Sugar rejected the password of 'prod' and it has not changed since "
            f"(file: {short_dir / 'prod.password'}): not sending it again"
        )
        assert "`sugarctl refresh prod --retry-rejected` (may count as a failed login)" in (
            refused.stderr
        )
    assert 1 == fake.calls["password"]  # below the lockout of three: the account still works

    set_password(short_dir, PASSWORD)
    fixed = sugarctl(daemon.socket, "refresh", NAME)
    assert (0, "") == (fixed.returncode, fixed.stderr)
    assert fake.valid(fixed.stdout.strip())
    assert 2 == fake.calls["password"]
    assert "ready" == status(daemon)["state"]
    assert "wrong-password" not in daemon.log()


@pytest.mark.slow
def test_retry_rejected_sends_the_same_password_once_after_an_unlock(
    short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """An admin changed the password back and unlocked the account: the file is unchanged, so
    only `{"retry_rejected": true}` sends it again, once; a bad body is a 400."""
    with running_fake(users={USER: "old-password"}, lockout_after=1) as fake:
        daemon = failed_with_wrong_password(fake, short_dir, start_daemon)
        fake.set_password(USER, "wrong-password")  # the password the file holds...
        fake.unlock(USER)  # ...and the lock the first try caused is gone

        assert 6 == sugarctl(daemon.socket, "refresh", NAME).returncode
        assert (400, "bad_request") == (
            refresh_by_curl(daemon, '{"retry_rejected": "yes"}')[0],
            refresh_by_curl(daemon, '{"retry_rejected": "yes"}')[1]["error"],
        )
        assert 1 == fake.calls["password"]

        code, token = refresh_by_curl(daemon, '{"retry_rejected": true}')
        assert 200 == code, token
        assert fake.valid(token["access_token"])
        assert 2 == fake.calls["password"]
        assert "sending the rejected password again, as asked" in daemon.log()


@pytest.mark.slow
def test_reload_never_resends_a_rejected_password(
    locking_fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """`sugarctl reload` and SIGHUP with the rejected password unchanged make no login and say
    why (reload exits 6), even when the platform changed (a new session); a fixed password
    file makes one login at the next reload."""
    fake = locking_fake
    daemon = failed_with_wrong_password(fake, short_dir, start_daemon)

    reloaded = sugarctl(daemon.socket, "reload")
    assert 6 == reloaded.returncode
    assert "no changes (1 unchanged)\n" == reloaded.stdout
    assert reloaded.stderr.startswith(
        "sugarctl: Sugar rejected the password of 'prod' and it has not changed since"
    )

    write_config(short_dir, {NAME: instance(fake, password="wrong-password", platform="mobile")})
    with SugardClient(daemon.socket) as client:
        answer = client.reload()
    assert ["prod"] == answer["changed"]
    assert ["prod"] == list(answer["needs_attention"])
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: daemon.log().count("reloaded:") == 3)
    time.sleep(0.5)  # several backoff_max periods: a login would have been made by now
    assert 1 == fake.calls["password"]
    assert "failed" == status(daemon)["state"]

    set_password(short_dir, PASSWORD)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: status(daemon)["state"] == "ready")
    assert 2 == fake.calls["password"]
    assert [(401, "sugard"), (200, "mobile")] == [
        (r.status, r.platform) for r in fake.requests if r.grant_type == "password"
    ]


@pytest.mark.slow
def test_a_rejected_client_secret_is_not_sent_again(
    short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """invalid_client: the client secret is the rejected one; refresh refuses until it
    changes, then tries once."""
    with running_fake(users={USER: PASSWORD}, clients={"etl": "good-secret"}) as fake:
        secret = short_dir / "etl.secret"
        secret.write_text("bad-secret\n")
        secret.chmod(0o600)
        table = instance(fake, client_id="etl", client_secret_file=str(secret))
        daemon = start_daemon(write_config(short_dir, {NAME: table}))
        wait_for(lambda: status(daemon)["state"] == "failed")
        assert "client" == status(daemon)["last_error"]["kind"]

        refused = sugarctl(daemon.socket, "refresh", NAME)
        assert 6 == refused.returncode
        assert "Sugar rejected the client secret of 'prod'" in refused.stderr
        assert 1 == fake.calls["token"]

        secret.write_text("good-secret\n")
        fixed = sugarctl(daemon.socket, "refresh", NAME)
        assert 0 == fixed.returncode, fixed.stderr
        assert 2 == fake.calls["token"]


def test_a_reload_that_only_changes_the_password_keeps_the_session(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A rotated password (or a typo) in the file: the reload keeps the live token with no
    upstream call; the next password login sends the new password."""
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    with daemon.client() as client:
        before = client.token(NAME, wait=20)["access_token"]
    fake.reset_counters()

    fake.set_password(USER, "rotated-pw")  # the admin rotates it in Sugar, then in the file
    set_password(short_dir, "rotated-pw")
    reloaded = sugarctl(daemon.socket, "reload")
    assert (0, "changed: prod (0 unchanged)\n") == (reloaded.returncode, reloaded.stdout)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: daemon.log().count("reloaded:") == 2)
    with daemon.client() as client:
        assert before == client.token(NAME)["access_token"]
    assert 0 == fake.calls["token"]
    assert "prod: new password; the session stays, the next password login uses it" in daemon.log()

    # Another login takes the session away: the way back is a password login, with the new one.
    fake.evict(USER, "sugard")
    with daemon.client() as client:
        after = client.invalidate(NAME, before)["access_token"]
    assert fake.valid(after)
    assert [("refresh_token", 400), ("password", 200)] == [
        (r.grant_type, r.status) for r in fake.requests
    ]  # and it succeeded: Sugar knows only the rotated password now

    # A typo at the next edit: the working session stays, the instance stays ready.
    set_password(short_dir, "rotated-pw-typo")
    assert 0 == sugarctl(daemon.socket, "reload").returncode
    with daemon.client() as client:
        assert after == client.token(NAME)["access_token"]
    assert ("ready", 2) == (status(daemon)["state"], len(fake.requests))
