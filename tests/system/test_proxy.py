"""Sugar through sugard: the proxy on the socket route and on an instance's loopback listener,
driven by real clients (curl, requests, httpx, aiohttp, http.client) against the real daemon,
with the fake SugarCRM behind a front of the test's own (tests/proxy_upstream.py)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import requests
from support import ROOT
from support.daemon import (
    USER,
    DaemonProcess,
    current_token,
    instance,
    proxy_url,
    write_config,
)
from support.http import curl_json
from support.proxy_upstream import SugarFront, pattern, pattern_sha256, running_front, vm_kib
from support.wait import wait_for

from sugard.proxy import PLACEHOLDER_REFRESH
from sugard.testing import FakeSugar

SEVEN_KEYS = [
    "access_token",
    "expires_in",
    "token_type",
    "scope",
    "refresh_token",
    "refresh_expires_in",
    "download_token",
]
BIG = 200 * 1024 * 1024
RSS_BUDGET_KIB = 32 * 1024


@pytest.fixture
def proxied(front: SugarFront, short_dir: Path, start_daemon) -> DaemonProcess:
    """A daemon with instance `prod` behind the front, listening on a loopback port."""
    config = write_config(short_dir, {"prod": instance(front, listen="127.0.0.1:0")})
    daemon: DaemonProcess = start_daemon(config)
    with daemon.client() as client:
        client.token("prod", wait=20)
    return daemon


def curl_socket(daemon: DaemonProcess, path: str, *args: str) -> tuple[int, Any]:
    return curl_json(daemon.socket, f"/v1/instances/prod{path}", *args)


def test_curl_over_the_socket_reaches_sugar_with_sugards_token(
    proxied: DaemonProcess, front: SugarFront
) -> None:
    """curl --unix-socket on /v1/instances/prod/rest/v10/me gets Sugar's answer."""
    status, body = curl_socket(proxied, "/rest/v10/me", "-H", "OAuth-Token: bogus")
    assert 200 == status
    assert USER == body["current_user"]["user_name"]


@pytest.mark.slow
def test_the_clients_credentials_are_replaced_and_hop_by_hop_headers_stay_on_their_hop(
    proxied: DaemonProcess, front: SugarFront
) -> None:
    """OAuth-Token, Authorization and Cookie are dropped, sugard's OAuth-Token is set; the
    headers of one connection (Connection and those it names, Keep-Alive) are not forwarded,
    nor Sugar's hop-by-hop answer headers; the query is kept."""
    answer = requests.post(
        proxy_url(proxied) + "/rest/v10/Echo?fields=name&max_num=2",
        json={"name": "x"},
        headers={
            "OAuth-Token": "bogus",
            "Authorization": "Bearer x",
            "Cookie": "PHPSESSID=abc",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Keep-Alive": "timeout=5",
            "X-Custom": "kept",
        },
        timeout=30,
    )
    assert 200 == answer.status_code, answer.text
    seen = {k.lower(): v for k, v in answer.json()["headers"].items()}
    assert current_token(proxied) == seen["oauth-token"]
    assert "authorization" not in seen
    assert "cookie" not in seen
    assert "x-hop" not in seen
    assert "keep-alive" not in seen
    assert "kept" == seen["x-custom"]
    assert front.url.removeprefix("http://") == seen["host"]
    assert "fields=name&max_num=2" == answer.json()["query"]
    assert '{"name": "x"}' == answer.json()["body"]
    assert "1" == answer.headers["X-Sugar"]
    assert "Proxy-Authenticate" not in answer.headers


def test_paths_outside_rest_are_404(proxied: DaemonProcess, front: SugarFront) -> None:
    """Only Sugar's /rest/ API is served: other paths answer 404, and never reach Sugar."""
    answer = requests.get(proxy_url(proxied) + "/index.php", timeout=30)
    assert 404 == answer.status_code
    assert "not_found" == answer.json()["error"]
    assert "error_message" in answer.json()
    status, _ = curl_socket(proxied, "/index.php")
    assert 404 == status
    assert [] == front.requests_to("/index.php")


@pytest.mark.parametrize("path", ["/rest/v10/oauth2/token", "/rest/v11_4/oauth2/token/"])
def test_a_login_is_answered_locally_with_the_current_token(
    proxied: DaemonProcess, fake: FakeSugar, path: str
) -> None:
    """POST oauth2/token (any grant, any credentials; zucker's trailing slash too) answers
    Sugar's seven keys with sugard's token and a placeholder refresh token; Sugar sees no login."""
    fake.reset_counters()
    answer = requests.post(
        proxy_url(proxied) + path,
        json={"grant_type": "password", "username": "x", "password": "y", "client_id": "z"},
        timeout=30,
    )
    assert 200 == answer.status_code
    body = answer.json()
    assert SEVEN_KEYS == list(body)
    assert current_token(proxied) == body["access_token"]
    assert PLACEHOLDER_REFRESH == body["refresh_token"]
    assert body["expires_in"] > 0
    assert "no-store" in answer.headers["Cache-Control"]
    assert 0 == fake.calls["token"]
    assert "answered a client's login" in proxied.log()


def test_a_logout_is_answered_locally_and_the_session_lives_on(
    proxied: DaemonProcess, fake: FakeSugar
) -> None:
    """POST oauth2/logout answers {"success": true}; Sugar sees no logout, the token stays valid."""
    token = current_token(proxied)
    fake.reset_counters()
    status, body = curl_socket(proxied, "/rest/v10/oauth2/logout", "-X", "POST")
    assert (200, {"success": True}) == (status, body)
    assert 0 == fake.calls["logout"]
    assert fake.valid(token)
    assert token == current_token(proxied)


def test_sudo_and_other_oauth2_routes_are_refused(proxied: DaemonProcess, fake: FakeSugar) -> None:
    """oauth2/sudo/USER is 403 in Sugar's envelope and never reaches Sugar."""
    fake.reset_counters()
    answer = requests.post(proxy_url(proxied) + "/rest/v10/oauth2/sudo/admin", timeout=30)
    assert 403 == answer.status_code
    assert {"error", "error_message"} == set(answer.json())
    assert 0 == fake.calls["sudo"]


def test_an_eviction_mid_run_is_invisible_to_the_client_and_a_post_is_replayed_once(
    proxied: DaemonProcess, fake: FakeSugar, front: SugarFront
) -> None:
    """Another login evicts sugard's session: the client's next POST still answers 200, after
    one renewal, its JSON body sent twice (once refused, once accepted) and never more."""
    url = proxy_url(proxied)
    with requests.Session() as client:
        assert 200 == client.get(url + "/rest/v10/me", timeout=30).status_code
        logins = fake.calls["password"]
        fake.evict(USER, "sugard")
        answer = client.post(url + "/rest/v10/Echo", json={"name": "Acme"}, timeout=30)
        assert 200 == answer.status_code, answer.text
        assert '{"name": "Acme"}' == answer.json()["body"]
        assert 200 == client.get(url + "/rest/v10/me", timeout=30).status_code
    echoes = front.requests_to("/rest/v10/Echo")
    assert [401, 200] == [e.status for e in echoes]
    assert echoes[0].body == echoes[1].body == b'{"name": "Acme"}'
    assert echoes[0].headers["OAuth-Token"] != echoes[1].headers["OAuth-Token"]
    assert logins + 1 == fake.calls["password"]


@pytest.mark.slow
def test_a_streamed_body_is_not_replayed_and_its_401_goes_back(
    proxied: DaemonProcess, fake: FakeSugar, front: SugarFront
) -> None:
    """A body over 1 MiB cannot be sent twice: the client gets Sugar's 401, the log says so
    (and that the proxy reported the token), the session is renewed all the same, and the
    client's retry succeeds."""
    url = proxy_url(proxied)
    fake.evict(USER, "sugard")
    logins = fake.calls["password"]
    refused = requests.post(url + "/rest/v10/Upload", data=b"x" * (2 * 1024 * 1024), timeout=60)
    assert 401 == refused.status_code
    assert "invalid_grant" == refused.json()["error"]
    assert "application/json" == refused.headers["Content-Type"]
    wait_for(lambda: fake.calls["password"] == logins + 1)
    log = proxied.log()
    assert "was streamed and cannot be sent again: its 401 goes back to the client" in log
    assert "(reported by the proxy); renewing" in log
    assert "reported by a script" not in log
    again = requests.post(url + "/rest/v10/Upload", data=b"x" * (2 * 1024 * 1024), timeout=60)
    assert 200 == again.status_code
    assert 2 * 1024 * 1024 == again.json()["size"]


@pytest.mark.slow
def test_50_concurrent_clients_and_one_eviction_make_one_renewal(
    proxied: DaemonProcess, fake: FakeSugar
) -> None:
    """50 aiohttp clients, 10 requests each through the listener, an eviction after the first
    100 answers: every request answers 200, and the fake sees exactly one new login."""
    url = proxy_url(proxied) + "/rest/v10/me"
    logins = fake.calls["password"]

    async def run() -> list[int]:
        answered = 0
        evicted = asyncio.Event()

        async def one_client() -> list[int]:
            nonlocal answered
            statuses = []
            async with aiohttp.ClientSession() as session:
                for _ in range(10):
                    async with session.get(url) as answer:
                        await answer.read()
                        statuses.append(answer.status)
                    answered += 1
                    if answered == 100 and not evicted.is_set():
                        evicted.set()
                        fake.evict(USER, "sugard")
            return statuses

        results = await asyncio.gather(*(one_client() for _ in range(50)))
        return [s for r in results for s in r]

    statuses = asyncio.run(run())
    assert [200] * 500 == statuses
    assert logins + 1 == fake.calls["password"]


def test_httpx_and_aiohttp_reach_sugar_over_the_socket(proxied: DaemonProcess) -> None:
    """httpx with a uds transport and aiohttp with a UnixConnector, pointed at the socket form
    of the site root, are answered by Sugar."""
    site = "http://sugard/v1/instances/prod"
    transport = httpx.HTTPTransport(uds=str(proxied.socket))
    with httpx.Client(transport=transport, base_url=site) as client:
        answer = client.get("/rest/v10/me", headers={"OAuth-Token": "bogus"})
        assert 200 == answer.status_code
        assert USER == answer.json()["current_user"]["user_name"]

    async def with_aiohttp() -> Any:
        connector = aiohttp.UnixConnector(path=str(proxied.socket))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(site + "/rest/v10/me") as answer,
        ):
            return await answer.json()

    assert USER == asyncio.run(with_aiohttp())["current_user"]["user_name"]


def test_sugar_unreachable_is_a_502_in_sugars_envelope(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """When Sugar cannot be reached after the login, the client gets 502 in Sugar's envelope."""
    with running_front(fake.url) as gone:
        config = write_config(short_dir, {"prod": instance(gone)})
        daemon = start_daemon(config)
        with daemon.client() as client:
            client.token("prod", wait=20)
    status, body = curl_socket(daemon, "/rest/v10/me")
    assert 502 == status
    assert "bad_gateway" == body["error"]
    assert "cannot reach" in body["error_message"]


@pytest.mark.slow
def test_proxy_timeout_answers_504(front: SugarFront, short_dir: Path, start_daemon) -> None:
    """A Sugar that never answers is given up on after proxy_timeout: 504 in Sugar's envelope."""
    config = write_config(short_dir, {"prod": instance(front, proxy_timeout=1)})
    daemon = start_daemon(config)
    status, body = curl_socket(daemon, "/rest/v10/Hang")
    assert 504 == status
    assert "gateway_timeout" == body["error"]
    assert "proxy_timeout" in body["error_message"]


def test_requests_beyond_proxy_connections_queue(
    front: SugarFront, short_dir: Path, start_daemon
) -> None:
    """With proxy_connections = 2, six requests held by Sugar never occupy more than two
    upstream connections at once, and all six are answered."""
    config = write_config(short_dir, {"prod": instance(front, proxy_connections=2)})
    daemon = start_daemon(config)
    with daemon.client() as client:
        client.token("prod", wait=20)
    results: list[int] = []

    def one() -> None:
        results.append(curl_socket(daemon, "/rest/v10/Hold")[0])

    threads = [threading.Thread(target=one) for _ in range(6)]
    for thread in threads:
        thread.start()
    wait_for(lambda: front.in_flight == 2)
    front.release(6)
    for thread in threads:
        thread.join(60)
    assert [200] * 6 == results
    assert 2 == front.most_in_flight


def _stream_download(url: str, size: int) -> str:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("GET", f"/rest/v10/Download/{size}")
    answer = conn.getresponse()
    assert 200 == answer.status
    digest = hashlib.sha256()
    while chunk := answer.read(1 << 20):
        digest.update(chunk)
    conn.close()
    return digest.hexdigest()


def _stream_upload(url: str, size: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.putrequest("POST", "/rest/v10/Upload")
    conn.putheader("Content-Length", str(size))
    conn.putheader("Content-Type", "application/octet-stream")
    conn.endheaders()
    for block in pattern(size):
        conn.send(block)
    answer = conn.getresponse()
    assert 200 == answer.status
    result: dict[str, Any] = json.loads(answer.read())
    conn.close()
    return result


@pytest.mark.slow
def test_200_mb_each_way_byte_exact_in_bounded_memory(proxied: DaemonProcess) -> None:
    """A 200 MB download and a 200 MB upload through the listener arrive byte-exact, and the
    daemon's peak RSS grows by less than 32 MiB over them."""
    url = proxy_url(proxied)
    pid = proxied.proc.pid
    # Warm up first: the first requests allocate what every later one reuses.
    assert pattern_sha256(4 << 20) == _stream_download(url, 4 << 20)
    assert 4 << 20 == _stream_upload(url, 4 << 20)["size"]
    before = vm_kib(pid, "VmRSS")
    assert pattern_sha256(BIG) == _stream_download(url, BIG)
    uploaded = _stream_upload(url, BIG)
    assert {"sha256": pattern_sha256(BIG), "size": BIG} == uploaded
    growth = vm_kib(pid, "VmHWM") - before
    print(f"daemon RSS {before} KiB before, peak grew by {growth} KiB over 2 x 200 MB")
    assert growth < RSS_BUDGET_KIB


def test_the_access_log_holds_no_query_and_no_token(
    proxied: DaemonProcess, fake: FakeSugar
) -> None:
    """The debug access log names the path without its query; no token appears in the log."""
    url = proxy_url(proxied)
    token = current_token(proxied)
    requests.get(url + "/rest/v10/Accounts?download_token=s3cret-in-query", timeout=30)
    requests.post(url + "/rest/v10/oauth2/token", json={"grant_type": "password"}, timeout=30)
    log = proxied.log()
    assert "prod GET '/rest/v10/Accounts' -> 200" in log
    assert "s3cret-in-query" not in log
    for secret in [token, *fake.issued]:
        assert secret not in log


def test_the_path_goes_as_the_client_encoded_it_and_dot_segments_are_refused(
    proxied: DaemonProcess, front: SugarFront
) -> None:
    """A path with harmless escapes reaches Sugar still encoded, its query as sent; a path
    with .. (which could reach oauth2/logout after Sugar's front normalises it) or an
    encoded slash is refused before it is forwarded (test_proxy_guards.py: the rest)."""
    url = proxy_url(proxied)
    answer = requests.get(url + "/rest/v10/Echo/a%40b%C3%A9?q=%C3%A9%2F%20", timeout=30)
    assert 200 == answer.status_code
    assert "/rest/v10/Echo/a%40b%C3%A9?q=%C3%A9%2F%20" == answer.json()["raw_path"]
    assert 400 == requests.get(url + "/rest/v10/Echo/a%2Fb", timeout=30).status_code
    status, body = curl_socket(
        proxied, "/rest/v10/Echo/%2e%2e/oauth2/logout", "-X", "POST", "--path-as-is"
    )
    assert 400 == status
    assert {"error", "error_message"} == set(body)


def test_a_body_that_breaks_off_upstream_is_cut_for_the_client_too(
    proxied: DaemonProcess,
) -> None:
    """When Sugar's answer breaks off mid-body, the client's transfer fails too rather than
    ending as if complete; the daemon keeps serving."""
    host, port = proxy_url(proxied).removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/rest/v10/Broken")
    answer = conn.getresponse()
    assert 200 == answer.status
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        answer.read()
    conn.close()
    assert 200 == requests.get(proxy_url(proxied) + "/rest/v10/me", timeout=30).status_code
    assert "broke off mid-body" in proxied.log()
    assert "Traceback" not in proxied.log()


@pytest.mark.slow
def test_the_proxy_benchmark_runs_and_measures_every_row() -> None:
    """`python -m bench.bench_proxy --quick` prints its table, every figure a number; the
    streams came back byte-exact (it fails otherwise) in bounded memory."""
    root = ROOT
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench_proxy", "--quick"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| measure")
    }
    assert {
        "p50 latency, 1 connection",
        "p99 latency, 1 connection",
        "throughput, 16 connections",
        "CPU per proxied request (the proxy's process)",
    } <= set(rows)
    assert all(
        re.match(r"^[0-9.,]+ (ms|us|/s)", cell) for cell in rows["p50 latency, 1 connection"][:4]
    )
    growth = next(v for k, v in rows.items() if k.startswith("daemon RSS growth"))[1]
    assert float(growth.split()[0]) < 32


def test_the_proxy_verifies_tls_as_the_instance_does(
    certs: dict[str, Path],
    tls_fake: FakeSugar,
    short_dir: Path,
    start_daemon,
) -> None:
    """Over HTTPS with a private CA, the proxy trusts the instance's ca_file (the system's CAs
    alone would refuse the site): the client is answered by Sugar."""
    config = write_config(short_dir, {"prod": instance(tls_fake, ca_file=str(certs["ca"]))})
    daemon = start_daemon(config)
    with daemon.client() as client:
        client.token("prod", wait=20)
    status, body = curl_socket(daemon, "/rest/v10/me")
    assert 200 == status, body
    assert USER == body["current_user"]["user_name"]
