"""The forwarding core: a client's request to the instance's `{url}/rest/...`, on sugard's token.

The client's `OAuth-Token`, `Authorization` and `Cookie` are dropped and sugard's current
`OAuth-Token` set; hop-by-hop headers stay on their hop; bodies stream both ways in chunks
(bounded memory), through one kept-alive pool per instance. A 401 `invalid_grant` from Sugar is
reported to the keeper (one renewal, however many requests saw the same token) and the request
replayed once, if its body could be kept (none, or at most `REPLAY_LIMIT` bytes of a known
length); otherwise the 401 goes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from yarl import URL

from sugard.config import InstanceConfig
from sugard.errors import InstanceNeedsAttention, InstanceStopped, NoValidToken, UserNotListed
from sugard.keeper import Keeper
from sugard.observe import Observer, Proxied
from sugard.proxy import guards
from sugard.proxy.answers import (
    TOKEN_WAIT,
    ProxyRegistry,
    TokenSource,
    oauth2,
    sugar_error,
    token_failure,
)
from sugard.proxy.clients import Caller, ClientBook, caller_of
from sugard.proxy.governor import Governor, RateRefused
from sugard.sugar import Grant, connection_failure, unreadable_answer
from sugard.wire import sudo_user_problem

log = logging.getLogger("sugard.proxy")
access_log = logging.getLogger("sugard.proxy.access")

REPLAY_LIMIT = 1024 * 1024  # a request body up to this size is kept, so it can be replayed
REPORTER = "the proxy"  # who reported a refused token, as the keeper's log says
# Fewer, larger writes: ~1.4x the download rate of 64 KiB chunks on loopback, a few hundred
# KiB per stream still (docs/performance.md).
CHUNK = 256 * 1024
MAX_ERROR_BODY = 64 * 1024  # a 401 body is read to find its label only up to this size

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
# come instead. `Expect` was answered by our server already (100-continue). Matched with `_`
# read as `-`: PHP reads OAuth_Token as OAuth-Token (both are HTTP_OAUTH_TOKEN).
DROPPED_REQUEST = HOP_BY_HOP | {"host", "oauth-token", "authorization", "cookie", "expect"}
# Sugar's cookies (the download token's among them) are sugard's session's, not the client's.
DROPPED_RESPONSE = HOP_BY_HOP | {"content-length", "set-cookie", "set-cookie2"}
BODY_TIMEOUT = 10.0  # to send a request body of known length, once the headers are in


_R = TypeVar("_R", bound=web.StreamResponse)
KEY_CALLER: web.RequestKey[Caller] = web.RequestKey("caller")
KEY_QUEUED: web.RequestKey[float] = web.RequestKey("queued")


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

    def __init__(
        self,
        registry: ProxyRegistry,
        observer: Observer | None = None,
        governor: Governor | None = None,
        *,
        body_timeout: float = BODY_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.body_timeout = body_timeout
        self.listener_urls: dict[str, str] = {}  # instance -> its listener's base URL
        self._pools: dict[str, _Pool] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.observer = observer or Observer()  # hears every request (metrics)
        self.governor = governor or Governor(self._config_of, self.observer)
        self.clients = ClientBook()  # who sent what (sugarctl clients)

    def _config_of(self, name: str) -> InstanceConfig | None:
        keeper = self.registry.keepers.get(name)
        return keeper.config if keeper is not None else None

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
        self.clients.forget(keepers)
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

    async def handle(
        self,
        request: web.Request,
        name: str,
        skip: int,
        user: str | None = None,
        peer: Any = None,
    ) -> web.StreamResponse:
        """Answer one proxied request for instance `name` from `peer` (who connected), on the
        token of `user` (Sugar's sudo) if given; Sugar's path is what follows the first `skip`
        segments of the request's path (those up to and including `rest`)."""
        started = time.perf_counter()
        # Only configured names: any other would be a new time series per typo (or attack).
        counted = name in self.registry.keepers
        caller = await caller_of(request, peer)
        request[KEY_CALLER] = caller
        try:
            response = await self._answer(request, name, skip, user)
        except BaseException:  # the client went away (cancelled), or a bug: no answer
            if counted:
                self.observer.observe(Proxied(name, None, time.perf_counter() - started))
                self._account(request, name, None)
            raise
        if counted:
            self.observer.observe(Proxied(name, response.status, time.perf_counter() - started))
            self._account(request, name, response)
        access_log.debug(
            "%s %s %r -> %d (%.1f ms)",
            name,
            request.method,
            request.path[:200],  # the path only: a query may carry a download token
            response.status,
            (time.perf_counter() - started) * 1000,
        )
        return response

    def _account(
        self, request: web.Request, name: str, response: web.StreamResponse | None
    ) -> None:
        size = request.content_length or 0
        if response is not None:
            size += response.content_length or response.body_length or 0
        self.clients.record(
            name,
            request[KEY_CALLER],
            None if response is None else response.status,
            size,
            request.get(KEY_QUEUED, 0.0),
            request.path,
        )

    async def _answer(
        self, request: web.Request, name: str, skip: int, user: str | None
    ) -> web.StreamResponse:
        keeper = self.registry.keepers.get(name)
        if keeper is None:
            return sugar_error(404, "not_found", f"sugard has no instance {name!r}")
        source: TokenSource = keeper
        if user is not None:
            problem = sudo_user_problem(user)
            if problem is not None:
                return sugar_error(400, "bad_request", problem)
            source = keeper.sudo.acting_as(user)
        # Which route it is, is decided on the decoded path, as Sugar will see it; what is
        # sent is the path as the client encoded it (guards.py: what may be sent at all).
        raw_path = request.rel_url.raw_path.split("/", skip + 1)[skip + 1]
        verdict = await guards.inspect(request, name, raw_path)
        if isinstance(verdict, web.Response):
            return verdict
        if isinstance(verdict, guards.LocalRoute):
            return await oauth2(request, source, verdict.route)
        try:
            return await self._forward(request, keeper, raw_path, source, verdict)
        except (NoValidToken, InstanceNeedsAttention, InstanceStopped, UserNotListed) as exc:
            replaced = self.registry.keepers.get(name, keeper) is not keeper
            if isinstance(exc, InstanceStopped) and replaced:
                # Replaced by a reload (new credentials) while this request waited, before
                # anything was sent: the new session is a retry away.
                return sugar_error(
                    503, "token_unavailable", f"instance {name!r} was reloaded; try again"
                )
            return token_failure(exc)

    async def _forward(
        self,
        request: web.Request,
        keeper: Keeper,
        path: str,
        source: TokenSource,
        verdict: guards.Forward,
    ) -> web.StreamResponse:
        config = keeper.config
        query = request.rel_url.raw_query_string
        url = URL(f"{config.url}/rest/{path}" + (f"?{query}" if query else ""), encoded=True)
        headers = _forwarded_headers(request.headers)
        try:
            body, replayable = await _request_body(request, verdict, self.body_timeout)
        except TimeoutError:
            response = sugar_error(
                408, "bad_request", f"request body not received within {self.body_timeout:g} s"
            )
            response.force_close()
            return response
        grant = await source.token(wait=TOKEN_WAIT)
        try:
            request[KEY_QUEUED] = await self.governor.admit(keeper.name, request[KEY_CALLER])
        except RateRefused as refused:
            response = sugar_error(429, "too_many_requests", refused.message)
            response.headers["Retry-After"] = str(refused.retry_after)
            return response
        pool = self._pool(keeper)
        pool.in_flight += 1
        try:
            return await self._exchange(
                request, pool, url, headers, body, replayable, grant, source
            )
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
        source: TokenSource,
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
                                grant = await source.invalidate(
                                    sent.reveal(), TOKEN_WAIT, reporter=REPORTER
                                )
                                await self.governor.own_call(keeper.name)  # the replay
                                continue
                            if attempt == 1:
                                # Not after a replay: a brand-new token refused at once is
                                # not a dead session, and renewing again would not help.
                                log.warning(
                                    "%s: Sugar refused token %s on %s %r; the request's body "
                                    "(over %d bytes, or of unknown length) was streamed and "
                                    "cannot be sent again: its 401 goes back to the client, "
                                    "which may retry once sugard has renewed",
                                    source.name,
                                    sent.fingerprint,
                                    request.method,
                                    request.path[:200],
                                    REPLAY_LIMIT,
                                )
                                _report_quietly(source, sent.reveal())
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
            except aiohttp.ClientResponseError as exc:  # Sugar answered, in what we cannot read
                return sugar_error(502, "bad_gateway", unreadable_answer(keeper.config.url, exc))
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
    dropped = DROPPED_REQUEST | _named_in_connection(headers)
    return [(k, v) for k, v in headers.items() if k.lower().replace("_", "-") not in dropped]


def _named_in_connection(headers: Mapping[str, str]) -> set[str]:
    """The headers a message's Connection names: hop-by-hop too (RFC 9110 7.6.1)."""
    values = headers.getall("Connection", []) if isinstance(headers, CIMultiDictProxy) else []
    return {token.strip().lower() for value in values for token in value.split(",")}


async def _request_body(
    request: web.Request, verdict: guards.Forward, timeout: float
) -> tuple[bytes | AsyncIterator[bytes] | None, bool]:
    """(the body to send, whether it can be sent twice). A body the guards read, or one of
    known length up to REPLAY_LIMIT (read within `timeout`, else TimeoutError), is in memory;
    any other streams through in chunks."""
    if verdict.body is not None:
        return verdict.body, True
    if not request.body_exists:
        return None, True
    length = request.content_length
    if length is not None and length <= REPLAY_LIMIT:
        async with asyncio.timeout(timeout):
            return await request.content.read(), True
    chunks = request.content.iter_chunked(CHUNK)
    return (guards.screened(chunks) if verdict.multipart else chunks), False


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


def _report_quietly(keeper: TokenSource, token: str) -> None:
    """Tell the keeper its token is dead without waiting for the renewal: this request's
    401 goes back as it is, the next ones get the new token."""

    async def report() -> None:
        with contextlib.suppress(
            NoValidToken, InstanceNeedsAttention, InstanceStopped, UserNotListed
        ):
            await keeper.invalidate(token, 0.0, reporter=REPORTER)

    task = asyncio.get_running_loop().create_task(report())
    _reports.add(task)
    task.add_done_callback(_reports.discard)


_reports: set[asyncio.Task[None]] = set()


def _copy_head(upstream: aiohttp.ClientResponse, response: _R) -> _R:
    response.set_status(upstream.status, upstream.reason)
    dropped = DROPPED_RESPONSE | _named_in_connection(upstream.headers)
    for key, value in upstream.headers.items():
        if key.lower() not in dropped:
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


def _why(exc: BaseException) -> str:
    said = connection_failure(exc)
    if said is not None:
        return said
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
