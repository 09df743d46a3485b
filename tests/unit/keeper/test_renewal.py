"""Renewal on a virtual clock: the daemon in-process with a wall clock shared with the fake
SugarCRM, so outages, suspends and session lifetimes of minutes pass in a fraction of a second;
each test goes through the daemon's real Unix socket and counts what reached the fake. (Split
from the lifecycle tests; those that run `sugard` as a process are tests/system/test_lifecycle.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support.daemon import PASSWORD, USER, fake_profile, write_config
from support.rig import NAME, first_token, get_json, rig, token_calls, unix_aiohttp_session
from support.wait import until

from sugard.config import load_config
from sugard.daemon import Daemon
from sugard.keeper import MAX_SLEEP


def test_no_sleep_is_longer_than_thirty_seconds() -> None:
    """The cap that makes a resumed laptop refresh within 30 s is the daemon's default."""
    assert 30.0 == MAX_SLEEP
    assert MAX_SLEEP == Daemon.__init__.__kwdefaults__["max_sleep"]


def backoff_schedule(attempts: int, cap: float, jitter: float) -> list[float]:
    """The waits after each failed attempt, as the docs promise: full jitter, 1 s to `cap`."""
    return [max(1.0, min(cap, 2.0**n) * jitter) for n in range(attempts)]


@pytest.mark.slow
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
    """Past the refresh token's end, sugard still tries the refresh (only Sugar knows it has
    ended: the local clock may have been set), and logs in once Sugar refuses it."""
    lifetimes = {"access_lifetime": 300, "refresh_lifetime": 600}
    async with rig(short_dir, sugar=lifetimes) as r:
        _, _before = await r.token()
        r.fake.reset_counters()
        r.clock.jump(1000)
        status, after = await r.token(wait=5)
        assert 200 == status
        assert r.fake.valid(after["access_token"])
        assert {"token": 2, "refresh_token": 1, "password": 1} == token_calls(r.fake)


@pytest.mark.slow
async def test_a_shrinking_session_is_renewed_by_login_without_a_storm(short_dir: Path) -> None:
    """Under max_session_lifetime each refresh leaves less session; sugard refreshes on its
    schedule and logs in once the session ends (Sugar refusing the one refresh tried at its
    end), never refreshing in a loop."""
    fake_settings = {"access_lifetime": 600, "max_session_lifetime": 1500}
    async with rig(short_dir, speed=1000.0, sugar=fake_settings, refresh_before=300) as r:
        _, _before = await r.token()
        await r.clock.sleep(3000)  # two session lifetimes
        grants = [q.grant_type for q in r.fake.requests]
        assert 2 <= grants.count("password") <= 3
        assert 5 <= grants.count("refresh_token") <= 10
        refused = [q.error for q in r.fake.requests if q.error]
        assert set(refused) <= {"invalid_grant"}
        assert len(refused) <= grants.count("password")
        status, after = await r.token()
        assert 200 == status
        assert r.fake.valid(after["access_token"])


@pytest.mark.slow
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
            async with unix_aiohttp_session(directory / "s.sock", 4) as http:
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
async def test_the_probe_checks_the_token_once_a_minute(short_dir: Path) -> None:
    """The default interval: about ten pings in ten minutes of a live token, and no renewal."""
    async with rig(short_dir, speed=200.0) as r:
        await first_token(r)
        await r.clock.sleep(600)
        assert 6 <= r.fake.calls["ping"] <= 10  # fewer if a busy machine wakes the keeper late
        assert {"token": 1, "password": 1} == token_calls(r.fake)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
