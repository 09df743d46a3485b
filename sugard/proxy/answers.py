"""What sugard answers itself on Sugar's routes, in Sugar's envelope (`error`, `error_message`).

The login, logout and sudo routes never reach Sugar: an SDK that logs in or out by itself would
otherwise end the session every other script shares. Refusals (the daemon's allow rules) and the
keeper's failures are answered here too, so Sugar clients report them as Sugar's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web

from sugard.errors import InstanceNeedsAttention, InstanceStopped, NoValidToken, UserNotListed
from sugard.keeper import Keeper
from sugard.sugar import Grant
from sugard.wire import PROXY_ERROR_HEADER

log = logging.getLogger("sugard.proxy")

TOKEN_WAIT = 10.0  # how long a proxied request waits for a token while sugard logs in
# Not Sugar's refresh token, which never leaves sugard: clients that insist on one get this.
PLACEHOLDER_REFRESH = "sugard-placeholder-refresh-token"


class ProxyRegistry(Protocol):
    """What the proxy needs from the daemon: the keepers and who may use them."""

    @property
    def keepers(self) -> Mapping[str, Keeper]: ...

    def allowed(self, peer: Any, instance: str | None) -> bool: ...


class TokenSource(Protocol):
    """Whose token a proxied request carries: the instance's (its `Keeper`), or a user's the
    instance acts as (`keeper.sudo.acting_as(user)`)."""

    @property
    def name(self) -> str: ...

    async def token(self, min_ttl: float = 0.0, wait: float = TOKEN_WAIT) -> Grant: ...

    async def invalidate(
        self, access_token: str, wait: float = TOKEN_WAIT, *, reporter: str = "a script"
    ) -> Grant: ...


TokenFailure = NoValidToken | InstanceNeedsAttention | InstanceStopped | UserNotListed


def sugar_error(status: int, label: str, message: str) -> web.Response:
    """An error in Sugar's own envelope, as Sugar sends it (no-store), marked as sugard's own
    (PROXY_ERROR_HEADER), so a client can tell it from an answer of Sugar's."""
    return web.json_response(
        {"error": label, "error_message": message},
        status=status,
        headers={"Cache-Control": "no-store", PROXY_ERROR_HEADER: label},
    )


def token_failure(exc: TokenFailure) -> web.Response:
    """The keeper could not give a token: why, as Sugar would say it."""
    if isinstance(exc, UserNotListed):
        return sugar_error(403, "forbidden", str(exc))
    if isinstance(exc, NoValidToken):
        return sugar_error(503, "token_unavailable", str(exc))
    if isinstance(exc, InstanceNeedsAttention):
        return sugar_error(502, "upstream_rejected", str(exc))
    return sugar_error(404, "not_found", str(exc))


def refused(
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


async def oauth2(request: web.Request, keeper: TokenSource, route: str) -> web.Response:
    """Sugar's login, logout and sudo, answered here: the caller was admitted by its uid,
    and a login or logout reaching Sugar would end the shared session."""
    if route == "token" and request.method == "POST":
        await _discard_body(request)
        try:
            grant = await keeper.token(wait=TOKEN_WAIT)
        except (NoValidToken, InstanceNeedsAttention, InstanceStopped, UserNotListed) as exc:
            return token_failure(exc)
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


async def _discard_body(request: web.Request) -> None:
    # Read what the client sent, so the connection can carry its next request.
    while await request.content.readany():
        pass


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
