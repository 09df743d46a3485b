"""The daemon's Unix socket: a private directory, a lock against a second daemon, a stale
socket from a crash probed and replaced, bound 0600 from birth; or the one socket activation
passed in, checked and adopted."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Sequence
from pathlib import Path

from sugard.daemon.systemd import ListenFd
from sugard.errors import SocketError
from sugard.wire import SOCKET_PATH_MAX

__all__ = [
    "SocketLock",
    "adopt_socket",
    "check_socket_dir",
    "check_socket_path",
    "prepare_socket",
]

log = logging.getLogger("sugard.daemon.sockets")


def check_socket_dir(directory: Path) -> None:
    """Create the socket's directory 0700, or refuse one that others could get into."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SocketError(f"cannot create socket directory {directory}: {exc.strerror}") from None
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise SocketError(f"{directory} is not a directory")
    if st.st_uid != os.getuid():
        raise SocketError(
            f"socket directory {directory} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.getuid()}); choose another --socket"
        )
    if st.st_mode & 0o077:
        raise SocketError(
            f"socket directory {directory} is open to others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 700 {directory}"
        )


class SocketLock:
    """`<socket>.lock`, held with flock(2) for the daemon's life.

    The stale-socket probe alone cannot tell a crashed daemon's socket from one that a daemon
    starting at the same moment has bound but not yet listens on; whoever holds the lock is
    the only one allowed to probe, remove and bind. The kernel drops the lock when the process
    dies, however it dies, so a crash never leaves a stale lock behind.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, socket_path: Path) -> None:
        while True:
            try:
                fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
                )
            except OSError as exc:
                raise SocketError(f"cannot open lock file {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"sugard (pid {holder})" if holder else "sugard"
                raise SocketError(
                    f"another {who} is already running on {socket_path}; use it "
                    f"(sugarctl --socket {socket_path} ...), or stop it first"
                ) from None
            # The previous holder unlinks the file as it exits: a lock on that unlinked file
            # would exclude nobody, so make sure ours is the one at the path.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def check_socket_path(path: Path) -> None:
    size = len(os.fsencode(path))
    if size > SOCKET_PATH_MAX:
        raise SocketError(
            f"socket path {path} is {size} bytes; Unix sockets allow at most "
            f"{SOCKET_PATH_MAX}: choose a shorter --socket"
        )


def prepare_socket(path: Path) -> tuple[socket.socket, SocketLock]:
    """A listening Unix socket at `path`, mode 0600 from birth, in a private directory, and
    the lock that makes it ours.

    A socket file left by a crashed daemon is removed; a live daemon there is not disturbed.
    """
    check_socket_path(path)
    check_socket_dir(path.parent)
    lock = SocketLock(path.with_name(path.name + ".lock"))
    lock.acquire(path)
    try:
        return _bind(path), lock
    except BaseException:
        lock.release()
        raise


def _bind(path: Path) -> socket.socket:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketError(f"{path} exists and is not a socket; remove it or choose another")
        if _answers(path):
            raise SocketError(
                f"something already answers on {path} (a sugard without a lock file?); "
                "stop it first"
            )
        log.info("removing stale socket %s", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: no window where others could connect
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.listen(512)
    sock.setblocking(False)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def adopt_socket(passed: Sequence[ListenFd]) -> socket.socket:
    """The one listening Unix stream socket that socket activation passed in.

    Only a Unix socket will do: the API decides who may ask from the peer's credentials,
    which other families do not carry.
    """
    described = ", ".join(f"fd {p.sock.fileno()} ({p.name})" for p in passed)
    if len(passed) != 1:
        raise SocketError(
            f"systemd passed {len(passed)} sockets ({described}); sugard listens on exactly "
            "one: keep a single ListenStream= in sugard.socket"
        )
    sock = passed[0].sock
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise SocketError(
            f"systemd passed {described}, which is not a Unix stream socket; sugard needs "
            "ListenStream=%t/sugard/sugard.sock (a path) in sugard.socket"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise SocketError(
            f"systemd passed {described}, which is not listening; sugard.socket must not "
            "set Accept=yes"
        )
    sock.setblocking(False)
    return sock
