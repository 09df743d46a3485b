"""Issue 23's four rules, against a fake that behaves like real Sugar 12.0 and 13.3 (no
/ServerInfo route): the version read from the metadata once across logins, a refresh token's
end as a hard deadline, no dead token served after a refresh refused for maintenance (and the
probe during a backoff), and one check for a burst of reports of a token Sugar still takes.

The in-process daemon with a virtual clock (minutes pass in a second), or the real `sugard
run` process with `sugarctl` scripts.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.daemon import PASSWORD, SUGARCTL, USER, instance, sugarctl, write_config
from support.rig import NAME, Rig, get_json, rig
from support.wait import until

from sugard.testing import FakeSugar, running_fake


async def call(r: Rig, path: str, method: str = "GET", **kwargs: Any) -> tuple[int, Any]:
    """The instance's route `path` on the in-process daemon."""
    return await get_json(r.http, f"/v1/instances/{NAME}{path}", method, **kwargs)


def version_calls(fake: FakeSugar) -> dict[str, int]:
    names = ("serverinfo", "metadata", "metadata_public", "sugar_version")
    return {name: n for name, n in fake.calls.items() if name in names and n}


# ------------------------------------------------------------------ 1. the version


@pytest.mark.parametrize("version", ["12.0", "13.3"])
async def test_the_version_comes_from_the_metadata_once_across_logins(
    version: str, short_dir: Path
) -> None:
    """Real 12.0 and 13.3 answer /ServerInfo with 404: the version is read from the metadata
    with the token after the first login (one call), kept across the next logins (no call),
    and 12.0's rule follows from it: requests during a refresh get the old token at once."""
    async with rig(short_dir, sugar={"sugar_version": version}) as r:
        code, first = await r.token()
        assert 200 == code
        await until(lambda: r.keeper.sugar_version == f"{version}.0")
        assert {"metadata": 1} == version_calls(r.fake)

        for _ in range(2):  # two evictions, two logins: the version is not asked again
            r.fake.evict(USER, "sugard")
            r.fake.revoke(first["access_token"])
            code, first = await call(
                r, "/invalidate", "POST", json={"access_token": first["access_token"]}
            )
            assert 200 == code, first
        assert 3 == r.fake.calls["password"]
        assert {"metadata": 1} == version_calls(r.fake)
        assert f"{version}.0" == r.keeper.sugar_version

        old = first["access_token"]
        r.fake.delay = 0.5
        forced = asyncio.create_task(call(r, "/refresh", "POST"))
        await until(lambda: r.keeper.state.value == "refreshing")
        code, during = await r.token()
        assert 200 == code
        assert (old == during["access_token"]) is (version == "12.0")
        await forced


async def test_where_the_metadata_hides_the_version_the_public_one_or_the_file_says_it(
    short_dir: Path,
) -> None:
    """A proxy that blocks /metadata: the login page's public metadata gives the version (one
    more call); blocked too, the site's sugar_version.json. Only after the first login."""
    blocked: set[str] = {"/rest/v10/metadata"}

    @web.middleware
    async def block(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in blocked:
            return web.Response(status=404, text="<html>not here</html>", content_type="text/html")
        response: web.StreamResponse = await handler(request)
        return response

    async with rig(short_dir, sugar={"sugar_version": "12.0"}, watch=block) as r:
        assert 200 == (await r.token())[0]
        await until(lambda: r.keeper.sugar_version == "12.0.0")
        assert {"metadata_public": 1} == version_calls(r.fake)  # the blocked one never arrives

    blocked.add("/rest/v10/metadata/public")
    async with rig(short_dir, sugar={"sugar_version": "13.3"}, watch=block) as r:
        assert 200 == (await r.token())[0]
        await until(lambda: r.keeper.sugar_version == "13.3.0")
        assert {"sugar_version": 1} == version_calls(r.fake)


# ------------------------------------------------------------------ 2. the deadline


@pytest.mark.parametrize("version", ["13.3", "12.0"])
async def test_a_refresh_token_ending_first_is_refreshed_before_it_ends_under_load(
    version: str, short_dir: Path
) -> None:
    """repro_d: a 15 s refresh token under 30 s access tokens, a script asking every second.
    The refresh token's end is a hard deadline: the refresh goes before it, quiet moment or
    not. Before: 3 password logins and 0 refreshes in 45 s; now 1 login and refreshes."""
    lifetimes = {"sugar_version": version, "access_lifetime": 30, "refresh_lifetime": 15}
    async with rig(
        short_dir, speed=10.0, sugar=lifetimes, refresh_before=10, probe_interval=0
    ) as r:
        end = r.clock() + 45
        while r.clock() < end:
            code, body = await r.token()
            assert 200 == code, body
            await r.clock.sleep(1)
        grants = [q.grant_type for q in r.fake.requests]
        assert 1 == grants.count("password"), grants
        assert grants.count("refresh_token") >= 4, grants
        assert [] == [q.error for q in r.fake.requests if q.error]


# ------------------------------------------------------------------ 3. maintenance


@pytest.mark.parametrize("version", ["13.3", "12.0"])
async def test_after_a_refresh_refused_for_maintenance_the_old_token_is_checked(
    version: str, short_dir: Path
) -> None:
    """On 13.3 Sugar runs the grant before its maintenance check: the refused refresh killed
    the token sugard holds. sugard checks it (one ping, which maintenance lets through) and
    stops serving it; on 12.0 the old token lives on (the grace) and is served as before."""
    async with rig(short_dir, sugar={"sugar_version": version}, backoff_max=300) as r:
        code, body = await r.token()
        assert 200 == code
        old = body["access_token"]
        await until(lambda: r.keeper.sugar_version == f"{version}.0")
        r.fake.maintenance = True
        r.fake.reset_counters()
        code, body = await call(r, "/refresh", "POST")
        assert 503 == code
        assert "maintenance" in body["message"]
        code, body = await r.token(wait=2)
        if version == "13.3":
            assert not r.fake.valid(old)
            assert 503 == code, body  # not the dead token
            assert body["retry_after"] >= 50  # the maintenance backoff
            assert 1 == r.fake.calls["ping"]
        else:
            assert r.fake.valid(old)
            assert (200, old) == (code, body["access_token"])
        assert 1 == r.fake.calls["refresh_token"]

        r.fake.maintenance = False
        code, body = await call(r, "/refresh", "POST")
        assert 200 == code
        assert r.fake.valid(body["access_token"])
        assert 1 == r.fake.calls["password"]  # the burned refresh token is not sent again


async def test_the_probe_runs_during_a_backoff(short_dir: Path) -> None:
    """Sugar's token endpoint fails (503s) in the advisory window, so sugard backs off and
    serves the still-valid token; an eviction meanwhile is found by the probe (every 60 s)
    instead of at the backoff's end: the dead token is not served on."""
    profile = {"sugar_version": "13.3", "access_lifetime": 3600}
    async with rig(short_dir, speed=100.0, sugar=profile, backoff_max=300, probe_interval=60) as r:
        code, body = await r.token()
        assert 200 == code
        token = body["access_token"]
        r.fake.fail_next(10_000, "503")
        r.clock.jump(r.keeper.refresh_at - r.clock())
        await until(lambda: r.keeper.state.value == "backing_off")
        r.fake.reset_counters()
        assert 1 == r.fake.evict(USER, "sugard")
        evicted = r.clock()
        while (await r.token(wait=0))[0] == 200:
            assert r.clock() - evicted < 60 + 10, "the dead token is still served"
            await asyncio.sleep(0.01)
        assert "backing_off" == r.keeper.state.value  # found during the backoff
        assert not r.fake.valid(token)
        assert 1 <= r.fake.calls["ping"] <= 2


# ------------------------------------------------------------------ 4. coalesced reports


@pytest.mark.timeout(120)
def test_fifty_reports_of_a_token_sugar_still_takes_make_one_check(
    short_dir: Path, start_daemon: Callable[..., Any]
) -> None:
    """50 `sugarctl invalidate` processes at once report the live token (their 401s had
    another cause): one ping at Sugar, the same token back to all. Before: 6 to 21 pings, as
    the processes' reports trickle in after the first check answered."""
    with running_fake(users={USER: PASSWORD}, sugar_version="13.3") as fake:
        daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
        alive = sugarctl(daemon.socket, "token", NAME).stdout.strip()
        fake.reset_counters()
        procs = [
            subprocess.Popen(
                [SUGARCTL, "--socket", str(daemon.socket), "invalidate", NAME, alive],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(50)
        ]
        answers = [(p.wait(60), p.communicate()[0].strip()) for p in procs]
        assert [(0, alive)] * 50 == answers, (fake.calls, daemon.log()[-3000:])
        assert 1 == fake.calls["ping"]
        assert 0 == fake.calls["token"]
        assert fake.valid(alive)
