"""A service manager of the test's own: the NOTIFY_SOCKET end that keeps fds as systemd's fd
store does, and `sugard run` started the way systemd starts it (LISTEN_FDS, LISTEN_FDNAMES)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from sugard.daemon.systemd import read_memfd
from support.daemon import sugarctl
from support.wait import wait_for

# What systemd does at start: the socket and the stored fds at 3, 4, ... in the order of
# LISTEN_FDNAMES, LISTEN_PID our pid. The launcher moves them there and execs the program,
# which keeps the pid, as systemd's fork+exec does.
LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    # Out of the way of 3, 4, ... first, so that no dup2 below lands on a source.
    sources = [fcntl.fcntl(int(fd), fcntl.F_DUPFD_CLOEXEC, 100) for fd in sys.argv[2:]]
    for target, fd in enumerate(sources, start=3):
        os.dup2(fd, target)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
    """
)


class FdStore:
    """The service manager's end of NOTIFY_SOCKET, keeping fds by FDNAME like systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.kept: dict[str, list[int]] = {}
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self.started: list[subprocess.Popen[bytes]] = []  # killed at the end if still running
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16)
            except OSError:
                return
            lines = data.decode().split("\n")
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            with self._lock:
                self.messages.append(data.decode())
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1":
                    self.kept.setdefault(name, []).extend(fds)
                    continue
                if fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.kept.pop(name, []):
                        os.close(fd)
                for fd in fds:  # BARRIER=1: closing its fd says "read up to here"
                    os.close(fd)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(name for name, fds in self.kept.items() if fds)

    def content(self, name: str) -> bytes:
        with self._lock:
            return read_memfd(self.kept[name][-1])

    def fds(self) -> tuple[list[int], str]:
        """What a restart passes: the kept fds (one per name) and LISTEN_FDNAMES."""
        with self._lock:
            named = [(name, fds[-1]) for name, fds in sorted(self.kept.items()) if fds]
        return [fd for _, fd in named], ":".join(name for name, _ in named)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.sock.close()
        for fds in self.kept.values():
            for fd in fds:
                os.close(fd)


class Started:
    """`sugard run` started as systemd would: NOTIFY_SOCKET, and LISTEN_* for `fds`."""

    def __init__(self, config: Path, sock: Path, store: FdStore, fds: list[int], names: str):
        self.socket = sock
        self.log_path = sock.with_name(f"sugard-{len(store.messages)}.log")
        argv = ["sugard", "run", "-c", str(config), "--socket", str(sock), "--log-level", "debug"]
        program = f"import sys; sys.argv = {argv!r}; from sugard.cli import main; main()"
        env = {**os.environ, "NOTIFY_SOCKET": str(store.path)}
        if fds:
            env |= {"LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": names}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, program, *map(str, fds)],
                pass_fds=fds,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        store.started.append(self.proc)
        wait_for(lambda: store_said(store, "READY=1", self), "READY=1")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert 0 == self.proc.wait(30), self.log()


def store_said(store: FdStore, what: str, started: Started) -> bool:
    assert started.proc.poll() is None, started.log()
    return any(what in message for message in store.messages[-3:])


def token(sock: Path) -> str:
    done = sugarctl(sock, "token", "prod")
    assert 0 == done.returncode, done.stderr
    return done.stdout.strip()


def start(config: Path, store: FdStore, short_dir: Path) -> Started:
    return Started(config, short_dir / "s.sock", store, *store.fds())
