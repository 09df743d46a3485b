"""Tokens of other users on the socket API: the `as` query value of the token routes, and
STATUS.sudo as the API shows it (times in RFC 3339)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from sugard.api.middleware import BadInput
from sugard.wire import sudo_user_problem

__all__ = ["as_user", "shown_sudo"]

Rfc3339 = Callable[[float | None], str | None]


def as_user(request: web.Request) -> str | None:
    """The user the request asks a token of (`?as=USER`); None: the instance's own. BadInput
    names a user that cannot be one (a '/', a space, a control character)."""
    user = request.query.get("as")
    if user is None:
        return None
    problem = sudo_user_problem(user)
    if problem is not None:
        raise BadInput(f"as: {problem}")
    return user


def shown_sudo(sudo: Mapping[str, Any] | None, rfc3339: Rfc3339) -> dict[str, Any] | None:
    """STATUS.sudo (`SudoStatus` as a dict) with its times in RFC 3339."""
    if sudo is None:
        return None
    users = sudo.get("users")
    return {
        **sudo,
        "allowed": list(sudo["allowed"]) if not isinstance(sudo["allowed"], str) else "*",
        "next_expiry": rfc3339(sudo["next_expiry"]),
        "last_error": _error(sudo["last_error"], rfc3339),
        "users": None
        if users is None
        else [
            {
                **user,
                "expires_at": rfc3339(user["expires_at"]),
                "refresh_at": rfc3339(user["refresh_at"]),
                "last_error": _error(user["last_error"], rfc3339),
            }
            for user in users
        ],
    }


def _error(error: Mapping[str, Any] | None, rfc3339: Rfc3339) -> dict[str, Any] | None:
    return None if error is None else {**error, "at": rfc3339(error["at"])}
