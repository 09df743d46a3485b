"""`Keeper.revoke` in-process against the fake SugarCRM: a renewal under way settles first, then
one logout with the session's refresh token and one login, in that order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from support.rig import first_token, rig
from support.wait import until


async def test_revoke_waits_for_the_refresh_in_flight_then_logs_out_and_in_once(
    short_dir: Path,
) -> None:
    """A refresh is in flight when revoke is asked: the refresh answers first, then the session
    it brought is logged out (the token it made dies) and one login makes the token revoke
    answers with."""
    seen: list[str] = []

    @web.middleware
    async def watch(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/oauth2/logout"):
            seen.append("logout")
        elif request.path.endswith("/oauth2/token"):
            seen.append("refresh" if b"refresh_token" in body else "login")
        return await handler(request)

    async with rig(short_dir, watch=watch) as r:
        await first_token(r)
        seen.clear()
        r.fake.delay = 0.3  # the token endpoint: the refresh stays in flight a while
        refreshing = asyncio.create_task(r.keeper.refresh_now())
        await until(lambda: seen == ["refresh"])
        revoked = await r.keeper.revoke(wait=10)
        refreshed = await refreshing
        assert ["refresh", "logout", "login"] == seen
        assert not r.fake.valid(refreshed.access_token.reveal())
        assert r.fake.valid(revoked.access_token.reveal())
        assert revoked is r.keeper.grant
