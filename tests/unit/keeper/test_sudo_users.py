"""Tokens of other users (Sugar's sudo) kept per user: the daemon in-process on a virtual clock
with the fake SugarCRM, through the real socket; and the renewal rules on stubs where the fake
has no such answer (a sudo session with a refresh token)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.daemon import PASSWORD, USER, fake_profile
from support.rig import NAME, Rig, first_token, get_json, rig
from support.wait import until

from sugard.config import InstanceConfig
from sugard.config.sources import SecretRef
from sugard.errors import InstanceNeedsAttention, UserNotListed
from sugard.keeper.sudo import IDLE_DROP, SudoUsers
from sugard.observe import Observer, SudoCall
from sugard.secret import Secret
from sugard.sugar import Grant
from sugard.sugar.errors import RefreshRejected
from sugard.sugar.sudo import NoSuchUser

ADMINS = {"users": {USER: PASSWORD, "jim": "jim-pw", "sally": "sally-pw"}, "admins": {USER}}


async def as_jim(r: Rig, action: str = "token", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    method = "GET" if action == "token" else "POST"
    path = f"/v1/instances/{NAME}/{action}?as=jim"
    return await get_json(r.http, path, method=method, **kwargs)


def held_back(
    gate: asyncio.Event, arrived: list[str]
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """A middleware for the fake that holds every sudo until `gate` opens (`arrived`: each
    sudo's path as it comes in)."""

    @web.middleware
    async def watch(request: web.Request, handler: Any) -> web.StreamResponse:
        if "/oauth2/sudo/" in request.path:
            arrived.append(request.path)
            await gate.wait()
        return await handler(request)  # type: ignore[no-any-return]

    return watch


async def test_a_refused_admin_token_is_reported_once_and_the_sudo_made_again(
    short_dir: Path,
) -> None:
    """Sugar refuses the admin token a sudo carries (evicted, or a refresh killed it): the
    keeper hears of it once, renews, and the sudo goes through on the new token."""
    async with rig(short_dir, sugar=ADMINS, sudo=["jim"]) as r:
        _, admin = await r.token()
        assert r.fake.revoke(admin["access_token"])
        r.fake.reset_counters()
        code, body = await as_jim(r)
        assert 200 == code, body
        assert {"jim": 2} == r.fake.sudo_calls
        assert 1 == r.fake.calls["refresh_token"]
        _, renewed = await r.token()
        assert admin["access_token"] != renewed["access_token"]
        assert r.fake.valid(body["access_token"])


async def test_the_admin_sessions_renewals_leave_the_users_tokens_alone(short_dir: Path) -> None:
    """A refresh of the admin session kills its old token, never jim's: jim's token still
    works and is served again with no new sudo."""
    async with rig(short_dir, sugar=ADMINS, sudo=["jim"]) as r:
        _, jim = await as_jim(r)
        for _ in range(2):
            code, _ = await get_json(r.http, f"/v1/instances/{NAME}/refresh", method="POST")
            assert 200 == code
        assert r.fake.valid(jim["access_token"])
        _, again = await as_jim(r)
        assert jim["access_token"] == again["access_token"]
        assert {"jim": 1} == r.fake.sudo_calls


async def test_an_idle_users_token_is_dropped_after_fifteen_minutes(short_dir: Path) -> None:
    """Nobody asked for jim's token for 15 min: it is dropped (no renewal for it, and no
    logout); 14 min are not enough."""
    assert 900 == IDLE_DROP
    async with rig(short_dir, sugar=ADMINS, sudo=["jim"]) as r:
        await as_jim(r)
        r.clock.jump(14 * 60)
        await asyncio.sleep(0.1)  # the sleep cap is 0.02 s here: it had its chance to drop
        assert 1 == r.keeper.status().sudo.held
        r.clock.jump(61)
        await until(lambda: r.keeper.status().sudo.held == 0)
        assert () == r.keeper.status().sudo.users
        assert {"jim": 1} == r.fake.sudo_calls
        assert 0 == r.fake.calls["logout"]


async def test_a_users_token_is_renewed_ahead_of_expiry_with_no_request(short_dir: Path) -> None:
    """Once asked for, jim's token is renewed in the refresh-ahead window by a new sudo, as
    the instance's own is, without waiting for a request."""
    async with rig(short_dir, sugar={**ADMINS, "access_lifetime": 600}, sudo=["jim"]) as r:
        _, first = await as_jim(r)
        status = r.keeper.status().sudo
        refresh_at = status.users[0].refresh_at
        assert refresh_at < status.users[0].expires_at - 60  # refresh_before: 300, or half
        r.clock.jump(refresh_at - r.clock() + 1)
        await until(lambda: r.fake.sudo_calls["jim"] == 2)
        _, renewed = await as_jim(r)
        assert first["access_token"] != renewed["access_token"]
        assert renewed["expires_in"] > 590


@pytest.mark.parametrize("version", ["13.3", "12.0"])
async def test_requests_during_a_sudo_wait_only_where_it_kills_the_old_token(
    version: str, short_dir: Path
) -> None:
    """On 13.3 a request for jim's token while jim's renewal is in flight waits for the new
    one (the new sudo evicts the old at once); on 12.0 it gets the old one at once."""
    gate, arrived = asyncio.Event(), []
    gate.set()
    sugar = {**ADMINS, **fake_profile(version)}
    async with rig(short_dir, sugar=sugar, sudo=["jim"], watch=held_back(gate, arrived)) as r:
        await first_token(r, version)
        _, old = await as_jim(r)
        gate.clear()
        forced = asyncio.create_task(as_jim(r, "refresh"))
        await until(lambda: len(arrived) == 2)
        waiting = asyncio.gather(*(as_jim(r) for _ in range(10)))
        await asyncio.sleep(0.2)
        if version == "12.0":
            assert waiting.done()
            assert {old["access_token"]} == {body["access_token"] for _, body in waiting.result()}
        else:
            assert not waiting.done()
        gate.set()
        _, new = await forced
        given = {body["access_token"] for _, body in await waiting}
        assert given == ({old["access_token"]} if version == "12.0" else {new["access_token"]})
        assert all(r.fake.valid(token) for token in given)


async def test_reports_of_a_users_dead_token_make_one_sudo(short_dir: Path) -> None:
    """Twenty scripts report jim's token refused: one new sudo, and all get its token."""
    async with rig(short_dir, sugar=ADMINS, sudo=["jim"]) as r:
        _, old = await as_jim(r)
        r.fake.revoke(old["access_token"])
        answers = await asyncio.gather(
            *(
                as_jim(r, "invalidate", json={"access_token": old["access_token"]})
                for _ in range(20)
            )
        )
        given = {body["access_token"] for _, body in answers}
        assert 1 == len(given) and old["access_token"] not in given
        assert {"jim": 2} == r.fake.sudo_calls
        assert 0 == r.fake.calls["refresh_token"]  # the admin session was never in question


# The rules on stubs: Sugar answering a sudo with a refresh token (12+ with needRefresh).


class Admin:
    async def token(self, min_ttl: float = 0.0, wait: float = 10.0) -> Grant:
        return grant("admin", "")

    async def invalidate(self, access_token: str, wait: float = 10.0) -> Grant:
        return grant("admin-2", "")


def grant(access: str, refresh: str) -> Grant:
    now = time.time()
    return Grant(Secret(access), Secret(refresh), Secret(""), "bearer", now, now + 3600, None)


class Upstream:
    """Sudos answer a token with a refresh token; refreshes answer as `refreshed` says."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.refresh_fails = False

    async def sudo(self, admin_token: Secret, user: str) -> Grant:
        self.calls.append(f"sudo {user}")
        if user == "ghost":
            raise NoSuchUser("Sugar has no active user named 'ghost'", unnamed="no such user")
        return grant(f"{user}-{len(self.calls)}", f"r-{len(self.calls)}")

    async def refresh_user(self, refresh_token: Secret) -> Grant:
        self.calls.append(f"refresh {refresh_token.reveal()}")
        if self.refresh_fails:
            raise RefreshRejected("Sugar refused the refresh token (invalid_grant)")
        return grant(f"refreshed-{len(self.calls)}", f"r-{len(self.calls)}")


class Events(Observer):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def observe(self, event: Any) -> None:
        if isinstance(event, SudoCall):
            self.seen.append(event.outcome)


def users(upstream: Upstream, events: Observer | None = None) -> SudoUsers:
    config = InstanceConfig(
        name=NAME,
        url="https://crm.example.com",
        username=USER,
        password=SecretRef("inline", "", Secret("p")),
        sudo=("jim", "ghost"),
    )
    return SudoUsers(
        config,
        upstream,  # type: ignore[arg-type]
        Admin(),
        lambda: 0.0,
        events or Observer(),
        rng=lambda: 0.5,
        max_sleep=0.02,
    )


async def test_a_sudo_session_with_a_refresh_token_is_renewed_by_a_refresh() -> None:
    """Where Sugar gave the sudo session a refresh token, a renewal refreshes it; a refresh
    Sugar refuses falls back to one new sudo."""
    upstream = Upstream()
    sudo = users(upstream)
    try:
        assert "jim-1" == (await sudo.token("jim")).access_token.reveal()
        assert "refreshed-2" == (await sudo.refresh_now("jim")).access_token.reveal()
        upstream.refresh_fails = True
        assert "jim-4" == (await sudo.refresh_now("jim")).access_token.reveal()
        assert ["sudo jim", "refresh r-1", "refresh r-2", "sudo jim"] == upstream.calls
    finally:
        await sudo.stop()


async def test_refusals_are_told_once_and_counted_without_names() -> None:
    """A user not listed: UserNotListed and no call; a user Sugar refused: the refusal again
    with no call, until refresh_now asks once more. The events carry outcomes, no names."""
    upstream, events = Upstream(), Events()
    sudo = users(upstream, events)
    try:
        with pytest.raises(UserNotListed, match="'bob'"):
            await sudo.token("bob")
        for _ in range(3):
            with pytest.raises(InstanceNeedsAttention, match="'ghost'"):
                await sudo.token("ghost")
        assert ["sudo ghost"] == upstream.calls
        with pytest.raises(InstanceNeedsAttention):
            await sudo.refresh_now("ghost")
        assert ["sudo ghost", "sudo ghost"] == upstream.calls
        assert ["not_listed", "rejected", "held_back", "held_back", "rejected"] == events.seen
    finally:
        await sudo.stop()
