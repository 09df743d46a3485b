"""The token lifecycle against every case of section 7 of the SugarCRM reference.

Each test goes through a real Unix socket, and counts what reached the fake SugarCRM: the
promise of sugard is as much "never makes things worse upstream" as "always has a token".
Tests that need time to pass (outages, suspend, session lifetimes) run the daemon in-process
with a virtual wall clock shared with the fake, so minutes pass in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.daemon import (
    USER,
    DaemonProcess,
    fake_profile,
    instance,
    status,
    sugarctl,
    write_config,
)
from support.rig import NAME, get_json, token_calls, unix_aiohttp_session
from support.wait import wait_for

from sugard.testing import FakeSugar

# --------------------------------------------------------------- the real daemon process


@pytest.mark.slow
def test_wrong_password_makes_one_attempt_however_many_requests(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A rejected password is tried once, never again by itself: no lockout, however asked."""
    fake = start_fake(lockout_after=3)
    config = write_config(short_dir, {NAME: instance(fake, password="wrong-password")})
    daemon = start_daemon(config)
    wait_for(lambda: status(daemon, NAME)["state"] == "failed", what="state failed")

    for _ in range(20):
        result = sugarctl(daemon.socket, "token", NAME)
        assert 6 == result.returncode, result.stderr
        assert "" == result.stdout
    with daemon.client() as client:
        for _ in range(30):
            with pytest.raises(Exception, match="Not sent again"):
                client.token(NAME)

    time.sleep(0.5)  # several backoff_max (0.2 s) periods: a retry would show by now
    assert 1 == fake.calls["password"]
    current = status(daemon, NAME)
    assert "failed" == current["state"]
    assert "credentials" == current["last_error"]["kind"]
    assert "fix the password" in current["last_error"]["message"]
    assert "wrong-password" not in daemon.log()

    # An admin sets the password sugard has: sugard still never sends it by itself (see
    # test_rejected_secret for the override); the count stays far from the lockout.
    fake.set_password(USER, "wrong-password")
    refused = sugarctl(daemon.socket, "refresh", NAME)
    assert 6 == refused.returncode
    assert "--retry-rejected" in refused.stderr
    assert 1 == fake.calls["password"]


@pytest.mark.slow
def test_a_reload_retries_a_failed_instance_once(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """An admin registers the platform in Sugar, config unchanged: `sugarctl reload` tries
    again (no secret was rejected, so it may)."""
    fake = start_fake()
    fake.remove_platform("sugard")
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    wait_for(lambda: status(daemon, NAME)["state"] == "failed", what="state failed")
    time.sleep(0.5)
    assert 1 == fake.calls["password"]

    fake.add_platform("sugard")
    reloaded = sugarctl(daemon.socket, "reload")
    assert 0 == reloaded.returncode, reloaded.stderr
    wait_for(lambda: status(daemon, NAME)["state"] == "ready", what="state ready")
    assert 2 == fake.calls["password"]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_thousand_concurrent_requests_on_a_cold_instance_make_one_login(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Requests that arrive while the first login is in flight all wait for that one login."""
    fake = start_fake(delay=1.0)  # a slow Sugar: the whole crowd arrives during the login
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    assert "logging_in" == status(daemon, NAME)["state"]

    async def crowd() -> list[tuple[int, dict[str, Any]]]:
        async with unix_aiohttp_session(daemon.socket, 1000) as http:
            return await asyncio.gather(
                *(get_json(http, f"/v1/instances/{NAME}/token") for _ in range(1000))
            )

    answers = asyncio.run(crowd())
    assert [200] * 1000 == [code for code, _ in answers]
    tokens = {body["access_token"] for _, body in answers}
    assert 1 == len(tokens)
    assert fake.valid(tokens.pop())
    assert {"token": 1, "password": 1} == token_calls(fake)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["13.3", "12.0"])
def test_eviction_is_recovered_with_one_password_login_after_the_first_report(
    version: str,
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Another login of the same user and platform kills our refresh token: one login fixes it.
    On 12.0 the evicted token works on for a while: a report then is checked and answered
    with the same token, and the recovery comes once Sugar refuses it."""
    fake = start_fake(**fake_profile(version))
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    dead = sugarctl(daemon.socket, "token", NAME).stdout.strip()
    assert 1 == fake.evict(USER, "sugard")
    if version == "12.0":
        early = sugarctl(daemon.socket, "invalidate", NAME, dead)
        assert (0, dead) == (early.returncode, early.stdout.strip())
        assert fake.revoke(dead)  # the session check has come: the grace is over
        time.sleep(1.2)  # past the burst the early report's check answered (REPORT_GAP)
    fake.reset_counters()

    async def reports() -> list[tuple[int, dict[str, Any]]]:
        async with unix_aiohttp_session(daemon.socket, 100) as http:
            return await asyncio.gather(
                *(
                    get_json(
                        http,
                        f"/v1/instances/{NAME}/invalidate",
                        method="POST",
                        json={"access_token": dead},
                    )
                    for _ in range(100)
                )
            )

    answers = asyncio.run(reports())
    assert [200] * 100 == [code for code, _ in answers]
    fresh = {body["access_token"] for _, body in answers}
    assert 1 == len(fresh)
    new = fresh.pop()
    assert dead != new
    assert fake.valid(new)
    # One probe confirms the report; the refresh token died with the session: one refresh
    # refused, then one password login.
    assert {"token": 2, "refresh_token": 1, "password": 1} == token_calls(fake)
    assert 1 == fake.calls["ping"]
    assert [("refresh_token", "invalid_grant"), ("password", None)] == [
        (r.grant_type, r.error) for r in fake.requests
    ]

    # A script that reports the old token late gets the current one, with no upstream call.
    late = sugarctl(daemon.socket, "invalidate", NAME, dead)
    assert 0 == late.returncode, late.stderr
    assert new == late.stdout.strip()
    assert 2 == fake.calls["token"]


@pytest.mark.slow
def test_a_hundred_reports_of_one_dead_token_make_one_refresh(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """An access token that died early (its refresh token alive) costs one refresh, no login."""
    fake = start_fake()
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    dead = sugarctl(daemon.socket, "token", NAME).stdout.strip()
    assert fake.revoke(dead)
    fake.reset_counters()

    def report(_: int) -> subprocess.CompletedProcess[str]:
        return sugarctl(daemon.socket, "invalidate", NAME, input=dead + "\n")

    async def reports() -> list[subprocess.CompletedProcess[str]]:
        # Real sugarctl processes, 100 at once, the token on stdin as scripts pipe it.
        return await asyncio.gather(*(asyncio.to_thread(report, i) for i in range(100)))

    results = asyncio.run(reports())
    assert [0] * 100 == [r.returncode for r in results], results[0].stderr
    assert 1 == len({r.stdout for r in results})
    assert dead != results[0].stdout.strip()
    assert fake.valid(results[0].stdout.strip())
    assert {"token": 1, "refresh_token": 1} == token_calls(fake)
    assert 1 == fake.calls["ping"]  # one check of the report, however many scripts made it


def test_maintenance_burns_the_refresh_token_then_one_login_once_the_site_is_back(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Maintenance is not a bad password: long backoff, the old token served, then one login."""
    fake = start_fake()
    config = write_config(short_dir, {NAME: instance(fake, backoff_max=300)})
    daemon = start_daemon(config)
    before = sugarctl(daemon.socket, "token", NAME).stdout.strip()
    fake.maintenance = True
    fake.reset_counters()

    # The forced refresh meets maintenance: Sugar deletes the refresh token, then says 401.
    forced = sugarctl(daemon.socket, "refresh", NAME)
    assert 5 == forced.returncode, forced.stderr
    assert "maintenance" in forced.stderr
    current = status(daemon, NAME)
    assert "backing_off" == current["state"]
    assert "maintenance" == current["last_error"]["kind"]
    assert "backing_off" == status(daemon, NAME)["state"]
    next_try = float(daemon.log().rsplit("next try in ", 1)[1].split(" s", 1)[0])
    assert 60.0 <= next_try <= 66.0  # the long backoff, not 1 s
    # The newest Sugar ran the grant before refusing: the token sugard held died with it. One
    # ping says so, and sugard no longer serves it (on 12.0 it lives on and is served).
    assert not fake.valid(before)
    assert 5 == sugarctl(daemon.socket, "token", NAME, "--wait", "0.5").returncode
    assert {"token": 1, "refresh_token": 1} == token_calls(fake)
    assert 1 == fake.calls["ping"]

    fake.maintenance = False
    fake.reset_counters()
    back = sugarctl(daemon.socket, "refresh", NAME)  # an admin does not wait a minute
    assert 0 == back.returncode, back.stderr
    assert fake.valid(back.stdout.strip())
    assert {"token": 1, "password": 1} == token_calls(fake)  # the burned refresh token not sent
    assert "ready" == status(daemon, NAME)["state"]


@pytest.mark.slow
def test_maintenance_during_login_is_retried_not_reported_as_bad_password(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A 401 whose text is Sugar's maintenance message keeps retrying; the instance never fails."""
    fake = start_fake(maintenance=True)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    wait_for(lambda: fake.calls["password"] >= 3, what="three login attempts")
    # Between attempts the state is backing_off; the next attempt may be under way already.
    settled = wait_for(
        lambda: (state := status(daemon, NAME)["state"]) != "logging_in" and state,
        what="the attempt to end",
    )
    assert "backing_off" == settled
    waited = sugarctl(daemon.socket, "token", NAME, "--wait", "0.2")
    assert 5 == waited.returncode
    assert "maintenance" in waited.stderr
    fake.maintenance = False
    got = sugarctl(daemon.socket, "token", NAME, "--wait", "5")
    assert 0 == got.returncode, got.stderr
    assert fake.valid(got.stdout.strip())


@pytest.mark.parametrize("lock", ["seats", "expired"])
def test_license_lock_backs_off_long_and_recovers(
    lock: str,
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A license lock is an admin's problem that passes: patient backoff, never `failed`."""
    fake = start_fake(license_error=lock)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake, backoff_max=300)}))
    wait_for(lambda: status(daemon, NAME)["state"] == "backing_off", what="backing_off")
    current = status(daemon, NAME)
    assert "license" == current["last_error"]["kind"]
    assert "administrator" in current["last_error"]["message"]
    assert 1 == fake.calls["password"]
    fake.license_error = None
    back = sugarctl(daemon.socket, "refresh", NAME)
    assert 0 == back.returncode, back.stderr
    assert 2 == fake.calls["password"]


@pytest.mark.slow
def test_unregistered_platform_fails_with_how_to_register_it(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A platform removed from Sugar's registry is a configuration error, said so, not retried."""
    fake = start_fake()
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    # The first login is done (the daemon answers before it is): the forced refresh below
    # is the first thing to meet the missing platform.
    wait_for(lambda: status(daemon, NAME)["state"] == "ready", what="the first login")
    fake.remove_platform("sugard")
    fake.reset_counters()

    forced = sugarctl(daemon.socket, "refresh", NAME)
    assert 6 == forced.returncode
    assert "Admin > Configure API Platforms" in forced.stderr
    assert 1 == len(forced.stderr.strip().splitlines())
    time.sleep(0.5)
    assert {"token": 1, "refresh_token": 1} == token_calls(fake)
    assert "failed" == status(daemon, NAME)["state"]

    fake.add_platform("sugard")
    again = sugarctl(daemon.socket, "refresh", NAME)
    assert 0 == again.returncode, again.stderr
    assert "ready" == status(daemon, NAME)["state"]


@pytest.mark.slow
def test_unknown_client_fails_without_retrying(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """400 invalid_client names the OAuth key to check; one attempt only."""
    fake = start_fake()
    config = write_config(short_dir, {NAME: instance(fake, client_id="no-such-key")})
    daemon = start_daemon(config)
    wait_for(lambda: status(daemon, NAME)["state"] == "failed", what="state failed")
    result = sugarctl(daemon.socket, "token", NAME)
    assert 6 == result.returncode
    assert "Admin > OAuth Keys" in result.stderr
    time.sleep(0.5)
    assert 1 == fake.calls["token"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["html502", "503", "429", "reset", "garbage"])
def test_transient_answers_are_retried_until_a_token_comes(
    kind: str,
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A proxy's HTML 502, a 503, a 429, a dropped connection or junk: retried, then served."""
    fake = start_fake()
    fake.fail_next(2, kind)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    got = sugarctl(daemon.socket, "token", NAME, "--wait", "10")
    assert 0 == got.returncode, got.stderr
    assert fake.valid(got.stdout.strip())
    assert [kind, kind, None] == [r.fault for r in fake.requests]
    current = status(daemon, NAME)
    # `logins` counts login attempts: what the login endpoint saw from sugard.
    assert (2, 3, "ready") == (current["failures"], current["logins"], current["state"])


@pytest.mark.slow
def test_retry_after_is_honoured(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A 429 with Retry-After: 2 is not asked again before 2 s, though the backoff says 1 s."""
    fake = start_fake()
    fake.fail_next(1, "429", retry_after=2)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake, backoff_max=10)}))
    got = sugarctl(daemon.socket, "token", NAME, "--wait", "10")
    assert 0 == got.returncode, got.stderr
    first, second = fake.requests
    assert 2.0 <= second.time - first.time < 4.0


def test_every_upstream_call_names_the_platform(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Logins and refreshes all send platform and client_id, so the session never lands on base."""
    fake = start_fake()
    fake.add_platform("scripts")
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake, platform="scripts")}))
    for _ in range(3):
        assert 0 == sugarctl(daemon.socket, "refresh", NAME).returncode
    fake.evict(USER, "scripts")
    assert 0 == sugarctl(daemon.socket, "refresh", NAME).returncode
    sent = [(r.grant_type, r.platform, r.client_id) for r in fake.requests]
    assert 6 == len(sent)
    assert {("scripts", "sugar")} == {(platform, client) for _, platform, client in sent}


@pytest.mark.slow
def test_min_ttl_forces_a_renewal_that_leaves_enough_time(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A script about to run long asks for min_ttl; sugard renews first if the token is short."""
    fake = start_fake(access_lifetime=10)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake, refresh_before=1)}))
    first = sugarctl(daemon.socket, "token", NAME)
    time.sleep(1.5)
    same = sugarctl(daemon.socket, "token", NAME, "--min-ttl", "5")
    assert first.stdout == same.stdout  # 8.5 s left is enough: no upstream call
    assert 1 == fake.calls["token"]
    # 9 s is what a fresh 10 s token can promise (90 %): more is capped there, not refused.
    longer = sugarctl(daemon.socket, "token", NAME, "--min-ttl", "9", "--format", "json")
    assert 0 == longer.returncode, longer.stderr
    assert 9 <= json.loads(longer.stdout)["expires_in"]
    assert {"token": 2, "password": 1, "refresh_token": 1} == token_calls(fake)


@pytest.mark.slow
def test_refresh_ahead_happens_in_the_background_before_expiry(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """With 3 s tokens, scripts asking all the time never wait and never get an expired token."""
    fake = start_fake(access_lifetime=3)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    seen: list[tuple[float, str, float]] = []
    slowest = 0.0
    with daemon.client() as client:
        end = time.monotonic() + 4.5
        while time.monotonic() < end:
            asked = time.monotonic()
            answer = client.token(NAME)
            slowest = max(slowest, time.monotonic() - asked)
            seen.append((time.time(), answer["access_token"], answer["expires_in"]))
            time.sleep(0.01)
    tokens = list(dict.fromkeys(token for _, token, _ in seen))
    assert len(tokens) >= 2  # refreshed at least once, ahead of expiry
    assert all(expires_in >= 0 for _, _, expires_in in seen)
    refreshes = [r for r in fake.requests if r.grant_type == "refresh_token"]
    assert 1 <= len(refreshes) <= 3  # the schedule's refreshes, no more
    assert 1 == fake.calls["password"]
    assert slowest < 0.5  # no script waited for a refresh


def test_restart_after_a_crash_logs_in_with_the_password(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A daemon killed after a rotation has no refresh token: one password login, no refresh."""
    fake = start_fake()
    config = write_config(short_dir, {NAME: instance(fake)})
    daemon = start_daemon(config)
    assert 0 == sugarctl(daemon.socket, "refresh", NAME).returncode
    daemon.proc.kill()
    daemon.stop()
    fake.reset_counters()
    again = start_daemon(config)
    got = sugarctl(again.socket, "token", NAME)
    assert 0 == got.returncode, got.stderr
    assert fake.valid(got.stdout.strip())
    assert {"token": 1, "password": 1} == token_calls(fake)


def test_a_report_of_a_token_that_still_works_keeps_the_session(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A script's 401 had another cause (a Bearer header, a wrong route): the probe finds the
    token alive, so sugarctl invalidate answers with the same token and nobody loses it."""
    fake = start_fake()
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    alive = sugarctl(daemon.socket, "token", NAME).stdout.strip()
    fake.reset_counters()
    results = [sugarctl(daemon.socket, "invalidate", NAME, alive) for _ in range(3)]
    assert [(0, alive)] * 3 == [(r.returncode, r.stdout.strip()) for r in results]
    assert fake.valid(alive)
    assert {} == token_calls(fake)
    # One check: reports that keep coming less than 1 s apart get its answer (REPORT_GAP).
    assert 1 == fake.calls["ping"]


@pytest.mark.slow
def test_a_past_error_is_kept_but_not_shown_as_current(
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """After two 503s and a recovery, status keeps the last error, marked as past; while
    sugard backs off, the error is current."""
    fake = start_fake()
    fake.fail_next(2, "503")
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake, backoff_max=300)}))
    assert 0 == sugarctl(daemon.socket, "token", NAME, "--wait", "10").returncode
    shown = json.loads(sugarctl(daemon.socket, "status", NAME, "--json").stdout)
    assert "ready" == shown["state"]
    assert ("server_error", False) == (shown["last_error"]["kind"], shown["last_error"]["current"])

    fake.fail_next(1, "503")
    assert 5 == sugarctl(daemon.socket, "refresh", NAME).returncode
    shown = json.loads(sugarctl(daemon.socket, "status", NAME, "--json").stdout)
    assert "backing_off" == shown["state"]
    assert shown["last_error"]["current"]
