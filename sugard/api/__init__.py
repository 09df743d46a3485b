"""The socket API: HTTP/1.1 + JSON under /v1, thin over the keepers.

Every answer, errors included, is JSON of the wire's shapes (described by `openapi.spec()`);
the daemon's errors become answers in one place (`answer`). Who may ask is checked when a
connection is made (`serving`) and for every request (`middleware`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_urldispatcher import _default_expect_handler

from sugard import __version__
from sugard.api.middleware import (
    MAX_BODY,
    Admission,
    BadInput,
    check_peer,
    forbidden,
    json_body,
    json_errors,
    seconds,
)
from sugard.api.openapi import spec
from sugard.api.serving import MAX_HEADERS, MAX_LINE, error, peer_of
from sugard.api.sudo import as_user, shown_sudo
from sugard.config import split_host_port
from sugard.errors import (
    ConfigRefused,
    DaemonError,
    InstanceNeedsAttention,
    InstanceStopped,
    LeaderOnly,
    NoValidToken,
    ReloadFailed,
    SocketError,
    UserNotListed,
)
from sugard.keeper import Keeper
from sugard.observe import Observer, TokenOutcome, TokenRequested
from sugard.peer import Peer
from sugard.proxy import add_routes
from sugard.proxy.governor import Governor
from sugard.proxy.tcp import TcpRunner
from sugard.sugar import Grant
from sugard.text import quoted
from sugard.wire import (
    DEFAULT_WAIT,
    INSTANCE_NAME_PATTERN,
    INSTANCE_NAME_RULE,
    MAX_MIN_TTL,
    MAX_WAIT,
    TOKEN_LIFETIME_HEADER,
)

__all__ = [
    "KEY_METRICS",
    "Registry",
    "answer",
    "make_app",
    "metrics_text",
    "rfc3339",
    "serve_metrics",
]

log = logging.getLogger("sugard.api")

# Used with fullmatch: `$` would also match before a trailing newline ("prod\n").
INSTANCE_NAME = re.compile(INSTANCE_NAME_PATTERN)

# To send a request body, once the headers are in. Passed to json_body at each call (not a
# default there), so the value in this module is the one that holds.
BODY_TIMEOUT = 10.0
# A scraper asks every 15 s or so: an idle connection to metrics_listen is not kept longer.
METRICS_IDLE_TIMEOUT = 10.0


class Registry(Admission, Protocol):
    """What the API needs from the daemon: the keepers, who may ask, a way to reload, and a
    way to stop (unless systemd runs it: then stopping is systemd's job)."""

    @property
    def keepers(self) -> Mapping[str, Keeper]: ...

    @property
    def under_systemd(self) -> bool: ...

    def allowed(self, peer: Peer, instance: str | None) -> bool: ...

    async def reload(self) -> dict[str, Any]: ...

    def request_stop(self) -> None: ...

    @property
    def refused(self) -> ConfigRefused | None:
        """Set while sugard runs without instances on a config it refused (under systemd)."""
        ...


# Cached: every token answer formats the same expiry again, and datetime formatting is a
# measurable share of a token request's CPU (docs/performance.md).
@functools.lru_cache(maxsize=256)
def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def answer(exc: DaemonError) -> web.Response:
    """The JSON answer for one of the daemon's errors: the one place they become HTTP."""
    return error(exc.code, exc.answer_message, **exc.details())


KEY_REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
KEY_CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
KEY_OBSERVER: web.AppKey[Observer] = web.AppKey("observer")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (Accept header, metric names, the instances shown; None: all) -> (body, Content-Type):
# Metrics.render
RenderMetrics = Callable[
    [str, Sequence[str], Callable[[str], bool] | None], Awaitable[tuple[bytes, str]]
]
KEY_METRICS: web.AppKey[RenderMetrics | None] = web.AppKey("metrics")


async def expect_small_body(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue`: a body over MAX_BODY is refused before the client sends it
    (aiohttp's own handler would invite it with a 100 first); others get the 100."""
    length = request.content_length
    if request.headers.get("Expect", "").lower() == "100-continue" and (length or 0) > MAX_BODY:
        response = error("bad_request", f"request body larger than {MAX_BODY} bytes", status=413)
        response.force_close()
        return response
    # aiohttp's own (private) handler: it sends the 100 and resets what counts as a
    # response started, which the error answers rely on (docs/architecture.md).
    await _default_expect_handler(request)
    return None


def make_app(
    registry: Registry,
    clock: Callable[[], float],
    *,
    observer: Observer | None = None,
    metrics: RenderMetrics | None = None,
    governor: Governor | None = None,
) -> web.Application:
    """The /v1 app; `observer` hears how token requests end, `metrics` answers /v1/metrics,
    `governor` keeps each instance's rate_limit (the proxy makes its own if none is given)."""
    observer = observer or Observer()
    guard = check_peer(registry, observer, _TOKEN_ROUTES)

    @web.middleware
    async def refused_config(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Every request gets the config's problems, at once, until a reload fixes them.
        refused = registry.refused
        if refused is not None and request.path != "/v1/reload":
            return answer(refused)
        return await handler(request)

    app = web.Application(
        middlewares=[json_errors, guard, refused_config], client_max_size=MAX_BODY
    )
    app[KEY_REGISTRY] = registry
    app[KEY_CLOCK] = clock
    app[KEY_OBSERVER] = observer
    app[KEY_METRICS] = metrics
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/instances", list_instances)
    app.router.add_get("/v1/instances/{name}", instance_status)
    app.router.add_get("/v1/instances/{name}/token", token)
    for path, handler in (
        ("/v1/instances/{name}/invalidate", invalidate),
        ("/v1/instances/{name}/refresh", refresh),
        ("/v1/instances/{name}/revoke", revoke),
        ("/v1/reload", reload),
        ("/v1/shutdown", shutdown),
    ):
        app.router.add_post(path, handler, expect_handler=expect_small_body)
    add_routes(app, registry, peer_of, observer, governor)
    app.router.add_get("/v1/metrics", metrics_text)
    return app


# Handlers


def _keeper(request: web.Request) -> Keeper | web.Response:
    name = request.match_info["name"]
    if not INSTANCE_NAME.fullmatch(name):
        return error("bad_request", f"bad instance name {quoted(name)}: {INSTANCE_NAME_RULE}")
    keepers = request.app[KEY_REGISTRY].keepers
    keeper = keepers.get(name)
    if keeper is None:
        names = ", ".join(sorted(keepers)) or "none"
        return error("unknown_instance", f"no instance {name!r}; configured: {names}")
    return keeper


def _status(keeper: Keeper) -> dict[str, Any]:
    """The STATUS object: the keeper's snapshot, its times in RFC 3339."""
    status = keeper.status()
    error = status.last_error
    return {
        **status.as_dict(),
        "expires_at": rfc3339(status.expires_at),
        "refresh_at": rfc3339(status.refresh_at),
        "last_refresh": rfc3339(status.last_refresh),
        "last_error": None if error is None else {**asdict(error), "at": rfc3339(error.at)},
        "sudo": shown_sudo(asdict(status.sudo) if status.sudo else None, rfc3339),
    }


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
    user: str | None = None,
) -> web.Response:
    """`get()` from `keeper` as a TOKEN answer; `min_ttl`, `wait` and `user` (a token of
    that user: Sugar's sudo) are what `get` asks for, for when the answer has to come from
    the keeper that replaced this one."""
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
            left = max(0.0, deadline - loop.time())
            grant = await (
                keeper.token(min_ttl, left)
                if user is None
                else keeper.sudo.token(user, min_ttl, left)
            )
    except (NoValidToken, InstanceNeedsAttention, InstanceStopped, UserNotListed) as exc:
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
    NoValidToken: "unavailable",
    InstanceNeedsAttention: "rejected",
    InstanceStopped: "gone",
    UserNotListed: "forbidden",
}


def _count(request: web.Request, keeper: Keeper, outcome: TokenOutcome) -> None:
    request.app[KEY_OBSERVER].observe(TokenRequested(keeper.name, outcome))


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
        return forbidden(registry, peer, keeper.name)
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
        min_ttl = seconds(request, "min_ttl", 0.0, MAX_MIN_TTL)
        wait = seconds(request, "wait", DEFAULT_WAIT, MAX_WAIT)
        user = as_user(request)
    except BadInput as exc:
        _count(request, keeper, "bad_request")
        return error("bad_request", str(exc))
    get = (
        (lambda: keeper.token(min_ttl, wait))
        if user is None
        else (lambda: keeper.sudo.token(user, min_ttl, wait))
    )
    return await _answer_token(request, keeper, get, min_ttl=min_ttl, wait=wait, user=user)


INVALIDATE_BODY = 'body must be JSON: {"access_token": "<the token Sugar refused>"}'


async def invalidate(request: web.Request) -> web.Response:
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    body = await json_body(request, INVALIDATE_BODY, timeout=BODY_TIMEOUT)
    if isinstance(body, web.Response):
        return body
    reported = body.get("access_token")
    if not isinstance(reported, str) or not reported:
        return error("bad_request", INVALIDATE_BODY)
    try:
        user = as_user(request)
    except BadInput as exc:
        return error("bad_request", str(exc))
    if user is not None:
        get = lambda: keeper.sudo.invalidate(user, reported)  # noqa: E731
        return await _answer_token(request, keeper, get, user=user)
    return await _answer_token(request, keeper, lambda: keeper.invalidate(reported))


REFRESH_BODY = 'body must be empty, or JSON: {"retry_rejected": true|false}'


async def refresh(request: web.Request) -> web.Response:
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    options = await json_body(request, REFRESH_BODY, timeout=BODY_TIMEOUT, empty_ok=True)
    if isinstance(options, web.Response):
        return options
    retry_rejected = options.get("retry_rejected", False)
    if not isinstance(retry_rejected, bool) or set(options) - {"retry_rejected"}:
        return error("bad_request", REFRESH_BODY)
    if retry_rejected:
        # Each try may count towards a lockout of the account: the owner's call, not a user's.
        refused = _not_owner(request, "send a rejected secret again through")
        if refused is not None:
            return refused
    try:
        user = as_user(request)
    except BadInput as exc:
        return error("bad_request", str(exc))
    if user is not None:
        # Also asks Sugar's sudo again after Sugar refused it (the one way besides a reload).
        again = lambda: keeper.sudo.refresh_now(user)  # noqa: E731
        return await _answer_token(request, keeper, again, user=user)
    # `retry_rejected` (sugarctl refresh --retry-rejected) is the one override of the rule
    # that a secret Sugar rejected is never sent again; the keeper applies both.
    return await _answer_token(
        request, keeper, lambda: keeper.refresh_now(retry_rejected=retry_rejected)
    )


async def revoke(request: web.Request) -> web.Response:
    """End the session at Sugar, so every token handed out dies, and log in anew."""
    refused = _not_owner(request, "revoke sessions of")
    if refused is not None:
        return refused
    keeper = _keeper(request)
    if isinstance(keeper, web.Response):
        return keeper
    peer = peer_of(request)
    log.info("%s: revoke asked by %s", keeper.name, peer.describe() if peer else "?")
    try:
        return await _answer_token(request, keeper, lambda: keeper.revoke())
    except LeaderOnly as exc:
        _count(request, keeper, "bad_request")
        return answer(exc)


def _not_owner(request: web.Request, action: str) -> web.Response | None:
    """The 403 for a peer other than the daemon's owner and root, who alone may `action`."""
    peer = peer_of(request)
    if peer is not None and peer.uid in (os.getuid(), 0):
        return None
    # allowed_uids/allowed_gids share tokens, not the running of the daemon.
    uid = peer.uid if peer else "?"
    return error("forbidden", f"uid {uid} may not {action} sugard; only its owner and root may")


# The routes that answer a TOKEN: how they end is counted per instance (metrics).
_TOKEN_ROUTES = frozenset({token, invalidate, refresh, revoke})


async def metrics_text(request: web.Request) -> web.StreamResponse:
    """The Prometheus exposition. On the socket, with the access rules of every route, and
    only the series of the instances the caller may use (as /v1/instances lists them); on
    `metrics_listen` (no registry there), the operator's whole view."""
    render = request.app.get(KEY_METRICS)
    if render is None:
        return error("not_found", "this sugard serves no metrics")
    registry = request.app.get(KEY_REGISTRY)
    shown: Callable[[str], bool] | None = None
    if registry is not None:
        peer = peer_of(request)
        shown = lambda name: peer is not None and registry.allowed(peer, name)  # noqa: E731
    body, content_type = await render(
        request.headers.get("Accept", ""), request.query.getall("name[]", []), shown
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
            "under_systemd",
            "sugard runs under systemd; stop it with `systemctl --user stop sugard` (and "
            "sugard.socket too, or the next connection starts it again)",
        )
    peer = peer_of(request)
    log.info("stopping: asked by %s", peer.describe() if peer else "?")
    registry.request_stop()
    return web.json_response({"status": "stopping", "pid": os.getpid()}, status=202)


async def serve_metrics(listen: str | None, render: RenderMetrics) -> web.AppRunner | None:
    """The runner serving `/metrics` on `listen` (None: none asked for); SocketError, with
    nothing left open, if the address cannot be had."""
    if listen is None:
        return None
    host, port = split_host_port(listen)
    app = web.Application()
    app[KEY_METRICS] = render
    app.router.add_get("/metrics", metrics_text)
    runner = TcpRunner(
        app,
        name="metrics_listen",
        admits=lambda peer: True,  # the operator's view, for whoever can reach the address
        envelope=lambda status, code, message: error(code, message, status=status),
        idle_timeout=METRICS_IDLE_TIMEOUT,
        max_line=MAX_LINE,
        max_headers=MAX_HEADERS,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    try:
        addresses = await runner.start(host, port)
    except OSError as exc:
        await runner.cleanup()
        # asyncio's text repeats the address; the errno's says it all.
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SocketError(
            f"cannot serve metrics on {listen}: {why}; choose another [daemon] metrics_listen"
        ) from None
    for address in addresses:
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        log.info("metrics on http://%s:%d/metrics", shown, address[1])
    return runner
