"""A hostile network and hostile neighbours on the TCP side: credentials never follow a
redirect, a site URL never carries a password, the TCP listeners hold a bounded number of
another uid's connections, and the proxy passes neither cookies nor hop-by-hop headers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from support.daemon import SUGARD, DaemonProcess, instance, proxy_url, sugarctl, write_config
from support.nobody import AS_NOBODY, NOBODY
from support.proxy_upstream import SugarFront
from support.redirects import redirecting, serving
from support.wait import wait_for

from sugard.auth import SugarAuth
from sugard.client import SugardClient
from sugard.testing import FakeSugar

URL_PASSWORD = "hunter2-in-the-url"


def test_a_site_url_with_a_password_is_refused_by_check_run_and_reload(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """`url = "https://user:pw@host"` is refused by check, run and reload, naming the key;
    the password shows nowhere."""
    userinfo_url = fake.url.replace("http://", f"http://alice:{URL_PASSWORD}@")
    bad = write_config(short_dir, {"prod": instance(fake, url=userinfo_url)}, name="bad.toml")
    for argv in (
        [SUGARD, "check", "--unit", "none", "-c", str(bad)],
        [SUGARD, "run", "-c", str(bad), "--socket", str(short_dir / "bad.sock")],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        said = result.stdout + result.stderr
        assert 0 != result.returncode, said
        assert "instances.prod.url" in said
        assert "user name or password" in said
        assert URL_PASSWORD not in said

    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    write_config(short_dir, {"prod": instance(fake, url=userinfo_url)})
    reload = sugarctl(daemon.socket, "reload")
    assert 0 != reload.returncode
    assert "instances.prod.url" in reload.stderr
    assert URL_PASSWORD not in reload.stderr + reload.stdout + daemon.log()
    with daemon.client() as client:
        assert fake.url == client.status()[0]["url"]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_sugar_auth_drops_the_token_on_a_redirect_to_another_host(
    daemon: DaemonProcess, status: int
) -> None:
    """requests with SugarAuth follows a redirect to another host without `OAuth-Token` (as
    requests drops Authorization there); the token reached only the host it was meant for."""
    with daemon.client() as client:
        token = client.token("prod")["access_token"]
    with (
        redirecting(status) as (url, _, ours, theirs),
        SugarAuth("prod", SugardClient(daemon.socket)) as auth,
        requests.Session() as http,
    ):
        http.auth = auth
        answer = http.post(f"{url}/rest/v10/Accounts", json={"name": "x"}, timeout=30)
        assert 200 == answer.status_code
        assert [status] == [r.status_code for r in answer.history]
    assert ours.carried(token)
    assert 1 == len(theirs.requests)
    assert not theirs.carried(token)
    assert "OAuth-Token" not in theirs.requests[0][2]


def test_sugar_auth_keeps_the_token_on_a_redirect_within_the_site(daemon: DaemonProcess) -> None:
    """A redirect to another path of the same site keeps `OAuth-Token` (the site is the one
    the token is for)."""
    with (
        serving() as (url, reached),
        SugarAuth("prod", SugardClient(daemon.socket)) as auth,
        requests.Session() as http,
    ):
        http.auth = auth
        token = auth.client.token("prod")["access_token"]
        answer = http.get(f"{url}/rest/v10/Moved/1", timeout=30)
        assert 200 == answer.status_code
        assert [301] == [r.status_code for r in answer.history]
    assert [("/rest/v10/Moved/1", token), ("/rest/v10/Here/1", token)] == [
        (path, headers.get("OAuth-Token")) for _, path, headers, _ in reached.requests
    ]


# Run as uid 65534 by the system's python (the test's interpreter may sit in a home directory
# that uid cannot enter): opens COUNT connections to each HOST:PORT and holds them; on a line
# from stdin, prints how many the server holds open (never answered), then on EOF closes them.
FLOOD = r"""
import selectors, socket, sys, time
count = int(sys.argv[1])
held = []
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    for _ in range(count):
        held.append(socket.create_connection((host, int(port))))
print("connected", flush=True)
sys.stdin.readline()
# Held: never answered. Turned-away ones get an answer and are closed; wait until no more
# answers come for a while (the daemon may still be working through its listen queue).
pending = selectors.DefaultSelector()
for s in held:
    s.setblocking(False)
    pending.register(s, selectors.EVENT_READ)
quiet_since = time.monotonic()
while time.monotonic() - quiet_since < 3:
    ready = pending.select(0.2)
    for key, _ in ready:
        pending.unregister(key.fileobj)
    if ready:
        quiet_since = time.monotonic()
print(len(pending.get_map()), flush=True)
sys.stdin.read()
"""
FLOOD_SIZE = 3000


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_another_uid_flooding_the_tcp_listeners_holds_few_connections_and_the_owner_is_served(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """uid 65534, allowed to use the instance, opens 3,000 idle connections to the proxy
    listener and 3,000 to metrics_listen: the daemon holds a few dozen of them, its open files
    stay far from the limit, and the owner's requests on both listeners are served meanwhile."""
    config = write_config(
        short_dir,
        {"prod": instance(fake, listen="127.0.0.1:0")},
        daemon={"metrics_listen": "127.0.0.1:0", "allowed_uids": [NOBODY]},
    )
    daemon = start_daemon(config)
    listener = proxy_url(daemon)
    metrics = re.search(r"metrics on http://(127\.0\.0\.1:\d+)/metrics", daemon.log())
    assert metrics and listener.startswith("http://"), daemon.log()
    targets = [listener.removeprefix("http://"), metrics.group(1)]
    before = open_fds(daemon.proc.pid)
    flood = subprocess.Popen(
        [*AS_NOBODY, "/usr/bin/python3", "-I", "-c", FLOOD, str(FLOOD_SIZE), *targets],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flood.stdin is not None and flood.stdout is not None
    try:
        assert "connected" == flood.stdout.readline().strip()
        flood.stdin.write("count\n")
        flood.stdin.flush()
        held = int(flood.stdout.readline())  # once the daemon answered all it turns away
        fds = open_fds(daemon.proc.pid)
        print(
            f"\n{2 * FLOOD_SIZE} connections from uid {NOBODY}: {held} held; "
            f"daemon fds {before} before, {fds} under the flood"
        )
        assert held <= 64
        assert fds < before + 200
        answer = requests.get(f"{listener}/rest/v10/me", timeout=30)
        assert 200 == answer.status_code, answer.text
        scraped = requests.get(f"http://{metrics.group(1)}/metrics", timeout=30)
        assert 200 == scraped.status_code
        with daemon.client() as client:
            assert client.token("prod")["access_token"]
    finally:
        flood.stdin.close()
        flood.wait(60)
        flood.stdout.close()


def raw_exchange(address: str, request: bytes) -> bytes:
    """Send `request` as it is to HOST:PORT; what came back before the server closed (or
    went quiet for 5 s)."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        sock.settimeout(5)
        received = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


SECRET_IN_REQUEST = "tok-3f9c-never-in-the-log"


def test_malformed_requests_on_the_tcp_listeners_are_logged_in_one_line_without_their_bytes(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Bytes that are not HTTP, on the proxy listener and on metrics_listen, get a 400 in the
    listener's JSON envelope; the log says so in one line, with no traceback and nothing of
    what was sent."""
    config = write_config(
        short_dir,
        {"prod": instance(fake, listen="127.0.0.1:0")},
        daemon={"metrics_listen": "127.0.0.1:0"},
    )
    daemon = start_daemon(config)
    listener = proxy_url(daemon)
    metrics = re.search(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", daemon.log())
    assert metrics, daemon.log()
    bad = [
        f"GET /rest/v10/me HTTP/1.1\r\nHost: x\r\nX-Token: {SECRET_IN_REQUEST}\x01\r\n\r\n",
        f"GET /{SECRET_IN_REQUEST} HTTP/1.1\r\nHost: x\r\nX: {'a' * 9000}\r\n\r\n",
        f"\x16\x03\x01{SECRET_IN_REQUEST} HTTP/1.1\r\n\r\n",
        f"GET /rest HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n{SECRET_IN_REQUEST}"
        "\r\n\r\n",
    ]
    for address, key in ((listener, "error_message"), (metrics.group(1), "message")):
        for request in bad:
            answer = raw_exchange(address, request.encode())
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.split(b" ")[1] == b"400", answer
            assert key in json.loads(body), answer
    log = daemon.log()
    assert "malformed HTTP request from uid" in log
    assert "Traceback" not in log
    assert SECRET_IN_REQUEST not in log


def test_connect_on_the_proxy_listener_is_answered_in_sugars_envelope(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """CONNECT (someone taking the listener for an HTTP proxy) gets Sugar's JSON envelope
    saying what the listener is, and the connection is closed; so does an unknown path."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake, listen="127.0.0.1:0")}))
    listener = proxy_url(daemon)
    own = listener.removeprefix("http://")
    for target in ("crm.example.com:443", own):
        request = f"CONNECT {target} HTTP/1.1\r\nHost: {own}\r\n\r\n"
        started = time.monotonic()
        head, _, body = raw_exchange(listener, request.encode()).partition(b"\r\n\r\n")
        assert time.monotonic() - started < 4, "the connection was left open"
        assert head.startswith(b"HTTP/1.1 405 "), head
        answer = json.loads(body)
        assert "method_not_allowed" == answer["error"]
        assert "/rest/" in answer["error_message"]
    answer = requests.get(f"{listener}/v1/health", timeout=30)
    assert 404 == answer.status_code
    assert "not_found" == answer.json()["error"]


def listener_of(daemon: DaemonProcess) -> str:
    with daemon.client() as client:
        client.token("prod", wait=20)
    return proxy_url(daemon)


def test_the_proxy_passes_no_cookie_no_hop_header_sugar_named_and_no_underscored_token(
    front: SugarFront, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Sugar's Set-Cookie (the download token's cookie) and the headers Sugar's Connection
    names stay with sugard; a client's `OAuth_Token` (PHP reads it as HTTP_OAUTH_TOKEN, as it
    reads OAuth-Token) never reaches Sugar: only sugard's token does."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(front, listen="127.0.0.1:0")}))
    listener = listener_of(daemon)
    front.extra_headers.update(
        {
            "Set-Cookie": "download_token_base=dl-cookie-value; Path=/; HttpOnly",
            "Connection": "X-Sugar-Hop",
            "X-Sugar-Hop": "this connection only",
        }
    )
    answer = requests.get(
        f"{listener}/rest/v10/Echo",
        headers={"OAuth_Token": "client-token", "oauth_token": "client-token-2"},
        timeout=30,
    )
    assert 200 == answer.status_code, answer.text
    assert "Set-Cookie" not in answer.headers
    assert "X-Sugar-Hop" not in answer.headers
    assert "1" == answer.headers["X-Sugar"]
    seen = answer.json()["headers"]
    tokens = [v for k, v in seen.items() if k.lower().replace("_", "-") == "oauth-token"]
    with daemon.client() as client:
        assert [client.token("prod")["access_token"]] == tokens


def test_a_sugar_header_over_8_kib_is_said_to_be_sugars_answer(
    front: SugarFront, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Sugar answering with a header line over 8 KiB gets a 502 that says Sugar answered
    with what sugard cannot read, not that Sugar could not be reached."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(front, listen="127.0.0.1:0")}))
    listener = listener_of(daemon)
    front.extra_headers["X-Huge"] = "h" * 9000
    answer = requests.get(f"{listener}/rest/v10/Echo", timeout=30)
    assert 502 == answer.status_code
    message = answer.json()["error_message"]
    assert "cannot reach" not in message
    assert f"{front.url} answered" in message
    assert "header" in message


def pipelined(socket_path: Path, requests_: list[bytes]) -> list[tuple[int, dict[str, object]]]:
    """Write `requests_` at once on one connection; the answers read back, in order, until
    the daemon closes the connection or all have come (status, JSON body)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(b"".join(requests_))
        sock.settimeout(30)
        buffer, answers = b"", []
        while len(answers) < len(requests_):
            head, found, rest = buffer.partition(b"\r\n\r\n")
            if found:
                length = int(re.search(rb"Content-Length: (\d+)", head, re.I)[1])  # type: ignore[index]
                if len(rest) >= length:
                    answers.append((int(head.split(b" ")[1]), json.loads(rest[:length])))
                    buffer = rest[length:]
                    continue
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
    return answers


def test_pipelined_requests_on_the_socket_are_all_answered_in_order(
    daemon: DaemonProcess,
) -> None:
    """Three requests written at once (a token, a report of a stale token with a body, the
    status) get three answers, in the order asked."""
    host = b"Host: sugard\r\n"
    body = json.dumps({"access_token": "not-the-current-one"}).encode()
    answers = pipelined(
        daemon.socket,
        [
            b"GET /v1/instances/prod/token HTTP/1.1\r\n" + host + b"\r\n",
            b"POST /v1/instances/prod/invalidate HTTP/1.1\r\n"
            + host
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body,
            b"GET /v1/instances/prod HTTP/1.1\r\n" + host + b"\r\n",
        ],
    )
    assert [200, 200, 200] == [status for status, _ in answers], answers
    token, reported, status = (answer for _, answer in answers)
    assert "access_token" in token and "access_token" in reported
    assert "prod" == status["name"]


def test_a_body_over_the_limit_gets_413_and_no_100_continue(daemon: DaemonProcess) -> None:
    """`Expect: 100-continue` with a Content-Length over 64 KiB: the first answer is the
    413, never a 100 Continue inviting the client to send it; within the limit, the 100
    comes and the request is served."""
    host = b"Host: sugard\r\n"
    for path in (b"/v1/instances/prod/invalidate", b"/v1/reload"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(daemon.socket))
            sock.settimeout(30)
            sock.sendall(
                b"POST " + path + b" HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
                b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
            )
            first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 413 "), first
        assert b"100 Continue" not in first
    body = json.dumps({"access_token": "stale"}).encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(daemon.socket))
        sock.settimeout(30)
        sock.sendall(
            b"POST /v1/instances/prod/invalidate HTTP/1.1\r\n" + host + b"Content-Type: "
            b"application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


# Run as uid 65534: listens on a port of 127.0.0.1, prints it, holds it until stdin closes.
SQUAT = r"""
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
sys.stdin.read()
"""


def test_a_listener_port_taken_by_another_user_is_retried_while_the_rest_serves(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """uid 65534 holds the listener's port while sugard starts: sugard starts anyway (the
    socket and the other instance serve), says so in the log and in STATUS, survives a reload,
    and binds the port once it is free."""
    squat = subprocess.Popen(
        [*AS_NOBODY, "/usr/bin/python3", "-I", "-c", SQUAT],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert squat.stdin is not None and squat.stdout is not None
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    notify.settimeout(30)
    try:
        port = int(squat.stdout.readline())
        address = f"127.0.0.1:{port}"
        tables = {
            "prod": instance(fake, listen=address),
            "other": instance(fake, listen="127.0.0.1:0", username="admin", password="admin-pw"),
        }
        config = write_config(short_dir, tables)
        daemon = start_daemon(config, env={"NOTIFY_SOCKET": str(short_dir / "notify")})
        status = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
        assert "1" == status["READY"]
        assert f"prod: cannot listen on {address}: Address already in use" in status["STATUS"]
        assert f"prod: cannot listen on {address}: Address already in use; serving" in (
            daemon.log()
        )
        with daemon.client() as client:
            assert client.token("prod", wait=20)["access_token"]
        other = proxy_url(daemon, "other")
        assert 200 == requests.get(f"{other}/rest/v10/me", timeout=30).status_code
        assert 0 == sugarctl(daemon.socket, "reload").returncode

        squat.stdin.close()
        squat.wait(30)
        wait_for(lambda: f"prod: proxy listening on http://{address}" in daemon.log())
        assert f"http://{address}" == proxy_url(daemon, "prod")
        answer = requests.get(f"http://{address}/rest/v10/me", timeout=30)
        assert 200 == answer.status_code
        while "cannot listen" in (text := notify.recv(4096).decode()) or "STATUS" not in text:
            pass
        assert "trying again" not in text
    finally:
        notify.close()
        if squat.poll() is None:
            squat.stdin.close()
            squat.wait(30)
        squat.stdout.close()


def test_proxy_url_says_to_give_clients_a_placeholder_password(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """`sugarctl proxy-url` prints the listener's URL alone on stdout and, on stderr, that
    clients get a placeholder password (sugard answers their login)."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake, listen="127.0.0.1:0")}))
    result = sugarctl(daemon.socket, "proxy-url", "prod")
    assert 0 == result.returncode
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+\n", result.stdout)
    assert "placeholder password" in result.stderr
    assert "sugard answers their login itself" in result.stderr
