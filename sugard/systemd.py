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

As libsystemd does with `unset_environment`, the variables are removed once read, so that
children (a `password_command`) never think they are the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

__all__ = [
    "JournalFormatter",
    "ListenFd",
    "Notifier",
    "listen_fds",
    "setup_logging",
    "started_by_systemd",
    "stderr_is_journal",
]

log = logging.getLogger("sugard.systemd")

SD_LISTEN_FDS_START = 3


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

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; False if systemd did not get them."""
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
            self._sock.sendto(message, target)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", address, exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={_one_line(status)}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one (systemd >= 253).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={_one_line(status)}")

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


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class ListenFd:
    """A socket that systemd (or systemd-socket-activate) passed in."""

    sock: socket.socket
    name: str


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[ListenFd]:
    """The sockets passed by socket activation, or [] if none were passed to this process.

    Raises ValueError, with a one-line message, if the variables are malformed.
    """
    env = os.environ if environ is None else environ
    pid_text = env.pop("LISTEN_PID", None)
    fds_text = env.pop("LISTEN_FDS", None)
    names_text = env.pop("LISTEN_FDNAMES", None)
    if not pid_text or not fds_text:
        return []
    try:
        pid, count = int(pid_text), int(fds_text)
    except ValueError:
        raise ValueError(
            f"LISTEN_PID={pid_text!r} and LISTEN_FDS={fds_text!r} must be numbers"
        ) from None
    if pid != os.getpid():
        # Inherited from a parent that was activated: not ours to take.
        return []
    if count < 0:
        raise ValueError(f"LISTEN_FDS={count} must not be negative")
    names = names_text.split(":") if names_text else []
    passed = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ValueError(
                f"LISTEN_FDS passed fd {fd} ({name}), which is not a socket: {exc.strerror or exc}"
            ) from None
        passed.append(ListenFd(sock, name))
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
