# Expected value first in asserts (docs/style.md), which ruff's SIM300 calls a Yoda condition.
"""The fake SugarCRM follows what a real Sugar does where it once did otherwise (docs/sugarcrm.md):
no /ServerInfo, the version in metadata and sugar_version.json, Sugar's texts and headers, an
expired token that turns invalid, bulk calls, the version in the Accept header, and sudo.

Self-contained on purpose: it starts its own fakes with `running_fake` and talks to them over
real HTTP with `requests`, like a user's own script would.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from sugard.testing import SUGAR_VERSIONS, FakeSugar, running_fake

PASSWORDS = {"admin": "admin-pw", "api": "api-pw", "bob": "bob-pw"}
SESSION_HEADERS = {
    "Cache-Control": "no-store, no-cache, must-revalidate",
    "Pragma": "no-cache",
    "Expires": "Thu, 19 Nov 1981 08:52:00 GMT",
}
SUDO_KEYS = ["access_token", "expires_in", "token_type", "scope"]
DELETED = "=deleted; expires=Thu, 01-Jan-1970 00:00:01 GMT; Max-Age=0; path=/; HttpOnly"
TIMEOUT = 10


@pytest.fixture
def fake() -> Iterator[FakeSugar]:
    """A fake on the newest version with three users; only `admin` is an admin."""
    with running_fake(users=PASSWORDS) as site:
        yield site


def login(
    fake: FakeSugar, user: str = "api", platform: str = "sugard", version: str = "v10"
) -> dict[str, Any]:
    """A password login; returns the token answer."""
    body = {
        "grant_type": "password",
        "client_id": "sugar",
        "client_secret": "",
        "username": user,
        "password": PASSWORDS[user],
        "platform": platform,
    }
    reply = requests.post(f"{fake.url}/rest/{version}/oauth2/token", json=body, timeout=TIMEOUT)
    assert 200 == reply.status_code, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def call(
    fake: FakeSugar,
    method: str,
    route: str,
    token: str | None = None,
    *,
    version: str | None = "v10",
    **kw: Any,
) -> requests.Response:
    """One request to `/rest/{version}/{route}` (`/rest/{route}` with version None)."""
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["OAuth-Token"] = token
    prefix = f"/rest/{version}" if version else "/rest"
    return requests.request(
        method, f"{fake.url}{prefix}/{route}", headers=headers, timeout=TIMEOUT, **kw
    )


def error(reply: requests.Response) -> tuple[int, str, str | None]:
    """(status, label, message) of one of Sugar's error answers."""
    body = reply.json()
    return reply.status_code, body["error"], body.get("error_message")


def set_cookies(reply: requests.Response) -> list[str]:
    """Every Set-Cookie header of an answer, in order."""
    return list(reply.raw.headers.getlist("Set-Cookie"))


# ---------------------------------------------------------------- where the version is


@pytest.mark.parametrize("version", SUGAR_VERSIONS)
@pytest.mark.parametrize("segment", ["v10", "v11_4"])
def test_server_info_route_is_absent(version: str, segment: str) -> None:
    """GET /ServerInfo answers 404 no_method on every version, naming the path it got."""
    with running_fake(users=PASSWORDS, sugar_version=version) as fake:
        token = login(fake)["access_token"]
        expected = f"Could not find any route that accepted a path like: {segment}/ServerInfo"
        for presented in (token, None):
            reply = call(fake, "GET", "ServerInfo", presented, version=segment)
            assert (404, "no_method", expected) == error(reply)
        assert 2 == fake.calls["serverinfo"]  # asked for, even though it is not there


def test_server_info_route_can_be_asked_for() -> None:
    """server_info_route=True serves the old ServerInfo answer, behind the token check."""
    with running_fake(users=PASSWORDS, sugar_version="13.3", server_info_route=True) as fake:
        assert (401, "need_login") == error(call(fake, "GET", "ServerInfo"))[:2]
        info = call(fake, "GET", "ServerInfo", login(fake)["access_token"]).json()
        assert ("ENT", "13.3.0") == (info["flavor"], info["version"])


@pytest.mark.parametrize("version", SUGAR_VERSIONS)
def test_metadata_server_info_carries_the_version(version: str) -> None:
    """metadata?type_filter=server_info needs a token and says flavor, version and build."""
    with running_fake(users=PASSWORDS, sugar_version=version) as fake:
        params = {"type_filter": "server_info"}
        assert (401, "need_login") == error(call(fake, "GET", "metadata", params=params))[:2]
        reply = call(fake, "GET", "metadata", login(fake)["access_token"], params=params)
        assert 200 == reply.status_code
        body = reply.json()
        assert ["server_info", "_hash"] == list(body)
        info = body["server_info"]
        assert ("ENT", f"{version}.0") == (info["flavor"], info["version"])
        assert isinstance(info["build"], str) and info["build"]
        assert 2 == fake.calls["metadata"]


@pytest.mark.parametrize("version", ["12.0", "13.3", "26.1"])
def test_public_metadata_needs_no_login(version: str) -> None:
    """metadata/public answers without a token: server_info with the version, and a config."""
    with running_fake(users=PASSWORDS, sugar_version=version) as fake:
        reply = call(fake, "GET", "metadata/public", params={"platform": "base"})
        assert 200 == reply.status_code
        body = reply.json()
        assert {"server_info", "config", "_hash"} == set(body)
        assert f"{version}.0" == body["server_info"]["version"]
        assert fake.url == body["config"]["siteUrl"]
        assert (1, 0) == (fake.calls["metadata_public"], fake.calls["metadata"])


@pytest.mark.parametrize(
    ("served", "status"),
    [(True, 200), (False, 404)],
)
def test_sugar_version_json_at_the_site_root(served: bool, status: int) -> None:
    """/sugar_version.json names version and flavor where the site serves it; else 404."""
    with running_fake(sugar_version="13.3", sugar_version_json=served) as fake:
        reply = requests.get(f"{fake.url}/sugar_version.json", timeout=TIMEOUT)
        assert status == reply.status_code
        if served:
            assert {"sugar_version": "13.3.0", "sugar_flavor": "ENT"} == reply.json()
        assert 1 == fake.calls["sugar_version"]


def test_version_reads_are_counted_per_login(fake: FakeSugar) -> None:
    """Each way to read the version is counted, so a test can assert "one read per login"."""
    token = login(fake)["access_token"]
    call(fake, "GET", "metadata", token, params={"type_filter": "server_info"})
    call(fake, "GET", "metadata/public")
    requests.get(f"{fake.url}/sugar_version.json", timeout=TIMEOUT)
    call(fake, "GET", "ServerInfo", token)
    counted = fake.calls
    assert (1, 1, 1, 1, 1) == (
        counted["password"],
        counted["metadata"],
        counted["metadata_public"],
        counted["sugar_version"],
        counted["serverinfo"],
    )


# ---------------------------------------------------------------- texts


def test_maintenance_login_text(fake: FakeSugar) -> None:
    """A login refused for maintenance says Sugar's own words."""
    fake.maintenance = True
    body = {"grant_type": "password", "client_id": "sugar", "username": "api", "password": "x"}
    body["password"] = PASSWORDS["api"]
    reply = requests.post(f"{fake.url}/rest/v10/oauth2/token", json=body, timeout=TIMEOUT)
    assert (
        401,
        "need_login",
        "SugarCRM is in maintenance mode. Only admins can login. "
        "Please contact your administrator for details.",
    ) == error(reply)


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "oauth2/token"),
        ("POST", "oauth2/logout"),
        ("POST", "Accounts"),
        ("PUT", "Accounts/some-id"),
        ("POST", "bulk"),
    ],
)
def test_a_body_that_is_not_json(fake: FakeSugar, method: str, route: str) -> None:
    """A JSON body that does not parse: 422 invalid_parameter, "A parameter ... was invalid."."""
    token = login(fake)["access_token"]
    reply = call(
        fake,
        method,
        route,
        token,
        data=b'{"grant_type": ',
        headers={"Content-Type": "application/json"},
    )
    assert (422, "invalid_parameter", "A parameter in your request was invalid.") == error(reply)


# ---------------------------------------------------------------- headers and cookies


@pytest.mark.parametrize(("method", "route"), [("GET", "me"), ("POST", "oauth2/logout")])
def test_session_answers_carry_phps_cache_headers(fake: FakeSugar, method: str, route: str) -> None:
    """The 200s of /me and logout carry no-store, no-cache, must-revalidate, Pragma, Expires."""
    reply = call(fake, method, route, login(fake)["access_token"])
    assert 200 == reply.status_code
    assert SESSION_HEADERS == {name: reply.headers[name] for name in SESSION_HEADERS}


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        ("not-a-token", {"Pragma": "no-cache", "Expires": SESSION_HEADERS["Expires"]}),
        (None, {}),
    ],
)
def test_a_401_after_a_presented_token_adds_pragma_and_expires(
    fake: FakeSugar, token: str | None, expected: dict[str, str]
) -> None:
    """A 401 for a presented token (a session was opened) adds Pragma and Expires; without
    a token only `Cache-Control: no-store`."""
    reply = call(fake, "GET", "me", token)
    assert 401 == reply.status_code
    assert "no-store" == reply.headers["Cache-Control"]
    got = {name: reply.headers[name] for name in ("Pragma", "Expires") if name in reply.headers}
    assert expected == got


def test_ping_is_private_with_an_etag(fake: FakeSugar) -> None:
    """/ping answers `Cache-Control: max-age=0, private` and an ETag."""
    reply = call(fake, "GET", "ping", login(fake)["access_token"])
    assert (200, "pong") == (reply.status_code, reply.json())
    assert "max-age=0, private" == reply.headers["Cache-Control"]
    assert reply.headers["ETag"]


def test_cookies_are_http_only_and_logout_deletes_them(fake: FakeSugar) -> None:
    """The download-token cookie is HttpOnly; a logout without `platform` deletes the one of
    its session's platform and PHPSESSID, both expired in 1970."""
    answer = login(fake, platform="mobile")
    reply = requests.post(
        f"{fake.url}/rest/v10/oauth2/token",
        json={"grant_type": "password", "client_id": "sugar", "username": "bob"}
        | {"password": PASSWORDS["bob"], "platform": "sugard"},
        timeout=TIMEOUT,
    )
    [cookie] = set_cookies(reply)
    assert cookie.startswith("download_token_sugard=") and cookie.endswith("; path=/; HttpOnly")
    logout = call(fake, "POST", "oauth2/logout", answer["access_token"])
    assert [f"download_token_mobile{DELETED}", f"PHPSESSID{DELETED}"] == set_cookies(logout)


# ---------------------------------------------------------------- expiry


def test_an_expired_token_is_invalid_after_saying_so(fake: FakeSugar) -> None:
    """After the first "has expired" answer for a token, its session is gone: "is invalid"."""
    token = login(fake)["access_token"]
    fake.expire_access_tokens()
    messages = [error(call(fake, "GET", "me", token))[2] for _ in range(3)]
    assert [
        "The access token provided has expired.",
        "The access token provided is invalid.",
        "The access token provided is invalid.",
    ] == messages


# ---------------------------------------------------------------- bulk


def bulk(fake: FakeSugar, token: str | None, *subs: dict[str, Any]) -> requests.Response:
    """POST /bulk with these sub-requests."""
    return call(fake, "POST", "bulk", token, json={"requests": list(subs)})


def test_bulk_runs_each_sub_request_with_the_parents_token(fake: FakeSugar) -> None:
    """Sub-requests run in order with the parent's OAuth-Token, whatever their own headers
    say; the answer lists contents, headers and status; bulk and sub-requests are counted."""
    token = login(fake)["access_token"]
    reply = bulk(
        fake,
        token,
        {"url": "/v10/me", "method": "GET", "headers": {"OAuth-Token": "someone-else"}},
        {"url": "/v10/Accounts", "method": "POST", "data": json.dumps({"name": "Acme"})},
        {"url": "/v11_4/Accounts", "method": "POST", "data": {"name": "Beta"}},
        {"url": "/v10/ping"},
        {"url": "/v10/nothing/here"},
    )
    assert 200 == reply.status_code
    results = reply.json()
    assert [["contents", "headers", "status"]] * 5 == [list(r) for r in results]
    assert [200, 200, 200, 200, 404] == [r["status"] for r in results]
    assert "api" == results[0]["contents"]["current_user"]["user_name"]
    assert ["Acme", "Beta"] == [r["name"] for r in fake.records("Accounts")]
    assert "pong" == results[3]["contents"]
    assert "max-age=0, private" == results[3]["headers"]["Cache-Control"]
    assert "no_method" == results[4]["contents"]["error"]
    counted = fake.calls
    assert (1, 5, 1, 2, 1) == (
        counted["bulk"],
        counted["bulk_requests"],
        counted["me"],
        counted["create"],
        counted["ping"],
    )


def test_bulk_logout_ends_the_parents_session(fake: FakeSugar) -> None:
    """A logout inside a bulk call is a logout with the parent's token (12.0+: refresh too)."""
    answer = login(fake)
    reply = bulk(fake, answer["access_token"], {"url": "/v10/oauth2/logout", "method": "POST"})
    assert [{"success": True}] == [r["contents"] for r in reply.json()]
    assert [f"download_token_sugard{DELETED}", f"PHPSESSID{DELETED}"] == set_cookies(reply)
    assert not fake.valid(answer["access_token"])
    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": answer["refresh_token"],
        "client_id": "sugar",
        "platform": "sugard",
    }
    assert (400, "invalid_grant") == error(call(fake, "POST", "oauth2/token", json=refresh))[:2]
    assert 1 == fake.calls["logout"]


def test_bulk_login_and_sudo(fake: FakeSugar) -> None:
    """A bulk call can log in (oauth2/token) and, with an admin's token, sudo."""
    admin = login(fake, "admin")["access_token"]
    creds = {"grant_type": "password", "client_id": "sugar", "username": "bob"}
    creds |= {"password": PASSWORDS["bob"], "platform": "sugard"}
    reply = bulk(
        fake,
        admin,
        {"url": "/v10/oauth2/token", "method": "POST", "data": creds},
        {"url": "/v10/oauth2/sudo/api", "method": "POST", "data": {"platform": "sugard"}},
    )
    logged_in, sudoed = reply.json()
    assert 200 == logged_in["status"] and fake.valid(logged_in["contents"]["access_token"])
    assert (200, SUDO_KEYS) == (sudoed["status"], list(sudoed["contents"]))
    me = call(fake, "GET", "me", sudoed["contents"]["access_token"]).json()
    assert "api" == me["current_user"]["user_name"]
    assert (2, 1, 1) == (fake.calls["password"], fake.calls["sudo"], fake.sudo_calls["api"])


def test_bulk_without_requests_is_refused(fake: FakeSugar) -> None:
    """A bulk body without a `requests` list is 422."""
    reply = call(fake, "POST", "bulk", login(fake)["access_token"], json={})
    assert 422 == reply.status_code


# ---------------------------------------------------------------- version in Accept


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/vnd.sugarcrm.core+json; version=10", 200),
        ("application/vnd.sugarcrm.core+json; version=11.4", 200),
        ("application/vnd.sugarcrm.core+json;version=11", 200),
        ("application/vnd.sugarcrm.core+json; version=42", 301),
        ("application/json", 301),
        (None, 301),
    ],
)
def test_the_version_in_the_accept_header(
    fake: FakeSugar, accept: str | None, expected: int
) -> None:
    """/rest/me with a versioned Accept header is /rest/v10/me (v11_4 for 11.4); without one,
    or with a version Sugar does not serve, 301 incorrect_version."""
    headers = {"Accept": accept} if accept else {}
    token = login(fake)["access_token"]
    reply = call(fake, "GET", "me", token, version=None, headers=headers)
    assert expected == reply.status_code
    if expected == 200:
        assert "api" == reply.json()["current_user"]["user_name"]
    else:
        assert "incorrect_version" == reply.json()["error"]


def test_unversioned_oauth2_routes_with_the_accept_header(fake: FakeSugar) -> None:
    """`/rest/oauth2/token` and `/rest/oauth2/logout` with the header log in and out."""
    accept = {"Accept": "application/vnd.sugarcrm.core+json; version=11.4"}
    creds = {"grant_type": "password", "client_id": "sugar", "username": "api"}
    creds |= {"password": PASSWORDS["api"], "platform": "sugard"}
    reply = call(fake, "POST", "oauth2/token", version=None, headers=accept, json=creds)
    assert 200 == reply.status_code
    token = reply.json()["access_token"]
    logout = call(fake, "POST", "oauth2/logout", token, version=None, headers=accept)
    assert {"success": True} == logout.json()
    assert not fake.valid(token)
    assert (1, 1) == (fake.calls["password"], fake.calls["logout"])


# ---------------------------------------------------------------- sudo


def sudo(fake: FakeSugar, token: str, user: str, **body: str) -> requests.Response:
    """POST oauth2/sudo/{user} with an optional JSON body."""
    return call(fake, "POST", f"oauth2/sudo/{user}", token, json=body or None)


def test_sudo_answers_four_keys_for_the_user_asked_for(fake: FakeSugar) -> None:
    """An admin's sudo answers access_token, expires_in, token_type, scope (null), on `base`
    by default; /me with that token is the user sudoed to; counted per user."""
    admin = login(fake, "admin")["access_token"]
    reply = sudo(fake, admin, "bob")
    assert 200 == reply.status_code
    body = reply.json()
    assert SUDO_KEYS == list(body)
    assert (3600, "bearer", None) == (body["expires_in"], body["token_type"], body["scope"])
    assert SESSION_HEADERS["Cache-Control"] == reply.headers["Cache-Control"]
    me = call(fake, "GET", "me", body["access_token"]).json()["current_user"]
    assert ("bob", "user") == (me["user_name"], me["type"])
    # The platform defaulted to base: bob's base session is the one evicted.
    base = login(fake, "bob", platform="base")["access_token"]
    sugard = login(fake, "bob")["access_token"]
    sudo(fake, admin, "bob")
    assert (False, True) == (fake.valid(base), fake.valid(sugard))
    assert (2, 2) == (fake.calls["sudo"], fake.sudo_calls["bob"])


@pytest.mark.parametrize(
    ("caller", "target", "status", "label"),
    [
        ("api", "bob", 403, "not_authorized"),  # not an admin
        ("admin", "nobody", 404, "not_found"),
        ("sudo", "api", 403, "not_authorized"),  # no sudo from a sudo session
        ("sudo", "admin", 403, "not_authorized"),  # even one for an admin
    ],
)
def test_sudo_refusals(fake: FakeSugar, caller: str, target: str, status: int, label: str) -> None:
    """Sudo is for admins, for known users, and never from a sudo session."""
    admin = login(fake, "admin")["access_token"]
    if caller == "sudo":
        token = sudo(fake, admin, "bob" if target != "admin" else "admin").json()["access_token"]
    else:
        token = login(fake, caller)["access_token"]
    assert (status, label) == error(sudo(fake, token, target))[:2]


def test_admins_are_whom_the_site_names() -> None:
    """admins= names the admin users: /me says their type, and only they may sudo."""
    with running_fake(users=PASSWORDS, admins={"api"}) as fake:
        api, admin = login(fake, "api")["access_token"], login(fake, "admin")["access_token"]
        assert 200 == sudo(fake, api, "bob", platform="sugard", client_id="sugar").status_code
        assert (403, "not_authorized") == error(sudo(fake, admin, "bob"))[:2]
        types = [call(fake, "GET", "me", t).json()["current_user"]["type"] for t in (api, admin)]
        assert ["admin", "user"] == types
        assert {"bob": 2} == dict(fake.sudo_calls)


@pytest.mark.parametrize(("version", "grace"), [("12.0", 120.0), ("13.3", 0.0)])
def test_sudo_evicts_as_a_login_does(version: str, grace: float) -> None:
    """A sudo evicts the user's session on that platform by the version's rules: at the next
    session check up to 13.0, at once from 13.3."""
    now = time.time()
    with running_fake(users=PASSWORDS, sugar_version=version, clock=lambda: now) as fake:
        bob = login(fake, "bob")["access_token"]
        sudo(fake, login(fake, "admin")["access_token"], "bob", platform="sugard")
        assert (grace > 0) == fake.valid(bob)
        fake.clock = lambda: now + grace + 1
        assert not fake.valid(bob)


def test_me_names_the_user_of_each_token(fake: FakeSugar) -> None:
    """/me answers the token's own user, and "admin" only for admins."""
    tokens = {user: login(fake, user)["access_token"] for user in PASSWORDS}
    seen = {
        user: call(fake, "GET", "me", token).json()["current_user"]
        for user, token in tokens.items()
    }
    assert {u: u for u in PASSWORDS} == {u: me["user_name"] for u, me in seen.items()}
    assert {"admin": "admin", "api": "user", "bob": "user"} == {
        u: me["type"] for u, me in seen.items()
    }


# ---------------------------------------------------------------- the command line


def test_command_line_switches() -> None:
    """`python -m sugard.testing --admin api --server-info-route --no-sugar-version-json`."""
    command = [sys.executable, "-m", "sugard.testing", "--user", "api:api-pw", "--user", "bob:x"]
    command += ["--admin", "api", "--server-info-route", "--no-sugar-version-json"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        try:
            creds = {"grant_type": "password", "client_id": "sugar", "username": "api"}
            creds |= {"password": "api-pw", "platform": "sugard"}
            reply = requests.post(f"{url}/rest/v10/oauth2/token", json=creds, timeout=TIMEOUT)
            token = reply.json()["access_token"]
            headers = {"OAuth-Token": token}
            info = requests.get(f"{url}/rest/v10/ServerInfo", headers=headers, timeout=TIMEOUT)
            assert 200 == info.status_code
            sudo = requests.post(
                f"{url}/rest/v10/oauth2/sudo/bob", headers=headers, timeout=TIMEOUT
            )
            assert 200 == sudo.status_code
            assert 404 == requests.get(f"{url}/sugar_version.json", timeout=TIMEOUT).status_code
        finally:
            proc.send_signal(signal.SIGTERM)
            assert 0 == proc.wait(timeout=TIMEOUT)
