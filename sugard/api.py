"""The socket API: HTTP/1.1 + JSON under /v1, served by aiohttp on the Unix socket.

Every answer, errors included, is JSON of the design's shapes (described by `openapi.spec()`);
no traceback or HTML page ever reaches a client, not even for bytes that are not HTTP.

Who may ask is decided by the kernel's word on the peer (`SO_PEERCRED`, `SO_PEERGROUPS`), twice:
when a connection is made (a refused uid may hold only a few connections, so it cannot starve
the others) and for every request (instances can narrow the daemon's list).

Hostile or broken clients are bounded: request line and header size and count, body size, time
to send a request or its body, idle time, and the number of connections (kept under the open
files limit, which is raised to its hard maximum first).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import re
import resource
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    PayloadEncodingError,
)

from . import __version__
from .errors import DaemonError, InstanceStopped, NeedsAttention, ReloadFailed, TokenUnavailable
from .keeper import Grant, Keeper
from .observe import Observer, TokenOutcome
from .openapi import spec
from .peer import Peer, peer_of_socket, peer_of_tcp_socket, refusal
from .proxy import PROXY_ROUTE, add_routes
from .wire import (
    DEFAULT_WAIT,
    INSTANCE_NAME_PATTERN,
    INSTANCE_NAME_RULE,
    MAX_MIN_TTL,
    MAX_WAIT,
    TOKEN_LIFETIME_HEADER,
    http_status,
)

__all__ = [
    "KEY_METRICS",
    "ApiRunner",
    "Peer",
    "Registry",
    "ReloadFailed",
    "connection_limits",
    "make_app",
    "metrics_text",
    "peer_of",
    "peer_of_tcp_socket",
    "raise_open_files_limit",
    "rfc3339",
]

log = logging.getLogger("sugard.api")

# Used with fullmatch: `$` would also match before a trailing newline ("prod\n").
INSTANCE_NAME = re.compile(INSTANCE_NAME_PATTERN)

MAX_BODY = 64 * 1024
MAX_LINE = 8190  # the request line, and each header line
MAX_HEADERS = 64
# A connection that sends no complete request for this long is closed; this also bounds how
# long a slowloris client can take over its request line and headers.
IDLE_TIMEOUT = 30.0
BODY_TIMEOUT = 10.0  # to send a request body, once the headers are in
MAX_CONNECTIONS = 4096
LISTEN_BACKLOG = 1024  # connections the kernel queues while the loop is busy accepting others
BUSY_LOG_INTERVAL = 10.0
REFUSED_PER_UID = 8  # open connections a refused uid may hold, enough to be told why


class Registry(Protocol):
    """What the API needs from the daemon: the keepers, who may ask, a way to reload, and a
    way to stop (unless systemd runs it: then stopping is systemd's job)."""

    @property
    def keepers(self) -> Mapping[str, Keeper]: ...

    @property
    def under_systemd(self) -> bool: ...

    def allowed(self, peer: Peer, instance: str | None) -> bool: ...

    async def reload(self) -> dict[str, Any]: ...

    def request_stop(self) -> None: ...


def peer_of(request: web.Request) -> Peer | None:
    """Who is asking, as the kernel says."""
    handler = request.protocol
    if isinstance(handler, _RequestHandler):
        return handler.peer
    transport = request.transport
    return peer_of_socket(transport.get_extra_info("socket") if transport else None)


# Cached: every token answer formats the same expiry again, and datetime formatting is a
# measurable share of a token request's CPU (bench/: ~15 us of ~80 us per request).
@functools.lru_cache(maxsize=256)
def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def error(status: int, code: str, message: str, **extra: Any) -> web.Response:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(max(1, math.ceil(extra["retry_after"])))
    return web.json_response(
        {"error": code, "message": message, **extra}, status=status, headers=headers
    )


def answer(exc: DaemonError) -> web.Response:
    """The JSON answer for one of the daemon's errors: the one place they become HTTP."""
    return error(http_status(exc.code), exc.code, exc.answer_message, **exc.details())


def _shown(value: str, limit: int = 80) -> str:
    """A client-supplied value, quoted, on one line and short, for an error message."""
    text = value if len(value) <= limit else value[:limit] + "..."
    return repr(text)


KEY_REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
KEY_CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
KEY_OBSERVER: web.AppKey[Observer] = web.AppKey("observer")
# (Accept header, metric names) -> (body, Content-Type): Metrics.render
RenderMetrics = Callable[[str, Sequence[str]], Awaitable[tuple[bytes, str]]]
KEY_METRICS: web.AppKey[RenderMetrics | None] = web.AppKey("metrics")


def make_app(
    registry: Registry,
    clock: Callable[[], float],
    *,
    observer: Observer | None = None,
    metrics: RenderMetrics | None = None,
) -> web.Application:
    """The /v1 app; `observer` hears how token requests end, `metrics` answers /v1/metrics."""
    app = web.Application(middlewares=[_json_errors, _check_peer], client_max_size=MAX_BODY)
    app[KEY_REGISTRY] = registry
    app[KEY_CLOCK] = clock
    app[KEY_OBSERVER] = observer or Observer()
    app[KEY_METRICS] = metrics
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/instances", list_instances)
    app.router.add_get("/v1/instances/{name}", instance_status)
    app.router.add_get("/v1/instances/{name}/token", token)
    app.router.add_post("/v1/instances/{name}/invalidate", invalidate)
    app.router.add_post("/v1/instances/{name}/refresh", refresh)
    app.router.add_post("/v1/reload", reload)
    app.router.add_post("/v1/shutdown", shutdown)
    add_routes(app, registry, peer_of)
    app.router.add_get("/v1/metrics", metrics_text)
    return app


# Serving: limits and JSON for what never reaches a handler (malformed HTTP, overload).


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's soft default is 1024);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open files limit to %d: %s", target, exc)
    return soft


class ApiRunner(web.AppRunner):
    """An AppRunner with sugard's limits, JSON for malformed requests, and connection caps."""

    def __init__(
        self,
        app: web.Application,
        *,
        idle_timeout: float | None = None,
        max_connections: int = MAX_CONNECTIONS,
        shutdown_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=shutdown_timeout,
            keepalive_timeout=IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            lingering_time=1.0,
            # Bodies are small JSON: a compressed one is refused as not JSON, never inflated.
            auto_decompress=False,
        )
        self._max_connections = max_connections
        self.backlog = LISTEN_BACKLOG  # for the site; set from the open files limit by setup()

    async def _make_server(self) -> web.Server:
        open_files = raise_open_files_limit()
        limit, self.backlog = connection_limits(open_files, self._max_connections)
        log.debug("serving up to %d connections (open files limit %d)", limit, open_files)
        base = await super()._make_server()
        return _Server(base, self.app[KEY_REGISTRY], limit)


def connection_limits(open_files: int, most: int = MAX_CONNECTIONS) -> tuple[int, int]:
    """(connections to hold, listen backlog) that never run the process out of descriptors.

    asyncio accepts up to `backlog` connections per loop iteration, and one turned away still
    holds its descriptor for an iteration or two: held + a few backlogs must stay under the
    limit, with room left for upstream HTTPS, secret commands and the log.
    """
    return max(16, min(most, open_files // 2)), max(8, min(LISTEN_BACKLOG, open_files // 16))


class _Server(web.Server):
    """aiohttp's Server, with a cap on connections in all and on those of refused uids."""

    def __init__(self, base: web.Server, registry: Registry, max_connections: int) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **base._kwargs,
        )
        self.max_connections = max_connections
        self._registry = registry
        self._refused: Counter[int] = Counter()
        self._refused_by: dict[web.RequestHandler, int] = {}
        self._turned_away = 0
        self._busy_logged_at = -math.inf

    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)

    def refusal(self, peer: Peer | None) -> dict[str, Any] | None:
        """Why a new connection is not admitted (an error body), or None to serve it."""
        if len(self._connections) >= self.max_connections:
            self._report_busy()
            return {
                "error": "busy",
                "message": f"sugard is serving its maximum of {self.max_connections} "
                "connections; try again in a moment",
                "retry_after": 1,
            }
        if peer is None:
            return {"error": "forbidden", "message": "sugard serves only local peers"}
        if not self._registry.allowed(peer, None) and self._refused[peer.uid] >= REFUSED_PER_UID:
            log.debug("turned away another connection of refused %s", peer.describe())
            return {"error": "forbidden", "message": refusal(peer, None)}
        return None

    def _report_busy(self) -> None:
        # Once per interval: an overload must not turn into a flood of log lines.
        self._turned_away += 1
        now = self._loop.time()
        if now - self._busy_logged_at >= BUSY_LOG_INTERVAL:
            log.warning(
                "at the limit of %d connections: turned %d away since the last report",
                self.max_connections,
                self._turned_away,
            )
            self._busy_logged_at, self._turned_away = now, 0

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = handler.peer if isinstance(handler, _RequestHandler) else None
        if peer is not None and not self._registry.allowed(peer, None):
            # Let a few requests in, to answer them with the reason (and log who asked).
            self._refused[peer.uid] += 1
            self._refused_by[handler] = peer.uid

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        super().connection_lost(handler, exc)
        uid = self._refused_by.pop(handler, None)
        if uid is not None:
            self._refused[uid] -= 1
            if self._refused[uid] <= 0:
                del self._refused[uid]


class _RequestHandler(web.RequestHandler):
    """Turns away connections the server does not admit, and answers requests that cannot be
    parsed with a JSON error, logging no traceback for them (aiohttp would log one per
    malformed request: a flood, and the bytes may hold a token)."""

    # Read once per connection: the kernel fixes a Unix socket's peer credentials at connect(),
    # and two getsockopt calls per request were ~10% of a token request's CPU (bench/).
    peer: Peer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(self._manager, _Server)
        self.peer = peer_of_socket(transport.get_extra_info("socket"))
        refusal = self._manager.refusal(self.peer)
        if refusal is None:
            super().connection_made(transport)
            return
        # Answered and closed here, before aiohttp sets the connection up: a turned-away
        # connection holds its descriptor for as short a time as possible.
        assert isinstance(transport, asyncio.Transport)
        status = 503 if refusal["error"] == "busy" else 403
        body = json.dumps(refusal).encode()
        retry = f"Retry-After: {refusal['retry_after']}\r\n" if "retry_after" in refusal else ""
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{retry}Connection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError, RuntimeError):
            transport.write(head.encode() + body)
        transport.close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        if status >= 500:
            log.error("internal error answering a request", exc_info=exc)
            resp = error(500, "internal", "internal error in sugard; see its log")
        else:
            log.debug("malformed request: %s", type(exc).__name__ if exc else status)
            resp = error(400, "bad_request", _malformed(exc))
        resp.force_close()
        return resp


def _malformed(exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):
        return f"malformed HTTP request: request line or header longer than {MAX_LINE} bytes"
    if isinstance(exc, BadHttpMethod):
        return "malformed HTTP request: not an HTTP method (is this client speaking HTTP/1.1?)"
    if isinstance(exc, InvalidHeader):
        return "malformed HTTP request: invalid header"
    if isinstance(exc, PayloadEncodingError):
        return "malformed HTTP request: body does not match Content-Length or Transfer-Encoding"
    if isinstance(exc, HttpProcessingError) and "headers" in (exc.message or "").lower():
        return f"malformed HTTP request: more than {MAX_HEADERS} headers"
    return "malformed HTTP request; send HTTP/1.1, like curl --unix-socket SOCKET http://sugard/v1/health"


# Middlewares

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error(
                404, "not_found", f"no such route: {request.method} {_shown(request.path)}"
            )
        if exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            resp = error(405, "method_not_allowed", f"{request.method} is not allowed here")
            if allowed:
                resp.headers["Allow"] = allowed
            return resp
        if exc.status == 413:
            return error(413, "bad_request", f"request body larger than {MAX_BODY} bytes")
        status = exc.status if 400 <= exc.status < 500 else 400
        return error(status, "bad_request", exc.reason)
    except Exception:
        log.exception("internal error answering %s %r", request.method, request.raw_path[:200])
        return error(500, "internal", "internal error in sugard; see its log")


@web.middleware
async def _check_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.route.name == PROXY_ROUTE:
        return await handler(request)  # the same rules, answered in Sugar's envelope there
    registry = request.app[KEY_REGISTRY]
    peer = peer_of(request)
    instance = request.match_info.get("name")
    if peer is not None and registry.allowed(peer, instance):
        return await handler(request)
    if (
        instance is not None
        and instance in registry.keepers
        and request.match_info.handler in _TOKEN_ROUTES
    ):
        request.app[KEY_OBSERVER].token_request(instance, "forbidden")
    if peer is not None:
        # Path quoted (%r): a decoded path could carry newlines into the log.
        log.warning(
            "refused %s %r from %s", request.method, request.raw_path[:200], peer.describe()
        )
    resp = _forbidden(registry, peer, instance)
    resp.force_close()
    return resp


def _forbidden(registry: Registry, peer: Peer | None, instance: str | None) -> web.Response:
    """The 403 for a peer `registry` does not admit to `instance` (None: the daemon)."""
    if peer is None:
        return error(403, "forbidden", "sugard serves only local Unix-socket peers")
    daemon_wide = registry.allowed(peer, None)
    return error(403, "forbidden", refusal(peer, instance if daemon_wide else None))


# Handlers


class _BadRequest(Exception):
    pass


def _keeper(request: web.Request) -> Keeper | web.Response:
    name = request.match_info["name"]
    if not INSTANCE_NAME.fullmatch(name):
        return error(400, "bad_request", f"bad instance name {_shown(name)}: {INSTANCE_NAME_RULE}")
    keepers = request.app[KEY_REGISTRY].keepers
    keeper = keepers.get(name)
    if keeper is None:
        names = ", ".join(sorted(keepers)) or "none"
        return error(404, "unknown_instance", f"no instance {name!r}; configured: {names}")
    return keeper


def _seconds(request: web.Request, key: str, default: float, high: float) -> float:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _BadRequest(f"{key} must be a number of seconds, not {_shown(raw)}") from None
    if math.isnan(value) or not 0 <= value <= high:
        raise _BadRequest(f"{key} must be between 0 and {high:g} seconds, not {_shown(raw)}")
    return value


def _status(keeper: Keeper) -> dict[str, Any]:
    status = keeper.status()
    grant = keeper.grant
    # The name the log gives the current token, so a log line can be matched to it.
    status["token_fingerprint"] = grant.access_token.fingerprint if grant else None
    for key in ("expires_at", "refresh_at", "last_refresh"):
        status[key] = rfc3339(status[key])
    if status["last_error"]:
        status["last_error"]["at"] = rfc3339(status["last_error"]["at"])
    return status


def _token_body(keeper: Keeper, grant: Grant, now: float) -> dict[str, Any]:
    return {
        "instance": keeper.name,
        "url": keeper.config.url,
        "access_token": grant.access_token.reveal(),
        "token_type": grant.token_type,
        "expires_at": rfc3339(grant.expires_at),
        "expires_in": max(0, int(grant.expires_at - now)),
        "download_token": grant.download_token.reveal(),
    }


async def _answer_token(
    request: web.Request,
    keeper: Keeper,
    get: Callable[[], Awaitable[Grant]],
    *,
    min_ttl: float = 0.0,
    wait: float = DEFAULT_WAIT,
) -> web.Response:
    """`get()` from `keeper` as a TOKEN answer; `min_ttl` and `wait` are what `get` asks for,
    for when the answer has to come from the keeper that replaced this one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        try:
            grant = await get()
        except InstanceStopped:
            # A reload gave the instance a new session (its auth settings changed) while this
            # request waited on the old one. Any token of the new keeper is newer than the
            # request, so it answers a token, invalidate or refresh alike: wait on it, once,
            # for the rest of the wait. A removed instance has no successor: 404 as before.
            successor = _successor(request, keeper)
            if successor is None:
                raise
            if isinstance(successor, web.Response):
                return successor
            keeper = successor
            grant = await keeper.token(min_ttl, max(0.0, deadline - loop.time()))
    except (TokenUnavailable, NeedsAttention, InstanceStopped) as exc:
        _count(request, keeper, _OUTCOMES[type(exc)])
        return answer(exc)
    _count(request, keeper, "served")
    now = request.app[KEY_CLOCK]()
    headers = {"Cache-Control": "no-store"}
    if grant.expires_at - now < min_ttl:
        # No token of this instance can have min_ttl left: say what they get, so the
        # client can tell its user rather than hand over a shorter token in silence.
        headers[TOKEN_LIFETIME_HEADER] = f"{max(0, int(grant.lifetime))}"
    return web.json_response(_token_body(keeper, grant, now), headers=headers)


_OUTCOMES: dict[type[DaemonError], TokenOutcome] = {
    TokenUnavailable: "unavailable",
    NeedsAttention: "rejected",
    InstanceStopped: "gone",
}


def _count(request: web.Request, keeper: Keeper, outcome: TokenOutcome) -> None:
    request.app[KEY_OBSERVER].token_request(keeper.name, outcome)


def _successor(request: web.Request, keeper: Keeper) -> Keeper | web.Response | None:
    """The keeper a reload put in place of a stopped `keeper` (None if there is none), or a
    403 if the reload also took the instance away from this peer."""
    registry = request.app[KEY_REGISTRY]
    successor = registry.keepers.get(keeper.name)
    if successor is None or successor is keeper:
        return None
    peer = peer_of(request)
    if peer is None or not registry.allowed(peer, keeper.name):
        uid = peer.uid if peer else "?"
        log.warning("refused uid %s the new session of %s after a reload", uid, keeper.name)
        return _forbidden(registry, peer, keeper.name)
    return successor


async def health(request: web.Request) -> web.Response:
    registry = request.app[KEY_REGISTRY]
    return web.json_response(
        {"status": "ok", "version": __version__, "instances": len(registry.keepers)}
    )


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(spec())


async def list_instances(request: web.Request) -> web.Response:
    registry = request.app[KEY_REGISTRY]
    peer = peer_of(request)
    # A peer sees only the instances it may use (an instance's allowed_uids narrow the list).
    shown = [
        _status(k)
        for name, k in sorted(registry.keepers.items())
        if peer is not None and registry.allowed(peer, name)
    ]
    return web.json_response({"instances": shown})


async def instance_status(request: web.Request) -> web.Response:
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    return web.json_response(_status(keeper))


async def token(request: web.Request) -> web.Response:
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    try:
        min_ttl = _seconds(request, "min_ttl", 0.0, MAX_MIN_TTL)
        wait = _seconds(request, "wait", DEFAULT_WAIT, MAX_WAIT)
    except _BadRequest as exc:
        _count(request, keeper, "bad_request")
        return error(400, "bad_request", str(exc))
    return await _answer_token(
        request, keeper, lambda: keeper.token(min_ttl, wait), min_ttl=min_ttl, wait=wait
    )


INVALIDATE_BODY = 'body must be JSON: {"access_token": "<the token Sugar refused>"}'


async def invalidate(request: web.Request) -> web.Response:
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    body = await _json_body(request, INVALIDATE_BODY)
    if isinstance(body, web.Response):
        return body
    reported = body.get("access_token")
    if not isinstance(reported, str) or not reported:
        return error(400, "bad_request", INVALIDATE_BODY)
    return await _answer_token(request, keeper, lambda: keeper.invalidate(reported))


async def _json_body(
    request: web.Request, shape: str, *, empty_ok: bool = False
) -> dict[str, Any] | web.Response:
    """The request's body as a JSON object ({} for none, if `empty_ok`), or the 4xx answer;
    `shape` says what the body must be."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            raw = await request.read()
    except TimeoutError:
        resp = error(408, "bad_request", f"request body not received within {BODY_TIMEOUT:g} s")
        resp.force_close()
        return resp
    except (web.RequestPayloadError, ConnectionError):
        # A broken chunked body, or a client gone mid-body: nothing to parse.
        resp = error(400, "bad_request", "request body incomplete or malformed")
        resp.force_close()
        return resp
    if empty_ok and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return error(400, "bad_request", shape)
    return body if isinstance(body, dict) else error(400, "bad_request", shape)


REFRESH_BODY = 'body must be empty, or JSON: {"retry_rejected": true|false}'


async def refresh(request: web.Request) -> web.Response:
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    options = await _json_body(request, REFRESH_BODY, empty_ok=True)
    if isinstance(options, web.Response):
        return options
    retry_rejected = options.get("retry_rejected", False)
    if not isinstance(retry_rejected, bool) or set(options) - {"retry_rejected"}:
        return error(400, "bad_request", REFRESH_BODY)
    # `retry_rejected` (sugarctl refresh --retry-rejected) is the one override of the rule
    # that a secret Sugar rejected is never sent again; the keeper applies both.
    return await _answer_token(
        request, keeper, lambda: keeper.refresh_now(retry_rejected=retry_rejected)
    )


def _not_owner(request: web.Request, action: str) -> web.Response | None:
    """The 403 for a peer other than the daemon's owner and root, who alone may `action`."""
    peer = peer_of(request)
    if peer is not None and peer.uid in (os.getuid(), 0):
        return None
    # allowed_uids/allowed_gids share tokens, not the running of the daemon.
    uid = peer.uid if peer else "?"
    return error(
        403, "forbidden", f"uid {uid} may not {action} sugard; only its owner and root may"
    )


# The routes that answer a TOKEN: how they end is counted per instance (metrics).
_TOKEN_ROUTES = frozenset({token, invalidate, refresh})


async def metrics_text(request: web.Request) -> web.StreamResponse:
    """The Prometheus exposition (on the socket, with the access rules of every route)."""
    render = request.app.get(KEY_METRICS)
    if render is None:
        return error(404, "not_found", "this sugard serves no metrics")
    body, content_type = await render(
        request.headers.get("Accept", ""), request.query.getall("name[]", [])
    )
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def reload(request: web.Request) -> web.Response:
    refused = _not_owner(request, "reload")
    if refused is not None:
        return refused
    try:
        diff = await request.app[KEY_REGISTRY].reload()
    except ReloadFailed as exc:
        return answer(exc)
    return web.json_response(diff)


async def shutdown(request: web.Request) -> web.Response:
    refused = _not_owner(request, "shut down")
    if refused is not None:
        return refused
    registry = request.app[KEY_REGISTRY]
    if registry.under_systemd:
        # systemd would see a clean exit as the end of the service, and sugard.socket would
        # start it again at the next connection: stopping is systemctl's job.
        return error(
            409,
            "under_systemd",
            "sugard runs under systemd; stop it with `systemctl --user stop sugard` (and "
            "sugard.socket too, or the next connection starts it again)",
        )
    peer = peer_of(request)
    log.info("stopping: asked by %s", peer.describe() if peer else "?")
    registry.request_stop()
    return web.json_response({"status": "stopping", "pid": os.getpid()}, status=202)
