"""The session guards: nothing sent through the proxy may reach Sugar's `oauth2/*` routes, in
any form Sugar (or a front before it) reads as one. docs/proxy.md states the rules; in short:

- the route is read the way Sugar's router reads it: after an optional version segment
  (`v10`, `v11_4`: Sugar takes the version from the Accept header when the path has none), so
  an unversioned `oauth2/...` is an oauth2 route too, whatever the Accept header says; case
  is ignored (sugard cannot rule out a front or a custom route that ignores it);
- a path must read the same to every server on the way: no encoded `/`, `\\` or `%` (a front
  that decodes twice, as Apache's rewrite into `__sugar_url` does, would make another path of
  it), no `;` parameters, no `&` or `+` (the rewrite puts the path into a query string), no
  encoded control characters or spaces;
- `__sugar_url` (Sugar's routing parameter, read from the query and from a form body) is never
  forwarded;
- a bulk request's sub-requests are read from its JSON body (nested bulks too): one aimed at
  `oauth2/*` refuses the whole bulk before anything is sent.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from aiohttp import web

from sugard.proxy.answers import sugar_error

__all__ = [
    "BULK_LIMIT",
    "FORM_LIMIT",
    "Forward",
    "LocalRoute",
    "inspect",
    "route_of",
    "screened",
]

log = logging.getLogger("sugard.proxy")

BULK_LIMIT = 4 * 1024 * 1024  # a bulk body is read whole, to check its sub-requests
FORM_LIMIT = 1024 * 1024  # a form-encoded body is read whole, to check its field names
MAX_BULK_DEPTH = 4  # a bulk inside a bulk inside ...: deeper is refused

# What a path may hold as it is: RFC 3986's unreserved characters and the sub-delimiters no
# server on the way reads as syntax. Refused: `;` (path parameters to Java servers and some
# fronts), `&` and `+` (query syntax once Apache's rewrite puts the path into `__sugar_url`),
# `\\` (a `/` to some servers), anything else a client should have encoded.
_RAW_OK = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$'()*,:@=")
# What an escape (%XX) may stand for: the same characters, and any byte of a UTF-8 sequence.
# Not `/`, `\\`, `%` (a second decoding makes another path of it), `;`, `&`, `+`, `?`, `#`,
# spaces or control characters.
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PATH_OK = _RAW_OK | frozenset("/%")
_PHP_UNDERSCORED = str.maketrans(" .[", "___")
_VERSION = re.compile(r"v\d+(?:_\d+)?", re.IGNORECASE)
# A multipart field whose name starts with __sugar (Sugar's routing parameter).
_MULTIPART_ROUTING = re.compile(rb"name\s*=\s*[\"']?\s*__sugar", re.IGNORECASE)
_MULTIPART_OVERLAP = 64
FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"


@dataclass(frozen=True)
class LocalRoute:
    """An oauth2 route sugard answers itself: `route` is what follows `oauth2/`, lower case."""

    route: str


@dataclass(frozen=True)
class Forward:
    """The request may go to Sugar; `body` is its body if a guard had to read it (a bulk, a
    form), else None (it streams as it comes); `multipart`: screen it while it streams."""

    body: bytes | None = None
    multipart: bool = False


class _Refused(Exception):
    def __init__(self, status: int, label: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.label = label
        self.message = message


def route_of(segments: Iterable[str]) -> list[str]:
    """Sugar's route of a decoded path: without empty segments, a leading `rest` (sub-request
    URLs may carry it) and a version segment."""
    parts = [part for part in segments if part]
    if parts and parts[0].lower() == "rest":
        parts = parts[1:]
    if parts and _VERSION.fullmatch(parts[0]):
        parts = parts[1:]
    return parts


async def inspect(
    request: web.Request, name: str, raw_path: str
) -> web.Response | LocalRoute | Forward:
    """What to do with a proxied request whose Sugar path (after `/rest/`, as the client
    encoded it) is `raw_path`: a refusal (400, 403) answered now, an oauth2 route sugard
    answers itself, or Forward (with the body if it had to be read)."""
    try:
        route = route_of(_decoded_segments(raw_path))
        _check_query(request.rel_url.raw_query_string)
        if route and route[0].lower() == "oauth2":
            return LocalRoute("/".join(route[1:]).lower())
        content_type = request.content_type.lower()
        if route and route[0].lower() == "bulk" and request.body_exists:
            body = await _read_limited(request, BULK_LIMIT, "a bulk request's body")
            if content_type in (FORM, MULTIPART):
                raise _Refused(
                    400,
                    "bad_request",
                    "sugard forwards a bulk request only with a JSON body (Content-Type "
                    "application/json): it reads the sub-requests to keep oauth2 routes out",
                )
            _check_bulk(body, "requests", 1)
            return Forward(body)
        if content_type == FORM and request.body_exists:
            body = await _read_limited(request, FORM_LIMIT, "a form-encoded body")
            _check_query(body.decode("latin-1"), "the form body")
            return Forward(body)
        if content_type == MULTIPART and request.body_exists:
            length = request.content_length
            if length is not None and length <= FORM_LIMIT:
                body = await _read_limited(request, FORM_LIMIT, "a multipart body")
                if _MULTIPART_ROUTING.search(body):
                    raise _routing_refused("the multipart body")
                return Forward(body)
            return Forward(multipart=True)
        return Forward()
    except _Refused as refused:
        log.warning(
            "%s: refused %s %r: %s", name, request.method, request.path[:200], refused.message
        )
        return sugar_error(refused.status, refused.label, refused.message)


async def screened(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A streamed multipart body, cut off (the upstream request then fails unfinished, and
    Sugar runs nothing) if a field names Sugar's routing parameter."""
    tail = b""
    async for chunk in chunks:
        if _MULTIPART_ROUTING.search(tail + chunk):
            log.warning("cut off a multipart upload naming __sugar_url before its end")
            raise _Refused(400, "bad_request", "a multipart field named __sugar_url")
        tail = (tail + chunk)[-_MULTIPART_OVERLAP:]
        yield chunk


def _decoded_segments(raw: str) -> list[str]:
    """The segments of a raw path, each decoded once; _Refused if any part could read as
    something else to a server that decodes again, or to one that splits differently."""
    if not _PATH_OK.issuperset(raw):
        char = next(c for c in raw if c not in _PATH_OK)  # the first, as the client reads it
        raise _Refused(
            400,
            "bad_request",
            f"sugard forwards no path with {char!r} in it: a server or front before Sugar "
            "could read it as another path"
            + ("; encode it as %XX" if char.isprintable() and char not in ";&+\\" else ""),
        )
    if _MALFORMED_ESCAPE.search(raw):
        raise _Refused(400, "bad_request", "sugard forwards no path with a malformed % escape")
    for match in _ESCAPE.finditer(raw):
        byte = int(match.group(1), 16)
        if byte < 0x80 and chr(byte) not in _RAW_OK:
            raise _Refused(
                400,
                "bad_request",
                f"sugard forwards no path with %{match.group(1)} ({_shown(chr(byte))}) in it: "
                "a server or front that decodes the path again would read another path",
            )
    try:
        segments = [
            unquote(part, errors="strict") if "%" in part else part for part in raw.split("/")
        ]
    except UnicodeDecodeError:
        raise _Refused(
            400, "bad_request", "sugard forwards no path whose escapes are not UTF-8"
        ) from None
    if any(part in (".", "..") for part in segments):
        raise _Refused(400, "bad_request", "sugard forwards no path with . or .. in it")
    return segments


def _shown(char: str) -> str:
    names = {"/": "a slash", "\\": "a backslash", "%": "a percent sign", " ": "a space"}
    if char in names:
        return names[char]
    if not char.isprintable():
        return f"control character {ord(char):#04x}"
    return repr(char)


def _check_query(query: str, where: str = "the query") -> None:
    """_Refused if `query` (PHP's parse_str syntax) names Sugar's routing parameter, which
    would replace the path Sugar routes by."""
    for pair in query.split("&"):
        key = pair.split("=", 1)[0]
        if key and _php_name(key).startswith("__sugar"):
            raise _routing_refused(where)


def _php_name(key: str) -> str:
    """A query key as PHP names the variable: decoded, leading spaces gone, spaces, dots and
    `[` made `_`; lower case, since sugard cannot rule out a front that ignores case."""
    try:
        decoded = unquote_to_bytes(key.replace("+", " ")).decode("utf-8", "replace")
    except ValueError:
        decoded = key
    return decoded.lstrip(" ").translate(_PHP_UNDERSCORED).lower()


def _routing_refused(where: str) -> _Refused:
    return _Refused(
        400,
        "bad_request",
        f"sugard forwards no __sugar_url in {where}: Sugar would route the request by it "
        "instead of by its path",
    )


async def _read_limited(request: web.Request, limit: int, what: str) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise _Refused(400, "bad_request", f"{what} is larger than {limit} bytes ({length})")
    parts: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise _Refused(400, "bad_request", f"{what} is larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def _check_bulk(raw: bytes | Any, where: str, depth: int) -> None:
    """_Refused if the bulk body `raw` (bytes, or the decoded data of a nested bulk) holds a
    sub-request aimed at oauth2/*, or one sugard cannot read."""
    if depth > MAX_BULK_DEPTH:
        raise _Refused(400, "bad_request", f"{where}: bulk requests nested too deep")
    data: Any = raw
    if isinstance(raw, bytes | str):
        if not raw.strip():
            return  # no arguments: Sugar answers missing_parameter itself
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise _Refused(
                400, "bad_request", f"{where}: a bulk request's body must be JSON"
            ) from None
    subs = data.get("requests") if isinstance(data, dict) else None
    if isinstance(subs, dict):
        entries: list[tuple[str, Any]] = [(f"{where}[{k!r}]", v) for k, v in subs.items()]
    elif isinstance(subs, list):
        entries = [(f"{where}[{i}]", v) for i, v in enumerate(subs)]
    else:
        return  # nothing Sugar would run: it answers the error itself
    for label, entry in entries:
        if not isinstance(entry, dict):
            raise _Refused(400, "bad_request", f"{label}: a sub-request must be a JSON object")
        url = entry.get("url")
        if url is None or url == "":
            continue  # Sugar refuses the whole bulk before running any sub-request
        if not isinstance(url, str):
            raise _Refused(400, "bad_request", f"{label}: url must be a string")
        method = str(entry.get("method") or "GET")[:20]
        try:
            route = route_of(_decoded_segments(_url_path(url)))
        except _Refused as refused:
            raise _Refused(
                refused.status, refused.label, f"{label} ({url[:100]!r}): {refused.message}"
            ) from None
        # Any segment, not only the route's first: a sub-request's url is read by parse_url,
        # whose corners sugard does not copy.
        if any(part.lower() == "oauth2" for part in route):
            raise _Refused(
                403,
                "not_authorized",
                f"sugard forwards no bulk request with an oauth2 sub-request: {label} is "
                f"{method} {url[:100]!r}; it would end or replace the session every script "
                "shares (sugard answers oauth2/token and oauth2/logout itself: send them alone)",
            )
        if route and route[0].lower() == "bulk":
            _check_bulk(entry.get("data") or b"", f"{label}.data.requests", depth + 1)


def _url_path(url: str) -> str:
    """The path of a sub-request's url as PHP's parse_url reads it: no scheme, host, query or
    fragment."""
    path = re.split(r"[?#]", url, maxsplit=1)[0]
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", path)
    if scheme is not None:
        path = path[scheme.end() :]
    if path.startswith("//"):
        slash = path.find("/", 2)
        path = path[slash:] if slash >= 0 else ""
    return path
