"""What the fake SugarCRM puts on the wire: Sugar's error envelope, its texts, and broken answers.

Everything a client could branch on lives here in one place, copied from how Sugar answers
(see docs/sugarcrm.md): HTTP status, the `error` label, `application/json` without a charset,
PHP's escapes, the cache headers and the download-token cookie, and no `WWW-Authenticate` or
`Retry-After` on Sugar's own errors. Faults that only a proxy in front of Sugar produces (HTML
502 pages, 429, resets, garbage) are built here too.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Final, Literal, get_args
from urllib.parse import parse_qsl

from aiohttp import hdrs, web

FaultKind = Literal["html502", "503", "429", "reset", "garbage"]
FAULT_KINDS: Final = frozenset(get_args(FaultKind))

# English texts of Sugar's en_us language pack; real sites localise them, clients must not match.
MSG_BAD_GRANT_TYPE: Final = "Invalid grant_type parameter or parameter missing"
MSG_NO_CLIENT_ID: Final = "Client id was not found in the headers or body"
MSG_BAD_CLIENT: Final = "The client credentials are invalid"
MSG_NO_USER_PASS: Final = 'Missing parameters. "username" and "password" required'  # noqa: S105
MSG_BAD_LOGIN: Final = "You must specify a valid username and password."
MSG_LOCKED: Final = (
    "Too many failed login attempts. Your account is locked; contact your administrator."
)
MSG_NO_REFRESH: Final = 'No "refresh_token" parameter found'
MSG_BAD_REFRESH: Final = "Invalid refresh token"
MSG_EXPIRED_REFRESH: Final = "Refresh token has expired: "
MSG_NO_TOKEN: Final = "No valid authentication for user."  # noqa: S105
MSG_INVALID_ACCESS: Final = "The access token provided is invalid."
MSG_EXPIRED_ACCESS: Final = "The access token provided has expired."
MSG_BAD_PLATFORM: Final = "Invalid platform specified."
MSG_MAINTENANCE: Final = "The system is in maintenance mode. Please try again later."
# What the token endpoint says when it refuses a login (or refresh) during maintenance.
MSG_MAINTENANCE_LOGIN: Final = (
    "SugarCRM is in maintenance mode. Only admins can login. "
    "Please contact your administrator for details."
)
MSG_LICENSE_EXPIRED: Final = (
    "Your Sugar license has expired. Only administrators can log in; contact your administrator."
)
MSG_LICENSE_SEATS: Final = (
    "The number of active users exceeds the number of licensed seats. Contact your administrator."
)
MSG_BAD_JSON: Final = "A parameter in your request was invalid."
MSG_IMPLICIT_GRANT: Final = "This OAuth2 library does not yet support implicit grant types."
MSG_IDM_NONRECOVERABLE: Final = "The identity server cannot confirm this session; log in again."
MSG_CLIENT_OUTDATED: Final = "This client is too old for this server. Please update it."
MSG_NOT_AUTHORIZED: Final = "You are not authorized to perform this action."
MSG_NO_ROUTE: Final = "Could not find any route that accepted a path like: "

_PROXY_PAGES: Final = {
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
    429: "429 Too Many Requests",
}


class ApiError(Exception):
    """A Sugar error answer; raised anywhere in a handler, turned into JSON at the edge."""

    def __init__(self, status: int, label: str, message: str | None, **extra: Any) -> None:
        super().__init__(status, label, message)
        self.status = status
        self.label = label
        # None: Sugar sends no error_message at all (unsupported_grant_type).
        self.message = message
        self.extra = extra
        # Set when the refusal came after PHP opened a session for a presented token: PHP's
        # session start has already sent Pragma and Expires, Sugar then sets only no-store.
        self.session_opened = False

    def response(self) -> web.Response:
        """Sugar's envelope, keys in Sugar's order; never cached, never a WWW-Authenticate."""
        body: dict[str, Any] = {"error": self.label}
        if self.message is not None:
            body["error_message"] = self.message
        body.update(self.extra)
        cache: dict[str, str] = {hdrs.CACHE_CONTROL: "no-store"}
        if self.session_opened:
            cache[hdrs.PRAGMA] = SESSION_CACHE_HEADERS[hdrs.PRAGMA]
            cache[hdrs.EXPIRES] = SESSION_CACHE_HEADERS[hdrs.EXPIRES]
        return json_response(body, status=self.status, cache=cache)


# What PHP's json_encode() with JSON_HEX_TAG|APOS|QUOT|AMP writes instead of these characters,
# and "/" escaped as PHP does by default; Python's json module has no such options.
_PHP_ESCAPES: Final = {"<": "\\u003C", ">": "\\u003E", "'": "\\u0027", "&": "\\u0026", "/": "\\/"}
# In Python's output a backslash is always the first of a two-character escape, so scanning the
# pairs left to right tells an escaped quote from an escaped backslash before a closing quote.
_PAIR_OR_SPECIAL: Final = re.compile(r"""\\.|[<>'&/]""")

# The headers PHP's session code (session.cache_limiter "nocache") adds to an answer given
# inside a session: token answers, /me, logout and sudo, besides the JSON type.
SESSION_CACHE_HEADERS: Final[Mapping[str, str]] = {
    hdrs.CACHE_CONTROL: "no-store, no-cache, must-revalidate",
    hdrs.PRAGMA: "no-cache",
    hdrs.EXPIRES: "Thu, 19 Nov 1981 08:52:00 GMT",
}
TOKEN_CACHE_HEADERS: Final = SESSION_CACHE_HEADERS
# What Sugar's REST layer sends with a GET answer it tags with an ETag (/ping).
ETAG_CACHE_CONTROL: Final = "max-age=0, private"


def php_json(body: object) -> str:
    """JSON as Sugar writes it: compact, ASCII only, with PHP's hex escapes."""
    text = json.dumps(body, separators=(",", ":"))

    def escape(match: re.Match[str]) -> str:
        found = match.group()
        if found == '\\"':
            return "\\u0022"
        return _PHP_ESCAPES.get(found, found)

    return _PAIR_OR_SPECIAL.sub(escape, text)


def json_response(
    body: object, *, status: int = 200, cache: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON answer as Sugar sends it: `application/json` with no charset, never cached."""
    headers: dict[str, str] = {hdrs.CONTENT_TYPE: "application/json"}
    headers.update(cache or {hdrs.CACHE_CONTROL: "no-store"})
    return web.Response(status=status, body=php_json(body).encode("ascii"), headers=headers)


SESSION_COOKIE: Final = "PHPSESSID"
# The API version a request was routed with, from its path or its Accept header.
API_VERSION: Final = web.RequestKey("sugar_api_version", str)


def set_download_cookie(
    response: web.Response, platform: str, value: str, max_age: int, now: float
) -> None:
    """The download-token cookie as PHP's setcookie() writes it: path=/, HttpOnly.

    Written by hand because aiohttp's cookie morsels use their own attribute order and date
    format, and the point here is to look like PHP.
    """
    expires = _cookie_date(now + max_age)
    response.headers.add(
        hdrs.SET_COOKIE,
        f"download_token_{platform}={value}; expires={expires}; Max-Age={max_age}; path=/; "
        "HttpOnly",
    )


def delete_cookie(response: web.Response, name: str) -> None:
    """What PHP sends for setcookie() with an empty value: the cookie "deleted" in 1970."""
    response.headers.add(
        hdrs.SET_COOKIE,
        f"{name}=deleted; expires={_cookie_date(1)}; Max-Age=0; path=/; HttpOnly",
    )


def delete_download_cookie(response: web.Response, platform: str) -> None:
    """The download-token cookie of `platform`, deleted."""
    delete_cookie(response, f"download_token_{platform}")


def _cookie_date(epoch: float) -> str:
    """PHP's cookie date: `Thu, 01-Jan-1970 00:00:01 GMT`, with dashes."""
    day, rest = formatdate(epoch, usegmt=True).split(", ", 1)
    dd, month, year, clock, zone = rest.split(" ")
    return f"{day}, {dd}-{month}-{year} {clock} {zone}"


# `Accept: application/vnd.sugarcrm.core+json; version=11.4`: the API version of a request
# whose path names none (Sugar's RestRequest reads it there).
_ACCEPT_VERSION: Final = re.compile(
    r"application/vnd\.sugarcrm\.core\+json\s*;\s*version=\"?(\d+(?:\.\d+)?)\"?", re.IGNORECASE
)


def accept_version(accept: str) -> str | None:
    """The path segment a versioned Accept header stands for: "10" is v10, "11.4" v11_4."""
    match = _ACCEPT_VERSION.search(accept)
    if match is None:
        return None
    return "v" + match.group(1).replace(".", "_")


@dataclass(frozen=True)
class Args:
    """The arguments of one request, merged the way Sugar's RestService merges them."""

    values: dict[str, str]
    basic: tuple[str, str] | None  # (client_id, client_secret) from HTTP Basic, if sent

    def get(self, key: str) -> str | None:
        """One argument; absent and empty are the same thing to Sugar (PHP `empty()`)."""
        value = self.values.get(key)
        return value or None


FORM: Final = "application/x-www-form-urlencoded"


async def read_args(request: web.Request) -> Args:
    """Body (form-encoded, else JSON) overlaid by the query string, plus HTTP Basic credentials.

    A body that is neither form-encoded nor valid JSON is Sugar's 422 `invalid_parameter`.
    """
    raw = await request.read()
    body: dict[str, str] = {}
    if raw:
        text = raw.decode("utf-8", "replace")
        if request.content_type == FORM:
            body = dict(parse_qsl(text, keep_blank_values=True))
        else:
            try:
                parsed: object = json.loads(text)
            except ValueError:
                raise ApiError(422, "invalid_parameter", MSG_BAD_JSON) from None
            if isinstance(parsed, dict):
                scalars = ((str(k), _scalar(v)) for k, v in parsed.items())
                body = {k: v for k, v in scalars if v is not None}
    # Sugar merges $_GET over the body, so a query-string argument always wins.
    values = body | dict(request.query)
    return Args(values, _basic_credentials(request.headers.get(hdrs.AUTHORIZATION, "")))


@dataclass(frozen=True)
class PresentedToken:
    """The access token a request carries, and whether it came as `Authorization: Bearer`."""

    token: str | None
    via_bearer: bool = False


async def presented_token(request: web.Request) -> PresentedToken:
    """Where Sugar looks for the access token: OAuth-Token, then `oauth_token` in a form POST,
    then in the query string, then (9.0+, decided by the caller) `Authorization: Bearer`."""
    header = request.headers.get("OAuth-Token")
    if header:
        return PresentedToken(header)
    if request.method == "POST" and request.content_type == FORM:
        form = dict(parse_qsl((await request.read()).decode("utf-8", "replace")))
        if form.get("oauth_token"):
            return PresentedToken(form["oauth_token"])
    if request.query.get("oauth_token"):
        return PresentedToken(request.query["oauth_token"])
    scheme, _, bearer = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    if scheme.lower() == "bearer" and bearer.strip():
        return PresentedToken(bearer.strip(), via_bearer=True)
    return PresentedToken(None)


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """(client_id, client_secret) from an `Authorization: Basic` header, if there is one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    # Decoded by hand: aiohttp's BasicAuth is deprecated in 3.14 and warns on construction.
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        # A mangled header still counts as "a method was used"; the client check refuses it.
        return ("", "")
    client_id, _, secret = decoded.partition(":")
    return (client_id, secret)


def _scalar(value: object) -> str | None:
    """A JSON value as PHP would see it in a string context; nested values are dropped."""
    if isinstance(value, bool):
        return "1" if value else ""
    if isinstance(value, str | int | float):
        return str(value)
    return None


def fault_response(request: web.Request, kind: FaultKind, retry_after: str | None) -> web.Response:
    """An answer from a broken proxy or network in front of Sugar, never from Sugar itself."""
    if kind == "reset":
        _reset(request)
        # Never sent: the transport is gone, aiohttp drops the write silently.
        return web.Response(status=500)
    if kind == "garbage":
        # A 200 that claims JSON but is cut short, as a truncated proxy buffer would give.
        return web.Response(status=200, text='{"access_token":"', content_type="application/json")
    status = {"html502": 502, "503": 503, "429": 429}[kind]
    title = _PROXY_PAGES[status]
    page = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
    headers = {hdrs.RETRY_AFTER: retry_after} if retry_after is not None else {}
    return web.Response(status=status, text=page, content_type="text/html", headers=headers)


def _reset(request: web.Request) -> None:
    """Drop the connection with a TCP RST, as a crashing proxy or a firewall does."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # Linger on with timeout 0 turns close() into an RST instead of an orderly FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
