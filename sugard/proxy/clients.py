"""Who called: the proxy's requests per client process, so that with one session serving every
script the operator can still ask which one sent what (`sugarctl clients NAME`).

A client is a process: its uid and pid, from the kernel (`SO_PEERCRED` on the socket; on the
listener, the owner of the peer's TCP socket and the process holding it, found by the socket's
inode in /proc). The book is bounded: the last `WINDOW` seconds, at most `MAX_CLIENTS` per
instance, the least recently seen dropped first. Never a metric label: pids come and go.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from sugard.peer import process_name, tcp_peer_owner

__all__ = [
    "MAX_CLIENTS",
    "WINDOW",
    "Caller",
    "ClientBook",
    "caller_of",
    "clients_answer",
    "unknown_instance",
]

WINDOW = 15 * 60.0  # seconds a client is remembered after its last request
MAX_CLIENTS = 1000  # per instance
MAX_COMMAND = 200  # characters of a command line kept
UNKNOWN_PID = 0


@dataclass(frozen=True)
class Caller:
    """A client process; `pid` 0 when the kernel named none (its requests are then one client
    per uid)."""

    uid: int
    pid: int


@dataclass
class _Account:
    command: str
    first_seen: float
    last_seen: float
    requests: int = 0
    errors: int = 0
    bytes: int = 0
    queued_seconds: float = 0.0
    last_path: str = ""


class ClientBook:
    """Per instance, per client process: requests, errors (no answer, or 4xx/5xx), bytes of
    the bodies both ways, seconds queued by the governor, the last path (never the query)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._books: dict[str, OrderedDict[Caller, _Account]] = {}

    def record(
        self,
        instance: str,
        caller: Caller,
        status: int | None,
        size: int,
        queued: float,
        path: str,
    ) -> None:
        now = self._clock()
        book = self._books.setdefault(instance, OrderedDict())
        account = book.get(caller)
        if account is None:
            account = book[caller] = _Account(_command(caller.pid), now, now)
        book.move_to_end(caller)
        account.last_seen = now
        account.requests += 1
        account.errors += status is None or status >= 400
        account.bytes += size
        account.queued_seconds += queued
        account.last_path = path[:200]
        self._prune(book, now)

    def clients(self, instance: str) -> list[dict[str, Any]]:
        """The clients of `instance` seen in the last WINDOW seconds, most recent first."""
        book = self._books.get(instance)
        if book is None:
            return []
        self._prune(book, self._clock())
        return [
            {
                "uid": caller.uid,
                "pid": caller.pid,
                "command": account.command,
                "first_seen": account.first_seen,
                "last_seen": account.last_seen,
                "requests": account.requests,
                "errors": account.errors,
                "bytes": account.bytes,
                "queued_seconds": round(account.queued_seconds, 3),
                "last_path": account.last_path,
            }
            for caller, account in reversed(book.items())
        ]

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the books of instances not in `keep` (after a reload removed them)."""
        kept = set(keep)
        for name in list(self._books):
            if name not in kept:
                del self._books[name]

    @staticmethod
    def _prune(book: OrderedDict[Caller, _Account], now: float) -> None:
        while book:
            oldest = next(iter(book.values()))
            if len(book) <= MAX_CLIENTS and oldest.last_seen >= now - WINDOW:
                break
            book.popitem(last=False)


def _command(pid: int) -> str:
    """The process's command line from /proc (its name in brackets if that is all that can be
    read), "?" when it is gone or unknown."""
    if pid <= UNKNOWN_PID:
        return "?"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4 * MAX_COMMAND)
        if raw:
            words = raw.rstrip(b"\0").split(b"\0")
            return " ".join(w.decode("utf-8", "replace") for w in words)[:MAX_COMMAND]
    except OSError:
        pass
    return process_name(pid)


class _Books(Protocol):
    @property
    def clients(self) -> ClientBook: ...


class _Keepers(Protocol):
    @property
    def keepers(self) -> Mapping[str, Any]: ...


def unknown_instance(name: str, keepers: Mapping[str, Any]) -> web.Response | None:
    """The socket API's 404 for an instance not among `keepers`; None for a known one."""
    if name in keepers:
        return None
    names = ", ".join(sorted(keepers)) or "none"
    return web.json_response(
        {"error": "unknown_instance", "message": f"no instance {name!r}; configured: {names}"},
        status=404,
    )


def clients_answer(
    registry: _Keepers, books: _Books
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`GET /v1/instances/{name}/clients`: the instance's clients, times in RFC 3339 UTC."""

    async def clients(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        unknown = unknown_instance(name, registry.keepers)
        if unknown is not None:
            return unknown
        shown = [
            {
                **row,
                "first_seen": _rfc3339(row["first_seen"]),
                "last_seen": _rfc3339(row["last_seen"]),
            }
            for row in books.clients.clients(name)
        ]
        return web.json_response({"instance": name, "clients": shown})

    return clients


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# A connection's caller is looked up once: a TCP peer's process does not change.
_callers: weakref.WeakKeyDictionary[Any, Caller] = weakref.WeakKeyDictionary()


async def caller_of(request: web.Request, peer: Any) -> Caller:
    """The process that sent `request`: the Unix socket peer's pid, or the process holding the
    loopback TCP peer's socket (looked up in a thread, once per connection)."""
    uid = getattr(peer, "uid", -1)
    pid = getattr(peer, "pid", UNKNOWN_PID)
    if pid != UNKNOWN_PID or request.transport is None:
        return Caller(uid, pid)
    transport = request.transport
    known = _callers.get(transport)
    if known is None:
        sock = transport.get_extra_info("socket")
        found = await asyncio.to_thread(_tcp_pid, sock, uid)
        known = _callers[transport] = Caller(uid, found)
    return known


def _tcp_pid(sock: Any, uid: int) -> int:
    """The pid of the process holding the other end of loopback TCP connection `sock` (one
    of `uid`'s processes whose fds this process may read); UNKNOWN_PID if none is found."""
    try:
        owner = tcp_peer_owner(sock.getsockname(), sock.getpeername())
    except OSError:
        return UNKNOWN_PID
    if owner is None:
        return UNKNOWN_PID
    target = f"socket:[{owner.inode}]"
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return UNKNOWN_PID
    for name in pids:
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") == target:
                    return int(name)
            except OSError:
                continue
    return UNKNOWN_PID
