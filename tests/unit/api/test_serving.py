"""The rooms of the socket API that hold no route: the one aiohttp internal serving relies on,
the access policy as a pure function of the config, and the keeper's status snapshot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support.daemon import instance, write_config

from sugard.config import load_config
from sugard.keeper import Keeper, Status
from sugard.peer import Peer, may_use
from sugard.proxy.tcp import response_started
from sugard.sugar import SugarClient
from sugard.testing import FakeSugar


async def test_the_response_started_check_follows_aiohttp(short_dir: Path) -> None:
    """serving asks aiohttp's payload writer whether a response began (no public API says so):
    false before the first byte, true after. Fails when an aiohttp upgrade changes that."""
    seen: list[bool] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(response_started(request))
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"x")
        seen.append(response_started(request))
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path = str(short_dir / "r.sock")
    await web.UnixSite(runner, path).start()
    try:
        connector = aiohttp.UnixConnector(path=path)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://sugard/") as answer,
        ):
            assert b"x" == await answer.read()
    finally:
        await runner.cleanup()
    assert [False, True] == seen


@dataclasses.dataclass(frozen=True)
class Lists:
    allowed_uids: tuple[int, ...] | None
    allowed_gids: tuple[int, ...] | None


def test_the_access_policy_is_a_pure_function_of_the_config() -> None:
    """The owner and root always; [daemon]'s lists widen, an instance's lists narrow; a gid
    matches primary or supplementary groups; no list of an instance's own: the daemon's."""
    daemon = Lists((1001,), (50,))
    owner, root = Peer(1, 1000, 1000), Peer(1, 0, 0)
    listed, grouped, stranger = Peer(1, 1001, 1001), Peer(1, 1002, 1002, (50,)), Peer(1, 1003, 7)
    narrow = Lists((1001,), None)
    assert [True, True, True, True, False] == [
        may_use(p, daemon, None, owner=1000) for p in (owner, root, listed, grouped, stranger)
    ]
    assert [True, True, True, False, False] == [
        may_use(p, daemon, narrow, owner=1000) for p in (owner, root, listed, grouped, stranger)
    ]
    assert may_use(grouped, daemon, Lists(None, None), owner=1000)


async def test_status_is_a_frozen_snapshot(fake: FakeSugar, tmp_path: Path) -> None:
    """Keeper.status() is a value: later changes of the keeper do not show in it, and nothing
    that renders it can change it; as_dict() has STATUS's fields in STATUS's order."""
    config = load_config(write_config(tmp_path, {"prod": instance(fake)}))
    async with aiohttp.ClientSession() as session:
        keeper = Keeper(config.instances["prod"], SugarClient(config.instances["prod"], session))
        status = keeper.status()
        assert isinstance(status, Status)
        with pytest.raises(dataclasses.FrozenInstanceError):
            status.state = "ready"  # type: ignore[misc]
        assert [
            "name",
            "url",
            "username",
            "platform",
            "state",
            "expires_at",
            "refresh_at",
            "last_refresh",
            "last_error",
            "logins",
            "refreshes",
            "failures",
            "token_fingerprint",
            "fleet",
            "sudo",
        ] == list(status.as_dict())
