"""A Sugar front for the proxy tests: a real aiohttp server on 127.0.0.1 standing in front of
the fake SugarCRM, for what the fake cannot do yet (echo what reached it, stream 200 MB each
way, hold a request open).

Every route checks the token the way Sugar would, by asking the fake's `/me` with it, so an
evicted token gets the fake's own 401 `invalid_grant`. Anything else under /rest/ (the token
endpoint the daemon logs in through, /me, /ping, modules) is relayed to the fake unchanged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from support.wait import wait_for as wait_for  # the suite's one, for the proxy tests

BLOCK = bytes(range(256)) * 4096  # 1 MiB of a pattern the client can check


def pattern(size: int) -> Iterator[bytes]:
    """`size` bytes of the download pattern, in blocks."""
    whole, rest = divmod(size, len(BLOCK))
    for _ in range(whole):
        yield BLOCK
    if rest:
        yield BLOCK[:rest]


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for block in pattern(size):
        digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Seen:
    """One request that reached the front (past the token check or not)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass(eq=False)
class SugarFront:
    fake_url: str
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    extra_headers: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release: asyncio.Semaphore | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _session: aiohttp.ClientSession | None = None
    _runner: web.AppRunner | None = None

    def open_connections(self) -> int:
        """Connections open to the front right now (kept-alive ones included)."""
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    def requests_to(self, path: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.path == path]

    def release(self, n: int = 1) -> None:
        """Let `n` held requests (/rest/v10/Hold) finish."""
        assert self._loop is not None and self._release is not None
        for _ in range(n):
            self._loop.call_soon_threadsafe(self._release.release)

    # Serving

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/rest/v10/Echo{tail:.*}", self._echo)
        app.router.add_get("/rest/v10/Broken", self._broken)
        app.router.add_get("/rest/v10/Download/{size}", self._download)
        app.router.add_route("*", "/rest/v10/Upload", self._upload)
        app.router.add_get("/rest/v10/Hold", self._hold)
        app.router.add_get("/rest/v10/Hang", self._hang)
        app.router.add_route("*", "/rest/{tail:.*}", self._relay)
        return app

    async def _authorized(self, request: web.Request) -> web.Response | None:
        """None if the fake accepts the request's OAuth-Token, else the fake's refusal."""
        assert self._session is not None
        headers = {}
        if "OAuth-Token" in request.headers:
            headers["OAuth-Token"] = request.headers["OAuth-Token"]
        async with self._session.get(f"{self.fake_url}/rest/v10/me", headers=headers) as answer:
            if answer.status == 200:
                return None
            return web.Response(
                status=answer.status, body=await answer.read(), content_type="application/json"
            )

    def _record(self, request: web.Request, body: bytes, status: int) -> None:
        with self._lock:
            self.seen.append(
                Seen(
                    request.method,
                    request.path,
                    request.query_string,
                    dict(request.headers),
                    body,
                    status,
                )
            )

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        refusal = await self._authorized(request)
        self._record(request, body, refusal.status if refusal else 200)
        if refusal is not None:
            return refusal
        return web.json_response(
            {
                "method": request.method,
                "headers": dict(request.headers),
                "body": body.decode("utf-8", "replace"),
                "query": request.query_string,
                "raw_path": request.raw_path,
            },
            headers={"X-Sugar": "1", "Proxy-Authenticate": "Basic", **self.extra_headers},
        )

    async def _download(self, request: web.Request) -> web.StreamResponse:
        refusal = await self._authorized(request)
        self._record(request, b"", refusal.status if refusal else 200)
        if refusal is not None:
            return refusal
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        for block in pattern(size):
            await response.write(block)
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        refusal = await self._authorized(request)
        if refusal is not None:
            await request.read()
            self._record(request, b"", refusal.status)
            return refusal
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        self._record(request, b"", 200)
        return web.json_response({"sha256": digest.hexdigest(), "size": size})

    async def _broken(self, request: web.Request) -> web.StreamResponse:
        """A chunked answer that breaks off after 1 MiB, as a crashing Sugar's would."""
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(BLOCK)
        await asyncio.sleep(0)  # let the block go out before the connection is cut
        assert request.transport is not None
        request.transport.abort()
        return response

    async def _hold(self, request: web.Request) -> web.Response:
        assert self._release is not None
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self._release.acquire()
        finally:
            with self._lock:
                self.in_flight -= 1
        self._record(request, b"", 200)
        return web.json_response({"held": True})

    async def _hang(self, request: web.Request) -> web.Response:
        self._record(request, b"", 0)
        await asyncio.Event().wait()  # until the client (the proxy) gives up
        raise AssertionError("unreachable")

    async def _relay(self, request: web.Request) -> web.Response:
        assert self._session is not None
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding", "connection")
        }
        async with self._session.request(
            request.method,
            f"{self.fake_url}{request.path_qs}",
            headers=headers,
            data=body or None,
        ) as answer:
            raw = await answer.read()
            self._record(request, body, answer.status)
            return web.Response(
                status=answer.status,
                body=raw,
                headers={"Content-Type": answer.headers.get("Content-Type", "application/json")},
            )


@contextmanager
def running_front(fake_url: str) -> Iterator[SugarFront]:
    """A SugarFront on 127.0.0.1 in a thread of its own, in front of the fake at `fake_url`."""
    front = SugarFront(fake_url)
    ready: concurrent.futures.Future[asyncio.Event] = concurrent.futures.Future()

    async def serve() -> None:
        stop = asyncio.Event()
        front._loop = asyncio.get_running_loop()
        front._release = asyncio.Semaphore(0)
        front._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        runner = web.AppRunner(front.app(), access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        front._runner = runner
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        front.url = f"http://{host}:{port}"
        ready.set_result(stop)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await front._session.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    stop = ready.result(timeout=10)
    try:
        yield front
    finally:
        assert front._loop is not None
        front._loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


def vm_kib(pid: int, key: str) -> int:
    """A /proc/PID/status figure (VmRSS, VmHWM) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")
