"""The proxy's loopback TCP listener for SDKs that cannot speak to a Unix socket, and
opening and closing the listeners around a start or a reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from sugard.config import Config, split_host_port
from sugard.errors import ReloadFailed
from sugard.proxy.answers import refused, sugar_error
from sugard.proxy.forward import Forwarder
from sugard.proxy.tcp import TcpRunner, tcp_peer

__all__ = ["close_listeners", "open_listeners"]

log = logging.getLogger("sugard.proxy")


IDLE_TIMEOUT = 30.0  # a listener connection with no request for this long is closed
MAX_LINE = 8190
MAX_HEADERS = 128  # Sugar clients send more headers than sugarctl does
RETRY_FIRST, RETRY_MOST = 0.5, 30.0  # binding an address in use again: the backoff, in s
HTTP_LABELS = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


class ProxyListener:
    """One instance's loopback TCP listener: `/rest/...` forwarded (`/as/USER/rest/...` on
    the token of a user the instance acts as), anything else 404.

    Who connects is read once per connection (`TcpRunner`, from the kernel); browsers
    are refused, since a web page in the user's own browser runs as the same uid."""

    def __init__(
        self,
        forwarder: Forwarder,
        name: str,
        address: str,
        *,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.forwarder = forwarder
        self.name = name
        self.address = address  # as configured: "127.0.0.1:8401"
        self.url = ""  # once started: the base URL, with the port the kernel gave
        self._hosts: frozenset[str] = frozenset()
        self._runner: TcpRunner | None = None
        self._shutdown_timeout = shutdown_timeout
        self.problem: str | None = None  # why it is not listening yet, while it retries
        self._retrying: asyncio.Task[None] | None = None
        self._on_change: Callable[[], object] = lambda: None

    def keep_trying(self, exc: OSError, on_change: Callable[[], object]) -> None:
        """Not bound (another process holds the address): serve without this listener and
        try again, with a backoff, until it binds or is stopped; `on_change` hears when it
        binds (the daemon's status says which listeners wait)."""
        self.problem = f"cannot listen on {self.address}: {_why(exc)}"
        self._on_change = on_change
        log.warning(
            "%s: %s; serving without this listener (the socket serves %s), trying again",
            self.name,
            self.problem,
            self.name,
        )
        self._retrying = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        delay = RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MOST)
            try:
                await self.start()
            except OSError as exc:
                log.debug("%s: still cannot listen on %s: %s", self.name, self.address, exc)
                continue
            self.problem, self._retrying = None, None
            self._on_change()
            return

    async def start(self) -> None:
        """Bind and serve; raises OSError (address in use, not local) with nothing left open."""
        host, port = split_host_port(self.address)  # checked by the config
        app = web.Application(middlewares=[self._admit])
        app.router.add_route("*", "/rest/{path:.*}", self._proxied)
        app.router.add_route("*", "/as/{user}/rest/{path:.*}", self._proxied_as)
        app.router.add_route("*", "/{tail:.*}", _not_found)
        registry = self.forwarder.registry
        runner = TcpRunner(
            app,
            name=f"{self.name}: proxy listener",
            admits=lambda peer: peer is not None and registry.allowed(peer, self.name),
            envelope=sugar_error,
            idle_timeout=IDLE_TIMEOUT,
            max_line=MAX_LINE,
            max_headers=MAX_HEADERS,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            bound = (await runner.start(host, port))[0]
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        # DNS rebinding: a page on evil.example, resolved to 127.0.0.1, sends Host: evil.example.
        self._hosts = frozenset({f"{shown}:{bound[1]}", f"localhost:{bound[1]}"})
        self.forwarder.listener_urls[self.name] = self.url
        log.info("%s: proxy listening on %s", self.name, self.url)

    async def stop(self) -> None:
        retrying, self._retrying = self._retrying, None
        if retrying is not None:
            retrying.cancel()
            await asyncio.gather(retrying, return_exceptions=True)
        if self.url and self.forwarder.listener_urls.get(self.name) == self.url:
            del self.forwarder.listener_urls[self.name]
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("%s: proxy stopped listening on %s", self.name, self.url)

    @web.middleware
    async def _admit(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        browser = _browser_request(request, self._hosts)
        if browser is not None:
            log.warning(
                "%s: refused %s %r: %s", self.name, request.method, request.path[:200], browser
            )
            response = sugar_error(403, "forbidden", f"sugard refuses {browser}")
            response.force_close()
            return response
        refusal = refused(request, self.forwarder.registry, self._peer(request), self.name)
        if refusal is not None:
            return refusal
        if request.method == "CONNECT":  # taken for an HTTP proxy: it is not one
            response = sugar_error(
                405,
                "method_not_allowed",
                f"sugard's listener is not an HTTP proxy; send Sugar's REST requests to "
                f"{self.url}/rest/...",
            )
            response.force_close()
            return response
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own answers, in Sugar's envelope too
            label = HTTP_LABELS.get(exc.status, "bad_request")
            return sugar_error(exc.status, label, exc.reason)

    def _peer(self, request: web.Request) -> Any:
        return tcp_peer(request)  # read once per connection, when it was made

    async def _proxied(self, request: web.Request) -> web.StreamResponse:
        return await self.forwarder.handle(request, self.name, 1, peer=self._peer(request))

    async def _proxied_as(self, request: web.Request) -> web.StreamResponse:
        user = request.match_info["user"]
        return await self.forwarder.handle(
            request, self.name, 3, user, peer=self._peer(request)
        )  # /as/{user}/rest/...


def _why(exc: OSError) -> str:
    # asyncio's text repeats the address; the errno's says it all.
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def _not_found(request: web.Request) -> web.Response:
    return sugar_error(
        404,
        "not_found",
        "sugard's proxy serves only Sugar's REST API, under /rest/ (or /as/USER/rest/)",
    )


def _browser_request(request: web.Request, hosts: frozenset[str]) -> str | None:
    """Why this looks like a browser's request (or a rebinding page's); None if it does not."""
    if "Origin" in request.headers:
        return "requests from web pages (an Origin header)"
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.lower() != "none":
        return "requests from web pages (Sec-Fetch-Site)"
    host = request.headers.get("Host", "").lower()
    if host not in hosts:
        return f"Host {host[:100]!r}: only the listener's own address is served"
    return None


async def open_listeners(
    forwarder: Forwarder,
    config: Config,
    current: Mapping[str, ProxyListener],
    *,
    shutdown_timeout: float,
    retry: Callable[[], object] | None = None,
) -> dict[str, ProxyListener]:
    """The proxy listeners `config` asks for: the current ones where their address stays
    (bound, or still trying), new ones bound now. If one cannot be bound: with `retry` (at
    start) it keeps trying by itself and `retry` hears when it binds; without (a reload),
    those bound here are closed again and ReloadFailed says why. The current ones are never
    touched here."""
    wanted: dict[str, ProxyListener] = {}
    opened: list[ProxyListener] = []
    try:
        for name, instance in config.instances.items():
            if instance.listen is None:
                continue
            kept = current.get(name)
            if kept is not None and kept.address == instance.listen:
                wanted[name] = kept
                continue
            listener = ProxyListener(
                forwarder,
                name,
                instance.listen,
                shutdown_timeout=shutdown_timeout,
            )
            try:
                await listener.start()
            except OSError as exc:
                if retry is not None:
                    listener.keep_trying(exc, retry)
                    opened.append(listener)
                    wanted[name] = listener
                    continue
                raise ReloadFailed(
                    [
                        f"instances.{name}.listen: cannot listen on {instance.listen}: "
                        f"{_why(exc)}; choose another port"
                    ]
                ) from None
            opened.append(listener)
            wanted[name] = listener
    except BaseException:
        await asyncio.gather(*(listener.stop() for listener in opened))
        raise
    return wanted


async def close_listeners(
    forwarder: Forwarder,
    current: Mapping[str, ProxyListener],
    keep: Mapping[str, ProxyListener],
) -> None:
    """Stop the listeners of `current` that are not in `keep` (removed, or moved to a new
    address)."""
    kept = set(map(id, keep.values()))
    gone = [lis for lis in current.values() if id(lis) not in kept]
    await asyncio.gather(*(listener.stop() for listener in gone))
    for listener in keep.values():
        # A moved listener's successor bound first; the old one's stop() dropped the URL.
        if listener.url:
            forwarder.listener_urls[listener.name] = listener.url
