"""Sugar's sudo (`POST /rest/{v}/oauth2/sudo/{user_name}`), as sugard's admin session asks it:
the request's parts and what each answer becomes (docs/sugarcrm.md, "Tokens of other users").

    UpstreamError (sugard.sugar.errors)
    +-- TransientError
    |   +-- AdminTokenRefused   401: Sugar no longer takes the admin token the sudo was sent
    |                           with (a refresh or an eviction killed it): report it, once
    +-- RejectedError
        +-- SudoRefused         Sugar will not hand out this user's token; asking again will
            |                   not change that, so it is not asked again before a person acts
            +-- NotAnAdmin      403 not_authorized: sugard's user is no admin (every user)
            +-- NoSuchUser      404 not_found: no such user, or an inactive one

Branching is on the HTTP status and the `error` label only (the texts are localised).
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from sugard.secret import Secret
from sugard.sugar.errors import RejectedError, TransientError, UpstreamError, refusal
from sugard.text import one_line

if TYPE_CHECKING:
    from sugard.config import InstanceConfig
    from sugard.sugar import Grant

__all__ = [
    "AdminTokenRefused",
    "NoSuchUser",
    "NotAnAdmin",
    "SudoRefused",
    "sudo_body",
    "sudo_path",
    "sudo_refusal",
]

SUDO_PATH = "/rest/v10/oauth2/sudo/"


class AdminTokenRefused(TransientError):
    """Sugar refused the admin token the sudo carried (401): a renewal of the admin session
    killed it meanwhile, or Sugar evicted it. The caller reports it and tries once more."""

    kind = "sudo_admin_token"


class SudoRefused(RejectedError):
    """Sugar will not give sugard a token of this user. `unnamed`: the same without the
    user's name (STATUS shows no names when the config says `sudo = ["*"]`)."""

    kind = "sudo"

    def __init__(
        self, message: str, *, unnamed: str, status: int | None = None, label: str | None = None
    ) -> None:
        super().__init__(message, status=status, label=label)
        self.unnamed = unnamed


class NotAnAdmin(SudoRefused):
    """403 `not_authorized`: sugard's user may not sudo at all (so for no user)."""

    kind = "sudo_not_admin"


class NoSuchUser(SudoRefused):
    """404 `not_found`: Sugar has no active user of that name."""

    kind = "sudo_no_user"


def sudo_path(user: str) -> str:
    """The sudo route for `user`, its name percent-encoded as one path segment."""
    return SUDO_PATH + urllib.parse.quote(user, safe="@.-_~+")


def sudo_body(instance: InstanceConfig) -> dict[str, str]:
    """The instance's own platform and client: never Sugar's default platform `base` (which
    would log the user out of the web UI) unless the instance's platform is `base`."""
    return {"platform": instance.platform, "client_id": instance.client_id}


def sudo_grant(data: dict[str, Any], sent_at: float) -> Grant | None:
    """Sugar's four keys (access_token, expires_in, token_type, scope), and a refresh token
    only where Sugar gave one (12+, asked with needRefresh): an empty one means none."""
    from sugard.sugar import Grant

    access, expires_in = data.get("access_token"), data.get("expires_in")
    if not isinstance(access, str) or not access:
        return None
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        return None
    refresh, token_type = data.get("refresh_token"), data.get("token_type")
    refresh_in = data.get("refresh_expires_in")
    has_refresh = isinstance(refresh, str) and bool(refresh)
    refresh_ends = (
        sent_at + float(refresh_in)
        if has_refresh
        and isinstance(refresh_in, int | float)
        and not isinstance(refresh_in, bool)
        and refresh_in > 0
        else None
    )
    return Grant(
        access_token=Secret(access),
        refresh_token=Secret(refresh if has_refresh and isinstance(refresh, str) else ""),
        download_token=Secret(""),
        token_type=token_type if isinstance(token_type, str) else "bearer",
        issued_at=sent_at,
        expires_at=sent_at + float(expires_in),
        refresh_expires_at=refresh_ends,
    )


def sudo_refusal(
    i: InstanceConfig,
    user: str,
    status: int,
    data: dict[str, Any] | None,
    retry_after: float | None,
) -> UpstreamError:
    """What an answer other than a token to the sudo for `user` becomes."""
    label = data.get("error") if data is not None else None
    label = label if isinstance(label, str) else None
    text = data.get("error_message") if data is not None else None
    says = f': "{one_line(text, 200)}"' if isinstance(text, str) and text else ""
    again = f"then run `sugarctl refresh {i.name} --as {user}`"
    if status == 401:
        return AdminTokenRefused(
            f"Sugar refused the token of {i.username!r} that the sudo was sent with "
            f"({label or 'HTTP 401'})",
            status=status,
            label=label,
        )
    if status == 403 and label == "not_authorized":
        why = f"{i.username} is not an admin in Sugar (not_authorized): only an admin may sudo"
        fix = f"make {i.username} an admin, or remove `sudo` from instance {i.name}"
        return NotAnAdmin(
            f"{why}; {fix}, {again}", unnamed=f"{why}; {fix}", status=status, label=label
        )
    if status == 404 and label == "not_found":
        return NoSuchUser(
            f"Sugar has no active user named {user!r} (not_found){says}; if the user exists "
            f"now, {again}",
            unnamed="Sugar has no active user of a name asked for (not_found)",
            status=status,
            label=label,
        )
    found = refusal(i, "sudo", status, data, retry_after, (), SUDO_PATH)
    if isinstance(found, TransientError):
        return found
    where = f"{label} ({status})" if label else f"HTTP {status}"
    if status == 422 and label == "invalid_parameter":
        return found  # the platform: the instance's own problem, said as for a login
    return SudoRefused(
        f"Sugar refused the sudo to {user!r}: {where}{says}; {again}",
        unnamed=f"Sugar refused a sudo: {where}",
        status=status,
        label=label,
    )
