"""systemd integration without libsystemd: sd_notify, socket activation, the watchdog, and
logging that journald understands.

Everything here is the documented wire protocol, in the standard library:

- sd_notify(3): newline-separated `KEY=VALUE` lines in one datagram to `$NOTIFY_SOCKET`
  (a path, or `@name` for the abstract namespace).
- sd_listen_fds(3): `$LISTEN_PID` is our pid, `$LISTEN_FDS` descriptors start at 3,
  `$LISTEN_FDNAMES` names them, colon-separated.
- sd_watchdog_enabled(3): `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, if set, is our pid); systemd
  wants `WATCHDOG=1` at least that often, sd_watchdog_enabled(3) advises every half of it.
- `$JOURNAL_STREAM` is `dev:inode` of the stream systemd connected to stderr; a line starting
  `<N>` carries syslog priority N.
- the file descriptor store (sd_pid_notify_with_fds(3)): `FDSTORE=1` and `FDNAME=` with the fd
  in SCM_RIGHTS hands a descriptor to the service manager, which keeps it across a restart
  (`FileDescriptorStoreMax=`) and passes it back in `$LISTEN_FDS`, named in `$LISTEN_FDNAMES`;
  `FDSTOREREMOVE=1` drops it. What sugard stores is a sealed memfd (never a file on disk), named
  with STORE_PREFIX, which is how it is told apart from the sockets at start.

As libsystemd does with `unset_environment`, the variables are removed once read, so that
children (a `password_command`) never think they are the service.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import select
import socket
import stat
import sys
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

from sugard.text import one_line

__all__ = [
    "STORE_PREFIX",
    "JournalFormatter",
    "ListenFd",
    "Notifier",
    "PassedFds",
    "listen_fds",
    "passed_fds",
    "read_memfd",
    "sealed_memfd",
    "setup_logging",
    "started_by_systemd",
    "stderr_is_journal",
]

log = logging.getLogger("sugard.daemon.systemd")

SD_LISTEN_FDS_START = 3
STORE_PREFIX = "store."  # FDNAME of what sugard keeps in the fd store; sockets never have it
FDNAME_MAX = 255
BARRIER_TIMEOUT = 5.0  # seconds to wait for the manager to have read what we sent
# Sealed for good: nobody, not even a process that gets the fd, can change or reseal it.
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class Notifier:
    """Sends sd_notify messages; a no-op when systemd did not ask for them."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self._address = address
        # systemd asks for a ping at least every WATCHDOG_USEC; sd_watchdog_enabled(3) advises
        # every half of it, which leaves room for one late iteration of the loop.
        self.watchdog_interval = watchdog_usec / 2_000_000 if address and watchdog_usec else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for in the environment, which it then cleans."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None) or None
        usec_text = env.pop("WATCHDOG_USEC", None)
        pid_text = env.pop("WATCHDOG_PID", None)
        usec: int | None = None
        try:
            if usec_text and (not pid_text or int(pid_text) == os.getpid()):
                usec = int(usec_text)
        except ValueError:
            log.warning(
                "ignoring WATCHDOG_USEC=%r, WATCHDOG_PID=%r: not numbers", usec_text, pid_text
            )
        if usec is not None and usec <= 0:
            usec = None
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str, fds: Sequence[int] = ()) -> bool:
        """Send `KEY=VALUE` lines (and `fds`, as SCM_RIGHTS) in one datagram; False if
        systemd did not get them."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        address = self._address
        target: str | bytes = "\0" + address[1:] if address.startswith("@") else address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never block the event loop on a full receive queue: a lost message is
                # better than a stalled daemon (systemd reads its queue promptly anyway).
                self._sock.setblocking(False)
            if fds:
                # Not socket.send_fds: up to Python 3.12 it drops its `address` argument.
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
                self._sock.sendmsg([message], [rights], 0, target)
            else:
                self._sock.sendto(message, target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", address, exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={one_line(status)}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one (systemd >= 253).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={one_line(status)}")

    def store_fd(self, name: str, fd: int) -> bool:
        """Hand `fd` to the service manager's fd store as STORE_PREFIX + `name`; it comes
        back in `passed_fds().stored[name]` after a restart. systemd keeps every fd it is
        sent, so replace one by `remove_fd(name)` first."""
        return self.notify("FDSTORE=1", f"FDNAME={_fdname(name)}", fds=[fd])

    def remove_fd(self, name: str) -> bool:
        """Drop what the fd store holds under `name` (every fd of that name)."""
        return self.notify("FDSTOREREMOVE=1", f"FDNAME={_fdname(name)}")

    def barrier(self, timeout: float = BARRIER_TIMEOUT) -> bool:
        """Wait until the manager has read every message sent before (sd_notify_barrier(3):
        `BARRIER=1` with a pipe's write end, which it closes once there); False if it did not
        within `timeout`. Blocking, for the last messages before exit: systemd may no longer
        take fds from a process that has already gone."""
        if self._address is None:
            return False
        done, signal_end = os.pipe2(os.O_CLOEXEC)
        try:
            sent = self.notify("BARRIER=1", fds=[signal_end])
            os.close(signal_end)
            signal_end = -1
            if not sent:
                return False
            poller = select.poll()
            poller.register(done, select.POLLHUP)  # once every copy of the write end is closed
            return bool(poller.poll(timeout * 1000))
        finally:
            os.close(done)
            if signal_end >= 0:
                os.close(signal_end)

    async def watchdog(self) -> None:
        """Ping the watchdog from the event loop until cancelled: if the loop hangs, the pings
        stop and systemd restarts the service."""
        interval = self.watchdog_interval
        if interval is None:
            return
        log.debug("systemd watchdog: pinging every %.1f s", interval)
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _fdname(name: str) -> str:
    """STORE_PREFIX + `name`, as systemd accepts it (fdname_is_valid): printable ASCII, no
    `:` (LISTEN_FDNAMES is colon-separated), at most 255 characters."""
    full = STORE_PREFIX + name
    if len(full) > FDNAME_MAX or not all(" " < c <= "~" and c != ":" for c in full):
        raise ValueError(
            f"fd store name {name!r}: use printable ASCII without ':' or spaces, at most "
            f"{FDNAME_MAX - len(STORE_PREFIX)} characters"
        )
    return full


def sealed_memfd(name: str, data: bytes) -> int:
    """A memfd (anonymous memory, never a file on disk) holding `data`, mode 0600, sealed
    against any change; close-on-exec. The caller owns (and closes) the fd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_memfd(fd: int) -> bytes:
    """The content of a memfd made by `sealed_memfd`; ValueError (one line) for anything
    else: a stored fd that is not sealed could have been changed after it was written."""
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise ValueError(f"fd {fd} is not a sealed memfd: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode) or seals & SEALS != SEALS:
        raise ValueError(f"fd {fd} is not a sealed memfd (seals {seals:#x})")
    chunks = []
    offset = 0
    while offset < st.st_size:
        chunk = os.pread(fd, st.st_size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class ListenFd:
    """A socket that systemd (or systemd-socket-activate) passed in."""

    sock: socket.socket
    name: str


@dataclass(frozen=True)
class PassedFds:
    """What systemd passed in: the sockets of socket activation, and what the fd store kept
    for us (name without STORE_PREFIX -> fd; the caller owns and closes those fds)."""

    sockets: list[ListenFd] = field(default_factory=list)
    stored: dict[str, int] = field(default_factory=dict)


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[ListenFd]:
    """The sockets passed by socket activation, or [] if none were passed to this process;
    fds from the fd store are closed (`passed_fds` keeps them).

    Raises ValueError, with a one-line message, if the variables are malformed.
    """
    passed = passed_fds(environ)
    for fd in passed.stored.values():
        os.close(fd)
    return passed.sockets


def passed_fds(environ: MutableMapping[str, str] | None = None) -> PassedFds:
    """The descriptors systemd passed to this process, sockets told from stored fds by name
    (STORE_PREFIX). Raises ValueError, with a one-line message, if the variables are malformed.
    """
    env = os.environ if environ is None else environ
    pid_text = env.pop("LISTEN_PID", None)
    fds_text = env.pop("LISTEN_FDS", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if not pid_text or not fds_text:
        return PassedFds()
    try:
        pid, count = int(pid_text), int(fds_text)
    except ValueError:
        raise ValueError(
            f"LISTEN_PID={pid_text!r} and LISTEN_FDS={fds_text!r} must be numbers"
        ) from None
    if pid != os.getpid():
        # Inherited from a parent that was activated: not ours to take.
        return PassedFds()
    if count < 0:
        raise ValueError(f"LISTEN_FDS={count} must not be negative")
    names = names_text.split(":") if names_text else []
    passed = PassedFds()
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        if name.startswith(STORE_PREFIX):
            os.set_inheritable(fd, False)
            key = name[len(STORE_PREFIX) :]
            if key in passed.stored:
                # The store keeps every fd sent under a name; the last one passed wins.
                log.warning("fd store passed %s twice; using the later one", name)
                os.close(passed.stored[key])
            passed.stored[key] = fd
            continue
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(
                f"LISTEN_FDS passed fd {fd} ({name}), which is not a socket: {exc.strerror or exc}"
            ) from None
        passed.sockets.append(ListenFd(sock, name))
    return passed


def started_by_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """systemd runs this process as a unit: it sets INVOCATION_ID for every unit, and (from
    systemd 248) SYSTEMD_EXEC_PID to the pid it started. A shell started from a service (some
    terminals are services) inherits both, with another process's pid: not run by systemd."""
    env = os.environ if environ is None else environ
    if not env.get("INVOCATION_ID"):
        return False
    exec_pid = env.get("SYSTEMD_EXEC_PID")
    return exec_pid is None or exec_pid == str(os.getpid())


# Logging

# syslog priorities, as journald reads them from a `<N>` prefix
PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def stderr_is_journal(environ: MutableMapping[str, str] | None = None) -> bool:
    """systemd sets JOURNAL_STREAM=dev:inode of the stream it connected; compare with stderr
    (a shell started from the service inherits the variable, not the stream)."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalFormatter(logging.Formatter):
    """`<N>` on every line: journald stores each line as its own entry, so a traceback's
    continuation lines need the priority too."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{PRIORITY.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging(level: str) -> None:
    """Log to stderr: plain lines with the time on a terminal, priority prefixes and no time
    for journald (it adds its own, and `journalctl -p` filters on the prefix)."""
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would print every request; its errors still come through.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
