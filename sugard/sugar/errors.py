"""What Sugar (or the network, or a proxy in front of Sugar) refused with, as one error tree:
`sugard.sugar` turns every failure into one of these, so nothing above it sees aiohttp.

    UpstreamError                    anything that kept us from getting a token
    +-- TransientError            worth retrying later; `retry_after`: the server's wish
    |   +-- Timeout               no answer within `timeout`
    |   +-- Unreachable           no connection (DNS, refused, TLS handshake, the proxy)
    |   +-- ProxyFailed           the proxy would not pass the request on (not a 407)
    |   +-- BadResponse           an answer that is not Sugar's JSON (a proxy's page?)
    |   +-- RateLimited           429
    |   +-- ServerError           408, 425, 5xx
    |   +-- Locked                for hours, not seconds: the keeper backs off patiently
    |   |   +-- Maintenance       maintenance mode (503 maintenance)
    |   |   +-- LicenseLocked     license expired, or no free seat (403 license_seats_needed)
    |   +-- RefreshConsumed       Sugar deleted the refresh token before refusing: log in next
    |       +-- MaintenanceLogout 401 need_login saying "maintenance" (also a Maintenance)
    |       +-- LicenseLogout     401 need_login naming the license (also a LicenseLocked)
    +-- RejectedError             Sugar said no, and asking again will not change that
        +-- CredentialsRejected   401 need_login on a password login (never retried: lockout)
        +-- ClientRejected        400 invalid_client
        +-- PlatformRejected      422 invalid_parameter: platform not registered in Sugar
        +-- RefreshRejected       the refresh token is gone (evicted, rotated, expired)
        +-- ProxyRejected         407 from the proxy: its credentials are missing or wrong

Which class an answer becomes is chosen by tables (`_UNAVAILABLE`, `_NEED_LOGIN_LOCKS`), so the
keeper decides by class alone and never reads an HTTP status. Branching uses the HTTP status
and the `error` label only, since `error_message` is localised;
the one exception is telling maintenance and license locks from a bad password, which Sugar
answers with the same 401 `need_login`, so their English texts are recognised (and the text of
an account lockout, for the words of the message only).
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from sugard.text import one_line

if TYPE_CHECKING:
    from sugard.config import InstanceConfig
    from sugard.sugar.outbound import Route

__all__ = [
    "BadResponse",
    "ClientRejected",
    "CredentialsRejected",
    "LicenseLocked",
    "LicenseLogout",
    "Locked",
    "Maintenance",
    "MaintenanceLogout",
    "PlatformRejected",
    "ProxyFailed",
    "ProxyRejected",
    "RateLimited",
    "RefreshConsumed",
    "RefreshRejected",
    "RejectedError",
    "ServerError",
    "Timeout",
    "TransientError",
    "Unreachable",
    "UpstreamError",
    "proxy_refused",
    "redirected",
    "refusal",
]

TRANSIENT_STATUSES = {408, 425, 429}
MAINTENANCE_TEXT = re.compile(r"maintenance", re.IGNORECASE)
LICENSE_TEXT = re.compile(r"licen[cs]e|seats", re.IGNORECASE)
# Only chooses the words of the message (the class is the same): Sugar's lockout text.
LOCKOUT_TEXT = re.compile(r"\blocked\b|too many failed", re.IGNORECASE)


class UpstreamError(Exception):
    """Base of every upstream failure. `kind` is a stable label; `str()` is one line for humans."""

    kind = "error"

    def __init__(self, message: str, *, status: int | None = None, label: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.label = label


class TransientError(UpstreamError):
    """Try again later. `retry_after` is the server's wish (seconds), if it said one."""

    kind = "transient"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        label: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message, status=status, label=label)
        self.retry_after = retry_after


class Timeout(TransientError):
    """No answer within the instance's `timeout`."""

    kind = "timeout"


class Unreachable(TransientError):
    """No connection: DNS, refused, the TLS handshake, or the proxy."""

    kind = "unreachable"


class ProxyFailed(TransientError):
    """The outbound proxy would not pass the request on (other than a 407)."""

    kind = "proxy"


class BadResponse(TransientError):
    """An answer that is not Sugar's JSON (a proxy's or a front's page)."""

    kind = "bad_response"


class RateLimited(TransientError):
    """429: too many requests now."""

    kind = "rate_limited"


class ServerError(TransientError):
    """408, 425 or a 5xx: the site could not answer now."""

    kind = "server_error"


class Locked(TransientError):
    """The site refuses for hours (maintenance, its license): retrying soon only adds load."""


class Maintenance(Locked):
    """The site is in maintenance mode (503 `maintenance`)."""

    kind = "maintenance"


class LicenseLocked(Locked):
    """The license expired, or no seat is free (403 `license_seats_needed`)."""

    kind = "license"


class RefreshConsumed(TransientError):
    """Sugar deleted the refresh token before it refused: the next try must log in."""


class MaintenanceLogout(RefreshConsumed, Maintenance):
    """401 `need_login` saying maintenance: the refresh token is already gone."""


class LicenseLogout(RefreshConsumed, LicenseLocked):
    """401 `need_login` naming the license: the refresh token is already gone."""


# What an answer that says "not now" becomes: by Sugar's `error` label, else by status.
_UNAVAILABLE_BY_LABEL: dict[str, type[TransientError]] = {"maintenance": Maintenance}
_UNAVAILABLE: dict[int, type[TransientError]] = {429: RateLimited}  # others: ServerError
# 401 need_login is Sugar's answer to a bad password and to a locked site alike; only the
# (English) text tells a lock: (pattern, class, what to say after "{url} ").
_NEED_LOGIN_LOCKS: tuple[tuple[re.Pattern[str], type[RefreshConsumed], str], ...] = (
    (MAINTENANCE_TEXT, MaintenanceLogout, "is in maintenance mode{says}"),
    (
        LICENSE_TEXT,
        LicenseLogout,
        "refuses logins because of its license{says}; an administrator must renew or extend it",
    ),
)


class RejectedError(UpstreamError):
    """Sugar refused, for a reason that a person has to fix."""

    kind = "rejected"


class CredentialsRejected(RejectedError):
    """401 `need_login` on a password login: never retried (lockout)."""

    kind = "credentials"


class ClientRejected(RejectedError):
    """400 `invalid_client`: the client id or secret."""

    kind = "client"


class PlatformRejected(RejectedError):
    """422 `invalid_parameter`: the platform is not registered in Sugar."""

    kind = "platform"


class RefreshRejected(RejectedError):
    """The refresh token is unusable; a password login is the way back."""

    kind = "refresh_token"


class ProxyRejected(RejectedError):
    """Never retried by itself: a proxy that checks a directory may lock the account too."""

    kind = "proxy"


def refusal(
    i: InstanceConfig,
    grant: str,
    status: int,
    data: dict[str, Any] | None,
    retry_after: float | None,
    sent_secrets: tuple[str, ...],
    token_path: str,
) -> UpstreamError:
    """The error that an answer other than a token (`status`, its JSON object `data` if it
    was one) to a `grant` request at `token_path` becomes; `sent_secrets` never show in it."""
    label = data.get("error") if data is not None else None
    text = data.get("error_message") if data is not None else None
    label = label if isinstance(label, str) else None
    # Redacted before it is cut to one short line: a cut through a secret would leave its head.
    sugar_says = one_line(_redact(text, sent_secrets), 200) if isinstance(text, str) else ""
    where = f"{label} ({status})" if label else f"HTTP {status}"

    if status in TRANSIENT_STATUSES or status >= 500:
        unavailable = _UNAVAILABLE_BY_LABEL.get(label or "") or _UNAVAILABLE.get(
            status, ServerError
        )
        return unavailable(
            f"{i.url} is unavailable: {where}{_quote(sugar_says)}",
            status=status,
            label=label,
            retry_after=retry_after,
        )
    if label is None:
        if status == 404:
            return RejectedError(
                f"no SugarCRM REST API at {i.url}{token_path} (HTTP 404); check url "
                "(the site root, like https://crm.example.com)",
                status=status,
            )
        return BadResponse(
            f"{i.url} answered HTTP {status} without SugarCRM's JSON (a proxy page?)",
            status=status,
            retry_after=retry_after,
        )

    if status == 401 and label == "need_login":
        for pattern, locked, says in _NEED_LOGIN_LOCKS:
            if pattern.search(sugar_says):
                return locked(
                    f"{i.url} " + says.format(says=_quote(sugar_says)), status=status, label=label
                )
        if grant == "password":
            if LOCKOUT_TEXT.search(sugar_says):
                advice = (
                    "Sugar says the account is locked: not sent again (each try counts again, "
                    "and may restart a timed lock). Once an admin unlocked the user: "
                    f"`sugarctl refresh {i.name} --retry-rejected`; or fix the password "
                    f"({i.password.describe()}), then run `sugarctl refresh {i.name}`"
                )
            else:
                advice = (
                    "Not sent again (each try may count towards a lockout): fix the "
                    f"password ({i.password.describe()}), then run `sugarctl refresh {i.name}`; "
                    f"if an admin unlocked the user instead: `sugarctl refresh {i.name} "
                    "--retry-rejected` (may count as a failed login)"
                )
            return CredentialsRejected(
                f"Sugar rejected the credentials of user {i.username!r} (need_login)"
                f"{_quote(sugar_says)}. {advice}",
                status=status,
                label=label,
            )
        return RefreshRejected(
            f"Sugar refused the refresh (need_login){_quote(sugar_says)}",
            status=status,
            label=label,
        )
    if status == 403 and label == "license_seats_needed":
        return LicenseLocked(
            f"{i.url} has no free license seat for {i.username!r}{_quote(sugar_says)}; "
            "an administrator must free or buy seats",
            status=status,
            label=label,
        )
    if label == "invalid_client":
        return ClientRejected(
            f"Sugar rejected client_id {i.client_id!r} or its client_secret (invalid_client); "
            "check them against Admin > OAuth Keys (the built-in 'sugar' key has an empty "
            f"secret), then run `sugarctl refresh {i.name}`",
            status=status,
            label=label,
        )
    if status == 422 and label == "invalid_parameter":
        return PlatformRejected(
            f"Sugar refused platform {i.platform!r} (invalid_parameter){_quote(sugar_says)}: "
            "register it in Sugar under Admin > Configure API Platforms, or set `platform` "
            "to a registered one",
            status=status,
            label=label,
        )
    if grant == "refresh_token" and label in ("invalid_grant", "invalid_request"):
        # IdM mode answers a failed refresh with invalid_request instead of invalid_grant.
        return RefreshRejected(
            f"Sugar refused the refresh token ({label}){_quote(sugar_says)}",
            status=status,
            label=label,
        )
    return RejectedError(
        f"Sugar refused the {'login' if grant == 'password' else 'refresh'}: {where}"
        f"{_quote(sugar_says)}",
        status=status,
        label=label,
    )


def redirected(i: InstanceConfig, grant: str, status: int, location: str | None) -> BadResponse:
    """A token request answered with a redirect, which is never followed (it would carry the
    password or the refresh token wherever it points): where it pointed, without the
    Location's user information, query or fragment (they could hold anything)."""
    what = "login" if grant == "password" else "refresh"
    target = urlsplit(urljoin(i.url + "/", location or ""))
    host = target.hostname or ""
    shown = f"{target.scheme}://{f'[{host}]' if ':' in host else host}"
    if target.port is not None:
        shown += f":{target.port}"
    where = f" to {one_line(shown + target.path, 200)}" if location else " without a Location"
    return BadResponse(
        f"{i.url} answered the {what} with a redirect (HTTP {status}){where}; sugard sends "
        "no credentials on a redirect: set url to the site's own address",
        status=status,
    )


def proxy_refused(i: InstanceConfig, route: Route, status: int) -> UpstreamError:
    """The proxy's own answer, never its text (which may echo the request)."""
    try:
        reason = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        reason = f"HTTP {status}"
    if status != 407:
        return ProxyFailed(
            f"proxy {route.proxy} refused to pass on the request to {i.url} ({reason})",
            status=status,
        )
    in_config = "proxy_password (or its _file, _env, _command, _credential) in the config"
    if route.user is not None:
        fix = f"fix proxy_username or {in_config}, then run `sugarctl reload`"
    elif route.credentials:
        fix = (
            f"fix the user and password in {route.variable} and restart sugard, or set "
            f"proxy_username and {in_config}"
        )
    else:
        fix = f"set proxy_username and {in_config}, then run `sugarctl reload`"
    said = f"refused {route.credentials}" if route.credentials else "asks for credentials"
    return ProxyRejected(f"proxy {route.proxy} {said} ({reason}); {fix}", status=status)


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    """Sugar's text is quoted to the user and the log: a proxy or plugin echoing the request
    must not carry our secrets there."""
    for secret in secrets:
        if len(secret) >= 4:  # an empty or tiny secret would garble the text instead
            text = text.replace(secret, "[redacted]")
    return text


def _quote(text: str) -> str:
    return f': "{text}"' if text else ""
