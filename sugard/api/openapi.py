"""The OpenAPI 3 description of the socket API, served at `GET /v1/openapi.json`.

Kept exact rather than loose: every status an operation can answer, every key of every body
(`additionalProperties: false`), and the headers clients rely on. The test suite runs
schemathesis against a live daemon with this document, so a drift either way fails a test.
Here: the paths and their answers; the bodies' schemas are sugard.api.schemas'.
"""

from __future__ import annotations

import copy
from typing import Any

from sugard import __version__
from sugard.api.schemas import INSTANCE_NAME, SCHEMAS, ref
from sugard.wire import (
    DEFAULT_WAIT,
    MAX_MIN_TTL,
    MAX_WAIT,
    SUDO_USER_MAX,
    SUDO_USER_PATTERN,
    SUDO_USER_RULE,
    TOKEN_LIFETIME_HEADER,
)

__all__ = ["PROXIED_AS_PATH", "PROXIED_METHODS", "PROXIED_PATH", "spec"]


def _json(schema: dict[str, Any], description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if headers:
        answer["headers"] = headers
    return answer


def _error(description: str, *codes: str, retry_after: bool = False) -> dict[str, Any]:
    schema = {
        "allOf": [
            ref("RetryableError" if retry_after else "Error"),
            {"properties": {"error": {"type": "string", "enum": list(codes)}}},
        ]
    }
    if retry_after:
        return _json(schema, description, **{"Retry-After": _RETRY_AFTER})
    return _json(schema, description)


_RETRY_AFTER = {
    "description": "whole seconds to wait before asking again",
    "required": True,
    "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
}
_NO_STORE = {
    "description": "tokens are never to be cached",
    "required": True,
    "schema": {"type": "string", "enum": ["no-store"]},
}

# Answers any operation can give: before routing (malformed HTTP, too many connections) or from
# the peer-credential check.
_COMMON = {
    "400": _error("malformed request", "bad_request"),
    "403": _error(
        "the peer's uid/gid is not allowed (SO_PEERCRED); see allowed_uids / allowed_gids",
        "forbidden",
    ),
    "503": _error("the daemon is at its connection limit", "busy", retry_after=True),
}


def _with_instance(**answers: dict[str, Any]) -> dict[str, Any]:
    return {
        **_COMMON,
        "400": _error("bad instance name, bad query value, or malformed request", "bad_request"),
        "404": _error(
            "no such instance in the config (`not_found`: an empty name, so no such route)",
            "unknown_instance",
            "not_found",
        ),
        **answers,
    }


_TOKEN_LIFETIME = {
    "description": "only when the token has less than `min_ttl` left (no token of this "
    "instance can have it): the lifetime in seconds Sugar gives its tokens",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}


def _token_answers(**extra: dict[str, Any]) -> dict[str, Any]:
    return _with_instance(
        **{
            "200": _json(
                ref("Token"),
                "the access token to use now",
                **{"Cache-Control": _NO_STORE, TOKEN_LIFETIME_HEADER: _TOKEN_LIFETIME},
            ),
            "403": _error(
                "the peer's uid/gid is not allowed (SO_PEERCRED), or `as` names a user the "
                "instance's `sudo` list does not",
                "forbidden",
            ),
            "502": _error(
                "Sugar refused the credentials, client or platform, or the sudo of `as` (not "
                "an admin, no such user); a person must fix it",
                "upstream_rejected",
            ),
            "503": _error(
                "no valid token within `wait` (upstream down, still logging in), or the daemon "
                "is at its connection limit",
                "token_unavailable",
                "busy",
                retry_after=True,
            ),
            **extra,
        }
    )


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "instance name, as in [instances.NAME]",
    "schema": {"type": "string", "pattern": INSTANCE_NAME},
    "example": "prod",
}


def _seconds(name: str, high: float, example: float, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "number", "minimum": 0, "maximum": high},
        "example": example,
    }


# A user name of Sugar's sudo, as `as` and the /as/{user}/ path take it.
_USER_NAME = {
    "type": "string",
    "minLength": 1,
    "maxLength": SUDO_USER_MAX,
    "pattern": SUDO_USER_PATTERN,
}
_AS = {
    "name": "as",
    "in": "query",
    "required": False,
    "description": "a token of this user instead, by Sugar's sudo: the instance's `sudo` list "
    "must name the user (else 403 `forbidden`, and no call to Sugar); Sugar refusing the sudo "
    f"answers 502 `upstream_rejected`. A user name: {SUDO_USER_RULE} (else 400)",
    "schema": _USER_NAME,
    "example": "jim",
}
_USER = {
    "name": "user",
    "in": "path",
    "required": True,
    "description": f"the user to act as (Sugar's sudo), like `as` of /token: {SUDO_USER_RULE}",
    "schema": _USER_NAME,
    "example": "jim",
}

# Sugar through sugard: any method is forwarded to {url}/rest/{path}, Sugar's answer comes back;
# under /as/{user}/ with the token of that user.
PROXIED_PATH = "/v1/instances/{name}/rest/{path}"
PROXIED_AS_PATH = "/v1/instances/{name}/as/{user}/rest/{path}"
PROXIED_METHODS = ("get", "post", "put", "patch", "delete")
_SUGAR_PATH = {
    "name": "path",
    "in": "path",
    "required": True,
    "description": "Sugar's REST path, like v10/me (query kept)",
    "schema": {"type": "string"},
}


def _proxied(method: str, acting: bool = False) -> dict[str, Any]:
    if acting:
        return {
            **_proxied(method),
            "operationId": f"proxyAs{method.capitalize()}",
            "summary": "forwarded to the instance's {url}/rest/{path} with a token of {user} "
            "(Sugar's sudo), as the proxy without /as/{user} does with sugard's own",
        }
    return {
        "operationId": f"proxy{method.capitalize()}",
        "summary": "forwarded to the instance's {url}/rest/{path} with sugard's OAuth-Token",
        "description": (
            "The client's OAuth-Token, Authorization and Cookie are dropped. POST oauth2/token "
            "and oauth2/logout (versioned or not, any case) are answered by sugard; "
            "oauth2/sudo and other oauth2 routes, and a bulk request with an oauth2 "
            "sub-request, are refused (403); a path another server could read as another "
            "path, or an unreadable bulk body, is refused (400). Past the instance's "
            "rate_limit a request queues; one that cannot go within rate_wait gets 429 with "
            "Retry-After. Errors sugard makes itself use Sugar's envelope."
        ),
        "responses": {
            "429": _json(
                ref("SugarError"),
                "over the instance's rate_limit for longer than rate_wait",
                **{"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}},
            ),
            "default": _json(ref("SugarError"), "Sugar's answer, or sugard's in Sugar's envelope"),
        },
    }


def spec() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy each call: callers may change it)."""
    return copy.deepcopy(_document())


def _document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "sugard socket API",
            "version": __version__,
            "description": (
                "HTTP/1.1 over the daemon's Unix socket, e.g. "
                "`curl --unix-socket $SOCK http://sugard/v1/instances/prod/token`. "
                "Who may call is decided by the peer's credentials (SO_PEERCRED): the daemon's "
                "own uid and root, widened by [daemon] allowed_uids / allowed_gids and narrowed "
                "per instance. Unknown routes answer 404 `not_found`, other methods 405 "
                "`method_not_allowed` with an Allow header."
            ),
        },
        "servers": [{"url": "http://sugard", "description": "any host name; the socket decides"}],
        "paths": {
            "/v1/health": {
                "get": {
                    "operationId": "health",
                    "summary": "the daemon is up",
                    "responses": {**_COMMON, "200": _json(ref("Health"), "the daemon is up")},
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "this document",
                    "responses": {
                        **_COMMON,
                        "200": _json({"type": "object"}, "the OpenAPI description of this API"),
                    },
                }
            },
            "/v1/instances": {
                "get": {
                    "operationId": "listInstances",
                    "summary": "status of every instance the caller may use",
                    "responses": {**_COMMON, "200": _json(ref("StatusList"), "the instances")},
                }
            },
            "/v1/instances/{name}": {
                "parameters": [_NAME],
                "get": {
                    "operationId": "instanceStatus",
                    "summary": "status of one instance",
                    "responses": _with_instance(**{"200": _json(ref("Status"), "its status")}),
                },
            },
            "/v1/instances/{name}/token": {
                "parameters": [_NAME],
                "get": {
                    "operationId": "token",
                    "summary": "the current access token",
                    "parameters": [
                        _seconds(
                            "min_ttl",
                            int(MAX_MIN_TTL),
                            60,
                            "the token must stay valid this long (capped at 90% of Sugar's "
                            "token lifetime); a fresher one is fetched if needed",
                        ),
                        _seconds(
                            "wait",
                            int(MAX_WAIT),
                            5,
                            f"how long to wait for a token (default {DEFAULT_WAIT:g})",
                        ),
                        _AS,
                    ],
                    "responses": _token_answers(),
                },
            },
            "/v1/instances/{name}/invalidate": {
                "parameters": [_NAME],
                "post": {
                    "operationId": "invalidate",
                    "summary": "report a token Sugar refused; answers the token to use now",
                    "description": "Only a report of the current token starts a refresh.",
                    "parameters": [_AS],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": ref("InvalidateRequest")}},
                    },
                    "responses": _token_answers(
                        **{
                            "408": _error("the body did not arrive in time", "bad_request"),
                            "413": _error("the body is larger than 64 KiB", "bad_request"),
                        }
                    ),
                },
            },
            "/v1/instances/{name}/refresh": {
                "parameters": [_NAME],
                "post": {
                    "operationId": "refresh",
                    "summary": "renew the token now, even from `failed` or during backoff",
                    "description": "A password or client secret that Sugar rejected is not "
                    "sent again unless it changed since, or the body asks for it (the "
                    "daemon's owner and root only; once per rejection, then not for a minute). "
                    "With `as`: a new token of that user, also after Sugar refused the sudo "
                    "(asked again).",
                    "parameters": [_AS],
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": ref("RefreshRequest")}},
                    },
                    "responses": _token_answers(
                        **{
                            "408": _error("the body did not arrive in time", "bad_request"),
                            "413": _error("the body is larger than 64 KiB", "bad_request"),
                        }
                    ),
                },
            },
            "/v1/instances/{name}/revoke": {
                "parameters": [_NAME],
                "post": {
                    "operationId": "revoke",
                    "summary": "end the session at Sugar (every token handed out dies) and log "
                    "in anew (the daemon's owner and root only)",
                    "description": "A logout with the session's refresh token, then one password "
                    "login; a password Sugar rejected is not sent (502, and nothing is ended). "
                    "In a fleet, only the host leading the session may (400 elsewhere).",
                    "responses": _token_answers(),
                },
            },
            "/v1/instances/{name}/proxy": {
                "parameters": [_NAME],
                "get": {
                    "operationId": "proxyUrls",
                    "summary": "the Sugar site root to give a client of the proxy",
                    "responses": _with_instance(
                        **{"200": _json(ref("ProxyUrls"), "where the proxy serves the instance")}
                    ),
                },
            },
            "/v1/instances/{name}/clients": {
                "parameters": [_NAME],
                "get": {
                    "operationId": "clients",
                    "summary": "who used the instance through the proxy in the last 15 minutes",
                    "description": "One row per client process (at most 1,000), most recently "
                    "seen first: what it sent through the proxy, and how long it waited for "
                    "the instance's rate_limit.",
                    "responses": _with_instance(
                        **{"200": _json(ref("Clients"), "the instance's clients")}
                    ),
                },
            },
            PROXIED_PATH: {
                "parameters": [_NAME, _SUGAR_PATH],
                **{method: _proxied(method) for method in PROXIED_METHODS},
            },
            PROXIED_AS_PATH: {
                "parameters": [_NAME, _USER, _SUGAR_PATH],
                **{method: _proxied(method, acting=True) for method in PROXIED_METHODS},
            },
            "/v1/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics: per instance state, expiry, counters "
                    "(docs/metrics.md); no secret and no username",
                    "responses": {
                        **_COMMON,
                        "200": {
                            "description": "the text exposition format (OpenMetrics if the "
                            "Accept header asks for it)",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/openmetrics-text": {"schema": {"type": "string"}},
                            },
                        },
                    },
                }
            },
            "/v1/reload": {
                "post": {
                    "operationId": "reload",
                    "summary": "reload the config (the daemon's owner and root only)",
                    "responses": {
                        **_COMMON,
                        "200": _json(ref("ReloadResult"), "what the reload changed"),
                        "422": _json(
                            ref("ReloadError"), "the new config is invalid; the old one runs on"
                        ),
                    },
                }
            },
            "/v1/shutdown": {
                "post": {
                    "operationId": "shutdown",
                    "summary": "stop the daemon as SIGTERM does (the daemon's owner and root "
                    "only); refused when systemd runs it",
                    "responses": {
                        **_COMMON,
                        "202": _json(
                            ref("Shutdown"),
                            "stopping: requests in flight finish (within shutdown_grace), "
                            "then the socket is removed and the process exits",
                        ),
                        "409": _error(
                            "systemd runs this daemon: `systemctl --user stop sugard`",
                            "under_systemd",
                        ),
                    },
                }
            },
        },
        "components": {"schemas": SCHEMAS},
    }
