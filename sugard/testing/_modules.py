"""The fake SugarCRM's module routes: records, filters, counts, metadata and file fields.

`FakeSugar._dispatch` hands every path it does not serve itself to `handle`, after the API
version check. Each route counts itself in `calls`, sleeps `latency[route]`, reads its
arguments, then passes the same token check as /me and does its work under the fake's lock
(never awaiting while holding it). Shapes and error texts follow Sugar's ModuleApi, FilterApi,
MetadataApi and FileApi.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aiohttp import BodyPartReader, hdrs, web

from sugard.testing import _wire as wire
from sugard.testing._files import CHUNK, StoredFile, write_stream
from sugard.testing._records import MODULE_RE, InvalidParameter, php_query
from sugard.testing._wire import (
    API_VERSION,
    ApiError,
    PresentedToken,
    json_response,
    presented_token,
)

T = TypeVar("T")

if TYPE_CHECKING:
    from sugard.testing._store import AccessToken
    from sugard.testing.fake import FakeSugar

# Route names, as counted in `calls` and keyed in `latency`.
ROUTES: Final = frozenset(
    {"list", "create", "read", "update", "delete", "filter", "count"}
    | {"metadata", "metadata_public", "file_download", "file_upload"}
)
METADATA_SECTIONS: Final = ("server_info", "modules", "full_module_list")
_DOWNLOAD_EXPIRES: Final = 30 * 86400  # Sugar lets browsers keep a download for 30 days


async def handle(site: FakeSugar, request: web.Request, path: str) -> web.StreamResponse | None:
    """Answer a module, metadata or file route; None when the path is none of them."""
    parts = path.split("/")
    method = request.method
    if parts == ["metadata"] and method == "GET":
        return await _metadata(site, request)
    if parts == ["metadata", "public"] and method == "GET":
        return await _public_metadata(site, request)
    if not MODULE_RE.fullmatch(parts[0]):
        return None
    module, rest = parts[0], parts[1:]
    if rest in ([], ["filter"]) and method == "GET":
        return await _list(site, request, module, "filter" if rest else "list")
    if rest == ["filter"] and method == "POST":
        return await _list(site, request, module, "filter")
    if rest == [] and method == "POST":
        return await _create(site, request, module)
    if (rest == ["count"] and method == "GET") or (
        rest == ["filter", "count"] and method in ("GET", "POST")
    ):
        return await _count(site, request, module)
    if len(rest) == 1 and method in ("GET", "PUT", "DELETE"):
        return await _record(site, request, module, rest[0])
    if len(rest) == 3 and rest[1] == "file" and method == "GET":
        return await _download(site, request, module, rest[0], rest[2])
    if len(rest) == 3 and rest[1] == "file" and method in ("POST", "PUT"):
        return await _upload(site, request, module, rest[0], rest[2])
    return None


# ---------------------------------------------------------------- records


async def _as_caller(
    site: FakeSugar, request: web.Request, route: str, query: Callable[[], T]
) -> T:
    """`query()` of the site's data once the request's token is checked for `route`; the
    data's InvalidParameter answers 422, as Sugar's does."""
    presented = await presented_token(request)
    with site._lock, _as_422():
        site._authenticate(presented, request, route)
        return query()


async def _list(site: FakeSugar, request: web.Request, module: str, route: str) -> web.Response:
    await _arrive(site, route)
    args = await _filter_args(request)
    records, next_offset = await _as_caller(
        site, request, route, lambda: site._data.query(module, args)
    )
    return json_response({"next_offset": next_offset, "records": records})


async def _count(site: FakeSugar, request: web.Request, module: str) -> web.Response:
    await _arrive(site, "count")
    args = await _filter_args(request)
    count = await _as_caller(site, request, "count", lambda: site._data.count(module, args))
    return json_response({"record_count": count})


async def _create(site: FakeSugar, request: web.Request, module: str) -> web.Response:
    await _arrive(site, "create")
    values = await _json_object(request)
    record = await _as_caller(site, request, "create", lambda: site._data.create(module, values))
    return json_response(record)


async def _record(
    site: FakeSugar, request: web.Request, module: str, record_id: str
) -> web.Response:
    method = request.method
    route = {"GET": "read", "PUT": "update", "DELETE": "delete"}[method]
    await _arrive(site, route)
    values = await _json_object(request) if method == "PUT" else {}
    presented = await presented_token(request)
    with site._lock:
        site._authenticate(presented, request, route)
        if method == "GET":
            record = site._data.get(module, record_id)
        elif method == "PUT":
            record = site._data.update(module, record_id, values)
        elif site._data.delete(module, record_id):
            site._files.drop_record(module, record_id)
            return json_response({"id": record_id})
        else:
            record = None
    if record is None:
        raise _not_found(module, record_id)
    return json_response(record)


# ---------------------------------------------------------------- metadata


async def _metadata(site: FakeSugar, request: web.Request) -> web.Response:
    """The sections asked for in `type_filter` (all of them without it), and `_hash`."""
    await _arrive(site, "metadata")
    presented = await presented_token(request)
    with site._lock:
        site._authenticate(presented, request, "metadata")
        modules = site._data.modules()
        version = site.sugar_version
    wanted = request.query.get("type_filter") or ",".join(METADATA_SECTIONS)
    sections: dict[str, Any] = {
        "server_info": _server_info(version),
        # Per-module metadata (fields, views) needs vardefs, which the fake does not have.
        "modules": {},
        "full_module_list": _hashed({name: name for name in modules}),
    }
    body = {name: sections[name] for name in wanted.split(",") if name in sections}
    return json_response(_hashed(body))


async def _public_metadata(site: FakeSugar, request: web.Request) -> web.Response:
    """`GET /metadata/public`: what the login page needs, without a token; the version too."""
    await _arrive(site, "metadata_public")
    with site._lock:
        platform = request.query.get("platform")
        if platform:
            site._check_platform(platform)
        version = site.sugar_version
    sections: dict[str, Any] = {
        "server_info": _server_info(version),
        # A minimal config: the site's address and its list size, nothing the fake lacks.
        "config": {"siteUrl": str(request.url.origin()), "maxQueryResult": 20},
    }
    wanted = request.query.get("type_filter") or ",".join(sections)
    body = {name: sections[name] for name in wanted.split(",") if name in sections}
    return json_response(_hashed(body))


def _server_info(version: str) -> dict[str, Any]:
    """The `server_info` metadata section, where Sugar publishes its version."""
    return _hashed(
        {
            "flavor": "ENT",
            "version": full_version(version),
            "build": "1",
            "product_name": "SugarCRM Enterprise",
        }
    )


def full_version(version: str) -> str:
    """ "26.1" as Sugar prints it, "26.1.0"."""
    parts = version.split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


def _hashed(section: dict[str, Any]) -> dict[str, Any]:
    digest = hashlib.md5(json.dumps(section, sort_keys=True).encode(), usedforsecurity=False)
    return section | {"_hash": digest.hexdigest()}


# ---------------------------------------------------------------- file fields


async def _arrived(site: FakeSugar, request: web.Request, route: str) -> PresentedToken:
    """Count the request on `route` (with its latency), then read the token it presents."""
    await _arrive(site, route)
    return await presented_token(request)


async def _download(
    site: FakeSugar, request: web.Request, module: str, record_id: str, field: str
) -> web.StreamResponse:
    presented = await _arrived(site, request, "file_download")
    with site._lock:
        _authenticate_download(site, request, presented)
        if site._data.get(module, record_id) is None:
            raise _not_found(module, record_id)
        stored = site._files.get((module, record_id, field))
        if stored is None:
            raise ApiError(
                404, "not_found", f"The requested file {module} :: {field} could not be found."
            )
        # Opened under the lock: an upload replacing this file right after unlinks it.
        handle = stored.path.open("rb")
    with handle:
        response = web.StreamResponse(
            headers={
                hdrs.CONTENT_TYPE: stored.content_type,
                hdrs.CONTENT_DISPOSITION: f'attachment; filename="{_header_safe(stored.name)}"',
                hdrs.EXPIRES: formatdate(site.clock() + _DOWNLOAD_EXPIRES, usegmt=True),
                "Content-Security-Policy": "script-src 'none'",
            }
        )
        response.content_length = stored.size
        await response.prepare(request)
        while chunk := handle.read(CHUNK):
            await response.write(chunk)
        await response.write_eof()
    return response


async def _upload(
    site: FakeSugar, request: web.Request, module: str, record_id: str, field: str
) -> web.Response:
    """POST takes a multipart form (the file in the part named after the field), PUT a raw body."""
    presented = await _arrived(site, request, "file_upload")
    with site._lock:
        # Unlike PHP, which takes in a whole upload before Sugar runs, the fake checks the
        # token first: it streams the body to disk only for a caller it knows.
        site._authenticate(presented, request, "file_upload")
        # Sugar loads the record before it reads the upload.
        if site._data.get(module, record_id) is None:
            raise _not_found(module, record_id)
        path = site._files.new_path()
    try:
        if request.method == "PUT":
            name = request.query.get("filename") or request.headers.get("Filename")
            content_type: str | None = request.content_type
            size = await write_stream(path, request.content.iter_chunked(CHUNK))
            if size == 0:
                raise ApiError(
                    400, "missing_parameter", "File is missing or no file data was received."
                )
        else:
            name, content_type, size = await _read_multipart(request, field, path)
        stored = StoredFile(
            name=name or str(uuid.uuid4()),
            content_type=content_type or "application/octet-stream",
            size=size,
            path=path,
        )
        with site._lock:
            record = site._data.update(module, record_id, {field: stored.name})
            if record is None:  # deleted while the upload streamed in
                raise _not_found(module, record_id)
            site._files.put((module, record_id, field), stored)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    version = request.get(API_VERSION) or request.match_info["version"]
    uri = f"{request.url.origin()}/rest/{version}/{module}/{record_id}/file/{field}"
    info = {
        "content-type": stored.content_type,
        "content-length": stored.size,
        "name": stored.name,
        "uri": uri,
    }
    return json_response({field: info, "record": record})


async def _read_multipart(
    request: web.Request, field: str, path: Path
) -> tuple[str | None, str | None, int]:
    """Stream the part named `field` into `path`; skip the others, as PHP's $_FILES would."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "missing_parameter", "Attachment is missing")
    reader = await request.multipart()
    found: tuple[str | None, str | None, int] | None = None
    saw_file = False
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or part.filename is None:
            await part.release()
            continue
        saw_file = True
        if part.name != field or found is not None:
            await part.release()
            continue
        size = await write_stream(path, _part_chunks(part))
        found = (part.filename, part.headers.get(hdrs.CONTENT_TYPE), size)
    if found is None:
        message = f"Incorrect field name for attachement: {field}" if saw_file else None
        raise ApiError(400, "missing_parameter", message or "Attachment is missing")
    return found


async def _part_chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


def _authenticate_download(
    site: FakeSugar, request: web.Request, presented: PresentedToken
) -> AccessToken | None:
    """The token header as everywhere, or the session's download token in the query string."""
    if request.headers.get("OAuth-Token") or "download_token" not in request.query:
        return site._authenticate(presented, request, "file_download")[1]
    token = request.query["download_token"]
    now = site.clock()
    session = next((r for r in site._store.refresh.values() if r.download_token == token), None)
    if session is None or session.expires_at < now:
        raise ApiError(401, "invalid_grant", wire.MSG_INVALID_ACCESS)
    site._check_platform(request.query.get("platform") or session.platform)
    # The same site-status checks as _authenticate makes for a token header.
    if "file_download" not in site.status_exempt:
        origin = str(request.url.origin())
        if site.maintenance:
            raise ApiError(503, "maintenance", wire.MSG_MAINTENANCE, url=origin)
        if site.license_error == "expired":
            raise ApiError(503, "admin_only", wire.MSG_LICENSE_EXPIRED, url=origin)
    return None


# ---------------------------------------------------------------- shared


async def _arrive(site: FakeSugar, route: str) -> None:
    """Count the call and wait out its latency. Callers then read the body and only then
    check the token, in Sugar's order (RestService parses the arguments before the login)."""
    with site._lock:
        site._calls[route] += 1
        pause = site.latency.get(route, 0.0)
    if pause > 0:
        await asyncio.sleep(pause)


async def _filter_args(request: web.Request) -> dict[str, Any]:
    """The query string (PHP's reading) overlaid on a JSON body, as Sugar merges them."""
    args: dict[str, Any] = {}
    if request.method == "POST":
        args = await _json_object(request)
    query = php_query(request.query.items())
    args |= query
    raw = query.get("filter")
    if isinstance(raw, str) and raw:
        # `filter` is one of FilterApi's jsonParams: a GET may send it as JSON text.
        try:
            args["filter"] = json.loads(raw)
        except ValueError:
            raise ApiError(422, "invalid_parameter", "The filter is not valid JSON.") from None
    return args


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(422, "invalid_parameter", wire.MSG_BAD_JSON) from None
    if not isinstance(body, Mapping):
        raise ApiError(422, "invalid_parameter", "The request body must be a JSON object.")
    return dict(body)


@contextmanager
def _as_422() -> Iterator[None]:
    """Sugar's SugarApiExceptionInvalidParameter: 422 `invalid_parameter` with its text."""
    try:
        yield
    except InvalidParameter as exc:
        raise ApiError(422, "invalid_parameter", str(exc)) from None


def _not_found(module: str, record_id: str) -> ApiError:
    return ApiError(404, "not_found", f"Could not find record: {record_id} in module: {module}")


def _header_safe(name: str) -> str:
    # Sugar strips line breaks so a file name cannot split the header; quotes would end it.
    return name.replace("\r", "").replace("\n", "").replace('"', "")
