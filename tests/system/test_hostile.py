"""Hostile input: malformed HTTP, unknown routes, bad names and values, oversized requests, idle
and stalled connections, and more connections than the daemon will hold. Every answer is JSON,
never a traceback and never a 5xx, and the daemon keeps handing out tokens throughout."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import resource
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import SUGARD, DaemonProcess, instance, sugarctl, write_config
from support.wait import wait_for

from sugard import api
from sugard.api import serving
from sugard.client import DaemonUnreachable, SugardClient
from sugard.config import load_config
from sugard.daemon import Daemon
from sugard.testing import FakeSugar, running_fake

HOST = b"Host: sugard\r\n"
INVALIDATE = b"POST /v1/instances/prod/invalidate HTTP/1.1\r\n" + HOST


def post(body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return INVALIDATE + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def get(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + HOST + b"\r\n"


# name -> (raw request, expected status, expected error code)
CASES: dict[str, tuple[bytes, int, str]] = {
    "tls client hello": (
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(40),
        400,
        "bad_request",
    ),
    "not http": (b"HELLO SUGARD\r\n\r\n", 400, "bad_request"),
    "http/9.9": (b"GET /v1/health HTTP/9.9\r\n" + HOST + b"\r\n", 400, "bad_request"),
    "header without colon": (b"GET /v1/health HTTP/1.1\r\nHost sugard\r\n\r\n", 400, "bad_request"),
    "nul in path": (get(b"/v1/hea\x00lth"), 400, "bad_request"),
    "request line too long": (get(b"/v1/" + b"a" * 9000), 400, "bad_request"),
    "header too long": (
        b"GET /v1/health HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
        400,
        "bad_request",
    ),
    "too many headers": (
        b"GET /v1/health HTTP/1.1\r\n"
        + HOST
        + b"".join(b"X-%d: y\r\n" % i for i in range(100))
        + b"\r\n",
        400,
        "bad_request",
    ),
    "negative content-length": (INVALIDATE + b"Content-Length: -5\r\n\r\n", 400, "bad_request"),
    "content-length and chunked": (
        INVALIDATE + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "broken chunk": (
        INVALIDATE + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "body too large": (post(b"a" * 70000), 413, "bad_request"),
    "body not json": (post(b"access_token=x"), 400, "bad_request"),
    "body not utf-8": (post(b"\xff\xfe\xfd"), 400, "bad_request"),
    "body a list": (post(b'["x"]'), 400, "bad_request"),
    "token not a string": (post(b'{"access_token": 5}'), 400, "bad_request"),
    "token empty": (post(b'{"access_token": ""}'), 400, "bad_request"),
    "json nested 60000 deep": (post(b"[" * 60000), 400, "bad_request"),
    "gzip body": (post(b"\x1f\x8b\x08\x00garbage", b"Content-Encoding: gzip"), 400, "bad_request"),
    "root": (get(b"/"), 404, "not_found"),
    "other version": (get(b"/v2/health"), 404, "not_found"),
    "route too deep": (get(b"/v1/instances/prod/token/more"), 404, "not_found"),
    "dot segments": (get(b"/v1/instances/../health"), 404, "not_found"),
    "connect": (b"CONNECT evil.example:443 HTTP/1.1\r\n" + HOST + b"\r\n", 404, "not_found"),
    "delete": (b"DELETE /v1/health HTTP/1.1\r\n" + HOST + b"\r\n", 405, "method_not_allowed"),
    "get on a post route": (get(b"/v1/reload"), 405, "method_not_allowed"),
    "name with newline": (get(b"/v1/instances/a%0Ab/token"), 400, "bad_request"),
    "name with slash": (get(b"/v1/instances/a%2Fb/token"), 400, "bad_request"),
    "name with space": (get(b"/v1/instances/a%20b"), 400, "bad_request"),
    "name starting with a dash": (get(b"/v1/instances/-prod"), 400, "bad_request"),
    "name of 65 characters": (get(b"/v1/instances/" + b"a" * 65 + b"/token"), 400, "bad_request"),
    "name not ascii": (get(b"/v1/instances/pr%C3%B6d/token"), 400, "bad_request"),
    "min_ttl a word": (get(b"/v1/instances/prod/token?min_ttl=soon"), 400, "bad_request"),
    "min_ttl negative": (get(b"/v1/instances/prod/token?min_ttl=-1"), 400, "bad_request"),
    "min_ttl nan": (get(b"/v1/instances/prod/token?min_ttl=nan"), 400, "bad_request"),
    "min_ttl infinite": (get(b"/v1/instances/prod/token?min_ttl=1e999"), 400, "bad_request"),
    "min_ttl above a day": (get(b"/v1/instances/prod/token?min_ttl=86401"), 400, "bad_request"),
    "wait above 300": (get(b"/v1/instances/prod/token?wait=301"), 400, "bad_request"),
    "wait hex": (get(b"/v1/instances/prod/token?wait=0x10"), 400, "bad_request"),
    "wait nul": (get(b"/v1/instances/prod/token?wait=%00"), 400, "bad_request"),
    "unknown instance": (get(b"/v1/instances/nope/token"), 404, "unknown_instance"),
}


def exchange(path: Path, request: bytes, timeout: float = 10) -> http.client.HTTPResponse:
    """Send raw bytes on a fresh connection; the daemon's answer, parsed as HTTP."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(os.fspath(path))
    # The daemon may answer and close before reading everything: the answer is still there.
    with contextlib.suppress(BrokenPipeError):
        sock.sendall(request)
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()  # type: ignore[attr-defined]
    sock.close()
    return response


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the table of bad requests (each test checks it is still healthy)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="sd-"))
    with running_fake(users={"alice": "alice-secret-pw"}) as fake:
        daemon = DaemonProcess(write_config(d, {"prod": instance(fake)}), d / "s.sock")
        daemon.wait_ready()
        yield daemon
        daemon.stop()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_requests_get_a_json_error(hostile: DaemonProcess, case: str) -> None:
    """Each bad request gets its 4xx with a one-line JSON error; no traceback in the log."""
    request, status, code = CASES[case]
    response = exchange(hostile.socket, request)
    body = json.loads(response.body)  # type: ignore[attr-defined]
    assert (status, code) == (response.status, body["error"])
    assert response.getheader("Content-Type", "").startswith("application/json")
    assert 1 == len(body["message"].splitlines())
    if status == 405:
        assert response.getheader("Allow")
    assert "Traceback" not in hostile.log()
    assert "Error handling request" not in hostile.log()
    with SugardClient(hostile.socket) as client:
        assert "ok" == client.health()["status"]


def raise_open_files_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


STALLED, ACTIVE = 600, 400


async def connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection made as a blocking client makes it: when the daemon's listen queue is full,
    connect() waits (asyncio's non-blocking connect would report success on a socket that never
    got connected)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    sock.setblocking(False)
    return await asyncio.open_unix_connection(sock=sock)


@pytest.mark.slow
async def test_a_thousand_connections_some_stalled_do_not_stop_token_requests(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """With 600 stalled connections held open (silent, half a request line, trickled headers,
    half a body), 400 concurrent token requests on new connections are all answered quickly."""
    raise_open_files_limit()
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    path = os.fspath(daemon.socket)
    assert 0 == sugarctl(daemon.socket, "token", "prod").returncode
    openers = [
        b"",
        b"GET /v1/instances/prod/tok",
        INVALIDATE + b'Content-Length: 100\r\n\r\n{"access_tok',
        b"GET /v1/health HTTP/1.1\r\n" + HOST + b"X-Slow: ",
    ]
    stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for i in range(STALLED):
        reader, writer = await connect(path)
        writer.write(openers[i % len(openers)])
        stalled.append((reader, writer))

    async def trickle() -> None:
        while True:  # a slowloris: one more header byte now and then, never the end
            await asyncio.sleep(0.2)
            for _, writer in stalled[3 :: len(openers)]:
                writer.write(b"a")

    async def ask() -> str:
        reader, writer = await connect(path)
        writer.write(
            b"GET /v1/instances/prod/token HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
        )
        raw = await reader.read()
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        token: str = json.loads(body)["access_token"]
        return token

    slowloris = asyncio.create_task(trickle())
    started = time.monotonic()
    tokens = await asyncio.wait_for(asyncio.gather(*(ask() for _ in range(ACTIVE))), 30)
    elapsed = time.monotonic() - started

    async def still_open(reader: asyncio.StreamReader) -> bool:
        try:
            await asyncio.wait_for(reader.read(1), 0.05)
        except TimeoutError:
            return True
        return False

    open_now = await asyncio.gather(*(still_open(r) for r, _ in stalled))
    slowloris.cancel()
    for _, writer in stalled:
        writer.close()
    assert 1 == len(set(tokens))
    assert fake.valid(tokens[0])
    assert [True] * STALLED == open_now  # the load was really concurrent
    assert elapsed < 10, f"{ACTIVE} token requests took {elapsed:.1f} s"
    assert "Traceback" not in daemon.log()


def test_connections_beyond_the_limit_are_turned_away_with_json(
    fake: FakeSugar, short_dir: Path
) -> None:
    """Under an open files limit of 256 the daemon holds half as many connections and never
    runs out of descriptors; further ones get 503 `busy` JSON with Retry-After, one log line
    says so, and tokens flow once they go."""
    config = write_config(short_dir, {"prod": instance(fake)})
    sock_path = short_dir / "s.sock"
    log_path = short_dir / "sugard.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                "prlimit",
                "--nofile=256:256",
                SUGARD,
                "run",
                "-c",
                str(config),
                "--socket",
                str(sock_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(sock_path)
        conns = []
        for _ in range(250):
            s = socket.socket(socket.AF_UNIX)
            s.connect(os.fspath(sock_path))
            conns.append(s)
        limit = serving.connection_limits(256)[0]
        # Until the daemon has turned away all it may not hold: then the count is its decision.
        wait_for(
            lambda: len(select.select(conns, [], [], 0)[0]) >= 250 - limit,
            what="the busy answers",
        )
        answers = []
        for s in conns:
            s.setblocking(False)
            try:
                answers.append(s.recv(4096))
            except BlockingIOError:
                answers.append(b"")
        held = answers.count(b"")
        turned_away = [a for a in answers if a]
        assert limit - 1 <= held <= limit  # the readiness probe's connection may linger
        assert 250 == held + len(turned_away)
        head, _, body = turned_away[0].partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"Retry-After: 1" in head
        assert "busy" == json.loads(body)["error"]
        for s in conns:
            s.close()
        assert 0 == sugarctl(sock_path, "token", "prod").returncode
        log = log_path.read_text()
        assert 1 == log.count(f"at the limit of {limit} connections")
        assert "Traceback" not in log
    finally:
        proc.terminate()
        proc.wait(15)


def test_the_daemon_raises_its_open_files_limit(fake: FakeSugar, short_dir: Path) -> None:
    """A daemon started with a soft open files limit of 256 raises it to the hard limit."""
    config = write_config(short_dir, {"prod": instance(fake)})
    sock_path = short_dir / "s.sock"
    proc = subprocess.Popen(
        [
            "prlimit",
            "--nofile=256:4096",
            SUGARD,
            "run",
            "-c",
            str(config),
            "--socket",
            str(sock_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(sock_path)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert ["4096", "4096"] == line.split()[3:5]
    finally:
        proc.terminate()
        proc.wait(15)


def _wait_ready(sock_path: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with SugardClient(sock_path, timeout=2) as client:
                client.health()
            return
        except DaemonUnreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.slow
async def test_silent_slow_and_idle_connections_are_closed(
    fake: FakeSugar, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A silent connection, trickled headers and an idle kept-alive connection are closed after
    the idle timeout; a body that stops halfway gets 408 JSON and the connection closed; a token
    request waiting longer than the idle timeout for a slow login is not cut short."""
    monkeypatch.setattr(serving, "IDLE_TIMEOUT", 0.5)
    monkeypatch.setattr(api, "BODY_TIMEOUT", 0.5)
    fake.delay = 1.0  # the first login takes longer than the idle timeout
    config = load_config(write_config(short_dir, {"prod": instance(fake)}))
    daemon = Daemon(config, short_dir / "s.sock")
    await daemon.start()
    path = os.fspath(daemon.socket_path)
    try:

        async def closed_after(opener: bytes, trickle: bool = False) -> tuple[float, bytes]:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(opener)
            started = time.monotonic()
            read = asyncio.create_task(reader.read())
            while trickle and not read.done():
                try:
                    writer.write(b"a")
                except OSError:
                    break  # closed by the daemon: the read below sees the end
                await asyncio.sleep(0.05)
            try:
                data = await asyncio.wait_for(read, 5)
            except (BrokenPipeError, ConnectionResetError):
                data = b""  # the daemon closed it while a trickled byte was on its way
            writer.close()
            return time.monotonic() - started, data

        waited, data = await closed_after(
            b"GET /v1/instances/prod/token?wait=5 HTTP/1.1\r\n"
            + HOST
            + b"Connection: close\r\n\r\n"
        )
        assert data.startswith(b"HTTP/1.1 200 ")
        assert waited > 0.5
        fake.delay = 0
        waited, data = await closed_after(b"")
        assert (b"", True) == (data, 0.4 < waited < 2)
        waited, data = await closed_after(b"GET /v1/health HTTP/1.1\r\nX-Slow: ", trickle=True)
        assert (b"", True) == (data, 0.4 < waited < 2)
        waited, data = await closed_after(get(b"/v1/health"))
        assert data.startswith(b"HTTP/1.1 200 ")
        assert 0.4 < waited < 2
        waited, data = await closed_after(INVALIDATE + b'Content-Length: 100\r\n\r\n{"acc')
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert "bad_request" == json.loads(body)["error"]
    finally:
        await daemon.stop()
