"""What every /v1 request passes through around its route, and what routes parse it with.

Around each route: the peer check (the kernel's word on the peer, asked again for every
request, since an instance's own lists can narrow the daemon's; the policy is
sugard.peer.may_use) and JSON for every error aiohttp raises (no route, wrong method, body too
large, a bug). For the routes: a query value in seconds, a JSON body read within a time limit.
The daemon's own errors become answers in sugard.api (`answer`), not here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from sugard.api.serving import error, peer_of
from sugard.observe import Observer, TokenRequested
from sugard.peer import Peer, refusal
from sugard.proxy import PROXY_ROUTES
from sugard.text import quoted

__all__ = [
    "MAX_BODY",
    "Admission",
    "BadInput",
    "Handler",
    "check_peer",
    "forbidden",
    "json_body",
    "json_errors",
    "seconds",
]

log = logging.getLogger("sugard.api")

MAX_BODY = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Admission(Protocol):
    """What the peer check needs from the daemon: its instances, and who may use which."""

    @property
    def keepers(self) -> Mapping[str, object]: ...

    def allowed(self, peer: Peer, instance: str | None) -> bool: ...


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error("not_found", f"no such route: {request.method} {quoted(request.path)}")
        if exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            resp = error("method_not_allowed", f"{request.method} is not allowed here")
            if allowed:
                resp.headers["Allow"] = allowed
            return resp
        if exc.status == 413:
            return error("bad_request", f"request body larger than {MAX_BODY} bytes", status=413)
        status = exc.status if 400 <= exc.status < 500 else 400
        return error("bad_request", exc.reason, status=status)
    except Exception:
        log.exception("internal error answering %s %r", request.method, request.raw_path[:200])
        return error("internal", "internal error in sugard; see its log")


def check_peer(
    registry: Admission, observer: Observer, token_routes: Collection[Handler]
) -> Middleware:
    """The middleware that lets through only peers `registry` admits; a refused request to
    one of `token_routes` (those that answer a TOKEN) is counted as `forbidden`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.route.name in PROXY_ROUTES:
            return await handler(request)  # the same rules, answered in Sugar's envelope there
        peer = peer_of(request)
        instance = request.match_info.get("name")
        if peer is not None and registry.allowed(peer, instance):
            return await handler(request)
        if (
            instance is not None
            and instance in registry.keepers
            and request.match_info.handler in token_routes
        ):
            observer.observe(TokenRequested(instance, "forbidden"))
        if peer is not None:
            # Path quoted (%r): a decoded path could carry newlines into the log.
            log.warning(
                "refused %s %r from %s", request.method, request.raw_path[:200], peer.describe()
            )
        resp = forbidden(registry, peer, instance)
        resp.force_close()
        return resp

    return middleware


def forbidden(registry: Admission, peer: Peer | None, instance: str | None) -> web.Response:
    """The 403 for a peer `registry` does not admit to `instance` (None: the daemon)."""
    if peer is None:
        return error("forbidden", "sugard serves only local Unix-socket peers")
    daemon_wide = registry.allowed(peer, None)
    return error("forbidden", refusal(peer, instance if daemon_wide else None))


class BadInput(Exception):
    """A query value the route cannot use; its message is the 400's."""


def seconds(request: web.Request, key: str, default: float, high: float) -> float:
    """The query value `key` as seconds in [0, high] (`default` if absent or empty)."""
    raw = request.query.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadInput(f"{key} must be a number of seconds, not {quoted(raw)}") from None
    if math.isnan(value) or not 0 <= value <= high:
        raise BadInput(f"{key} must be between 0 and {high:g} seconds, not {quoted(raw)}")
    return value


async def json_body(
    request: web.Request, shape: str, *, timeout: float, empty_ok: bool = False
) -> dict[str, Any] | web.Response:
    """The request's body as a JSON object ({} for none, if `empty_ok`), or the 4xx answer;
    `shape` says what the body must be, `timeout` how long it may take to arrive."""
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()
    except TimeoutError:
        resp = error("bad_request", f"request body not received within {timeout:g} s", status=408)
        resp.force_close()
        return resp
    except (web.RequestPayloadError, ConnectionError):
        # A broken chunked body, or a client gone mid-body: nothing to parse.
        resp = error("bad_request", "request body incomplete or malformed")
        resp.force_close()
        return resp
    if empty_ok and not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return error("bad_request", shape)
    return body if isinstance(body, dict) else error("bad_request", shape)
