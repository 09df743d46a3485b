"""The schemas of the socket API's OpenAPI document (its `components`): every body the daemon
answers or accepts, exact (`additionalProperties: false`), from the wire's codes, states and
instance-name rule. sugard.api.openapi builds the paths on them and serves the document.
"""

from __future__ import annotations

from typing import Any

from sugard.wire import ERRORS, INSTANCE_NAME_PATTERN, STATES

__all__ = ["ERROR_CODES", "INSTANCE_NAME", "SCHEMAS", "ref"]

ERROR_CODES = tuple(sorted(ERRORS))
INSTANCE_NAME = f"^{INSTANCE_NAME_PATTERN}$"


def ref(name: str) -> dict[str, str]:
    """A reference to the schema `name` of SCHEMAS."""
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


_TIME = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC"}
_COUNT = {"type": "integer", "minimum": 0}
_ERROR_STATUS = {
    "type": "object",
    "nullable": True,
    "required": ["at", "kind", "message", "current"],
    "additionalProperties": False,
    "properties": {
        "at": _TIME,
        "kind": {"type": "string"},
        "message": {"type": "string"},
        # True only while the state is caused by it; else it is history.
        "current": {"type": "boolean"},
    },
}
_SUDO = {
    "type": "object",
    "nullable": True,
    "description": "the users the instance acts as (Sugar's sudo; null: none). Their names "
    'only where the config lists them: with sudo = ["*"] counts only',
    "required": [
        "allowed",
        "held",
        "refused",
        "refused_all",
        "next_expiry",
        "last_error",
        "users",
    ],
    "additionalProperties": False,
    "properties": {
        "allowed": {
            "oneOf": [
                {"type": "array", "items": {"type": "string"}},
                {"type": "string", "enum": ["*"]},
            ]
        },
        "held": {**_COUNT, "description": "users with a token now"},
        "refused": {**_COUNT, "description": "users Sugar refused (not asked again)"},
        "refused_all": {
            "type": "boolean",
            "description": "Sugar refused sugard's user itself (no admin): no sudo for anyone",
        },
        "next_expiry": _nullable(_TIME),
        "last_error": _ERROR_STATUS,
        "users": {
            "type": "array",
            "nullable": True,
            "items": {
                "type": "object",
                "required": ["user", "expires_at", "refresh_at", "last_error", "refused"],
                "additionalProperties": False,
                "properties": {
                    "user": {"type": "string"},
                    "expires_at": _nullable(_TIME),
                    "refresh_at": _nullable(_TIME),
                    "last_error": _ERROR_STATUS,
                    "refused": {"type": "boolean"},
                },
            },
        },
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error", "message"],
        "additionalProperties": False,
        "properties": {
            "error": {"type": "string", "enum": list(ERROR_CODES)},
            "message": {"type": "string", "description": "one line for a human"},
        },
    },
    "RetryableError": {
        "type": "object",
        "required": ["error", "message", "retry_after"],
        "additionalProperties": False,
        "properties": {
            "error": {"type": "string", "enum": list(ERROR_CODES)},
            "message": {"type": "string", "description": "one line for a human"},
            "retry_after": {"type": "number", "minimum": 0},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "version", "instances"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "string", "enum": ["ok"]},
            "version": {"type": "string"},
            "instances": _COUNT,
        },
    },
    "Status": {
        "type": "object",
        "required": [
            "name",
            "url",
            "username",
            "platform",
            "state",
            "expires_at",
            "refresh_at",
            "last_refresh",
            "last_error",
            "token_fingerprint",
            "logins",
            "refreshes",
            "failures",
            "fleet",
            "sudo",
        ],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": INSTANCE_NAME},
            "url": {"type": "string"},
            "username": {"type": "string"},
            "platform": {"type": "string"},
            "state": {"type": "string", "enum": list(STATES)},
            "expires_at": _nullable(_TIME),
            "refresh_at": _nullable(_TIME),
            "last_refresh": _nullable(_TIME),
            "last_error": _ERROR_STATUS,
            "token_fingerprint": {
                "type": "string",
                "nullable": True,
                "pattern": "^[0-9a-f]{8}$",
                "description": "the name the log gives the current token (null: no token); "
                "`sugarctl token NAME --fingerprint` prints the same",
            },
            "logins": _COUNT,
            "refreshes": _COUNT,
            "failures": _COUNT,
            "fleet": {
                "type": "object",
                "nullable": True,
                "description": "fleet mode (docs/fleet.md); null: the session is this host's",
                "required": ["role", "holder", "epoch"],
                "additionalProperties": False,
                "properties": {
                    "role": {"type": "string", "enum": ["leader", "follower"]},
                    "holder": {
                        "type": "string",
                        "nullable": True,
                        "description": "the leader's lease holder id, host:pid:random",
                    },
                    "epoch": {"type": "integer", "minimum": 0},
                },
            },
            "sudo": _SUDO,
        },
    },
    "StatusList": {
        "type": "object",
        "required": ["instances"],
        "additionalProperties": False,
        "properties": {"instances": {"type": "array", "items": ref("Status")}},
    },
    "Token": {
        "type": "object",
        "required": [
            "instance",
            "url",
            "access_token",
            "token_type",
            "expires_at",
            "expires_in",
            "download_token",
        ],
        "additionalProperties": False,
        "properties": {
            "instance": {"type": "string", "pattern": INSTANCE_NAME},
            "url": {"type": "string", "description": "the site root; call {url}/rest/v10/..."},
            "access_token": {"type": "string", "minLength": 1, "description": "OAuth-Token"},
            "token_type": {"type": "string"},
            "expires_at": _TIME,
            "expires_in": _COUNT,
            "download_token": {"type": "string"},
        },
    },
    "InvalidateRequest": {
        "type": "object",
        "required": ["access_token"],
        "properties": {
            "access_token": {
                "type": "string",
                "minLength": 1,
                "description": "the token Sugar refused",
            }
        },
        "example": {"access_token": "4c0f5cb8-6bb0-4c6b-9d2e-2f4a8f9e1d7a"},
    },
    "RefreshRequest": {
        "type": "object",
        "properties": {
            "retry_rejected": {
                "type": "boolean",
                "default": False,
                "description": "send a password (or client secret) Sugar rejected once more, "
                "although it did not change (after an administrator unlocked the account); "
                "Sugar may count it as a failed login",
            }
        },
        "additionalProperties": False,
        "example": {"retry_rejected": True},
    },
    "Shutdown": {
        "type": "object",
        "required": ["status", "pid"],
        "additionalProperties": False,
        "properties": {
            "status": {"type": "string", "enum": ["stopping"]},
            "pid": {"type": "integer", "minimum": 1},
        },
    },
    "ReloadResult": {
        "type": "object",
        "required": ["added", "removed", "changed", "unchanged"],
        "additionalProperties": False,
        "properties": {
            **{
                key: {"type": "array", "items": {"type": "string"}}
                for key in ("added", "removed", "changed", "unchanged")
            },
            "needs_attention": {
                "type": "object",
                "description": "instances left failed, each with what to do: Sugar rejected "
                "their secret and it has not changed, so it is not sent again",
                "additionalProperties": {"type": "string"},
            },
            "restart_needed": {
                "type": "array",
                "items": {"type": "string"},
                "description": "settings that changed but take effect only when sugard "
                "restarts, like `[daemon] metrics_listen` or `[fleet]`",
            },
        },
    },
    "ProxyUrls": {
        "type": "object",
        "required": ["instance", "socket_url", "listen_url", "api_version"],
        "additionalProperties": False,
        "properties": {
            "instance": {"type": "string", "pattern": INSTANCE_NAME},
            "socket_url": {
                "type": "string",
                "description": "the Sugar site root over this socket",
                "example": "http://sugard/v1/instances/prod",
            },
            "listen_url": {
                "type": "string",
                "nullable": True,
                "description": "the site root on the instance's loopback listener, if any",
            },
            "api_version": {
                "type": "string",
                "description": "the REST API version (api_version) `sugarctl api` puts before "
                "a path that names none",
                "example": "v10",
            },
        },
    },
    "Clients": {
        "type": "object",
        "required": ["instance", "clients"],
        "additionalProperties": False,
        "properties": {
            "instance": {"type": "string", "pattern": INSTANCE_NAME},
            "clients": {"type": "array", "items": {"$ref": "#/components/schemas/Client"}},
        },
    },
    "Client": {
        "type": "object",
        "required": [
            "uid",
            "pid",
            "command",
            "first_seen",
            "last_seen",
            "requests",
            "errors",
            "bytes",
            "queued_seconds",
            "last_path",
        ],
        "additionalProperties": False,
        "properties": {
            "uid": {"type": "integer"},
            "pid": {
                "type": "integer",
                "description": "0 when the kernel named no process (then one row per uid)",
            },
            "command": {"type": "string", "description": "its command line, from /proc"},
            "first_seen": {"type": "string", "format": "date-time"},
            "last_seen": {"type": "string", "format": "date-time"},
            "requests": {"type": "integer", "description": "requests sent through the proxy"},
            "errors": {"type": "integer", "description": "of those: no answer, or 4xx/5xx"},
            "bytes": {"type": "integer", "description": "request and answer bodies"},
            "queued_seconds": {
                "type": "number",
                "description": "time its requests waited for the rate_limit, together",
            },
            "last_path": {"type": "string", "description": "the last path, never the query"},
        },
    },
    "SugarError": {
        "type": "object",
        "required": ["error", "error_message"],
        "properties": {
            "error": {"type": "string", "description": "Sugar's error label"},
            "error_message": {"type": "string"},
        },
    },
    "ReloadError": {
        "type": "object",
        "required": ["error", "message", "errors"],
        "additionalProperties": False,
        "properties": {
            "error": {"type": "string", "enum": ["invalid_config"]},
            "message": {"type": "string"},
            "errors": {
                "type": "array",
                "items": {"type": "string", "description": "file: key: message"},
            },
        },
    },
}
