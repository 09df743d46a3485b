"""The token lifecycle where SugarCloud with SugarIdentity (IdM mode) differs from Sugar's own
token code (docs/sugarcrm.md): no one-session eviction, single-use refresh tokens whose reuse
kills the chain, `download_token` equal to the access token after a refresh, and a refused
refresh answered `invalid_request`. Each case runs against the 13.3 profile too, where the
outcome differs, through the real socket and `sugarctl`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from support.daemon import PASSWORD, USER, DaemonProcess, instance, sugarctl, write_config
from support.rig import NAME, first_token, rig, token_calls
from support.wait import until

from sugard.testing import FakeSugar

PROFILES: dict[str, dict[str, Any]] = {
    "13.3": {"sugar_version": "13.3"},
    "idm": {"sugar_version": "13.3", "idm_mode": True},
}


def script_login(fake: FakeSugar, platform: str = "sugard") -> None:
    """A script that logs in by itself, as the same user on sugard's platform."""
    answer = requests.post(
        f"{fake.url}/rest/v10/oauth2/token",
        json={
            "grant_type": "password",
            "client_id": "sugar",
            "client_secret": "",
            "username": USER,
            "password": PASSWORD,
            "platform": platform,
        },
        timeout=30,
    )
    assert 200 == answer.status_code, answer.text


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_a_script_logging_in_by_itself_evicts_sugard_except_under_sugaridentity(
    profile: str,
    start_fake: Callable[..., FakeSugar],
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    """On 13.3 another login with sugard's user and platform kills sugard's session: the report
    is confirmed by one probe and costs one refused refresh and one login. Under SugarIdentity
    there is no one-session rule: the probe finds the token alive and nothing is renewed."""
    fake = start_fake(**PROFILES[profile])
    daemon = start_daemon(write_config(short_dir, {NAME: instance(fake)}))
    before = sugarctl(daemon.socket, "token", NAME).stdout.strip()
    script_login(fake)
    fake.reset_counters()
    reported = sugarctl(daemon.socket, "invalidate", NAME, before)
    assert 0 == reported.returncode, reported.stderr
    after = reported.stdout.strip()
    assert 1 == fake.calls["ping"]  # the report is checked once
    assert fake.valid(after)
    if profile == "idm":
        assert before == after
        assert {} == token_calls(fake)
    else:
        assert before != after
        assert {"token": 2, "refresh_token": 1, "password": 1} == token_calls(fake)


@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_one_refresh_answers_every_waiter_and_never_reuses_a_refresh_token(
    profile: str, short_dir: Path
) -> None:
    """40 requests with a min_ttl the token cannot meet: one refresh for all, and no refresh
    token is ever sent twice (under SugarIdentity a reuse would kill the whole chain). After
    the refresh, IdM's `download_token` is the access token itself, and sugard hands it out."""
    async with rig(short_dir, sugar=PROFILES[profile]) as r:
        old = await first_token(r, "13.3")
        r.fake.reset_counters()
        r.clock.jump(3600 - 20)  # 20 s left: short of min_ttl 25
        answers = await asyncio.gather(*(r.token(min_ttl=25, wait=10) for _ in range(40)))
        assert [200] * 40 == [code for code, _ in answers]
        tokens = {body["access_token"] for _, body in answers}
        assert 1 == len(tokens)
        new = tokens.pop()
        assert old["access_token"] != new
        await until(lambda: r.keeper.state.value == "ready")
        assert {"token": 1, "refresh_token": 1} == token_calls(r.fake)
        assert [("refresh_token", None)] == [(q.grant_type, q.error) for q in r.fake.requests]
        assert r.fake.valid(new)
        download = {body["download_token"] for _, body in answers}
        if profile == "idm":
            assert {new} == download
        else:
            assert new not in download


async def test_a_refused_idm_refresh_is_followed_by_one_password_login(short_dir: Path) -> None:
    """SugarIdentity answers a refresh it refuses with 400 `invalid_request`, not Sugar's
    `invalid_grant`: sugard reads it as a refresh token gone and logs in once, never `failed`."""
    async with rig(short_dir, sugar=PROFILES["idm"]) as r:
        await first_token(r, "13.3")
        r.fake.reset_counters()
        assert 1 == r.fake.evict(USER, "sugard")  # the identity server dropped the chain
        r.clock.jump(3600 - 20)  # 20 s left: short of min_ttl 25, so a renewal now
        code, refreshed = await r.token(min_ttl=25)
        assert 200 == code, refreshed
        assert [("refresh_token", "invalid_request"), ("password", None)] == [
            (q.grant_type, q.error) for q in r.fake.requests
        ]
        assert "ready" == r.keeper.state.value
