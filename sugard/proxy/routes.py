"""On the socket: `ANY /v1/instances/{name}/rest/{path}` forwarded (and, on the token of a
user the instance acts as, `/v1/instances/{name}/as/{user}/rest/{path}`), and the proxy's base
URLs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from sugard.observe import Observer
from sugard.proxy.answers import ProxyRegistry, refused
from sugard.proxy.clients import clients_answer, unknown_instance
from sugard.proxy.forward import Forwarder
from sugard.proxy.governor import Governor

PROXY_ROUTE = "sugar-proxy"  # the socket route's name: api's peer check leaves it to us
PROXY_AS_ROUTE = "sugar-proxy-sudo"  # the same, acting as a user (Sugar's sudo)
PROXY_ROUTES = frozenset({PROXY_ROUTE, PROXY_AS_ROUTE})
PeerOf = Callable[[web.Request], Any]  # the request's peer (api.Peer), or None: refuse


KEY_FORWARDER: web.AppKey[Forwarder] = web.AppKey("forwarder")


def add_routes(
    app: web.Application,
    registry: ProxyRegistry,
    peer_of: PeerOf,
    observer: Observer,
    governor: Governor | None = None,
) -> Forwarder:
    """Serve the proxy on the socket app: `/v1/instances/{name}/rest/{path}`,
    `GET /v1/instances/{name}/proxy` (the base URLs to give a client) and
    `GET /v1/instances/{name}/clients` (who sent what through it)."""
    forwarder = Forwarder(registry, observer, governor)
    app[KEY_FORWARDER] = forwarder

    async def proxied(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        refusal = refused(request, registry, peer_of(request), name)
        if refusal is not None:
            return refusal
        # /v1/instances/{name}/rest/..., or /v1/instances/{name}/as/{user}/rest/...
        user = request.match_info.get("user")
        skip = 4 if user is None else 6
        return await forwarder.handle(request, name, skip, user, peer=peer_of(request))

    async def proxy_urls(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        unknown = unknown_instance(name, registry.keepers)
        if unknown is not None:
            return unknown
        return web.json_response(
            {
                "instance": name,
                "socket_url": f"http://sugard/v1/instances/{name}",
                "listen_url": forwarder.listener_urls.get(name),
                "api_version": registry.keepers[name].config.api_version,
            }
        )

    async def close(app: web.Application) -> None:
        await forwarder.close()

    app.router.add_route("*", "/v1/instances/{name}/rest/{path:.*}", proxied, name=PROXY_ROUTE)
    app.router.add_route(
        "*", "/v1/instances/{name}/as/{user}/rest/{path:.*}", proxied, name=PROXY_AS_ROUTE
    )
    app.router.add_get("/v1/instances/{name}/proxy", proxy_urls)
    app.router.add_get("/v1/instances/{name}/clients", clients_answer(registry, forwarder))
    app.on_cleanup.append(close)
    return forwarder
