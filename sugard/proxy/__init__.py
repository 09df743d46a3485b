"""Sugar through sugard: an authenticating proxy, so unmodified scripts and SDKs share the session.

A client points its Sugar site URL at sugard (`http://sugard/v1/instances/NAME` over the
socket, or an instance's loopback `listen` address) and speaks Sugar's REST API as usual.
The rooms, each with its own job:

- `forward`: the forwarding core (one upstream pool per instance, hop-by-hop headers, bodies
  streamed both ways, the 401 `invalid_grant` rule and the one replay);
- `answers`: what sugard answers itself, in Sugar's envelope (the local login, logout and sudo
  refusal, the allow rules' refusals, the keeper's failures);
- `routes`: the proxy's routes on the socket app;
- `listener`: an instance's loopback TCP listener, its browser guards and peer lookup.
"""

from sugard.proxy.answers import PLACEHOLDER_REFRESH, ProxyRegistry, sugar_error
from sugard.proxy.forward import REPLAY_LIMIT, Forwarder, new_upstream_pool
from sugard.proxy.listener import ProxyListener
from sugard.proxy.routes import KEY_FORWARDER, PROXY_ROUTE, PROXY_ROUTES, add_routes

__all__ = [
    "KEY_FORWARDER",
    "PLACEHOLDER_REFRESH",
    "PROXY_ROUTE",
    "PROXY_ROUTES",
    "REPLAY_LIMIT",
    "Forwarder",
    "ProxyListener",
    "ProxyRegistry",
    "add_routes",
    "new_upstream_pool",
    "sugar_error",
]
