# Expected value first in asserts (docs/style.md), which ruff's SIM300 calls a Yoda condition.
"""The fake SugarCRM itself: it must answer exactly as docs/sugarcrm.md says Sugar does, on
each supported Sugar version and in IdM mode.

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
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from support import ROOT
from support.daemon import SUGARD
from support.sugar_replies import assert_error

from sugard.testing import LATEST_VERSION, SUGAR_VERSIONS, FakeSugar, TokenRequest, running_fake

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
SERVER_INFO = "metadata?type_filter=server_info"  # where Sugar publishes its version
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
    assert_error(reply, 400, "unsupported_grant_type", message=False)
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
    """HTTP Basic is accepted for client_id/secret, and wins over a client_id in the body."""
    fake = await start(clients={"sugar": "", "app": "app-secret"})
    http = Http(session, fake)
    no_client = creds(client_id=None, client_secret=None)
    good = await http.token(no_client, headers=basic("app", "app-secret"))
    assert 200 == good.status
    assert "app" == fake.requests[-1].client_id
    wrong = await http.token(no_client, headers=basic("app", "other"))
    assert_error(wrong, 400, "invalid_client")
    both = await http.token(creds(client_id="nobody"), headers=basic("app", "app-secret"))
    assert 200 == both.status
    assert "app" == fake.requests[-1].client_id
    # The session belongs to the Basic client: only it may refresh it.
    assert_error(await http.refresh(both.body["refresh_token"]), 400, "invalid_grant")


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
    """With a check interval (as up to 13.0.x) the old access token lives on that long only."""
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
    """13.3+: another login of the same user and platform kills the first session at once."""
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
    """Up to 13.0.x an evicted access token lives until the next check; its refresh token dies."""
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


async def test_api_call_without_token_is_need_login(http: Http) -> None:
    """No token anywhere in the request is 401 need_login."""
    await http.login()
    assert_error(await http.get("me"), 401, "need_login")


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


@pytest.mark.parametrize("version", SUGAR_VERSIONS)
async def test_logout_without_refresh_token(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession, version: str
) -> None:
    """8.0 keeps the session's refresh token; from 12.0 a bare logout ends the whole session."""
    fake = await start(sugar_version=version)
    http = Http(session, fake)
    first = (await http.login()).body
    assert 200 == (await http.post("oauth2/logout", first["access_token"])).status
    assert not fake.valid(first["access_token"])
    refresh = await http.refresh(first["refresh_token"])
    if version == "8.0":
        assert 200 == refresh.status
    else:
        assert_error(refresh, 400, "invalid_grant")


async def test_sudo(http: Http, sugar: FakeSugar) -> None:
    """Admins get a token for another user, evicting that user's session; others get 403."""
    admin = (await http.login()).body["access_token"]
    bob = (await http.login(username="bob", password=BOB_PASSWORD)).body
    reply = await http.post("oauth2/sudo/bob", admin, {"platform": "sugard"})
    assert 200 == reply.status
    assert TOKEN_KEYS[:4] == list(reply.body)  # no refresh or download token
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


# ---------------------------------------------------------------- Sugar versions

GRACE_VERSIONS = ["8.0", "12.0", "13.0"]  # a rotated token lives until the next session check
AT_ONCE_VERSIONS = ["13.3", "14.0", "25.1", "26.1"]  # a rotated token dies at once
T0 = 1_800_000_000.0  # a whole second, so that lifetimes read plainly


def test_versions_cover_eight_to_the_newest() -> None:
    """The supported versions, oldest first; the default is the newest."""
    assert ("8.0", "12.0", "13.0", "13.3", "14.0", "25.1", "26.1") == SUGAR_VERSIONS
    assert "26.1" == LATEST_VERSION == FakeSugar().sugar_version


def test_unknown_version_is_refused_with_the_supported_ones() -> None:
    """A version the fake cannot play fails at construction, naming the ones it can."""
    with pytest.raises(ValueError, match=r"unsupported sugar_version '13\.1'.*8\.0, 12\.0"):
        FakeSugar(sugar_version="13.1")


@pytest.mark.parametrize("version", SUGAR_VERSIONS)
async def test_server_info_publishes_the_version(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession, version: str
) -> None:
    """With server_info_route=True, GET /ServerInfo needs a token and answers ServerInfoApi's
    fields, version "V.0" (no Sugar version is known to serve it: off by default)."""
    fake = await start(sugar_version=version, server_info_route=True)
    http = Http(session, fake)
    assert_error(await http.get("ServerInfo"), 401, "need_login")
    token = (await http.login()).body["access_token"]
    info = await http.get("ServerInfo", token, version="v11_4")
    assert 200 == info.status
    assert ["flavor", "version", "build", "marketing_version", "gmt_time", "server_time"] == list(
        info.body
    )
    assert ("ENT", f"{version}.0") == (info.body["flavor"], info.body["version"])
    assert info.body["gmt_time"].endswith("+0000")
    assert all(isinstance(value, str) for value in info.body.values())
    assert 2 == fake.calls["serverinfo"]  # the refused call counts too


async def test_server_info_is_closed_during_maintenance(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """ServerInfo, where served, is an ordinary route: maintenance answers it 503."""
    sugar = await start(server_info_route=True)
    http = Http(session, sugar)
    token = (await http.login()).body["access_token"]
    sugar.maintenance = True
    assert_error(await http.get("ServerInfo", token), 503, "maintenance")


@pytest.mark.parametrize("version", SUGAR_VERSIONS)
async def test_old_access_token_after_a_refresh(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession, version: str
) -> None:
    """Up to 13.0.x the rotated token works until its session's check 120 s after login;
    from 13.3 it dies the moment the refresh answers."""
    fake = await start(sugar_version=version)
    freeze(fake, T0)
    http = Http(session, fake)
    first = (await http.login()).body
    freeze(fake, T0 + 100)
    assert 200 == (await http.refresh(first["refresh_token"])).status
    old = await http.get("me", first["access_token"])
    if version in GRACE_VERSIONS:
        assert 200 == old.status
        freeze(fake, T0 + 119.9)
        assert 200 == (await http.get("me", first["access_token"])).status
        freeze(fake, T0 + 120)
    assert_error(await http.get("me", first["access_token"]), 401, "invalid_grant")


async def test_session_checks_run_at_most_every_120_s_from_the_last_one(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """12.0: a call 130 s after login runs a check, so a token evicted at +140 s lives to +250 s
    (not 120 s after the eviction, nor 120 s after login)."""
    fake = await start(sugar_version="12.0")
    freeze(fake, T0)
    http = Http(session, fake)
    token = (await http.login()).body["access_token"]
    for at in (50, 130, 200):  # checks at 0 (login) and 130; the call at 50 and 200 runs none
        freeze(fake, T0 + at)
        assert 200 == (await http.get("ping", token)).status
    freeze(fake, T0 + 240)
    assert 1 == fake.evict("admin", "sugard")
    for at in (240, 249.9):
        freeze(fake, T0 + at)
        assert 200 == (await http.get("ping", token)).status
    freeze(fake, T0 + 250)
    assert_error(await http.get("ping", token), 401, "invalid_grant")
    freeze(fake, T0 + 260)
    assert not fake.valid(token)


async def test_grace_after_a_refresh_is_zero_when_a_check_is_due(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """12.0: a refresh 130 s after a login whose token was never checked since leaves the old
    token no grace at all: its first call after the refresh runs the check."""
    fake = await start(sugar_version="12.0")
    freeze(fake, T0)
    http = Http(session, fake)
    first = (await http.login()).body
    freeze(fake, T0 + 130)
    assert 200 == (await http.refresh(first["refresh_token"])).status
    assert_error(await http.get("me", first["access_token"]), 401, "invalid_grant")


async def test_an_unused_evicted_token_dies_at_its_first_call_after_the_interval(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """12.0: evicted at +100 s, still working at +119 s, dead at +122 s (as observed)."""
    fake = await start(sugar_version="12.0")
    freeze(fake, T0)
    http = Http(session, fake)
    first = (await http.login()).body
    freeze(fake, T0 + 100)
    second = (await http.login()).body
    freeze(fake, T0 + 119)
    assert 200 == (await http.get("me", first["access_token"])).status
    freeze(fake, T0 + 122)
    assert_error(await http.get("me", first["access_token"]), 401, "invalid_grant")
    assert 200 == (await http.get("me", second["access_token"])).status


@pytest.mark.parametrize("version", GRACE_VERSIONS)
async def test_eviction_grace_overrides_the_versions_check_interval(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession, version: str
) -> None:
    """eviction_grace=0 makes even an old version kill rotated tokens at once."""
    fake = await start(sugar_version=version, eviction_grace=0)
    http = Http(session, fake)
    first = (await http.login()).body
    await http.refresh(first["refresh_token"])
    assert_error(await http.get("me", first["access_token"]), 401, "invalid_grant")


@pytest.mark.parametrize("version", SUGAR_VERSIONS)
async def test_license_seats_exceeded(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession, version: str
) -> None:
    """Seats exceeded at login: 403 license_seats_needed from 9.0, 401 need_login on 8.0."""
    fake = await start(sugar_version=version, license_error="seats")
    reply = await Http(session, fake).login()
    if version == "8.0":
        assert_error(reply, 401, "need_login")
    else:
        assert_error(reply, 403, "license_seats_needed")


@pytest.mark.parametrize("version", SUGAR_VERSIONS)
async def test_authorization_bearer(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession, version: str
) -> None:
    """`Authorization: Bearer` works from 9.0 (8.0: need_login), and only without OAuth-Token."""
    fake = await start(sugar_version=version)
    http = Http(session, fake)
    token = (await http.login()).body["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    reply = await http.call("GET", "me", headers=bearer)
    if version == "8.0":
        assert_error(reply, 401, "need_login")
    else:
        assert 200 == reply.status
    both = await http.call("GET", "me", headers={**bearer, "OAuth-Token": "not-a-token"})
    assert_error(both, 401, "invalid_grant")


async def test_bearer_on_8_0_only_for_idm_opi_tokens(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """8.0 in IdM mode reads a Bearer token of the opi platform, and no other."""
    fake = await start(sugar_version="8.0", idm_mode=True, platforms={"base", "sugard", "opi"})
    http = Http(session, fake)
    opi = (await http.login(platform="opi")).body["access_token"]
    other = (await http.login()).body["access_token"]
    assert 200 == (await http.call("GET", "me", headers={"Authorization": f"Bearer {opi}"})).status
    reply = await http.call("GET", "me", headers={"Authorization": f"Bearer {other}"})
    assert_error(reply, 401, "need_login")


async def test_oauth_token_as_a_post_field_or_in_the_query(http: Http, sugar: FakeSugar) -> None:
    """`oauth_token` in a form POST or in the query string stands for the OAuth-Token header."""
    token = (await http.login()).body["access_token"]
    ping = await http.call("GET", "ping", params={"oauth_token": token})
    assert (200, "pong") == (ping.status, ping.body)
    logout = await http.call("POST", "oauth2/logout", data={"oauth_token": token})
    assert (200, {"success": True}) == (logout.status, logout.body)
    assert not sugar.valid(token)


async def test_maintenance_trap_a_refused_login_evicts_the_live_session(
    http: Http, sugar: FakeSugar
) -> None:
    """A login refused for maintenance still opens a session, which evicts the live one."""
    live = (await http.login()).body
    other_platform = (await http.login(platform="base")).body
    sugar.maintenance = True
    assert_error(await http.login(), 401, "need_login")
    sugar.maintenance = False
    assert not sugar.valid(live["access_token"])
    assert_error(await http.refresh(live["refresh_token"]), 400, "invalid_grant")
    assert sugar.valid(other_platform["access_token"])


async def test_license_lock_at_login_evicts_the_live_session_too(
    http: Http, sugar: FakeSugar
) -> None:
    """A login refused for license seats evicts the user's live session on that platform."""
    live = (await http.login()).body
    sugar.license_error = "seats"
    assert_error(await http.login(), 403, "license_seats_needed")
    sugar.license_error = None
    assert_error(await http.refresh(live["refresh_token"]), 400, "invalid_grant")


@pytest.mark.parametrize("version", ["12.0", "13.3"])
async def test_maintenance_trap_on_refresh_kills_the_old_token_as_a_refresh_does(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession, version: str
) -> None:
    """A refresh refused for maintenance rotated anyway: the old token lives on only on 12.0."""
    fake = await start(sugar_version=version)
    http = Http(session, fake)
    first = (await http.login()).body
    fake.maintenance = True
    assert_error(await http.refresh(first["refresh_token"]), 401, "need_login")
    assert ("12.0" == version) == fake.valid(first["access_token"])


# ---------------------------------------------------------------- token endpoint details


@pytest.mark.parametrize("grant", ["password", "refresh_token"])
async def test_any_scope_is_invalid_scope(http: Http, grant: str) -> None:
    """A non-empty scope is 400 invalid_scope, after the grant is checked, before rotation."""
    first = (await http.login()).body
    if grant == "password":
        reply = await http.login(scope="api")
    else:
        reply = await http.refresh(first["refresh_token"], scope="api")
    assert_error(reply, 400, "invalid_scope", message=False)
    assert_error(await http.login(password="wrong", scope="api"), 401, "need_login")
    assert 200 == (await http.refresh(first["refresh_token"])).status


@pytest.mark.parametrize("route", ["oauth2/token", "oauth2/logout"])
async def test_a_body_that_is_not_json_is_422(http: Http, sugar: FakeSugar, route: str) -> None:
    """A JSON body that does not parse is 422 invalid_parameter, and counted at the token route."""
    reply = await http.call(
        "POST",
        route,
        data=b'{"grant_type": "password",',
        headers={"Content-Type": "application/json"},
    )
    assert_error(reply, 422, "invalid_parameter")
    if route == "oauth2/token":
        assert (1, 422, "invalid_parameter") == (
            sugar.calls["token"],
            sugar.requests[-1].status,
            sugar.requests[-1].error,
        )


async def test_implicit_grant_is_501_after_the_client_check(http: Http) -> None:
    """grant_type=token: 501 with the library's text as the label; a bad client comes first."""
    reply = await http.login(grant_type="token")
    assert 501 == reply.status
    assert {"error": "This OAuth2 library does not yet support implicit grant types."} == reply.body
    assert_error(await http.login(grant_type="token", client_id="nobody"), 400, "invalid_client")


@pytest.mark.parametrize(
    ("fields", "status", "label"),
    [
        ({"grant_type": "magic", "client_id": "nobody"}, 400, "invalid_request"),
        ({"grant_type": "client_credentials", "client_id": "nobody"}, 400, "invalid_client"),
        ({"password": "wrong", "client_id": "nobody"}, 400, "invalid_client"),
        ({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}, 400, "invalid_grant"),
        ({"grant_type": "http://example.com/grant"}, 400, "invalid_grant"),
    ],
)
async def test_checks_run_grant_type_then_client_then_grant(
    http: Http, fields: dict[str, str], status: int, label: str
) -> None:
    """The first failing check answers: grant_type, then client, then the grant itself."""
    assert_error(
        await http.login(**fields), status, label, message=label != "invalid_grant"
    )  # extension grants: no message


async def test_extension_grants_have_no_message(http: Http) -> None:
    """An unknown urn: grant is invalid_grant with no error_message."""
    reply = await http.login(grant_type="urn:example:grant")
    assert {"error": "invalid_grant"} == reply.body


async def test_accept_any_platform(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """With the registry check off any well-formed platform works; a malformed one still 422s."""
    strict = Http(session, await start())
    assert_error(await strict.login(platform="unregistered"), 422, "invalid_parameter")
    http = Http(session, await start(accept_any_platform=True))
    reply = await http.login(platform="unregistered")
    assert 200 == reply.status
    assert 200 == (await http.get("me", reply.body["access_token"])).status
    assert_error(await http.login(platform="no spaces!"), 422, "invalid_parameter")


# ---------------------------------------------------------------- wire details


async def test_json_is_php_json_without_charset(http: Http) -> None:
    """application/json with no charset, and PHP's escapes for " ' & < > and /."""
    url = f"{http.fake.url}/rest/v10/x%3Cy%3E%26%27"
    async with http.session.get(url) as resp:
        raw = await resp.text()
        assert "application/json" == resp.headers["Content-Type"]
    assert r'"Could not find a route for GET \/x\u003Cy\u003E\u0026\u0027."' in raw
    reply = await http.login(password=None)
    assert "application/json" == reply.headers["Content-Type"]
    async with http.session.post(
        f"{http.fake.url}/rest/v10/oauth2/token", json=creds(password=None)
    ) as resp:
        assert r"\u0022username\u0022" in await resp.text()


async def test_cache_headers(http: Http) -> None:
    """Token answers carry PHP's session cache headers; errors only `no-store`."""
    reply = await http.login()
    assert "no-store, no-cache, must-revalidate" == reply.headers["Cache-Control"]
    assert "no-cache" == reply.headers["Pragma"]
    assert "Thu, 19 Nov 1981 08:52:00 GMT" == reply.headers["Expires"]
    error = await http.login(password="wrong")
    assert "no-store" == error.headers["Cache-Control"]
    assert "Pragma" not in error.headers


async def test_download_cookie_attributes(http: Http, sugar: FakeSugar) -> None:
    """The cookie: expires and Max-Age of the refresh lifetime, path=/, HttpOnly; logout
    deletes the cookie of the logout request's platform, and PHP's session cookie."""
    freeze(sugar, T0)
    reply = await http.login()
    cookie = reply.headers["Set-Cookie"]
    download = reply.body["download_token"]
    assert (
        f"download_token_sugard={download}; expires=Fri, 29-Jan-2027 08:00:00 GMT; "
        "Max-Age=1209600; path=/; HttpOnly"
    ) == cookie
    logout = await http.post("oauth2/logout", reply.body["access_token"], {"platform": "sugard"})
    deleted = "=deleted; expires=Thu, 01-Jan-1970 00:00:01 GMT; Max-Age=0; path=/; HttpOnly"
    cookies = [value for name, value in logout.headers.items() if name == "Set-Cookie"]
    assert [f"download_token_sugard{deleted}", f"PHPSESSID{deleted}"] == cookies


async def test_refresh_expires_in_is_a_whole_number(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """Under max_session_lifetime with a fractional clock, refresh_expires_in stays an int."""
    fake = await start(max_session_lifetime=1000)
    freeze(fake, T0 + 0.75)
    http = Http(session, fake)
    first = (await http.login()).body
    freeze(fake, T0 + 301.25)
    second = (await http.refresh(first["refresh_token"])).body
    assert 699 == second["refresh_expires_in"]
    assert isinstance(second["refresh_expires_in"], int)


async def test_expired_refresh_message_names_both_times(http: Http, sugar: FakeSugar) -> None:
    """ "Refresh token has expired: <its end> vs <now>", both epoch seconds."""
    freeze(sugar, T0 + 0.5)
    first = (await http.login()).body
    freeze(sugar, T0 + 1209601.5)
    reply = await http.refresh(first["refresh_token"])
    expected = f"Refresh token has expired: {int(T0) + 1209600} vs {int(T0) + 1209601}"
    assert expected == reply.body["error_message"]


async def test_tokens_live_to_the_end_of_their_last_whole_second(
    start: Callable[..., Awaitable[FakeSugar]], session: aiohttp.ClientSession
) -> None:
    """A 4 s token issued at .05 answers 200 at 4.9 s and "has expired" at 5.1 s."""
    fake = await start(access_lifetime=4)
    freeze(fake, T0 + 0.05)
    http = Http(session, fake)
    token = (await http.login()).body["access_token"]
    freeze(fake, T0 + 4.95)
    assert 200 == (await http.get("me", token)).status
    freeze(fake, T0 + 5.15)
    expired = await http.get("me", token)
    assert "The access token provided has expired." == expired.body["error_message"]


# ---------------------------------------------------------------- IdM mode


@pytest.fixture
async def idm(start: Callable[..., Awaitable[FakeSugar]]) -> FakeSugar:
    """A fake in IdM mode (SugarCloud with SugarIdentity), its clock stopped at T0."""
    fake = await start(idm_mode=True)
    freeze(fake, T0)
    return fake


async def test_idm_tokens_are_opaque_and_scoped(
    idm: FakeSugar, session: aiohttp.ClientSession
) -> None:
    """IdM tokens are not UUIDs and `scope` is not null."""
    reply = (await Http(session, idm).login()).body
    assert TOKEN_KEYS == list(reply)
    with pytest.raises(ValueError, match="badly formed"):
        uuid.UUID(reply["access_token"])
    assert isinstance(reply["scope"], str) and reply["scope"]


async def test_idm_refresh_answer_order_and_download_token(
    idm: FakeSugar, session: aiohttp.ClientSession
) -> None:
    """An IdM refresh puts download_token (the access token itself) before an absolute
    refresh_expires_in."""
    http = Http(session, idm)
    first = (await http.login()).body
    assert first["download_token"] != first["access_token"]
    second = (await http.refresh(first["refresh_token"])).body
    assert [*TOKEN_KEYS[:5], "download_token", "refresh_expires_in"] == list(second)
    assert second["access_token"] == second["download_token"]
    assert int(T0) + 1209600 == second["refresh_expires_in"]


async def test_idm_has_no_one_session_eviction(
    idm: FakeSugar, session: aiohttp.ClientSession
) -> None:
    """Two IdM logins of one user on one platform both stay alive."""
    http = Http(session, idm)
    first, second = [(await http.login()).body for _ in range(2)]
    assert idm.valid(first["access_token"]) and idm.valid(second["access_token"])
    assert 200 == (await http.refresh(first["refresh_token"])).status


async def test_idm_refresh_token_reuse_kills_the_chain(
    idm: FakeSugar, session: aiohttp.ClientSession
) -> None:
    """Reusing a spent IdM refresh token is invalid_request and ends the session it led to."""
    http = Http(session, idm)
    bystander = (await http.login()).body
    first = (await http.login()).body
    second = (await http.refresh(first["refresh_token"])).body
    assert_error(await http.refresh(first["refresh_token"]), 400, "invalid_request")
    assert_error(await http.refresh(second["refresh_token"]), 400, "invalid_request")
    assert not idm.valid(second["access_token"])
    assert 200 == (await http.refresh(bystander["refresh_token"])).status


async def test_idm_revocation_cache(idm: FakeSugar, session: aiohttp.ClientSession) -> None:
    """A revoked IdM token works until Sugar's ~10 s cached answer about it runs out; one
    never checked before dies at once."""
    http = Http(session, idm)
    used = (await http.login()).body["access_token"]
    unused = (await http.login()).body["access_token"]
    assert 200 == (await http.get("me", used)).status
    freeze(idm, T0 + 3)
    assert idm.revoke(used) and idm.revoke(unused)
    assert_error(await http.get("me", unused), 401, "invalid_grant")
    freeze(idm, T0 + 9.9)
    assert 200 == (await http.get("me", used)).status
    freeze(idm, T0 + 10)
    assert_error(await http.get("me", used), 401, "invalid_grant")


async def test_idm_nonrecoverable_error(idm: FakeSugar, session: aiohttp.ClientSession) -> None:
    """The idm_nonrecoverable switch answers token checks 401 idm_nonrecoverable_error."""
    http = Http(session, idm)
    token = (await http.login()).body["access_token"]
    idm.idm_nonrecoverable = True
    assert_error(await http.get("ping", token), 401, "idm_nonrecoverable_error")
    idm.idm_nonrecoverable = False
    assert 200 == (await http.get("ping", token)).status


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


@pytest.mark.parametrize(
    "run", [[sys.executable, "-m", "sugard.testing"], [SUGARD, "fake"]], ids=["module", "sugard"]
)
def test_module_runs_as_a_subprocess(run: list[str]) -> None:
    """`python -m sugard.testing` and `sugard fake` (what a pipx install has) print only
    the URL, serve logins, exit 0 on SIGTERM."""
    command = [*run, "--port", "0", "--user", "carol:carol-pw"]
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


def test_sugard_fake_takes_the_module_options_and_names_itself() -> None:
    """`sugard fake` has the module's options (its --help lists them as `sugard fake`, and
    `sugard help fake` is the same); a bad option exits 2 naming `sugard fake`."""
    helped = subprocess.run([SUGARD, "fake", "--help"], capture_output=True, text=True, timeout=30)
    assert 0 == helped.returncode
    assert helped.stdout.startswith("usage: sugard fake ")
    for option in ("--sugar-version", "--user", "--seed", "--idm", "--lockout-after"):
        assert option in helped.stdout
    again = subprocess.run([SUGARD, "help", "fake"], capture_output=True, text=True, timeout=30)
    assert (0, helped.stdout) == (again.returncode, again.stdout)
    bad = subprocess.run([SUGARD, "fake", "--bogus"], capture_output=True, text=True, timeout=30)
    assert 2 == bad.returncode
    assert "sugard fake: error: unrecognized arguments: --bogus" in bad.stderr


def get_json(url: str, token: str) -> tuple[int, Any]:
    """A GET with urllib and an OAuth-Token header; returns status and parsed JSON."""
    request = urllib.request.Request(url, headers={"OAuth-Token": token})  # noqa: S310
    with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
        return resp.status, json.load(resp)


def test_running_fake_plays_the_version_asked_for() -> None:
    """running_fake(sugar_version=...) serves that version's server_info and behaviour."""
    with running_fake(sugar_version="8.0", license_error="seats") as fake:
        status, body = post_form(f"{fake.url}/rest/v10/oauth2/token", creds())
        assert (401, "need_login") == (status, body["error"])
        fake.license_error = None
        status, body = post_form(f"{fake.url}/rest/v10/oauth2/token", creds())
        info = get_json(f"{fake.url}/rest/v10/{SERVER_INFO}", body["access_token"])
        assert (200, "8.0.0") == (info[0], info[1]["server_info"]["version"])


def test_module_takes_version_idm_and_platform_switches() -> None:
    """`--sugar-version 12.0 --idm --accept-any-platform` plays IdM on 12.0, any platform."""
    command = [
        sys.executable,
        "-m",
        "sugard.testing",
        "--sugar-version",
        "12.0",
        "--idm",
        "--accept-any-platform",
        "--user",
        "carol:carol-pw",
    ]
    with subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        url = proc.stdout.readline().strip()
        fields = creds(username="carol", password="carol-pw", platform="not-registered")
        status, body = post_form(f"{url}/rest/v10/oauth2/token", fields)
        assert 200 == status
        assert body["scope"]  # IdM: never null
        info = get_json(f"{url}/rest/v10/{SERVER_INFO}", body["access_token"])
        assert "12.0.0" == info[1]["server_info"]["version"]
        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(timeout=10)
        assert ("", "") == (proc.stdout.read(), proc.stderr.read())


def test_module_refuses_an_unsupported_version() -> None:
    """An unknown --sugar-version exits 2 naming the supported ones."""
    result = subprocess.run(
        [sys.executable, "-m", "sugard.testing", "--sugar-version", "9.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 2 == result.returncode
    assert "8.0" in result.stderr and "26.1" in result.stderr
    assert "" == result.stdout
