# Expected value first in asserts (docs/style.md), which ruff's SIM300 calls a Yoda condition.
"""The fake SugarCRM itself: it must answer exactly as docs/sugarcrm-oauth2.md says Sugar does.

Every other test trusts this fake, so these tests talk to it over real HTTP on 127.0.0.1 with
aiohttp (and urllib from synchronous code), never by poking at its internals.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from sugard.testing import FakeSugar, TokenRequest, running_fake

ROOT = Path(__file__).resolve().parent.parent
TOKEN_KEYS = [
    "access_token",
    "expires_in",
    "token_type",
    "scope",
    "refresh_token",
    "refresh_expires_in",
    "download_token",
]
ADMIN_PASSWORD = "admin-password"
BOB_PASSWORD = "bob-password"


@dataclass(frozen=True)
class Reply:
    """One HTTP answer, read in full."""

    status: int
    body: Any  # parsed JSON, or the raw text when it is not JSON
    headers: Mapping[str, str]
    cookies: dict[str, str]


class Http:
    """A thin aiohttp client for the fake, speaking the way sugard does (OAuth-Token header)."""

    def __init__(self, session: aiohttp.ClientSession, fake: FakeSugar) -> None:
        self.session = session
        self.fake = fake

    async def call(self, method: str, route: str, *, version: str = "v10", **kw: Any) -> Reply:
        url = f"{self.fake.url}/rest/{version}/{route}"
        async with self.session.request(method, url, **kw) as resp:
            text = await resp.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            cookies = {name: morsel.value for name, morsel in resp.cookies.items()}
            return Reply(resp.status, body, resp.headers, cookies)

    async def token(self, body: dict[str, str] | None = None, **kw: Any) -> Reply:
        return await self.call("POST", "oauth2/token", json=body, **kw)

    async def login(self, **fields: str | None) -> Reply:
        return await self.token(creds(**fields))

    async def refresh(self, refresh_token: str, **fields: str | None) -> Reply:
        body: dict[str, str | None] = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": "sugar",
            "client_secret": "",
            "platform": "sugard",
        }
        body.update(fields)
        return await self.token({k: v for k, v in body.items() if v is not None})

    async def get(self, route: str, token: str | None = None, **kw: Any) -> Reply:
        headers = {"OAuth-Token": token} if token is not None else {}
        return await self.call("GET", route, headers=headers, **kw)

    async def post(self, route: str, token: str, body: dict[str, str] | None = None) -> Reply:
        return await self.call("POST", route, headers={"OAuth-Token": token}, json=body or {})


def creds(**fields: str | None) -> dict[str, str]:
    """A password-grant body as sugard sends it; a field set to None is left out."""
    body: dict[str, str | None] = {
        "grant_type": "password",
        "client_id": "sugar",
        "client_secret": "",
        "username": "admin",
        "password": ADMIN_PASSWORD,
        "platform": "sugard",
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


def basic(client_id: str, secret: str) -> dict[str, str]:
    """An `Authorization: Basic` header (aiohttp.BasicAuth is deprecated since 3.14)."""
    encoded = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def freeze(fake: FakeSugar, at: float) -> None:
    """Stop the fake's clock at `at`, so lifetimes are tested without sleeping."""
    fake.clock = lambda: at


def assert_error(reply: Reply, status: int, label: str) -> None:
    """Sugar's error envelope: status, label, no-store, and no headers Sugar never sends."""
    assert (status, label) == (reply.status, reply.body["error"]), reply.body
    assert "no-store" == reply.headers["Cache-Control"]
    assert "WWW-Authenticate" not in reply.headers
    assert "Retry-After" not in reply.headers


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """One aiohttp session without cookies, as sugard uses."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        yield client


@pytest.fixture
async def start() -> AsyncIterator[Callable[..., Awaitable[FakeSugar]]]:
    """Start FakeSugars with given settings; all are closed after the test."""
    started: list[FakeSugar] = []

    async def make(**kwargs: Any) -> FakeSugar:
        kwargs.setdefault("users", {"admin": ADMIN_PASSWORD, "bob": BOB_PASSWORD})
        fake = FakeSugar(**kwargs)
        await fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.close()


@pytest.fixture
async def sugar(start: Callable[..., Awaitable[FakeSugar]]) -> FakeSugar:
    """A fake with default settings and two users, admin and bob."""
    return await start()


@pytest.fixture
def http(session: aiohttp.ClientSession, sugar: FakeSugar) -> Http:
    """A client for the default fake."""
    return Http(session, sugar)


# ---------------------------------------------------------------- login


async def test_login_answers_the_seven_keys_in_sugars_order(http: Http, sugar: FakeSugar) -> None:
    """A password login answers the seven documented keys, in order, with uuid4 tokens."""
    reply = await http.login()
    assert 200 == reply.status
    assert TOKEN_KEYS == list(reply.body)
    assert 3600 == reply.body["expires_in"]
    assert "bearer" == reply.body["token_type"]
    assert reply.body["scope"] is None
    assert 1209600 == reply.body["refresh_expires_in"]
    for key in ("access_token", "refresh_token", "download_token"):
        assert 4 == uuid.UUID(reply.body[key]).version
    assert {"download_token_sugard": reply.body["download_token"]} == reply.cookies
    assert "no-store" == reply.headers["Cache-Control"]
    assert sugar.valid(reply.body["access_token"])


async def test_platform_defaults_to_base(http: Http, sugar: FakeSugar) -> None:
    """Without `platform`, the session lands on "base" and the request is recorded as omitted."""
    reply = await http.login(platform=None)
    assert 200 == reply.status
    assert ["download_token_base"] == list(reply.cookies)
    assert sugar.requests[-1].platform is None


async def test_fractional_lifetimes_are_kept(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """Short test lifetimes such as 2.5 s reach the client unrounded."""
    fake = await start(access_lifetime=2.5, refresh_lifetime=10.0)
    reply = await Http(session, fake).login()
    assert (2.5, 10) == (reply.body["expires_in"], reply.body["refresh_expires_in"])


@pytest.mark.parametrize(
    ("fields", "status", "label"),
    [
        ({"grant_type": None}, 400, "invalid_request"),
        ({"grant_type": "magic"}, 400, "invalid_request"),
        ({"client_id": None}, 400, "invalid_client"),
        ({"client_id": "nobody"}, 400, "invalid_client"),
        ({"client_secret": "not-empty"}, 400, "invalid_client"),
        ({"username": None}, 400, "invalid_request"),
        ({"password": None}, 400, "invalid_request"),
        ({"password": "wrong"}, 401, "need_login"),
        ({"username": "mallory"}, 401, "need_login"),
        ({"platform": "unregistered"}, 422, "invalid_parameter"),
        ({"grant_type": "refresh_token"}, 400, "invalid_request"),
        ({"grant_type": "refresh_token", "refresh_token": "nope"}, 400, "invalid_grant"),
    ],
)
async def test_token_endpoint_error_table(
    http: Http, fields: dict[str, str | None], status: int, label: str
) -> None:
    """Each failed token request answers the documented status and label."""
    assert_error(await http.login(**fields), status, label)


@pytest.mark.parametrize("grant", ["client_credentials", "authorization_code"])
async def test_unsupported_grants_have_no_message(http: Http, grant: str) -> None:
    """client_credentials and authorization_code: 400 unsupported_grant_type, no error_message."""
    reply = await http.login(grant_type=grant)
    assert_error(reply, 400, "unsupported_grant_type")
    assert {"error": "unsupported_grant_type"} == reply.body


async def test_error_texts_that_clients_may_show(http: Http) -> None:
    """The English texts of the errors people read: platform, refresh and token failures."""
    platform = await http.login(platform="unregistered")
    assert "Invalid platform specified." == platform.body["error_message"]
    refresh = await http.refresh("nope")
    assert "Invalid refresh token" == refresh.body["error_message"]


async def test_client_outdated_answers_433(http: Http, sugar: FakeSugar) -> None:
    """The client_outdated switch answers 433 at the token endpoint."""
    sugar.client_outdated = True
    assert_error(await http.login(), 433, "client_outdated")


async def test_form_encoded_body_works(http: Http) -> None:
    """A form-encoded body is accepted like JSON."""
    reply = await http.call("POST", "oauth2/token", data=creds())
    assert 200 == reply.status


async def test_query_string_overrides_body(http: Http) -> None:
    """Query-string arguments win over body arguments of the same name."""
    reply = await http.token(
        creds(password="wrong", platform="base"),
        params={"password": ADMIN_PASSWORD, "platform": "sugard"},
    )
    assert 200 == reply.status
    assert ["download_token_sugard"] == list(reply.cookies)


async def test_http_basic_carries_the_client(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """HTTP Basic is accepted for client_id/secret; a wrong secret or two methods fail."""
    fake = await start(clients={"sugar": "", "app": "app-secret"})
    http = Http(session, fake)
    no_client = creds(client_id=None, client_secret=None)
    good = await http.token(no_client, headers=basic("app", "app-secret"))
    assert 200 == good.status
    assert "app" == fake.requests[-1].client_id
    wrong = await http.token(no_client, headers=basic("app", "other"))
    assert_error(wrong, 400, "invalid_client")
    both = await http.token(creds(client_id="app"), headers=basic("app", "app-secret"))
    assert_error(both, 400, "invalid_client")


async def test_custom_client_needs_its_secret(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """A client with a secret fails without it and works with it in the body."""
    fake = await start(clients={"sugar": "", "app": "app-secret"})
    http = Http(session, fake)
    assert_error(await http.login(client_id="app", client_secret=None), 400, "invalid_client")
    assert 200 == (await http.login(client_id="app", client_secret="app-secret")).status


# ---------------------------------------------------------------- refresh and rotation


async def test_refresh_rotates_everything(http: Http, sugar: FakeSugar) -> None:
    """A refresh hands out three new tokens; the old refresh and access tokens die at once."""
    first = (await http.login()).body
    second = await http.refresh(first["refresh_token"])
    assert 200 == second.status
    assert TOKEN_KEYS == list(second.body)
    for key in ("access_token", "refresh_token", "download_token"):
        assert first[key] != second.body[key]
    assert not sugar.valid(first["access_token"])
    assert sugar.valid(second.body["access_token"])
    again = await http.refresh(first["refresh_token"])
    assert_error(again, 400, "invalid_grant")
    assert_error(await http.get("me", first["access_token"]), 401, "invalid_grant")


async def test_rotation_grace_keeps_old_access_token_alive(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """With a grace period (Sugar 8-12) the old access token lives on for that long only."""
    fake = await start(eviction_grace=120)
    now = time.time()
    freeze(fake, now)
    http = Http(session, fake)
    first = (await http.login()).body
    assert 200 == (await http.refresh(first["refresh_token"])).status
    assert 200 == (await http.get("me", first["access_token"])).status
    freeze(fake, now + 121)
    assert_error(await http.get("me", first["access_token"]), 401, "invalid_grant")


async def test_refresh_session_takes_the_requests_platform(http: Http, sugar: FakeSugar) -> None:
    """A refresh without platform moves the session to "base" (the web UI's platform)."""
    first = (await http.login()).body
    moved = await http.refresh(first["refresh_token"], platform=None)
    assert ["download_token_base"] == list(moved.cookies)
    web_ui = (await http.login(platform="base")).body
    # The web UI's new login evicts the moved session: it was on "base" now.
    assert_error(await http.refresh(moved.body["refresh_token"]), 400, "invalid_grant")
    assert sugar.valid(web_ui["access_token"])


async def test_refresh_with_another_client_is_invalid_grant(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """A refresh token only works with the client_id it was issued to."""
    fake = await start(clients={"sugar": "", "app": "app-secret"})
    http = Http(session, fake)
    first = (await http.login()).body
    reply = await http.refresh(first["refresh_token"], client_id="app", client_secret="app-secret")
    assert_error(reply, 400, "invalid_grant")
    assert "Invalid refresh token" == reply.body["error_message"]


async def test_expired_refresh_token(http: Http, sugar: FakeSugar) -> None:
    """After refresh_lifetime a refresh answers invalid_grant "Refresh token has expired"."""
    first = (await http.login()).body
    later = time.time() + 1209601
    freeze(sugar, later)
    reply = await http.refresh(first["refresh_token"])
    assert_error(reply, 400, "invalid_grant")
    assert reply.body["error_message"].startswith("Refresh token has expired: ")


async def test_max_session_lifetime_shrinks_refresh_expiry(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """Under max_session_lifetime each new refresh token inherits the old expiry."""
    fake = await start(max_session_lifetime=1000)
    now = time.time()
    freeze(fake, now)
    http = Http(session, fake)
    first = (await http.login()).body
    assert 1000 == first["refresh_expires_in"]
    freeze(fake, now + 300)
    second = (await http.refresh(first["refresh_token"])).body
    assert 700 == second["refresh_expires_in"]
    freeze(fake, now + 1001)
    assert_error(await http.refresh(second["refresh_token"]), 400, "invalid_grant")


async def test_idm_mode_quirks(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """IdM mode: a refresh answers an epoch as refresh_expires_in; bad ones invalid_request."""
    fake = await start(idm_mode=True)
    now = 1_800_000_000.25
    freeze(fake, now)
    http = Http(session, fake)
    first = (await http.login()).body
    assert 1209600 == first["refresh_expires_in"]
    second = (await http.refresh(first["refresh_token"])).body
    assert int(now + 1209600) == second["refresh_expires_in"]
    assert_error(await http.refresh(first["refresh_token"]), 400, "invalid_request")


# ---------------------------------------------------------------- one session per platform


async def test_second_login_evicts_the_first_at_once(http: Http, sugar: FakeSugar) -> None:
    """Sugar 13: another login of the same user and platform kills the first session at once."""
    first = (await http.login()).body
    other_platform = (await http.login(platform="base")).body
    second = (await http.login()).body
    assert not sugar.valid(first["access_token"])
    assert_error(await http.refresh(first["refresh_token"]), 400, "invalid_grant")
    assert sugar.valid(second["access_token"])
    assert sugar.valid(other_platform["access_token"])


async def test_eviction_grace_period(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """Sugar 8-12: an evicted access token lives for the grace period; its refresh token is gone."""
    fake = await start(eviction_grace=120)
    now = time.time()
    freeze(fake, now)
    http = Http(session, fake)
    first = (await http.login()).body
    await http.login()
    assert fake.valid(first["access_token"])
    assert_error(await http.refresh(first["refresh_token"]), 400, "invalid_grant")
    freeze(fake, now + 120)
    assert not fake.valid(first["access_token"])


async def test_mobile_keeps_two_sessions(http: Http, sugar: FakeSugar) -> None:
    """The "mobile" platform keeps the two newest sessions; a third login evicts the oldest."""
    one, two, three = [(await http.login(platform="mobile")).body for _ in range(3)]
    assert not sugar.valid(one["access_token"])
    assert sugar.valid(two["access_token"])
    assert sugar.valid(three["access_token"])


async def test_evict_switch_acts_like_a_login_elsewhere(http: Http, sugar: FakeSugar) -> None:
    """evict(user, platform) deletes the refresh token and kills the access token."""
    first = (await http.login()).body
    assert 1 == sugar.evict("admin", "sugard")
    assert not sugar.valid(first["access_token"])
    assert_error(await http.refresh(first["refresh_token"]), 400, "invalid_grant")


# ---------------------------------------------------------------- API calls with a token


async def test_me_and_ping_with_a_valid_token(http: Http) -> None:
    """/me names the token's user and /ping answers the JSON string "pong"."""
    token = (await http.login(username="bob", password=BOB_PASSWORD)).body["access_token"]
    me = await http.get("me", token)
    assert 200 == me.status
    assert "bob" == me.body["current_user"]["user_name"]
    assert me.body["current_user"]["id"]
    ping = await http.get("ping", token)
    assert (200, "pong") == (ping.status, ping.body)


async def test_api_call_without_token_or_with_bearer(http: Http) -> None:
    """No OAuth-Token header is need_login, and `Authorization: Bearer` does not count."""
    token = (await http.login()).body["access_token"]
    assert_error(await http.get("me"), 401, "need_login")
    bearer = await http.call("GET", "me", headers={"Authorization": f"Bearer {token}"})
    assert_error(bearer, 401, "need_login")


async def test_unknown_revoked_and_expired_access_tokens(http: Http, sugar: FakeSugar) -> None:
    """Unknown or revoked tokens are "invalid"; an expired one says "has expired"."""
    unknown = await http.get("ping", str(uuid.uuid4()))
    assert_error(unknown, 401, "invalid_grant")
    assert "The access token provided is invalid." == unknown.body["error_message"]
    first = (await http.login()).body["access_token"]
    assert sugar.revoke(first)
    assert_error(await http.get("me", first), 401, "invalid_grant")
    second = (await http.login(platform="base")).body["access_token"]
    freeze(sugar, time.time() + 3601)
    expired = await http.get("me", second)
    assert_error(expired, 401, "invalid_grant")
    assert "The access token provided has expired." == expired.body["error_message"]


async def test_expire_access_tokens_switch(http: Http, sugar: FakeSugar) -> None:
    """expire_access_tokens() makes live tokens answer "has expired" without moving the clock."""
    token = (await http.login()).body["access_token"]
    sugar.expire_access_tokens()
    reply = await http.get("me", token)
    assert "The access token provided has expired." == reply.body["error_message"]


async def test_logout_kills_the_session(http: Http, sugar: FakeSugar) -> None:
    """Logout kills the access token at once, and the refresh token sent with it."""
    first = (await http.login()).body
    reply = await http.post(
        "oauth2/logout", first["access_token"], {"refresh_token": first["refresh_token"]}
    )
    assert (200, {"success": True}) == (reply.status, reply.body)
    assert not sugar.valid(first["access_token"])
    assert_error(await http.refresh(first["refresh_token"]), 400, "invalid_grant")
    assert 1 == sugar.calls["logout"]


async def test_logout_without_refresh_token_leaves_it(http: Http, sugar: FakeSugar) -> None:
    """As in Sugar, logout deletes only the refresh token it is given."""
    first = (await http.login()).body
    await http.post("oauth2/logout", first["access_token"])
    assert not sugar.valid(first["access_token"])
    assert 200 == (await http.refresh(first["refresh_token"])).status


async def test_sudo(http: Http, sugar: FakeSugar) -> None:
    """Admins get a token for another user, evicting that user's session; others get 403."""
    admin = (await http.login()).body["access_token"]
    bob = (await http.login(username="bob", password=BOB_PASSWORD)).body
    reply = await http.post("oauth2/sudo/bob", admin, {"platform": "sugard"})
    assert 200 == reply.status
    assert TOKEN_KEYS == list(reply.body)
    me = await http.get("me", reply.body["access_token"])
    assert "bob" == me.body["current_user"]["user_name"]
    assert not sugar.valid(bob["access_token"])
    assert_error(await http.post("oauth2/sudo/nobody", admin), 404, "not_found")
    not_admin = await http.post("oauth2/sudo/admin", reply.body["access_token"])
    assert_error(not_admin, 403, "not_authorized")
    assert 3 == sugar.calls["sudo"]


@pytest.mark.parametrize("version", ["v10", "v11", "v11_4", "v11_20"])
async def test_supported_versions(http: Http, version: str) -> None:
    """v10, v11 and v11_N all serve the token endpoint."""
    assert 200 == (await http.token(creds(), version=version)).status


@pytest.mark.parametrize("version", ["v9", "v12", "v4_1", "latest"])
async def test_unsupported_versions_answer_301(http: Http, version: str) -> None:
    """Versions outside v10..v11_N answer 301 incorrect_version, without a Location."""
    reply = await http.token(creds(), version=version, allow_redirects=False)
    assert_error(reply, 301, "incorrect_version")
    assert "Location" not in reply.headers


async def test_unknown_route_is_404(http: Http) -> None:
    """A route Sugar does not have answers 404 no_method."""
    assert_error(await http.get("nothing/here"), 404, "no_method")


# ---------------------------------------------------------------- site status


async def test_maintenance_burns_the_refresh_token(http: Http, sugar: FakeSugar) -> None:
    """During maintenance a refresh deletes the refresh token, then answers 401 need_login."""
    first = (await http.login()).body
    sugar.maintenance = True
    reply = await http.refresh(first["refresh_token"])
    assert_error(reply, 401, "need_login")
    assert "maintenance" in reply.body["error_message"]
    sugar.maintenance = False
    assert_error(await http.refresh(first["refresh_token"]), 400, "invalid_grant")
    assert 200 == (await http.login()).status


async def test_maintenance_at_login_and_on_other_routes(http: Http, sugar: FakeSugar) -> None:
    """Maintenance: login is 401 need_login, /me and /ping keep working, other routes get 503."""
    token = (await http.login()).body["access_token"]
    sugar.maintenance = True
    login = await http.login(platform="base")
    assert_error(login, 401, "need_login")
    assert "maintenance" in login.body["error_message"]
    assert 200 == (await http.get("me", token)).status
    assert 200 == (await http.get("ping", token)).status
    records = await http.get("Accounts", token)
    assert_error(records, 503, "maintenance")
    assert sugar.url == records.body["url"]


async def test_status_exempt_can_block_me_too(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """With status_exempt emptied, even /me answers 503 during maintenance."""
    fake = await start(status_exempt=frozenset())
    http = Http(session, fake)
    token = (await http.login()).body["access_token"]
    fake.maintenance = True
    assert_error(await http.get("me", token), 503, "maintenance")


async def test_license_errors(http: Http, sugar: FakeSugar) -> None:
    """Seats: 403 license_seats_needed; expired: 401 need_login at login, 503 admin_only."""
    token = (await http.login()).body["access_token"]
    sugar.license_error = "seats"
    assert_error(await http.login(platform="base"), 403, "license_seats_needed")
    sugar.license_error = "expired"
    reply = await http.login(platform="base")
    assert_error(reply, 401, "need_login")
    assert "license" in reply.body["error_message"]
    assert_error(await http.get("Accounts", token), 503, "admin_only")
    assert 200 == (await http.get("me", token)).status


# ---------------------------------------------------------------- accounts and platforms


async def test_lockout_is_checked_before_the_password(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """After N failed logins even the right password fails, until unlock()."""
    fake = await start(lockout_after=2)
    http = Http(session, fake)
    await http.refresh("not-a-token")  # bad refresh tokens do not count
    for _ in range(2):
        assert_error(await http.login(password="wrong"), 401, "need_login")
    locked = await http.login()
    assert_error(locked, 401, "need_login")
    assert locked.body["error_message"].startswith("Too many failed login attempts")
    assert 200 == (await http.login(username="bob", password=BOB_PASSWORD)).status
    fake.unlock("admin")
    assert 200 == (await http.login()).status


async def test_set_password(http: Http, sugar: FakeSugar) -> None:
    """After set_password() the old password is refused and the new one works."""
    sugar.set_password("admin", "new-password")
    assert_error(await http.login(), 401, "need_login")
    assert 200 == (await http.login(password="new-password")).status


async def test_removed_platform_is_422_everywhere(http: Http, sugar: FakeSugar) -> None:
    """An unregistered platform: 422 at login, at refresh and on every call with its token."""
    first = (await http.login()).body
    sugar.remove_platform("sugard")
    reply = await http.get("me", first["access_token"])
    assert_error(reply, 422, "invalid_parameter")
    assert "Invalid platform specified." == reply.body["error_message"]
    assert_error(await http.refresh(first["refresh_token"]), 422, "invalid_parameter")
    assert_error(await http.login(), 422, "invalid_parameter")
    sugar.add_platform("sugard")
    assert 200 == (await http.refresh(first["refresh_token"])).status


# ---------------------------------------------------------------- injected faults


@pytest.mark.parametrize(
    ("kind", "status", "content_type"),
    [("html502", 502, "text/html"), ("503", 503, "text/html"), ("429", 429, "text/html")],
)
async def test_proxy_faults(
    http: Http, sugar: FakeSugar, kind: Any, status: int, content_type: str
) -> None:
    """html502, 503 and 429 answer HTML pages, then the next request goes through."""
    sugar.fail_next(1, kind)
    reply = await http.login()
    assert status == reply.status
    assert reply.headers["Content-Type"].startswith(content_type)
    assert "Retry-After" not in reply.headers
    assert 200 == (await http.login()).status
    assert {"token": 2, "password": 1} == sugar.calls
    assert [status, 200] == [r.status for r in sugar.requests]
    assert kind == sugar.requests[0].fault


async def test_429_with_retry_after(http: Http, sugar: FakeSugar) -> None:
    """fail_next(..., retry_after=7) sends `Retry-After: 7`."""
    sugar.fail_next(2, "429", retry_after=7)
    for _ in range(2):
        reply = await http.login()
        assert (429, "7") == (reply.status, reply.headers["Retry-After"])
    assert 200 == (await http.login()).status


async def test_reset_drops_the_connection(http: Http, sugar: FakeSugar) -> None:
    """ "reset" closes the TCP connection without any answer; it is recorded with status 0."""
    sugar.fail_next(1, "reset")
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.login()
    assert 200 == (await http.login()).status
    assert (
        TokenRequest(
            time=sugar.requests[0].time,
            grant_type="password",
            username="admin",
            platform="sugard",
            client_id="sugar",
            status=0,
            error=None,
            fault="reset",
        )
        == sugar.requests[0]
    )
    assert 1 == sugar.calls["password"]


async def test_garbage_is_a_200_that_is_not_json(http: Http, sugar: FakeSugar) -> None:
    """ "garbage" answers 200 with a body no JSON parser accepts."""
    sugar.fail_next(1, "garbage")
    reply = await http.login()
    assert 200 == reply.status
    assert isinstance(reply.body, str)


async def test_delay_slows_the_token_endpoint(http: Http, sugar: FakeSugar) -> None:
    """`delay` holds every token answer back by that many seconds."""
    sugar.delay = 0.2
    began = time.monotonic()
    assert 200 == (await http.login()).status
    assert time.monotonic() - began >= 0.2


async def test_fail_next_rejects_unknown_kinds(sugar: FakeSugar) -> None:
    """A typo in a fault kind fails loudly instead of silently passing."""
    with pytest.raises(ValueError, match="unknown fault kind"):
        sugar.fail_next(1, "html500")  # type: ignore[arg-type]


# ---------------------------------------------------------------- records, secrets, counters


async def test_records_hold_no_secrets_but_secrets_are_listed(http: Http, sugar: FakeSugar) -> None:
    """Records never hold a password; received_secrets() and issued list what leak scans need."""
    first = (await http.login()).body
    await http.refresh(first["refresh_token"])
    assert ADMIN_PASSWORD not in repr(sugar.requests)
    assert ADMIN_PASSWORD not in repr(sugar)
    assert {ADMIN_PASSWORD, first["refresh_token"]} <= set(sugar.received_secrets())
    assert 6 == len(sugar.issued)
    assert first["access_token"] in sugar.issued
    assert ["password", "refresh_token"] == [r.grant_type for r in sugar.requests]
    sugar.reset_counters()
    assert ([], 0) == (sugar.requests, sugar.calls.total())
    assert 6 == len(sugar.issued)


async def test_app_mounts_in_aiohttp_test_client() -> None:
    """FakeSugar.app can be served by aiohttp's own TestServer."""
    fake = FakeSugar()
    async with TestClient(TestServer(fake.app)) as client:
        resp = await client.post("/rest/v10/oauth2/token", json=creds())
        assert 200 == resp.status
        assert TOKEN_KEYS == list(await resp.json())


async def test_async_context_manager_sets_and_clears_url() -> None:
    """`async with FakeSugar()` listens on 127.0.0.1 while inside, and not after."""
    async with FakeSugar() as fake:
        assert fake.url.startswith("http://127.0.0.1:")
    assert "" == fake.url


# ---------------------------------------------------------------- synchronous use


def post_form(url: str, fields: dict[str, str]) -> tuple[int, Any]:
    """A form POST with urllib; returns status and parsed JSON."""
    data = urllib.parse.urlencode(fields).encode()
    try:
        with urllib.request.urlopen(url, data=data, timeout=10) as resp:  # noqa: S310
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.load(err)


def test_running_fake_from_synchronous_code() -> None:
    """running_fake serves from a thread; switches and counters work from the caller's thread."""
    with running_fake(users={"alice": "alice-pw"}, platforms={"base", "cli"}) as fake:
        token_url = f"{fake.url}/rest/v10/oauth2/token"
        fields = creds(username="alice", password="alice-pw", platform="cli")
        status, body = post_form(token_url, fields)
        assert 200 == status
        assert fake.valid(body["access_token"])
        fake.maintenance = True
        status, body = post_form(token_url, fields)
        assert (401, "need_login") == (status, body["error"])
        assert 2 == fake.calls["password"]
    assert "" == fake.url


def test_module_runs_as_a_subprocess() -> None:
    """`python -m sugard.testing` prints only its URL, serves logins, exits 0 on SIGTERM."""
    command = [sys.executable, "-m", "sugard.testing", "--port", "0", "--user", "carol:carol-pw"]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        status, body = post_form(
            f"{url}/rest/v10/oauth2/token",
            creds(username="carol", password="carol-pw"),
        )
        assert 200 == status
        assert TOKEN_KEYS == list(body)
        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(timeout=10)
        assert ("", "") == (proc.stdout.read(), proc.stderr.read())
