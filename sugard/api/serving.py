"""Serving the socket API: aiohttp's runner with per-uid admission and limits on the Unix
socket, and the TCP site of `metrics_listen`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
    PayloadEncodingError,
)

from sugard.peer import Peer, peer_of_socket, refusal
from sugard.proxy.tcp import AdmittingHandler, raise_open_files_limit
from sugard.wire import http_status

__all__ = [
    "ApiRunner",
    "connection_limits",
    "error",
    "peer_of",
    "raise_open_files_limit",
]

log = logging.getLogger("sugard.api")


# Its log lines are the socket API's to a reader of the journal, as they were before the split.
MAX_LINE = 8190  # the request line, and each header line
MAX_HEADERS = 64
# A connection that sends no complete request for this long is closed; this also bounds how
# long a slowloris client can take over its request line and headers.
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 4096
LISTEN_BACKLOG = 1024  # connections the kernel queues while the loop is busy accepting others
BUSY_LOG_INTERVAL = 10.0
REFUSED_PER_UID = 8  # open connections a refused uid may hold, enough to be told why


def error(code: str, message: str, *, status: int | None = None, **extra: Any) -> web.Response:
    """A JSON error answer of the wire's shape, with the wire's status for `code` unless
    `status` is another (a bad_request that is a 408 or a 413); `retry_after` also sets
    Retry-After."""
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(max(1, math.ceil(extra["retry_after"])))
    return web.json_response(
        {"error": code, "message": message, **extra},
        status=http_status(code) if status is None else status,
        headers=headers,
    )


def peer_of(request: web.Request) -> Peer | None:
    """Who is asking, as the kernel said when the connection was made."""
    handler = request.protocol
    if isinstance(handler, _RequestHandler):
        return handler.peer
    transport = request.transport
    return peer_of_socket(transport.get_extra_info("socket") if transport else None)


def connection_limits(open_files: int, most: int = MAX_CONNECTIONS) -> tuple[int, int]:
    """(connections to hold, listen backlog) that never run the process out of descriptors.

    asyncio accepts up to `backlog` connections per loop iteration, and one turned away still
    holds its descriptor for an iteration or two: held + a few backlogs must stay under the
    limit, with room left for upstream HTTPS, secret commands and the log.
    """
    return max(16, min(most, open_files // 2)), max(8, min(LISTEN_BACKLOG, open_files // 16))


class ApiRunner(web.AppRunner):
    """An AppRunner that serves one listening socket itself (`serve`), admitting connections
    by `admits(peer)` (the daemon-wide access policy) and the connection limit."""

    def __init__(
        self,
        app: web.Application,
        admits: Callable[[Peer], bool],
        *,
        idle_timeout: float | None = None,
        max_connections: int = MAX_CONNECTIONS,
        shutdown_timeout: float = 10.0,
    ) -> None:
        # The HTTP protocol's limits: given to aiohttp's runner, and to each RequestHandler
        # this module makes.
        self._handler_options: dict[str, Any] = {
            "access_log": None,
            "keepalive_timeout": IDLE_TIMEOUT if idle_timeout is None else idle_timeout,
            "max_line_size": MAX_LINE,
            "max_field_size": MAX_LINE,
            "max_headers": MAX_HEADERS,
            "lingering_time": 1.0,
            # Bodies are small JSON: a compressed one is refused as not JSON, never inflated.
            "auto_decompress": False,
        }
        super().__init__(
            app, handle_signals=False, shutdown_timeout=shutdown_timeout, **self._handler_options
        )
        self._admits = admits
        self._max_connections = max_connections
        self._admission: _Admission | None = None
        self._listener: asyncio.AbstractServer | None = None

    async def serve(self, sock: socket.socket) -> None:
        """Accept connections on `sock` (listening already); call after setup()."""
        server = self.server
        assert server is not None, "setup() first"
        open_files = raise_open_files_limit()
        limit, backlog = connection_limits(open_files, self._max_connections)
        log.debug("serving up to %d connections (open files limit %d)", limit, open_files)
        admission = _Admission(self._admits, limit)
        self._admission = admission
        loop = asyncio.get_running_loop()
        options = self._handler_options

        def new_connection() -> _RequestHandler:
            return _RequestHandler(server, admission, loop=loop, **options)

        self._listener = await loop.create_server(new_connection, sock=sock, backlog=backlog)

    async def cleanup(self) -> None:
        """Stop accepting, then let aiohttp finish the open connections (shutdown_timeout)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await super().cleanup()


class _Admission:
    """Which connections are let in: a cap on all, and on those of refused uids."""

    def __init__(self, admits: Callable[[Peer], bool], max_connections: int) -> None:
        self.max_connections = max_connections
        self.open = 0
        self._admits = admits
        self._refused: Counter[int] = Counter()
        self._turned_away = 0
        self._busy_logged_at = -math.inf

    def refusal(self, peer: Peer | None) -> dict[str, Any] | None:
        """Why a new connection is not admitted (an error body), or None to serve it."""
        if self.open >= self.max_connections:
            self._report_busy()
            return {
                "error": "busy",
                "message": f"sugard is serving its maximum of {self.max_connections} "
                "connections; try again in a moment",
                "retry_after": 1,
            }
        if peer is None:
            return {"error": "forbidden", "message": "sugard serves only local peers"}
        if not self._admits(peer) and self._refused[peer.uid] >= REFUSED_PER_UID:
            log.debug("turned away another connection of refused %s", peer.describe())
            return {"error": "forbidden", "message": refusal(peer, None)}
        return None

    def admitted(self, peer: Peer) -> int | None:
        """Count a connection let in; the uid to release later if it is a refused one (let
        in for a few requests, to answer them with the reason and log who asked)."""
        self.open += 1
        if self._admits(peer):
            return None
        self._refused[peer.uid] += 1
        return peer.uid

    def released(self, refused_uid: int | None) -> None:
        self.open -= 1
        if refused_uid is not None:
            self._refused[refused_uid] -= 1
            if self._refused[refused_uid] <= 0:
                del self._refused[refused_uid]

    def _report_busy(self) -> None:
        # Once per interval: an overload must not turn into a flood of log lines.
        self._turned_away += 1
        now = asyncio.get_running_loop().time()
        if now - self._busy_logged_at >= BUSY_LOG_INTERVAL:
            log.warning(
                "at the limit of %d connections: turned %d away since the last report",
                self.max_connections,
                self._turned_away,
            )
            self._busy_logged_at, self._turned_away = now, 0


class _RequestHandler(AdmittingHandler):
    """aiohttp's HTTP protocol, turning away connections that are not admitted, and answering
    requests that cannot be parsed with a JSON error, logging no traceback for them (aiohttp
    would log one per malformed request: a flood, and the bytes may hold a token)."""

    def __init__(
        self, server: web.Server, admission: _Admission, *, loop: Any, **options: Any
    ) -> None:
        super().__init__(server, loop=loop, **options)
        self._admission = admission
        # Read once per connection: the kernel fixes a Unix socket's peer credentials at
        # connect(), and two getsockopt calls per request were ~10% of a token request's CPU.
        self.peer: Peer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.peer = peer_of_socket(transport.get_extra_info("socket"))
        refused = self._admission.refusal(self.peer)
        if refused is None:
            assert self.peer is not None
            refused_uid = self._admission.admitted(self.peer)
            self.admit(transport, lambda: self._admission.released(refused_uid))
            return
        self.turn_away(
            transport,
            http_status(refused["error"]),
            "application/json",
            json.dumps(refused).encode(),
            refused.get("retry_after"),
        )

    def error_answer(self, status: int, exc: BaseException | None) -> web.Response:
        if status >= 500:
            log.error("internal error answering a request", exc_info=exc)
            return error("internal", "internal error in sugard; see its log")
        log.debug("malformed request: %s", type(exc).__name__ if exc else status)
        return error("bad_request", _malformed(exc))


def _malformed(exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):
        return f"malformed HTTP request: request line or header longer than {MAX_LINE} bytes"
    if isinstance(exc, BadHttpMethod):
        return "malformed HTTP request: not an HTTP method (is this client speaking HTTP/1.1?)"
    if isinstance(exc, InvalidHeader):
        return "malformed HTTP request: invalid header"
    if isinstance(exc, PayloadEncodingError):
        return "malformed HTTP request: body does not match Content-Length or Transfer-Encoding"
    if isinstance(exc, HttpProcessingError) and "headers" in (exc.message or "").lower():
        return f"malformed HTTP request: more than {MAX_HEADERS} headers"
    return "malformed HTTP request; send HTTP/1.1, like curl --unix-socket SOCKET http://sugard/v1/health"
