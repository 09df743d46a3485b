"""The proxy's loopback TCP listener for SDKs that cannot speak to a Unix socket, and
opening and closing the listeners around a start or a reload.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from sugard.config import Config, split_host_port
from sugard.errors import ReloadFailed
from sugard.peer import peer_of_tcp_socket
from sugard.proxy.answers import refused, sugar_error
from sugard.proxy.forward import Forwarder

__all__ = ["close_listeners", "open_listeners"]

log = logging.getLogger("sugard.proxy")


IDLE_TIMEOUT = 30.0  # a listener connection with no request for this long is closed
MAX_LINE = 8190
MAX_HEADERS = 128  # Sugar clients send more headers than sugarctl does


class ProxyListener:
    """One instance's loopback TCP listener: `/rest/...` forwarded, anything else 404.

    Who connects is read once per connection (`peer_of_socket`, from the kernel); browsers
    are refused, since a web page in the user's own browser runs as the same uid."""

    def __init__(
        self,
        forwarder: Forwarder,
        name: str,
        address: str,
        peer_of_socket: Callable[[Any], Any],
        *,
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.forwarder = forwarder
        self.name = name
        self.address = address  # as configured: "127.0.0.1:8401"
        self.url = ""  # once started: the base URL, with the port the kernel gave
        self._peer_of_socket = peer_of_socket
        self._peers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._hosts: frozenset[str] = frozenset()
        self._runner: web.AppRunner | None = None
        self._shutdown_timeout = shutdown_timeout

    async def start(self) -> None:
        """Bind and serve; raises OSError (address in use, not local) with nothing left open."""
        host, port = split_host_port(self.address)  # checked by the config
        app = web.Application(middlewares=[self._admit])
        app.router.add_route("*", "/rest/{path:.*}", self._proxied)
        app.router.add_route("*", "/{tail:.*}", _not_found)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=IDLE_TIMEOUT,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            auto_decompress=False,  # a compressed upload is forwarded as it came
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        # DNS rebinding: a page on evil.example, resolved to 127.0.0.1, sends Host: evil.example.
        self._hosts = frozenset({f"{shown}:{bound[1]}", f"localhost:{bound[1]}"})
        self.forwarder.listener_urls[self.name] = self.url
        log.info("%s: proxy listening on %s", self.name, self.url)

    async def stop(self) -> None:
        if self.forwarder.listener_urls.get(self.name) == self.url:
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
        return refusal if refusal is not None else await handler(request)

    def _peer(self, request: web.Request) -> Any:
        # Once per connection: the lookup asks the kernel, and a TCP peer's owner is fixed.
        transport = request.transport
        if transport is None:
            return None
        if transport not in self._peers:
            self._peers[transport] = self._peer_of_socket(transport.get_extra_info("socket"))
        return self._peers[transport]

    async def _proxied(self, request: web.Request) -> web.StreamResponse:
        return await self.forwarder.handle(request, self.name, 1, self._peer(request))


async def _not_found(request: web.Request) -> web.Response:
    return sugar_error(
        404, "not_found", "sugard's proxy serves only Sugar's REST API, under /rest/"
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
) -> dict[str, ProxyListener]:
    """The proxy listeners `config` asks for: the current ones where their address stays,
    new ones bound now. If one cannot be bound, those bound here are closed again and
    ReloadFailed says why; the current ones are never touched here."""
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
                peer_of_tcp_socket,
                shutdown_timeout=shutdown_timeout,
            )
            try:
                await listener.start()
            except OSError as exc:
                raise ReloadFailed(
                    [
                        f"instances.{name}.listen: cannot listen on {instance.listen}: "
                        f"{exc.strerror or exc}; choose another port"
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
        forwarder.listener_urls[listener.name] = listener.url
