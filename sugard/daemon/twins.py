"""One daemon per Sugar session on a host: Sugar keeps one session per user and platform, so
two daemons logging in as the same url, user and platform (a second `sugard run` on another
socket, or one started from cron or `su` without `$XDG_RUNTIME_DIR`) would log each other out
at every renewal, each still saying `ready`.

Why an abstract Unix socket, named by a hash of the uid, url, username and platform, and not a
lock file: a file would have to be in a place every such daemon sees, and there is none that
does not depend on the environment (`$XDG_RUNTIME_DIR` differs or is unset, and the systemd
unit's `PrivateTmp=` gives it a /tmp of its own), while abstract names are one namespace per
network namespace, which the unit shares with the user's shells and cron. The kernel drops the
name when the process dies, however it dies, so a crash never leaves a stale lock. Whoever
holds a name answers a connection with its pid and socket, so the refusal can point at it.

Abstract names carry no permissions: another user could take a name first. A name held by
another uid is therefore not obeyed (it would only let them keep our sugard from starting);
sugard logs it and goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from sugard.config import InstanceConfig, session_identity
from sugard.errors import SocketError

__all__ = ["SessionLocks", "lock_name"]

log = logging.getLogger("sugard.daemon")

PEERCRED = b"iII"  # struct ucred: pid, uid, gid


# Daemons with different values count as on different hosts: for a benchmark or a test that
# plays several hosts on one machine (bench/bench_fleet.py), never for real use.
HOST_SCOPE = "SUGARD_HOST_SCOPE"


def lock_name(instance: InstanceConfig, uid: int) -> bytes | None:
    """The abstract socket name of `instance`'s session for `uid`; None if it has none."""
    identity = session_identity(instance.url, instance.username, instance.platform)
    if identity is None:
        return None
    scope = os.environ.get(HOST_SCOPE, "")
    digest = hashlib.sha256("\0".join((str(uid), scope, *identity)).encode()).hexdigest()[:40]
    return b"\0sugard-session-" + digest.encode()


class _Tell(asyncio.Protocol):
    """Answers whoever connects to a held name with "PID SOCKET", then hangs up."""

    def __init__(self, line: bytes) -> None:
        self._line = line

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self._line)
        transport.close()


class SessionLocks:
    """The names of the sessions this daemon's instances keep (fleet instances excepted:
    there the fleet decides who logs in)."""

    def __init__(self, socket_path: Path) -> None:
        self._line = f"{os.getpid()} {socket_path}\n".encode()
        self._held: dict[bytes, asyncio.AbstractServer] = {}

    async def hold(self, instances: Iterable[InstanceConfig], fleet: bool) -> None:
        """Hold the name of each instance's session; SocketError naming the daemon that holds
        one already (and none of the names taken by this call kept)."""
        taken: list[bytes] = []
        try:
            for instance in instances:
                name = lock_name(instance, os.getuid())
                if name is None or name in self._held or (fleet and instance.fleet):
                    continue
                server = await self._bind(name, instance)
                if server is not None:
                    self._held[name] = server
                    taken.append(name)
        except BaseException:
            for name in taken:
                self._held.pop(name).close()
            raise

    def release_except(self, instances: Iterable[InstanceConfig]) -> None:
        """Give up the names of sessions none of `instances` keeps."""
        keep = {lock_name(i, os.getuid()) for i in instances}
        for name in [n for n in self._held if n not in keep]:
            self._held.pop(name).close()

    def release_all(self) -> None:
        self.release_except(())

    async def _bind(self, name: bytes, instance: InstanceConfig) -> asyncio.AbstractServer | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(name)
        except OSError:
            sock.close()
            self._refuse(name, instance)
            return None
        sock.listen(8)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        return await loop.create_unix_server(lambda: _Tell(self._line), sock=sock)

    def _refuse(self, name: bytes, instance: InstanceConfig) -> None:
        """SocketError naming the daemon of our uid that holds `name`; a warning (and no
        refusal) if another uid holds it."""
        pid, uid, said = _holder(name)
        if uid is not None and uid not in (os.getuid(), 0):
            log.warning(
                "%s: the lock of its session is held by uid %s, not by a sugard of ours; "
                "going on without it",
                instance.name,
                uid,
            )
            return
        holder_pid, _, holder_socket = said.partition(" ")
        pid_text = holder_pid if holder_pid.isdigit() else (str(pid) if pid else "?")
        where = holder_socket or "its socket"
        raise SocketError(
            f"another sugard (pid {pid_text}, socket {where}) already keeps the session of "
            f"{instance.name!r} ({instance.username} at {instance.url}, platform "
            f"{instance.platform}); two would log each other out at every renewal. Use that "
            f"one: sugarctl --socket {where} token {instance.name} (or "
            f"SUGARD_SOCKET={where}); or stop it first"
        )


def _holder(name: bytes) -> tuple[int | None, int | None, str]:
    """(pid, uid, what it said) of whoever holds `name`; Nones and "" as far as unknown."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    with probe:
        try:
            probe.connect(name)
        except OSError:
            return None, None, ""
        import struct

        pid, uid, _ = struct.unpack(
            PEERCRED,
            probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(PEERCRED)),
        )
        said = b""
        with contextlib.suppress(OSError):
            while len(said) < 4096 and (chunk := probe.recv(4096)):
                said += chunk
        return pid, uid, said.decode(errors="replace").strip()
