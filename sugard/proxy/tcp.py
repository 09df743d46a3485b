"""Serving on TCP (the proxy's listeners, `metrics_listen`): who connects is read from the
kernel once per connection, and the connections one peer may hold are capped, so that another
user cannot use up the daemon's open files; requests that are not HTTP are answered in the
listener's own error envelope and logged in one line, without their bytes.

The caps are the process's, across every TCP listener, since open files are the process's:

- another uid (or, for a peer whose owner the kernel cannot name, its address) holds at most
  `PER_PEER` connections, or `REFUSED_PER_PEER` where it may not use what the listener serves;
- all of those together leave `reserve` connections of the limit to the daemon's own uid and
  root, who are always served while any descriptor is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web

from sugard.peer import Peer, peer_of_tcp_socket

__all__ = [
    "PER_PEER",
    "REFUSED_PER_PEER",
    "AdmittingHandler",
    "Envelope",
    "TcpCaps",
    "TcpRunner",
    "raise_open_files_limit",
    "response_started",
    "tcp_peer",
]

log = logging.getLogger("sugard.tcp")

PER_PEER = 64  # connections another uid may hold on all TCP listeners together
REFUSED_PER_PEER = 8  # ... where it may not use what it connects to: enough to be told why
MAX_TCP_CONNECTIONS = 4096
LISTEN_BACKLOG = 256
MALFORMED_LOG_INTERVAL = 10.0  # one line per interval however many come: a flood stays short

# (status, label, message) -> the listener's error answer (Sugar's envelope, or the API's).
Envelope = Callable[[int, str, str], web.Response]


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's soft default is 1024);
    returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.debug("cannot raise the open files limit to %d: %s", target, exc)
    return soft


class TcpCaps:
    """The connections held on TCP listeners, by peer (see the module's doc)."""

    def __init__(self, limit: int, owners: frozenset[int]) -> None:
        self.limit = limit
        self.reserve = max(4, limit // 8)
        self.owners = owners
        self.open = 0
        self.foreign = 0
        self._held: Counter[object] = Counter()

    def refusal(
        self, peer: Peer | None, address: str, allowed: bool
    ) -> tuple[int, str, str] | None:
        """Why a new connection is turned away, as (status, label, message); None to admit."""
        if peer is not None and peer.uid in self.owners:
            if self.open >= self.limit:
                return 503, "busy", f"sugard holds its maximum of {self.limit} TCP connections"
            return None
        key, who = _key(peer, address)
        cap = PER_PEER if allowed else REFUSED_PER_PEER
        if self._held[key] >= cap:
            if not allowed:
                return 403, "forbidden", f"{who} may not use this listener"
            return 503, "busy", f"{who} holds its maximum of {cap} connections to sugard"
        if self.open >= self.limit - self.reserve:
            return 503, "busy", "sugard holds its maximum of TCP connections for other users"
        return None

    def admitted(self, peer: Peer | None, address: str) -> object | None:
        """Count a connection let in; what to hand `released` when it closes."""
        self.open += 1
        if peer is not None and peer.uid in self.owners:
            return None
        key, _ = _key(peer, address)
        self._held[key] += 1
        self.foreign += 1
        return key

    def released(self, key: object | None) -> None:
        self.open -= 1
        if key is None:
            return
        self.foreign -= 1
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]

    def held(self, peer: Peer | None, address: str = "") -> int:
        """Connections `peer` holds now (for tests and the debug log)."""
        return self._held[_key(peer, address)[0]]


def _key(peer: Peer | None, address: str) -> tuple[object, str]:
    if peer is not None:
        return ("uid", peer.uid), f"uid {peer.uid}"
    return ("address", address), f"a peer at {address or 'an unknown address'}"


_caps: TcpCaps | None = None


def caps() -> TcpCaps:
    """The process's caps, sized by its open files limit (raised first)."""
    global _caps  # one per process: the open files limit is the process's
    if _caps is None:
        limit = max(16, min(MAX_TCP_CONNECTIONS, raise_open_files_limit() // 4))
        _caps = TcpCaps(limit, frozenset({os.getuid(), 0}))
    return _caps


def tcp_peer(request: web.Request) -> Peer | None:
    """Who is at the other end of `request`'s connection, as the kernel said at connect."""
    protocol = request.protocol
    return protocol.peer if isinstance(protocol, _TcpHandler) else None


class TcpRunner(web.AppRunner):
    """An AppRunner serving `app` on one TCP address (`start`), admitting connections by the
    process's caps; `admits(peer)` says whether the peer may use what is served (a refused
    one gets the smaller cap), `envelope` words the errors, `name` names it in the log."""

    def __init__(
        self,
        app: web.Application,
        *,
        name: str,
        admits: Callable[[Peer | None], bool],
        envelope: Envelope,
        idle_timeout: float,
        max_line: int,
        max_headers: int,
        shutdown_timeout: float,
    ) -> None:
        self._options: dict[str, Any] = {
            "access_log": None,
            "keepalive_timeout": idle_timeout,
            "max_line_size": max_line,
            "max_field_size": max_line,
            "max_headers": max_headers,
            "lingering_time": 1.0,
            "auto_decompress": False,
        }
        super().__init__(
            app, handle_signals=False, shutdown_timeout=shutdown_timeout, **self._options
        )
        self.name = name
        self._admits = admits
        self._envelope = envelope
        self._listening: asyncio.AbstractServer | None = None
        self._malformed = _MalformedLog(name)

    async def start(self, host: str | None, port: int) -> list[tuple[str, int]]:
        """Listen on (host, port); the addresses bound. OSError (in use, not local) with
        nothing left open."""
        server = self.server
        assert server is not None, "setup() first"
        caps_now = caps()
        loop = asyncio.get_running_loop()
        options, admits, envelope = self._options, self._admits, self._envelope
        malformed = self._malformed

        def new_connection() -> _TcpHandler:
            return _TcpHandler(server, caps_now, admits, envelope, malformed, loop=loop, **options)

        self._listening = await loop.create_server(
            new_connection, host or None, port, reuse_address=True, backlog=LISTEN_BACKLOG
        )
        return [sock.getsockname()[:2] for sock in self._listening.sockets]

    async def cleanup(self) -> None:
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        await super().cleanup()


class _MalformedLog:
    """One line per interval for requests that are not HTTP, with how many came since."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._since = 0
        self._logged_at = -MALFORMED_LOG_INTERVAL

    def report(self, peer: Peer | None, what: str) -> None:
        self._since += 1
        now = asyncio.get_running_loop().time()
        if now - self._logged_at < MALFORMED_LOG_INTERVAL:
            return
        who = f"uid {peer.uid}" if peer is not None else "a peer whose owner is unknown"
        more = f" (and {self._since - 1} more since the last report)" if self._since > 1 else ""
        # The class of the error, never its text: aiohttp's quotes the bytes it choked on.
        log.warning("%s: malformed HTTP request from %s (%s)%s", self.name, who, what, more)
        self._logged_at, self._since = now, 0


def response_started(request: web.BaseRequest) -> bool:
    """Whether bytes of a response went out already (then no error answer can follow).

    aiohttp has no public way to ask this: its own handle_error reads the payload writer's
    `output_size`, and so does this, alone (tests/unit/api/test_serving.py pins it)."""
    return request.writer.output_size > 0


class AdmittingHandler(web.RequestHandler):
    """aiohttp's HTTP protocol for a listener that turns connections away. A subclass's
    connection_made either `admit`s the connection (with what to release when it closes) or
    `turn_away`s it; requests that cannot be parsed get the subclass's `error_answer`."""

    def __init__(self, server: web.Server, *, loop: Any, **options: Any) -> None:
        super().__init__(server, loop=loop, **options)
        self._release: Callable[[], None] | None = None

    def admit(self, transport: asyncio.BaseTransport, release: Callable[[], None]) -> None:
        """Serve the connection; `release` runs once when it closes."""
        self._release = release
        super().connection_made(transport)

    @staticmethod
    def turn_away(
        transport: asyncio.BaseTransport,
        status: int,
        content_type: str,
        body: bytes,
        retry_after: object | None = None,
    ) -> None:
        """Answer `status` with `body` and close, before aiohttp sets the connection up: a
        turned-away connection holds its descriptor for as short a time as possible."""
        retry = f"Retry-After: {retry_after}\r\n" if retry_after is not None else ""
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: {content_type}; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{retry}Connection: close\r\n\r\n"
        )
        assert isinstance(transport, asyncio.Transport)
        with contextlib.suppress(OSError, RuntimeError):
            transport.write(head.encode() + body)
        transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if response_started(request):  # as aiohttp's own: no answer can follow
            raise ConnectionError("response already started; closing the connection")
        answer = self.error_answer(status, exc)
        answer.force_close()
        return answer

    def error_answer(self, status: int, exc: BaseException | None) -> web.Response:
        """The answer to a request that failed with `status` before a response began: 500
        for an error of the daemon's, else a request that cannot be parsed."""
        raise NotImplementedError


class _TcpHandler(AdmittingHandler):
    """aiohttp's HTTP protocol, turning away connections over the caps at once, and
    answering requests that cannot be parsed in the listener's envelope."""

    def __init__(
        self,
        server: web.Server,
        caps: TcpCaps,
        admits: Callable[[Peer | None], bool],
        envelope: Envelope,
        malformed: _MalformedLog,
        *,
        loop: Any,
        **options: Any,
    ) -> None:
        super().__init__(server, loop=loop, **options)
        self._caps = caps
        self._admits = admits
        self._envelope = envelope
        self._malformed = malformed
        self.peer: Peer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        self.peer = peer_of_tcp_socket(sock)
        address = _host(transport.get_extra_info("peername"))
        allowed = self._admits(self.peer)
        refused = self._caps.refusal(self.peer, address, allowed)
        if refused is None:
            held = self._caps.admitted(self.peer, address)
            self.admit(transport, lambda: self._caps.released(held))
            return
        status, label, message = refused
        log.debug("turned away a TCP connection: %s", message)
        answer = self._envelope(status, label, message)
        body = answer.body if isinstance(answer.body, bytes) else b""
        self.turn_away(transport, status, answer.content_type, body, 1 if status == 503 else None)

    def error_answer(self, status: int, exc: BaseException | None) -> web.Response:
        if status >= 500:
            log.error("%s: internal error answering a request", self._malformed.name, exc_info=exc)
            return self._envelope(500, "internal", "internal error in sugard; see its log")
        what = type(exc).__name__ if exc is not None else f"HTTP {status}"
        self._malformed.report(self.peer, what)
        return self._envelope(400, "bad_request", "malformed HTTP request; send HTTP/1.1")


def _host(peername: Any) -> str:
    if isinstance(peername, tuple) and peername:
        return str(peername[0])
    return ""
