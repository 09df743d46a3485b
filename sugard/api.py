"""The socket API: HTTP/1.1 + JSON under /v1, served by aiohttp on the Unix socket.

Every answer, errors included, is JSON of the design's shapes; no traceback or HTML page ever
reaches a client. Each connection's peer credentials are checked before any route runs.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from . import __version__
from .keeper import InstanceStopped, Keeper, NeedsAttention, TokenUnavailable
from .sugar import Grant

__all__ = ["Peer", "Registry", "make_app", "peer_of", "rfc3339"]

log = logging.getLogger("sugard.api")

DEFAULT_WAIT = 10.0
MAX_WAIT = 300.0
MAX_BODY = 64 * 1024


class ReloadFailed(Exception):
    """The new config is invalid; `problems` are one-line messages. The old config stays."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Registry(Protocol):
    """What the API needs from the daemon: the keepers, and a way to reload."""

    @property
    def keepers(self) -> Mapping[str, Keeper]: ...

    def allowed(self, peer: Peer, instance: str | None) -> bool: ...

    async def reload(self) -> dict[str, list[str]]: ...


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def executable(self) -> str:
        try:
            return os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return "?"


def peer_of(request: web.Request) -> Peer | None:
    """SO_PEERCRED of the connection: who is asking, as the kernel says."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


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


KEY_REGISTRY = web.AppKey("registry", Registry)  # type: ignore[type-abstract]
KEY_CLOCK = web.AppKey("clock", Callable[[], float])


def make_app(registry: Registry, clock: Callable[[], float]) -> web.Application:
    app = web.Application(middlewares=[_json_errors, _check_peer], client_max_size=MAX_BODY)
    app[KEY_REGISTRY] = registry
    app[KEY_CLOCK] = clock
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/instances", list_instances)
    app.router.add_get("/v1/instances/{name}", instance_status)
    app.router.add_get("/v1/instances/{name}/token", token)
    app.router.add_post("/v1/instances/{name}/invalidate", invalidate)
    app.router.add_post("/v1/instances/{name}/refresh", refresh)
    app.router.add_post("/v1/reload", reload)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error(404, "not_found", f"no such route: {request.method} {request.path}")
        if exc.status == 405:
            return error(405, "method_not_allowed", f"{request.method} is not allowed here")
        if exc.status == 413:
            return error(413, "bad_request", "request body too large")
        return error(exc.status, "bad_request", exc.reason)
    except Exception:
        log.exception("internal error answering %s %s", request.method, request.path)
        return error(500, "internal", "internal error in sugard; see its log")


@web.middleware
async def _check_peer(request: web.Request, handler: Handler) -> web.StreamResponse:
    peer = peer_of(request)
    if peer is not None:
        instance = request.match_info.get("name")
        if not request.app[KEY_REGISTRY].allowed(peer, instance):
            log.warning(
                "refused %s %s from pid %d uid %d (%s)",
                request.method,
                request.path,
                peer.pid,
                peer.uid,
                peer.executable(),
            )
            return error(403, "forbidden", f"uid {peer.uid} may not use this sugard")
    return await handler(request)


def _keeper(request: web.Request) -> Keeper | web.Response:
    name = request.match_info["name"]
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
        raise _BadRequest(f"{key} must be a number of seconds, not {raw!r}") from None
    if not 0 <= value <= high or math.isnan(value):
        raise _BadRequest(f"{key} must be between 0 and {high:g} seconds")
    return value


class _BadRequest(Exception):
    pass


def _status(keeper: Keeper) -> dict[str, Any]:
    status = keeper.status()
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
    request: web.Request, keeper: Keeper, get: Callable[[], Awaitable[Grant]]
) -> web.Response:
    try:
        grant = await get()
    except TokenUnavailable as exc:
        return error(503, "token_unavailable", str(exc), retry_after=exc.retry_after)
    except NeedsAttention as exc:
        return error(502, "upstream_rejected", str(exc))
    except InstanceStopped as exc:
        return error(404, "unknown_instance", str(exc))
    body = _token_body(keeper, grant, request.app[KEY_CLOCK]())
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def health(request: web.Request) -> web.Response:
    registry = request.app[KEY_REGISTRY]
    return web.json_response(
        {"status": "ok", "version": __version__, "instances": len(registry.keepers)}
    )


async def list_instances(request: web.Request) -> web.Response:
    keepers = request.app[KEY_REGISTRY].keepers
    return web.json_response({"instances": [_status(k) for _, k in sorted(keepers.items())]})


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
        min_ttl = _seconds(request, "min_ttl", 0.0, 86400)
        wait = _seconds(request, "wait", DEFAULT_WAIT, MAX_WAIT)
    except _BadRequest as exc:
        return error(400, "bad_request", str(exc))
    return await _answer_token(request, keeper, lambda: keeper.token(min_ttl, wait))


async def invalidate(request: web.Request) -> web.Response:
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    try:
        body = await request.json()
    except ValueError:
        return error(400, "bad_request", 'body must be JSON: {"access_token": "..."}')
    reported = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(reported, str) or not reported:
        return error(400, "bad_request", 'body must be JSON: {"access_token": "..."}')
    return await _answer_token(request, keeper, lambda: keeper.invalidate(reported))


async def refresh(request: web.Request) -> web.Response:
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    return await _answer_token(request, keeper, lambda: keeper.refresh_now())


async def reload(request: web.Request) -> web.Response:
    try:
        diff = await request.app[KEY_REGISTRY].reload()
    except ReloadFailed as exc:
        return web.json_response(
            {
                "error": "invalid_config",
                "message": "the new config has errors; the old one is still running",
                "errors": exc.problems,
            },
            status=422,
        )
    return web.json_response(diff)
