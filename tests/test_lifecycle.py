"""The token lifecycle against every case of section 7 of the SugarCRM reference.

Each test goes through a real Unix socket, and counts what reached the fake SugarCRM: the
promise of sugard is as much "never makes things worse upstream" as "always has a token".
Tests that need time to pass (outages, suspend, session lifetimes) run the daemon in-process
with a virtual wall clock shared with the fake, so minutes pass in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    PASSWORD,
    USER,
    DaemonProcess,
    fake_profile,
    instance,
    sugarctl,
    wait_for,
    write_config,
)

from sugard.config import load_config
from sugard.daemon import Daemon
from sugard.keeper import MAX_SLEEP
from sugard.testing import FakeSugar, running_fake

NAME = "crm"


@pytest.fixture
def sugar() -> Iterator[Callable[..., FakeSugar]]:
    """Start fake SugarCRMs with chosen switches (alice's password is PASSWORD)."""
    with contextlib.ExitStack() as stack:

        def start(**switches: Any) -> FakeSugar:
            switches.setdefault("users", {USER: PASSWORD})
            return stack.enter_context(running_fake(**switches))

        yield start


def status(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.client() as client:
        result: dict[str, Any] = client.status(NAME)
        return result


def token_calls(fake: FakeSugar) -> dict[str, int]:
    """What reached Sugar's token endpoint (the version read and the probes are pinned apart)."""
    return {k: v for k, v in fake.calls.items() if k in ("token", "password", "refresh_token")}


async def get_json(
    http: aiohttp.ClientSession, path: str, method: str = "GET", **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, "http://sugard" + path, **kwargs) as response:
        return response.status, await response.json()


def unix_session(socket: Path, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket), limit=connections),
        timeout=aiohttp.ClientTimeout(total=30),
    )


# --------------------------------------------------------------- the real daemon process


def test_wrong_password_makes_one_attempt_however_many_requests(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A rejected password is tried once, never again by itself: no lockout, however asked."""
    fake = sugar(lockout_after=3)
    config = write_config(short_dir, {NAME: instance(fake, password="wrong-password")})
    daemon = start_daemon(config)
    wait_for(lambda: status(daemon)["state"] == "failed", what="state failed")

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
    current = status(daemon)
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


def test_a_reload_retries_a_failed_instance_once(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """An admin registers the platform in Sugar, config unchanged: `sugarctl reload` tries
    again (no secret was rejected, so it may)."""
    fake = sugar()
    fake.remove_platform("sugard")
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    wait_for(lambda: status(daemon)["state"] == "failed", what="state failed")
    time.sleep(0.5)
    assert 1 == fake.calls["password"]

    fake.add_platform("sugard")
    reloaded = sugarctl(daemon.socket, "reload")
    assert 0 == reloaded.returncode, reloaded.stderr
    wait_for(lambda: status(daemon)["state"] == "ready", what="state ready")
    assert 2 == fake.calls["password"]


@pytest.mark.timeout(120)
def test_a_thousand_concurrent_requests_on_a_cold_instance_make_one_login(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Requests that arrive while the first login is in flight all wait for that one login."""
    fake = sugar(delay=1.0)  # a slow Sugar: the whole crowd arrives during the login
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    assert "logging_in" == status(daemon)["state"]

    async def crowd() -> list[tuple[int, dict[str, Any]]]:
        async with unix_session(daemon.socket, 1000) as http:
            return await asyncio.gather(
                *(get_json(http, f"/v1/instances/{NAME}/token") for _ in range(1000))
            )

    answers = asyncio.run(crowd())
    assert [200] * 1000 == [code for code, _ in answers]
    tokens = {body["access_token"] for _, body in answers}
    assert 1 == len(tokens)
    assert fake.valid(tokens.pop())
    assert {"token": 1, "password": 1} == token_calls(fake)


@pytest.mark.parametrize("version", ["13.3", "12.0"])
def test_eviction_is_recovered_with_one_password_login_after_the_first_report(
    version: str,
    sugar: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """Another login of the same user and platform kills our refresh token: one login fixes it.
    On 12.0 the evicted token works on for a while: a report then is checked and answered
    with the same token, and the recovery comes once Sugar refuses it."""
    fake = sugar(**fake_profile(version))
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
        async with unix_session(daemon.socket, 100) as http:
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


def test_a_hundred_reports_of_one_dead_token_make_one_refresh(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """An access token that died early (its refresh token alive) costs one refresh, no login."""
    fake = sugar()
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
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Maintenance is not a bad password: long backoff, the old token served, then one login."""
    fake = sugar()
    config = write_config(short_dir, {NAME: instance(fake, backoff_max=300)})
    daemon = start_daemon(config)
    before = sugarctl(daemon.socket, "token", NAME).stdout.strip()
    fake.maintenance = True
    fake.reset_counters()

    # The forced refresh meets maintenance: Sugar deletes the refresh token, then says 401.
    forced = sugarctl(daemon.socket, "refresh", NAME)
    assert 5 == forced.returncode, forced.stderr
    assert "maintenance" in forced.stderr
    current = status(daemon)
    assert "backing_off" == current["state"]
    assert "maintenance" == current["last_error"]["kind"]
    assert "backing_off" == status(daemon)["state"]
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
    assert "ready" == status(daemon)["state"]


def test_maintenance_during_login_is_retried_not_reported_as_bad_password(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A 401 whose text is Sugar's maintenance message keeps retrying; the instance never fails."""
    fake = sugar(maintenance=True)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    wait_for(lambda: fake.calls["password"] >= 3, what="three login attempts")
    # Between attempts the state is backing_off; the next attempt may be under way already.
    settled = wait_for(
        lambda: (state := status(daemon)["state"]) != "logging_in" and state,
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
    sugar: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A license lock is an admin's problem that passes: patient backoff, never `failed`."""
    fake = sugar(license_error=lock)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake, backoff_max=300)}))
    wait_for(lambda: status(daemon)["state"] == "backing_off", what="backing_off")
    current = status(daemon)
    assert "license" == current["last_error"]["kind"]
    assert "administrator" in current["last_error"]["message"]
    assert 1 == fake.calls["password"]
    fake.license_error = None
    back = sugarctl(daemon.socket, "refresh", NAME)
    assert 0 == back.returncode, back.stderr
    assert 2 == fake.calls["password"]


def test_unregistered_platform_fails_with_how_to_register_it(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A platform removed from Sugar's registry is a configuration error, said so, not retried."""
    fake = sugar()
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    # The first login is done (the daemon answers before it is): the forced refresh below
    # is the first thing to meet the missing platform.
    wait_for(lambda: status(daemon)["state"] == "ready", what="the first login")
    fake.remove_platform("sugard")
    fake.reset_counters()

    forced = sugarctl(daemon.socket, "refresh", NAME)
    assert 6 == forced.returncode
    assert "Admin > Configure API Platforms" in forced.stderr
    assert 1 == len(forced.stderr.strip().splitlines())
    time.sleep(0.5)
    assert {"token": 1, "refresh_token": 1} == token_calls(fake)
    assert "failed" == status(daemon)["state"]

    fake.add_platform("sugard")
    again = sugarctl(daemon.socket, "refresh", NAME)
    assert 0 == again.returncode, again.stderr
    assert "ready" == status(daemon)["state"]


def test_unknown_client_fails_without_retrying(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """400 invalid_client names the OAuth key to check; one attempt only."""
    fake = sugar()
    config = write_config(short_dir, {NAME: instance(fake, client_id="no-such-key")})
    daemon = start_daemon(config)
    wait_for(lambda: status(daemon)["state"] == "failed", what="state failed")
    result = sugarctl(daemon.socket, "token", NAME)
    assert 6 == result.returncode
    assert "Admin > OAuth Keys" in result.stderr
    time.sleep(0.5)
    assert 1 == fake.calls["token"]


@pytest.mark.parametrize("kind", ["html502", "503", "429", "reset", "garbage"])
def test_transient_answers_are_retried_until_a_token_comes(
    kind: str,
    sugar: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """A proxy's HTML 502, a 503, a 429, a dropped connection or junk: retried, then served."""
    fake = sugar()
    fake.fail_next(2, kind)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    got = sugarctl(daemon.socket, "token", NAME, "--wait", "10")
    assert 0 == got.returncode, got.stderr
    assert fake.valid(got.stdout.strip())
    assert [kind, kind, None] == [r.fault for r in fake.requests]
    current = status(daemon)
    # `logins` counts login attempts: what the login endpoint saw from sugard.
    assert (2, 3, "ready") == (current["failures"], current["logins"], current["state"])


def test_retry_after_is_honoured(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A 429 with Retry-After: 2 is not asked again before 2 s, though the backoff says 1 s."""
    fake = sugar()
    fake.fail_next(1, "429", retry_after=2)
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake, backoff_max=10)}))
    got = sugarctl(daemon.socket, "token", NAME, "--wait", "10")
    assert 0 == got.returncode, got.stderr
    first, second = fake.requests
    assert 2.0 <= second.time - first.time < 4.0


def test_every_upstream_call_names_the_platform(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Logins and refreshes all send platform and client_id, so the session never lands on base."""
    fake = sugar()
    fake.add_platform("scripts")
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake, platform="scripts")}))
    for _ in range(3):
        assert 0 == sugarctl(daemon.socket, "refresh", NAME).returncode
    fake.evict(USER, "scripts")
    assert 0 == sugarctl(daemon.socket, "refresh", NAME).returncode
    sent = [(r.grant_type, r.platform, r.client_id) for r in fake.requests]
    assert 6 == len(sent)
    assert {("scripts", "sugar")} == {(platform, client) for _, platform, client in sent}


def test_min_ttl_forces_a_renewal_that_leaves_enough_time(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A script about to run long asks for min_ttl; sugard renews first if the token is short."""
    fake = sugar(access_lifetime=10)
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


def test_refresh_ahead_happens_in_the_background_before_expiry(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """With 3 s tokens, scripts asking all the time never wait and never get an expired token."""
    fake = sugar(access_lifetime=3)
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
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A daemon killed after a rotation has no refresh token: one password login, no refresh."""
    fake = sugar()
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


# --------------------------------------------------------------- in-process, virtual time


class VirtualClock:
    """A wall clock for the fake and the daemon: runs `speed` times real time and can jump."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self._start = time.time()
        self._offset = 0.0

    def __call__(self) -> float:
        return self._start + (time.time() - self._start) * self.speed + self._offset

    def jump(self, seconds: float) -> None:
        """As after a suspend: the wall clock moves on, asyncio's monotonic clock did not."""
        self._offset += seconds

    async def sleep(self, virtual_seconds: float) -> None:
        await asyncio.sleep(virtual_seconds / self.speed)


@dataclass
class Rig:
    fake: FakeSugar
    daemon: Daemon
    clock: VirtualClock
    http: aiohttp.ClientSession

    @property
    def keeper(self) -> Any:
        return self.daemon.keepers[NAME]

    async def token(self, **query: float) -> tuple[int, dict[str, Any]]:
        params = {key: str(value) for key, value in query.items()}
        return await get_json(self.http, f"/v1/instances/{NAME}/token", params=params)


@contextlib.asynccontextmanager
async def rig(
    directory: Path,
    *,
    speed: float = 1.0,
    max_sleep: float = 0.02,
    rng: Callable[[], float] = lambda: 0.5,
    sugar: dict[str, Any] | None = None,
    watch: Any = None,
    **settings: Any,
) -> AsyncIterator[Rig]:
    clock = VirtualClock(speed)
    fake = FakeSugar(users={USER: PASSWORD}, clock=clock, **(sugar or {}))
    if watch is not None:
        fake.app.middlewares.append(watch)  # sees every request the fake gets
    await fake.start()
    daemon: Daemon | None = None
    try:
        table = instance(fake, **settings)
        config = load_config(write_config(directory, {NAME: table}))
        daemon = Daemon(config, directory / "s.sock", clock=clock, max_sleep=max_sleep, rng=rng)
        await daemon.start()
        async with unix_session(directory / "s.sock", 64) as http:
            yield Rig(fake, daemon, clock, http)
    finally:
        if daemon is not None:
            await daemon.stop()
        await fake.close()


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def test_no_sleep_is_longer_than_thirty_seconds() -> None:
    """The cap that makes a resumed laptop refresh within 30 s is the daemon's default."""
    assert 30.0 == MAX_SLEEP
    assert MAX_SLEEP == Daemon.__init__.__kwdefaults__["max_sleep"]


def backoff_schedule(attempts: int, cap: float, jitter: float) -> list[float]:
    """The waits after each failed attempt, as the docs promise: full jitter, 1 s to `cap`."""
    return [max(1.0, min(cap, 2.0**n) * jitter) for n in range(attempts)]


async def test_a_sixty_second_outage_serves_the_valid_token_and_keeps_to_the_schedule(
    short_dir: Path,
) -> None:
    """503s and dropped connections for 60 s: scripts get the current token at once, sugard's
    attempts are spaced by its backoff, and the refresh goes through when Sugar is back."""
    async with rig(short_dir, speed=40.0, backoff_max=300, refresh_before=300) as r:
        status, first = await r.token()
        assert 200 == status
        for _ in range(100):
            r.fake.fail_next(1, "503")
            r.fake.fail_next(1, "reset")
        r.fake.reset_counters()
        assert r.keeper.refresh_at is not None
        r.clock.jump(r.keeper.refresh_at - r.clock())  # straight to the advisory window
        outage_start = r.clock()

        served: list[tuple[str, float]] = []
        while r.clock() < outage_start + 60:
            status, body = await r.token(wait=0)
            assert 200 == status, body
            served.append((body["access_token"], body["expires_in"]))
            await asyncio.sleep(0.01)
        attempts = [q for q in r.fake.requests if q.time < outage_start + 60]
        r.fake.clear_faults()

        assert {first["access_token"]} == {token for token, _ in served}
        assert min(expires_in for _, expires_in in served) > 200
        # rng 0.5: waits 1, 1, 2, 4, 8, 16, 32 s, so attempts at 0, 1, 2, 4, 8, 16, 32.
        waits = backoff_schedule(len(attempts), 300, 0.5)
        gaps = [b.time - a.time for a, b in itertools.pairwise(attempts)]
        assert all(gap >= wait for gap, wait in zip(gaps, waits, strict=False)), (gaps, waits)
        assert 5 <= len(attempts) <= 7, [a.time - outage_start for a in attempts]
        assert {"refresh_token"} == {a.grant_type for a in attempts}
        assert {"503", "reset"} == {a.fault for a in attempts}

        # Sugar is back: the next attempt in the schedule refreshes, the refresh token intact.
        await until(lambda: r.keeper.state.value == "ready" and r.keeper.refreshes > 0)
        status, after = await r.token()
        assert first["access_token"] != after["access_token"]
        assert 0 == r.fake.calls["password"]


async def test_a_suspend_past_expiry_gets_a_fresh_token_within_the_sleep_cap(
    short_dir: Path,
) -> None:
    """After a jump of the wall clock past expiry, no script gets the dead token, and sugard
    renews by itself within one sleep cap (30 s in production, 0.2 s here)."""
    async with rig(short_dir, max_sleep=0.2, sugar={"access_lifetime": 3600}) as r:
        _, before = await r.token()
        r.fake.reset_counters()
        r.clock.jump(2 * 3600)  # the lid was closed for two hours
        resumed = time.monotonic()
        await until(lambda: r.fake.calls["token"] >= 1, timeout=5)
        assert time.monotonic() - resumed < 0.2 + 0.8  # the cap, plus room for a busy machine
        status, after = await r.token()
        assert 200 == status
        assert before["access_token"] != after["access_token"]
        assert r.fake.valid(after["access_token"])
        assert after["expires_in"] > 3000
        assert {"token": 1, "refresh_token": 1} == token_calls(r.fake)


async def test_a_request_right_after_resume_waits_for_the_fresh_token(short_dir: Path) -> None:
    """Expiry is checked when a token is served: the dead token is never handed out."""
    async with rig(short_dir, max_sleep=30.0) as r:  # the supervisor sleeps through the jump
        _, before = await r.token()
        r.clock.jump(2 * 3600)
        status, after = await r.token(wait=5)
        assert 200 == status
        assert before["access_token"] != after["access_token"]
        assert r.fake.valid(after["access_token"])


async def test_downtime_longer_than_the_refresh_lifetime_ends_with_a_password_login(
    short_dir: Path,
) -> None:
    """Once the refresh token has expired, sugard logs in instead of sending a dead refresh."""
    lifetimes = {"access_lifetime": 300, "refresh_lifetime": 600}
    async with rig(short_dir, sugar=lifetimes) as r:
        _, _before = await r.token()
        r.fake.reset_counters()
        r.clock.jump(1000)
        status, after = await r.token(wait=5)
        assert 200 == status
        assert r.fake.valid(after["access_token"])
        assert {"token": 1, "password": 1} == token_calls(r.fake)


async def test_a_shrinking_session_is_renewed_by_login_without_a_storm(short_dir: Path) -> None:
    """Under max_session_lifetime each refresh leaves less session; sugard refreshes on its
    schedule and logs in once the session ends, never refreshing in a loop."""
    fake_settings = {"access_lifetime": 600, "max_session_lifetime": 1500}
    async with rig(short_dir, speed=1000.0, sugar=fake_settings, refresh_before=300) as r:
        _, _before = await r.token()
        await r.clock.sleep(3000)  # two session lifetimes
        grants = [q.grant_type for q in r.fake.requests]
        assert 2 <= grants.count("password") <= 3
        assert 5 <= grants.count("refresh_token") <= 10
        assert [] == [q.error for q in r.fake.requests if q.error]
        status, after = await r.token()
        assert 200 == status
        assert r.fake.valid(after["access_token"])


async def test_idm_epoch_refresh_expiry_is_read_as_a_time_not_a_duration(short_dir: Path) -> None:
    """IdM answers refresh_expires_in as an epoch: refreshes keep working, no needless logins."""
    async with rig(short_dir, speed=1000.0, sugar={"idm_mode": True, "access_lifetime": 600}) as r:
        await r.token()
        await r.clock.sleep(2400)  # four access lifetimes: a refresh every ~290 s
        grants = [q.grant_type for q in r.fake.requests]
        assert 1 == grants.count("password")
        assert 6 <= grants.count("refresh_token") <= 9
        assert [] == [q.error for q in r.fake.requests if q.error]


@contextlib.asynccontextmanager
async def daemon_on_stub(
    directory: Path, grant: Callable[[web.Request], Any], **table: Any
) -> AsyncIterator[aiohttp.ClientSession]:
    """An in-process daemon whose one instance talks to `grant`, a stand-in for Sugar's token
    endpoint (for answers the fake does not give); yields a session on the daemon's socket."""
    app = web.Application()
    app.router.add_post("/rest/v10/oauth2/token", grant)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        settings = {"url": url, "username": USER, "password": PASSWORD, **table}
        daemon = Daemon(
            load_config(write_config(directory, {NAME: settings})), directory / "s.sock"
        )
        await daemon.start()
        try:
            async with unix_session(directory / "s.sock", 4) as http:
                yield http
        finally:
            await daemon.stop()
    finally:
        await runner.cleanup()


async def test_sugar_text_that_echoes_our_secrets_is_redacted(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy or plugin that echoes the request in its error text cannot leak the password."""
    client_secret = "client-secret-value"

    async def echo(request: web.Request) -> web.Response:
        body = await request.json()
        text = f"bad login {body['password']} with {body['client_secret']}"
        return web.json_response({"error": "need_login", "error_message": text}, status=401)

    async with daemon_on_stub(short_dir, echo, client_secret=client_secret) as http:
        code, body = await get_json(http, f"/v1/instances/{NAME}/token")
        _, shown = await get_json(http, f"/v1/instances/{NAME}")
    assert 502 == code
    said = json.dumps([body, shown]) + caplog.text
    assert "bad login [redacted] with [redacted]" in said
    assert PASSWORD not in said
    assert client_secret not in said


async def test_a_secret_echoed_where_the_text_is_cut_leaves_no_part_of_it(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Sugar's text is cut to one short line; a password echoed across the cut is redacted
    whole first, not cut into a head that no longer matches."""
    password = "p4ssw0rd-that-is-long-enough"

    async def echo(request: web.Request) -> web.Response:
        text = "x" * 190 + " " + (await request.json())["password"]
        return web.json_response({"error": "need_login", "error_message": text}, status=401)

    async with daemon_on_stub(short_dir, echo, password=password) as http:
        code, body = await get_json(http, f"/v1/instances/{NAME}/token")
        _, shown = await get_json(http, f"/v1/instances/{NAME}")
    assert 502 == code
    said = json.dumps([body, shown]) + caplog.text
    assert "[redac" in said  # the marker may itself be cut
    assert password[:6] not in said


async def test_an_echoed_refresh_token_is_redacted(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh answered with an error text quoting the refresh token that was sent: the
    status, the error answer and the log show it as [redacted]."""
    refresh_token = "rt-0123456789abcdef"

    async def grant(request: web.Request) -> web.Response:
        body = await request.json()
        if body["grant_type"] == "password":
            return web.json_response(
                {
                    "access_token": "at-0123456789abcdef",
                    "expires_in": 3600,
                    "token_type": "bearer",
                    "refresh_token": refresh_token,
                    "refresh_expires_in": 1209600,
                }
            )
        text = f"cannot refresh {body['refresh_token']} now"
        return web.json_response({"error": "server_error", "error_message": text}, status=503)

    async with daemon_on_stub(short_dir, grant) as http:
        assert 200 == (await get_json(http, f"/v1/instances/{NAME}/token"))[0]
        code, body = await get_json(http, f"/v1/instances/{NAME}/refresh", method="POST")
        _, shown = await get_json(http, f"/v1/instances/{NAME}")
    assert 503 == code
    said = json.dumps([body, shown]) + caplog.text
    assert "cannot refresh [redacted] now" in shown["last_error"]["message"]
    assert refresh_token not in said


async def test_sugar_cookies_are_never_sent_back(short_dir: Path) -> None:
    """Sugar sets a download_token cookie on every grant; sugard keeps none (dummy jar)."""
    cookies_seen: list[str | None] = []

    async def grant(request: web.Request) -> web.Response:
        cookies_seen.append(request.headers.get("Cookie"))
        n = len(cookies_seen)
        body = {"access_token": f"a{n}", "refresh_token": f"r{n}", "expires_in": 3600}
        response = web.json_response(body)
        response.set_cookie("download_token_sugard", f"d{n}", path="/")
        return response

    async with daemon_on_stub(short_dir, grant) as http:
        assert 200 == (await get_json(http, f"/v1/instances/{NAME}/token"))[0]
        for _ in range(3):
            code, _ = await get_json(http, f"/v1/instances/{NAME}/refresh", method="POST")
            assert 200 == code
    assert [None] * 4 == cookies_seen


async def test_a_request_in_the_mandatory_window_waits_then_gets_retry_after(
    short_dir: Path,
) -> None:
    """With the token about to expire and Sugar down, a request waits `wait`, then gets 503
    token_unavailable with when to come back, and the daemon's own attempts go on."""
    async with rig(short_dir, backoff_max=300) as r:
        r.fake.fail_next(1000, "503")
        r.clock.jump(3600 - 5)  # 5 s left: inside the mandatory window
        asked = time.monotonic()
        code, body = await r.token(wait=0.3)
        waited = time.monotonic() - asked
        assert 503 == code
        assert "token_unavailable" == body["error"]
        assert body["retry_after"] >= 1
        assert "503" in body["message"]
        assert 0.3 <= waited < 2.0
        r.fake.clear_faults()
        code, body = await get_json(r.http, f"/v1/instances/{NAME}/refresh", method="POST")
        assert 200 == code  # `sugarctl refresh` cuts the backoff short once Sugar is back
        assert r.fake.valid(body["access_token"])


# --------------------------------------------------------------- renewal per Sugar version


async def first_token(r: Rig, version: str | None = None) -> dict[str, Any]:
    """The first token, once the keeper has read the server's version (after its login)."""
    code, body = await r.token()
    assert 200 == code, body
    if version is not None:
        await until(lambda: r.keeper.sugar_version == version + ".0")
    return body


async def test_min_ttl_requests_during_a_refresh_all_get_its_token(short_dir: Path) -> None:
    """40 requests with a min_ttl the current token cannot meet, arriving while a slow refresh
    is in flight, wait for that refresh and get its token: one refresh, no second one that
    would kill the tokens just handed out (Sugar 13.3+)."""
    async with rig(short_dir, sugar=fake_profile("13.3")) as r:
        old = await first_token(r, "13.3")
        r.fake.reset_counters()
        r.fake.delay = 1.0
        r.clock.jump(3600 - 20)  # 20 s left: the advisory window, and short of min_ttl 25
        await until(lambda: r.keeper.state.value == "refreshing")
        answers = await asyncio.gather(*(r.token(min_ttl=25, wait=10) for _ in range(40)))
        r.fake.delay = 0.0
        assert [200] * 40 == [code for code, _ in answers]
        tokens = {body["access_token"] for _, body in answers}
        assert 1 == len(tokens)
        assert old["access_token"] not in tokens
        await until(lambda: r.keeper.state.value == "ready")
        assert 1 == r.keeper.refreshes
        assert {"token": 1, "refresh_token": 1} == token_calls(r.fake)
        assert r.fake.valid(tokens.pop())


@pytest.mark.parametrize("version", ["13.3", "12.0"])
async def test_requests_during_a_refresh_wait_only_where_it_kills_the_old_token(
    version: str, short_dir: Path
) -> None:
    """On 13.3 a request that arrives while a refresh is in flight waits for the new token
    (the old one dies when the refresh answers); on 12.0 it gets the old token at once."""
    async with rig(short_dir, sugar=fake_profile(version)) as r:
        old = (await first_token(r, version))["access_token"]
        r.fake.delay = 1.0
        forced = asyncio.create_task(
            get_json(r.http, f"/v1/instances/{NAME}/refresh", method="POST")
        )
        await until(lambda: r.keeper.state.value == "refreshing")
        asked = time.monotonic()
        answers = await asyncio.gather(*(r.token() for _ in range(20)))
        took = time.monotonic() - asked
        code, refreshed = await forced
        assert 200 == code
        given = {body["access_token"] for _, body in answers}
        if version == "13.3":
            assert {refreshed["access_token"]} == given  # held, then the new token
            assert not r.fake.valid(old)
        else:
            assert {old} == given  # at once: the old token lives on for a while
            assert took < 1.0
            assert r.fake.valid(old)
        assert all(r.fake.valid(token) for token in given)


async def test_old_token_grace_in_the_config_overrides_the_version(short_dir: Path) -> None:
    """`old_token_grace = 120` on a server that says 13.3: requests during a refresh never wait."""
    async with rig(short_dir, sugar=fake_profile("13.3"), old_token_grace=120) as r:
        old = (await first_token(r))["access_token"]
        r.fake.delay = 1.0
        forced = asyncio.create_task(
            get_json(r.http, f"/v1/instances/{NAME}/refresh", method="POST")
        )
        await until(lambda: r.keeper.state.value == "refreshing")
        code, body = await r.token()
        assert (200, old) == (code, body["access_token"])
        assert "refreshing" == r.keeper.state.value  # answered while the refresh was in flight
        await forced
        assert 0 == r.fake.calls["metadata"]  # a set grace needs no version


async def test_a_server_without_server_info_is_served_as_the_newest(short_dir: Path) -> None:
    """A Sugar (or a proxy) that does not answer ServerInfo: the instance works as usual and
    renews as on 13.3+, where a refresh kills the old token."""
    served = itertools.count(1)

    async def grant(request: web.Request) -> web.Response:
        n = next(served)
        return web.json_response(
            {"access_token": f"a{n}", "refresh_token": f"r{n}", "expires_in": 3600}
        )

    async with daemon_on_stub(short_dir, grant) as http:
        code, _ = await get_json(http, f"/v1/instances/{NAME}/token")
        assert 200 == code
        code, renewed = await get_json(http, f"/v1/instances/{NAME}/refresh", method="POST")
        assert (200, "a2") == (code, renewed["access_token"])
        _, shown = await get_json(http, f"/v1/instances/{NAME}")
        assert ("ready", None) == (shown["state"], shown["last_error"])


async def test_a_quiet_moment_is_chosen_for_a_refresh_that_kills_the_old_token(
    short_dir: Path,
) -> None:
    """On 13.3 the scheduled refresh waits, inside its window, while scripts keep taking the
    token, and goes as soon as they pause, at the latest halfway to expiry."""
    lifetimes = {"access_lifetime": 600, **fake_profile("13.3")}
    async with rig(short_dir, speed=100.0, sugar=lifetimes, refresh_before=300) as r:
        await first_token(r, "13.3")
        window = r.keeper.refresh_at
        expires = r.keeper.grant.expires_at
        r.fake.reset_counters()
        while r.fake.calls["refresh_token"] == 0:  # a script asking all the time
            await r.token()
            await asyncio.sleep(0.005)
        (busy,) = r.fake.requests
        assert window + 10 < busy.time <= window + (expires - window) / 2 + 5
        # Nobody asks: the next refresh goes at the start of its window.
        await until(lambda: r.keeper.refresh_at != window)
        window = r.keeper.refresh_at
        await until(lambda: r.fake.calls["refresh_token"] == 2, timeout=20)
        assert r.fake.requests[-1].time < window + 3


async def test_an_unreported_eviction_is_recovered_within_one_probe_interval(
    short_dir: Path,
) -> None:
    """Another login evicts sugard's session and no script reports it: the probe (every 60 s)
    finds the dead token, and one refused refresh + one login bring a working one."""
    async with rig(short_dir, speed=100.0, sugar=fake_profile("13.3"), probe_interval=60) as r:
        dead = (await first_token(r, "13.3"))["access_token"]
        r.fake.reset_counters()
        assert 1 == r.fake.evict(USER, "sugard")
        evicted = r.clock()
        await until(lambda: r.keeper.grant.access_token.reveal() != dead, timeout=10)
        assert r.clock() - evicted <= 60 + 5
        _, now = await r.token()
        assert r.fake.valid(now["access_token"])
        assert {"token": 2, "refresh_token": 1, "password": 1} == token_calls(r.fake)
        assert 1 <= r.fake.calls["ping"] <= 2  # the one that found it (and maybe the next)


async def test_probe_interval_zero_turns_the_probe_off(short_dir: Path) -> None:
    """`probe_interval = 0`: no ping in ten minutes."""
    async with rig(short_dir, speed=1000.0, probe_interval=0) as r:
        await first_token(r)
        await r.clock.sleep(600)
        assert 0 == r.fake.calls["ping"]


async def test_the_probe_checks_the_token_once_a_minute(short_dir: Path) -> None:
    """The default interval: about ten pings in ten minutes of a live token, and no renewal."""
    async with rig(short_dir, speed=200.0) as r:
        await first_token(r)
        await r.clock.sleep(600)
        assert 6 <= r.fake.calls["ping"] <= 10  # fewer if a busy machine wakes the keeper late
        assert {"token": 1, "password": 1} == token_calls(r.fake)


def test_a_report_of_a_token_that_still_works_keeps_the_session(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A script's 401 had another cause (a Bearer header, a wrong route): the probe finds the
    token alive, so sugarctl invalidate answers with the same token and nobody loses it."""
    fake = sugar()
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    alive = sugarctl(daemon.socket, "token", NAME).stdout.strip()
    fake.reset_counters()
    results = [sugarctl(daemon.socket, "invalidate", NAME, alive) for _ in range(3)]
    assert [(0, alive)] * 3 == [(r.returncode, r.stdout.strip()) for r in results]
    assert fake.valid(alive)
    assert {} == token_calls(fake)
    # One check: reports that keep coming less than 1 s apart get its answer (REPORT_GAP).
    assert 1 == fake.calls["ping"]


async def test_a_refresh_token_that_ends_first_is_used_before_it_ends(short_dir: Path) -> None:
    """Refresh tokens shorter-lived than access tokens: sugard refreshes while the refresh
    token still works, keeping the session, instead of a password login every time."""
    lifetimes = {"access_lifetime": 600, "refresh_lifetime": 200}
    # 100x, not 1000x: the refresh goes out about 60 s (virtual) before the refresh token
    # ends, which at 1000x is 60 ms of a loaded machine's scheduling (it failed so, once).
    async with rig(short_dir, speed=100.0, sugar=lifetimes, probe_interval=0) as r:
        await first_token(r)
        await r.clock.sleep(2000)
        grants = [q.grant_type for q in r.fake.requests]
        assert 1 == grants.count("password")
        assert 15 <= grants.count("refresh_token") <= 25
        assert [] == [q.error for q in r.fake.requests if q.error]


async def test_a_password_login_after_the_session_ends_says_why(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under max_session_lifetime the login at the session's end is logged with its reason;
    after a downtime past the refresh lifetime, with the refresh token's expiry."""
    caplog.set_level("INFO", "sugard.keeper")
    capped = {"access_lifetime": 600, "max_session_lifetime": 1500}
    async with rig(short_dir, speed=1000.0, sugar=capped, refresh_before=300) as r:
        await first_token(r)
        await until(lambda: r.fake.calls["password"] == 2, timeout=10)
    assert "session reached the site's max_session_lifetime at" in caplog.text
    caplog.clear()
    async with rig(short_dir, sugar={"access_lifetime": 300, "refresh_lifetime": 600}) as r:
        await first_token(r)
        r.clock.jump(1000)
        code, _ = await r.token(wait=5)
        assert 200 == code
    assert "refresh token expired at" in caplog.text


def test_a_past_error_is_kept_but_not_shown_as_current(
    sugar: Callable[..., FakeSugar], short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """After two 503s and a recovery, status keeps the last error, marked as past; while
    sugard backs off, the error is current."""
    fake = sugar()
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


async def test_sugard_never_sends_scope_and_never_logs_out(short_dir: Path) -> None:
    """Across logins, refreshes, a report, an eviction, probes and the daemon's stop: no
    request carries `scope` (Sugar answers 400 invalid_scope), none goes to oauth2/logout."""
    seen: list[tuple[str, set[str]]] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        fields: set[str] = set(request.query)
        if request.can_read_body:
            raw = await request.read()
            with contextlib.suppress(ValueError):
                body = json.loads(raw)
                fields |= set(body) if isinstance(body, dict) else set()
        seen.append((request.path, fields))
        response: web.StreamResponse = await handler(request)
        return response

    profile = fake_profile("13.3")
    async with rig(short_dir, speed=100.0, sugar=profile, watch=record, probe_interval=60) as r:
        dead = (await first_token(r))["access_token"]
        await get_json(r.http, f"/v1/instances/{NAME}/refresh", method="POST")
        r.fake.evict(USER, "sugard")
        await get_json(
            r.http, f"/v1/instances/{NAME}/invalidate", method="POST", json={"access_token": dead}
        )
        await r.clock.sleep(120)
    paths = {path for path, _ in seen}
    assert "/rest/v10/oauth2/token" in paths
    assert "/rest/v10/ping" in paths
    assert not any("logout" in path for path in paths)
    assert [] == [path for path, fields in seen if "scope" in fields]


def test_old_token_grace_and_probe_interval_are_read_and_checked(short_dir: Path) -> None:
    """Both keys work in [defaults] and per instance; a wrong value names the key and the fix."""
    table = {"url": "https://crm.example.com", "username": USER, "password": PASSWORD}
    config = load_config(
        write_config(
            short_dir,
            {
                "a": table,
                "b": {**table, "platform": "sugard_b", "old_token_grace": 0, "probe_interval": 0},
            },
            defaults={"probe_interval": 30},
        )
    )
    a, b = config.instances["a"], config.instances["b"]
    assert ("auto", 30.0) == (a.old_token_grace, a.probe_interval)
    assert (0.0, 0.0) == (b.old_token_grace, b.probe_interval)
    with pytest.raises(Exception, match='old_token_grace: must be "auto" or seconds'):
        load_config(write_config(short_dir, {"a": {**table, "old_token_grace": "never"}}))
    with pytest.raises(Exception, match="probe_interval: must be between 0 and 86400"):
        load_config(write_config(short_dir, {"a": {**table, "probe_interval": -1}}))
