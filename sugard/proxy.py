"""Sugar through sugard: an authenticating proxy, so unmodified scripts and SDKs share the session.

A client points its Sugar site URL at sugard (`http://sugard/v1/instances/NAME` over the
socket, or an instance's loopback `listen` address) and speaks Sugar's REST API as usual:

- requests are forwarded to the instance's `{url}/rest/...` with the client's `OAuth-Token`,
  `Authorization` and `Cookie` dropped and sugard's current `OAuth-Token` set; hop-by-hop
  headers stay on their hop; bodies stream both ways in chunks (bounded memory);
- a 401 `invalid_grant` from Sugar is reported to the keeper (one renewal, however many
  requests saw the same token) and the request replayed once, if its body could be kept
  (none, or at most `REPLAY_LIMIT` bytes of a known length); otherwise the 401 goes back;
- the login, logout and sudo routes are answered here and never reach Sugar: an SDK that
  logs in or out by itself would otherwise end the session every other script shares.

Errors sugard makes itself on these routes use Sugar's envelope (`error`, `error_message`), so
Sugar clients report them as they report Sugar's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import aiohttp
from aiohttp import web
from yarl import URL

from .config import InstanceConfig
from .keeper import Grant, InstanceStopped, Keeper, NeedsAttention, TokenUnavailable
from .observe import Observer

__all__ = [
    "KEY_FORWARDER",
    "PROXY_ROUTE",
    "REPLAY_LIMIT",
    "Forwarder",
    "ProxyListener",
    "add_routes",
    "new_upstream_pool",
]

log = logging.getLogger("sugard.proxy")
access_log = logging.getLogger("sugard.proxy.access")

PROXY_ROUTE = "sugar-proxy"  # the socket route's name: api's peer check leaves it to us
REPLAY_LIMIT = 1024 * 1024  # a request body up to this size is kept, so it can be replayed
# Fewer, larger writes: ~1.4x the download rate of 64 KiB chunks on loopback, a few hundred
# KiB per stream still (docs/performance.md).
CHUNK = 256 * 1024
TOKEN_WAIT = 10.0  # how long a proxied request waits for a token while sugard logs in
MAX_ERROR_BODY = 64 * 1024  # a 401 body is read to find its label only up to this size
# Not Sugar's refresh token, which never leaves sugard: clients that insist on one get this.
PLACEHOLDER_REFRESH = "sugard-placeholder-refresh-token"
IDLE_TIMEOUT = 30.0  # a listener connection with no request for this long is closed
MAX_LINE = 8190
MAX_HEADERS = 128  # Sugar clients send more headers than sugarctl does

# RFC 9110 7.6.1: these describe one connection, not the message, so they never cross it.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# The client's credentials and its view of the address go; sugard's token and Sugar's host
# come instead. `Expect` was answered by our server already (100-continue).
DROPPED_REQUEST = HOP_BY_HOP | {"host", "oauth-token", "authorization", "cookie", "expect"}


class ProxyRegistry(Protocol):
    """What the proxy needs from the daemon: the keepers and who may use them."""

    @property
    def keepers(self) -> Mapping[str, Keeper]: ...

    def allowed(self, peer: Any, instance: str | None) -> bool: ...


_R = TypeVar("_R", bound=web.StreamResponse)
PeerOf = Callable[[web.Request], Any]  # the request's peer (api.Peer), or None: refuse


def sugar_error(status: int, label: str, message: str) -> web.Response:
    """An error in Sugar's own envelope, as Sugar sends it (no-store)."""
    return web.json_response(
        {"error": label, "error_message": message},
        status=status,
        headers={"Cache-Control": "no-store"},
    )


def new_upstream_pool(config: InstanceConfig) -> aiohttp.ClientSession:
    """The kept-alive connection pool proxied requests of one instance go through.

    Requests beyond `proxy_connections` queue for a free connection. The way out (an HTTP
    proxy or not) is the instance's outbound route, the same as its token calls take; it is
    passed per request (`_forward`), as sugar.py does."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(
            limit=config.proxy_connections, limit_per_host=config.proxy_connections
        ),
        # Bodies pass through as Sugar sent them: inflating them would cost memory and CPU,
        # and the client asked for the encoding itself.
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
    )


@dataclass(eq=False)
class _Pool:
    keeper: Keeper  # the pool follows one session: a new keeper (new url or TLS) gets a new pool
    limit: int
    session: aiohttp.ClientSession
    in_flight: int = 0
    retired: bool = False


class Forwarder:
    """Forwards proxied requests of every instance; one upstream pool per instance."""

    def __init__(self, registry: ProxyRegistry) -> None:
        self.registry = registry
        self.listener_urls: dict[str, str] = {}  # instance -> its listener's base URL
        self._pools: dict[str, _Pool] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.observer = Observer()  # the daemon's own hears every request (metrics)

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(p.session.close() for p in pools), *self._closing)

    def _pool(self, keeper: Keeper) -> _Pool:
        pool = self._pools.get(keeper.name)
        limit = keeper.config.proxy_connections
        if pool is not None and pool.keeper is keeper and pool.limit == limit:
            return pool
        if pool is not None:
            self._retire(pool)
        pool = _Pool(keeper, limit, new_upstream_pool(keeper.config))
        self._pools[keeper.name] = pool
        return pool

    def prune(self, keepers: Mapping[str, Keeper]) -> None:
        """After a reload: let go of the pools of instances removed or given a new session."""
        for name, pool in list(self._pools.items()):
            if keepers.get(name) is not pool.keeper:
                del self._pools[name]
                self._retire(pool)

    def _retire(self, pool: _Pool) -> None:
        # Requests still streaming through the old pool finish on it; it closes after them.
        pool.retired = True
        if pool.in_flight == 0:
            self._close_later(pool)

    def _close_later(self, pool: _Pool) -> None:
        task = asyncio.get_running_loop().create_task(pool.session.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # The request

    async def handle(self, request: web.Request, name: str, skip: int) -> web.StreamResponse:
        """Answer one proxied request for instance `name`; Sugar's path is what follows the
        first `skip` segments of the request's path (those up to and including `rest`)."""
        started = time.perf_counter()
        # Only configured names: any other would be a new time series per typo (or attack).
        counted = name in self.registry.keepers
        try:
            response = await self._answer(request, name, skip)
        except BaseException:  # the client went away (cancelled), or a bug: no answer
            if counted:
                self.observer.proxied(name, None, time.perf_counter() - started)
            raise
        if counted:
            self.observer.proxied(name, response.status, time.perf_counter() - started)
        access_log.debug(
            "%s %s %r -> %d (%.1f ms)",
            name,
            request.method,
            request.path[:200],  # the path only: a query may carry a download token
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    async def _answer(self, request: web.Request, name: str, skip: int) -> web.StreamResponse:
        keeper = self.registry.keepers.get(name)
        if keeper is None:
            return sugar_error(404, "not_found", f"sugard has no instance {name!r}")
        # Which route it is, is decided on the decoded path, as Sugar will see it; what is
        # sent is the path as the client encoded it (a record id may hold %2F).
        segments = [part for part in request.path.split("/")[skip + 1 :] if part]
        if any(part in (".", "..") for part in segments):
            return sugar_error(400, "bad_request", "sugard forwards no path with . or .. in it")
        if len(segments) >= 2 and segments[1].lower() == "oauth2":
            return await self._oauth2(request, keeper, "/".join(segments[2:]).lower())
        raw_path = request.rel_url.raw_path.split("/", skip + 1)[skip + 1]
        try:
            return await self._forward(request, keeper, raw_path)
        except TokenUnavailable as exc:
            return sugar_error(503, "token_unavailable", str(exc))
        except NeedsAttention as exc:
            return sugar_error(502, "upstream_rejected", str(exc))
        except InstanceStopped as exc:
            if self.registry.keepers.get(name, keeper) is not keeper:
                # Replaced by a reload (new credentials) while this request waited, before
                # anything was sent: the new session is a retry away.
                return sugar_error(
                    503, "token_unavailable", f"instance {name!r} was reloaded; try again"
                )
            return sugar_error(404, "not_found", str(exc))

    async def _oauth2(self, request: web.Request, keeper: Keeper, route: str) -> web.Response:
        """Sugar's login, logout and sudo, answered here: the caller was admitted by its uid,
        and a login or logout reaching Sugar would end the shared session."""
        if route == "token" and request.method == "POST":
            await _discard_body(request)
            try:
                grant = await keeper.token(wait=TOKEN_WAIT)
            except TokenUnavailable as exc:
                return sugar_error(503, "token_unavailable", str(exc))
            except NeedsAttention as exc:
                return sugar_error(502, "upstream_rejected", str(exc))
            except InstanceStopped as exc:
                return sugar_error(404, "not_found", str(exc))
            log.info(
                "%s: answered a client's login with token %s (never sent to Sugar)",
                keeper.name,
                grant.access_token.fingerprint,
            )
            return _token_answer(grant, time.time())
        if route == "logout" and request.method == "POST":
            await _discard_body(request)
            log.info("%s: answered a client's logout; the session stays alive", keeper.name)
            return web.json_response({"success": True}, headers={"Cache-Control": "no-store"})
        log.info("%s: refused %s oauth2/%r", keeper.name, request.method, route[:100])
        if route.startswith("sudo"):
            why = "sugard does not forward sudo: it would log the user out of its session"
        else:
            why = (
                "sugard answers oauth2/token and oauth2/logout itself and forwards no other "
                "oauth2 route"
            )
        return sugar_error(403, "not_authorized", why)

    async def _forward(self, request: web.Request, keeper: Keeper, path: str) -> web.StreamResponse:
        config = keeper.config
        query = request.rel_url.raw_query_string
        url = URL(f"{config.url}/rest/{path}" + (f"?{query}" if query else ""), encoded=True)
        headers = _forwarded_headers(request.headers)
        body, replayable = await _request_body(request)
        grant = await keeper.token(wait=TOKEN_WAIT)
        pool = self._pool(keeper)
        pool.in_flight += 1
        try:
            return await self._exchange(request, pool, url, headers, body, replayable, grant)
        finally:
            pool.in_flight -= 1
            if pool.retired and pool.in_flight == 0:
                self._close_later(pool)

    async def _exchange(
        self,
        request: web.Request,
        pool: _Pool,
        url: URL,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        replayable: bool,
        grant: Grant,
    ) -> web.StreamResponse:
        keeper = pool.keeper
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=keeper.config.timeout, sock_read=keeper.config.proxy_timeout
        )
        # The instance's way out, as its token calls take it: an outbound HTTP proxy, if any,
        # with its credentials (Proxy-Authorization rides in the headers for plain http).
        route = keeper.upstream.route.request_options(keeper.config.url, {})  # same scheme
        route_headers = list(route.pop("headers").items())
        for attempt in (1, 2):
            sent = grant.access_token
            try:
                async with pool.session.request(
                    request.method,
                    url,
                    headers=[*headers, *route_headers, ("OAuth-Token", sent.reveal())],
                    data=body,
                    timeout=timeout,
                    ssl=keeper.upstream.tls,
                    allow_redirects=False,
                    **route,
                ) as upstream:
                    if upstream.status == 401:
                        raw = await _small_body(upstream)
                        if raw is not None and _label(raw) == "invalid_grant":
                            if attempt == 1 and replayable:
                                log.info(
                                    "%s: Sugar refused token %s on %s %r; renewing and "
                                    "replaying once",
                                    keeper.name,
                                    sent.fingerprint,
                                    request.method,
                                    request.path[:200],
                                )
                                grant = await keeper.invalidate(sent.reveal(), TOKEN_WAIT)
                                continue
                            if attempt == 1:
                                # Not after a replay: a brand-new token refused at once is
                                # not a dead session, and renewing again would not help.
                                _report_quietly(keeper, sent.reveal())
                        if raw is not None:
                            return _copy_head(upstream, web.Response(body=raw))
                    return await _relay(request, upstream)
            except TimeoutError:
                return sugar_error(
                    504,
                    "gateway_timeout",
                    f"{keeper.config.url} did not answer within "
                    f"{keeper.config.proxy_timeout:g} s (proxy_timeout)",
                )
            except aiohttp.ClientConnectorCertificateError as exc:
                return sugar_error(
                    502,
                    "bad_gateway",
                    f"TLS certificate of {keeper.config.url} not trusted "
                    f"({exc.certificate_error}); set ca_file to your CA bundle",
                )
            except (aiohttp.ClientError, OSError) as exc:
                return sugar_error(
                    502, "bad_gateway", f"cannot reach {keeper.config.url}: {_why(exc)}"
                )
        raise AssertionError("unreachable: the second attempt always answers")


def _forwarded_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The client's headers Sugar is to see: not those of this hop, nor its credentials."""
    # Headers the client named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    named = headers.get("Connection")
    dropped = DROPPED_REQUEST
    if named:
        dropped = dropped | {token.strip().lower() for token in named.split(",")}
    return [(k, v) for k, v in headers.items() if k.lower() not in dropped]


async def _request_body(request: web.Request) -> tuple[bytes | AsyncIterator[bytes] | None, bool]:
    """(the body to send, whether it can be sent twice). A body of known length up to
    REPLAY_LIMIT is read into memory; any other streams through in chunks."""
    if not request.body_exists:
        return None, True
    length = request.content_length
    if length is not None and length <= REPLAY_LIMIT:
        return await request.content.read(), True
    return request.content.iter_chunked(CHUNK), False


async def _discard_body(request: web.Request) -> None:
    # Read what the client sent, so the connection can carry its next request.
    while await request.content.readany():
        pass


async def _small_body(upstream: aiohttp.ClientResponse) -> bytes | None:
    """The whole body of an error answer if it is small; None (left unread) if not."""
    length = upstream.content_length
    if length is not None and length > MAX_ERROR_BODY:
        return None
    raw = await upstream.content.read(MAX_ERROR_BODY + 1)
    if len(raw) > MAX_ERROR_BODY:
        raise aiohttp.ClientPayloadError("error body too large")  # pragma: no cover
    return raw


def _label(raw: bytes) -> str | None:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    label = data.get("error") if isinstance(data, dict) else None
    return label if isinstance(label, str) else None


def _report_quietly(keeper: Keeper, token: str) -> None:
    """Tell the keeper its token is dead without waiting for the renewal: this request's
    401 goes back as it is, the next ones get the new token."""

    async def report() -> None:
        with contextlib.suppress(TokenUnavailable, NeedsAttention, InstanceStopped):
            await keeper.invalidate(token, 0.0)

    task = asyncio.get_running_loop().create_task(report())
    _reports.add(task)
    task.add_done_callback(_reports.discard)


_reports: set[asyncio.Task[None]] = set()


def _copy_head(upstream: aiohttp.ClientResponse, response: _R) -> _R:
    response.set_status(upstream.status, upstream.reason)
    for key, value in upstream.headers.items():
        lower = key.lower()
        if lower not in HOP_BY_HOP and lower != "content-length":
            response.headers.add(key, value)
    return response


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Stream Sugar's answer to the client, a chunk at a time; a small one of known length in
    one piece (head and body in one write: most of Sugar's answers are a few KiB of JSON, and
    each write on loopback costs as much as the rest of the request)."""
    length = upstream.content_length
    if length is not None and length <= CHUNK and request.method != "HEAD":
        try:
            body = await upstream.content.readexactly(length)
        except (aiohttp.ClientError, TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            return sugar_error(
                502, "bad_gateway", f"Sugar's answer broke off before its end ({_why(exc)})"
            )
        return _copy_head(upstream, web.Response(body=body))
    response = _copy_head(upstream, web.StreamResponse())
    if length is not None:
        response.content_length = length
    await response.prepare(request)
    chunks = upstream.content.iter_chunked(CHUNK)
    while True:
        try:
            chunk = await anext(chunks, b"")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # The head is out, so no error answer can follow, and ending the body normally
            # would pass a cut one off as whole: cut the client's connection too.
            log.warning(
                "%s %r: Sugar's answer broke off mid-body (%s); cutting the client's too",
                request.method,
                request.path[:200],
                _why(exc),
            )
            break
        if not chunk:
            await response.write_eof()
            return response
        try:
            await response.write(chunk)
        except (ConnectionError, RuntimeError) as exc:
            log.debug("%s %r: the client went away (%s)", request.method, request.path[:200], exc)
            break
    if request.transport is not None:
        request.transport.abort()
    return response


def _token_answer(grant: Grant, now: float) -> web.Response:
    """Sugar's seven-key token answer, for the token sugard holds. The refresh token is a
    placeholder: Sugar's own never leaves sugard (a client refreshing with it would rotate
    the session away from every other script)."""
    refresh_in = (
        grant.refresh_expires_at - now
        if grant.refresh_expires_at is not None
        else grant.expires_at - now
    )
    body = {
        "access_token": grant.access_token.reveal(),
        "expires_in": max(0, int(grant.expires_at - now)),
        "token_type": grant.token_type,
        "scope": None,
        "refresh_token": PLACEHOLDER_REFRESH,
        "refresh_expires_in": max(0, int(refresh_in)),
        "download_token": grant.download_token.reveal(),
    }
    return web.json_response(
        body,
        headers={
            "Cache-Control": "no-store, no-cache, must-revalidate",
            "Pragma": "no-cache",
        },
    )


def _why(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.strerror or "connection failed"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


# On the socket: ANY /v1/instances/{name}/rest/{path}

KEY_FORWARDER: web.AppKey[Forwarder] = web.AppKey("forwarder")


def add_routes(app: web.Application, registry: ProxyRegistry, peer_of: PeerOf) -> Forwarder:
    """Serve the proxy on the socket app: `/v1/instances/{name}/rest/{path}` and
    `GET /v1/instances/{name}/proxy` (the base URLs to give a client)."""
    forwarder = Forwarder(registry)
    app[KEY_FORWARDER] = forwarder

    async def proxied(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        refusal = _refused(request, registry, peer_of(request), name)
        if refusal is not None:
            return refusal
        # /v1/instances/{name}/rest/...
        return await forwarder.handle(request, name, 4)

    async def proxy_urls(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in registry.keepers:
            names = ", ".join(sorted(registry.keepers)) or "none"
            return web.json_response(
                {
                    "error": "unknown_instance",
                    "message": f"no instance {name!r}; configured: {names}",
                },
                status=404,
            )
        return web.json_response(
            {
                "instance": name,
                "socket_url": f"http://sugard/v1/instances/{name}",
                "listen_url": forwarder.listener_urls.get(name),
            }
        )

    async def close(app: web.Application) -> None:
        await forwarder.close()

    app.router.add_route("*", "/v1/instances/{name}/rest/{path:.*}", proxied, name=PROXY_ROUTE)
    app.router.add_get("/v1/instances/{name}/proxy", proxy_urls)
    app.on_cleanup.append(close)
    return forwarder


def _refused(
    request: web.Request, registry: ProxyRegistry, peer: Any, name: str
) -> web.Response | None:
    """The daemon's allow rules, answered in Sugar's envelope; None if `peer` may use `name`."""
    if peer is not None and registry.allowed(peer, name):
        return None
    who = f"uid {peer.uid}" if peer is not None else "a peer whose owner is unknown"
    log.warning("refused proxied %s %r from %s", request.method, request.path[:200], who)
    if peer is None:
        message = "sugard serves only local peers whose owner it can tell"
    else:
        message = (
            f"uid {peer.uid} may not use instance {name!r} through sugard; its allowed_uids / "
            "allowed_gids in the config decide who may"
        )
    response = sugar_error(403, "forbidden", message)
    response.force_close()
    return response


# Over loopback TCP: an instance's `listen` address serves its site root.


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
        host, port = split_listen(self.address)
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
            site = web.TCPSite(runner, host.strip("[]"), port, reuse_address=True)
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
        refusal = _refused(request, self.forwarder.registry, self._peer(request), self.name)
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
        return await self.forwarder.handle(request, self.name, 1)  # /rest/...


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


def split_listen(address: str) -> tuple[str, int]:
    """("127.0.0.1", 8401) from "127.0.0.1:8401", ("[::1]", 8401) from "[::1]:8401"."""
    host, _, port = address.rpartition(":")
    return host, int(port)
