"""The session guards, on both routes (the socket and the loopback listener): no form of
Sugar's oauth2 routes reaches the fake (versioned or not, any case, inside a bulk), and no path
a front could read as another path is forwarded; ordinary requests and bulks still go through.
Requests are written byte for byte (support/raw_http.py), so no client re-encodes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.daemon import DaemonProcess, current_token, instance, proxy_url, write_config
from support.raw_http import exchange

from sugard.proxy.guards import BULK_LIMIT
from sugard.testing import FakeSugar

ACCEPT_10 = {"Accept": "application/vnd.sugarcrm.core+json; version=10"}
ACCEPT_11_4 = {"Accept": "application/vnd.sugarcrm.core+json; version=11.4"}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("g")


@pytest.fixture
def guarded(fake: FakeSugar, short_dir: Path, start_daemon) -> DaemonProcess:
    """A daemon whose instance `prod` is the fake, on the socket and on a listener. It makes
    no call of its own after the login (no probe; a set grace needs no version read), so
    whatever reaches the fake during a test was sent through the proxy."""
    table = instance(fake, listen="127.0.0.1:0", probe_interval=0, old_token_grace=0)
    daemon: DaemonProcess = start_daemon(write_config(short_dir, {"prod": table}))
    with daemon.client() as client:
        client.token("prod", wait=20)
    return daemon


@pytest.fixture(params=["socket", "listener"])
def route(request: pytest.FixtureRequest, guarded: DaemonProcess) -> tuple[Path | str, str]:
    """(where to connect, the site root's path) of one of the proxy's two routes."""
    if request.param == "socket":
        return guarded.socket, "/v1/instances/prod"
    url = proxy_url(guarded)
    return url, ""


def send(
    route: tuple[Path | str, str],
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> tuple[int, dict[str, str], Any]:
    where, root = route
    return exchange(where, method, root + path, headers, body)


def bulk(*subs: dict[str, Any]) -> bytes:
    return json.dumps({"requests": list(subs)}).encode()


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/rest/oauth2/logout", ACCEPT_10),
        ("/rest/oauth2/logout", ACCEPT_11_4),
        ("/rest/oauth2/logout", {}),
        ("/rest/OAuth2/Logout", ACCEPT_10),
        ("/rest/V10/OAUTH2/logout", {}),
        ("/rest/v11_4//oauth2/logout/", {}),
    ],
)
def test_every_form_of_logout_is_answered_by_sugard_and_never_reaches_sugar(
    route: tuple[Path | str, str],
    guarded: DaemonProcess,
    fake: FakeSugar,
    path: str,
    headers: dict[str, str],
) -> None:
    """An unversioned logout (the version in the Accept header, or none), or one in another
    case, gets the local answer; Sugar sees nothing and the session lives on."""
    before = current_token(guarded)
    fake.reset_counters()
    status, _, body = send(route, "POST", path, headers)
    assert (200, {"success": True}) == (status, body)
    assert [] == fake.arrivals
    assert before == current_token(guarded)
    assert fake.valid(before)


def test_an_unversioned_login_gets_sugards_token_like_a_versioned_one(
    route: tuple[Path | str, str], guarded: DaemonProcess, fake: FakeSugar
) -> None:
    """POST /rest/oauth2/token with the version in the Accept header is answered with
    sugard's current token, as /rest/v10/oauth2/token is; nothing reaches Sugar."""
    fake.reset_counters()
    form = b"grant_type=password&username=x&password=y&client_id=sugar&platform=base"
    headers = {**ACCEPT_11_4, "Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = send(route, "POST", "/rest/oauth2/token", headers, form)
    assert 200 == status
    assert current_token(guarded) == body["access_token"]
    assert [] == fake.arrivals


@pytest.mark.parametrize("path", ["/rest/oauth2/sudo/admin", "/rest/v10/OAuth2/sudo/admin"])
def test_sudo_in_any_form_is_refused(
    route: tuple[Path | str, str], fake: FakeSugar, path: str
) -> None:
    """oauth2/sudo, unversioned (Accept header) or in another case, is refused with 403."""
    fake.reset_counters()
    status, _, body = send(route, "POST", path, ACCEPT_10)
    assert 403 == status
    assert "not_authorized" == body["error"]
    assert [] == fake.arrivals


@pytest.mark.parametrize(
    "sub",
    [
        {"url": "/v10/oauth2/logout", "method": "POST"},
        {"url": "/oauth2/logout", "method": "POST", "headers": ACCEPT_10},
        {"url": "/v11_4/oauth2/token", "method": "POST", "data": {"grant_type": "password"}},
        {"url": "v10/oauth2/sudo/admin", "method": "POST"},
        {"url": "/rest/v10/OAUTH2/logout?x=1", "method": "post"},
        {"url": "https://elsewhere.example/v10/oauth2/logout", "method": "POST"},
        {
            "url": "/v10/bulk",
            "method": "POST",
            "data": {"requests": [{"url": "/v10/oauth2/logout"}]},
        },
    ],
)
def test_a_bulk_with_an_oauth2_sub_request_is_refused_whole_before_anything_is_sent(
    route: tuple[Path | str, str], guarded: DaemonProcess, fake: FakeSugar, sub: dict[str, Any]
) -> None:
    """A bulk carrying an oauth2 sub-request (any version, case, host, nested in another
    bulk) gets 403 in Sugar's envelope naming it; no sub-request runs, the session lives."""
    before = current_token(guarded)
    fake.reset_counters()
    body = bulk({"url": "/v10/me", "method": "GET"}, sub)
    status, _, answer = send(
        route, "POST", "/rest/v10/bulk", {"Content-Type": "application/json"}, body
    )
    assert 403 == status, answer
    assert "not_authorized" == answer["error"]
    assert "requests[1]" in answer["error_message"]
    assert [] == fake.arrivals
    assert before == current_token(guarded)


def test_an_ordinary_bulk_is_forwarded_unchanged(
    route: tuple[Path | str, str], fake: FakeSugar
) -> None:
    """A bulk of ordinary sub-requests reaches Sugar as sent and runs each one."""
    fake.reset_counters()
    body = bulk({"url": "/v10/me", "method": "GET"}, {"url": "/v10/ping", "method": "GET"})
    status, _, answer = send(
        route, "POST", "/rest/v10/bulk", {"Content-Type": "application/json"}, body
    )
    assert 200 == status, answer
    assert [200, 200] == [sub["status"] for sub in answer]
    assert 1 == fake.calls["bulk"]
    assert 2 == fake.calls["bulk_requests"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"requests[0][url]=/v10/oauth2/logout", "application/x-www-form-urlencoded"),
        (b"[" * 10 + b"1" + b"]" * 10 + b" " * (BULK_LIMIT + 1), "application/json"),
    ],
    ids=["not-json", "form", "oversized"],
)
def test_a_bulk_sugard_cannot_read_is_refused_with_400_and_never_forwarded(
    route: tuple[Path | str, str], fake: FakeSugar, body: bytes, content_type: str
) -> None:
    """A bulk body that is not JSON, is form-encoded, or is larger than sugard reads, gets
    400 in Sugar's envelope; nothing reaches Sugar."""
    fake.reset_counters()
    status, _, answer = send(route, "POST", "/rest/v10/bulk", {"Content-Type": content_type}, body)
    assert 400 == status
    assert "bad_request" == answer["error"]
    assert [] == fake.arrivals


@pytest.mark.parametrize(
    "path",
    [
        "/rest/v10/oauth2%252flogout",
        "/rest/x/..%252foauth2%252flogout",
        "/rest/v10/oauth2%2flogout",
        "/rest/v10/oauth2%2Flogout",
        "/rest/v10/oauth2%5clogout",
        "/rest/v10/oauth2;x=1/logout",
        "/rest/v10/me;jsessionid=1",
        "/rest/v10/me%00",
        "/rest/v10/me%20",
        "/rest/v10/me%09",
        "/rest/v10/me&__sugar_url=v10/oauth2/logout",
        "/rest/v10/me%26__sugar_url=v10/oauth2/logout",
        "/rest/v10/me+x",
        "/rest/v10/%2e%2e/oauth2/logout",
        "/rest/v10/me?__sugar_url=v10/oauth2/logout",
        "/rest/v10/me?__sugar.url=v10/oauth2/logout",
        "/rest/v10/me?__SUGAR_URL=v10/oauth2/logout",
    ],
)
def test_a_path_another_server_could_read_as_another_path_is_refused_with_400(
    route: tuple[Path | str, str], fake: FakeSugar, path: str
) -> None:
    """Encoded slashes and backslashes, double encoding, `;` parameters, encoded NUL, tabs
    and spaces, query syntax in the path, and Sugar's own routing parameter are refused
    before anything is sent."""
    fake.reset_counters()
    status, _, answer = send(route, "GET", path)
    assert 400 == status, answer
    assert "bad_request" == answer["error"]
    assert [] == fake.arrivals


def test_sugars_routing_parameter_in_a_form_body_is_refused(
    route: tuple[Path | str, str], fake: FakeSugar
) -> None:
    """A form-encoded body naming __sugar_url (which PHP's $_REQUEST would route by) is
    refused with 400; a form body without it is forwarded."""
    fake.reset_counters()
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, answer = send(
        route, "POST", "/rest/v10/Accounts", headers, b"name=A&__sugar_url=v10/oauth2/logout"
    )
    assert (400, "bad_request") == (status, answer["error"])
    assert [] == fake.arrivals
    status, _, answer = send(route, "GET", "/rest/v10/me", headers, b"name=A")
    assert 200 == status, answer
    assert 1 == len(fake.arrivals)


@pytest.mark.parametrize(
    "path",
    ["/rest/v10/me", "/rest/me", "/rest/v10/Accounts/a%40b%3Ac", "/rest/v10/Accounts/%C3%A9"],
)
def test_ordinary_paths_still_reach_sugar(
    route: tuple[Path | str, str], fake: FakeSugar, path: str
) -> None:
    """Ordinary routes, unversioned ones with the Accept header, and harmless escapes (an
    encoded `@`, `:` or UTF-8) are forwarded."""
    fake.reset_counters()
    status, _, _ = send(route, "GET", path, ACCEPT_10)
    assert status in (200, 404)
    assert [path.split("?")[0]] == [arrival.path for arrival in fake.arrivals]


def test_a_streamed_multipart_body_naming_sugar_url_is_cut_off_before_its_end(
    route: tuple[Path | str, str], fake: FakeSugar
) -> None:
    """A multipart upload longer than sugard reads whole (1 MiB), with a field named
    __sugar_url after 300 KiB, is cut off before that field: Sugar never gets the whole
    request (no record is made), the client gets 502."""
    boundary = "sugardboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="filler"\r\n\r\n'.encode()
        + b"x" * (300 * 1024)
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="__sugar_url"\r\n\r\n'
        "v10/oauth2/logout\r\n".encode()
        + b"y" * (1024 * 1024)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, answer = send(route, "POST", "/rest/v10/Notes", headers, body)
    assert 502 == status, answer
    assert [] == fake.records("Notes")
