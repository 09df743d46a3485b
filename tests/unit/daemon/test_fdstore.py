"""The fd store primitives: a sealed memfd, sent with FDSTORE=1 over a real datagram
NOTIFY_SOCKET (SCM_RIGHTS) and read back on the other end, and stored fds passed to a freshly
exec'd program in LISTEN_FDS/LISTEN_FDNAMES next to a socket, told apart by name.

Not here: a restart under a real systemd user manager (this machine has no systemd as PID 1,
and `systemd-run --user` finds no user bus)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.service_manager import LAUNCHER

from sugard.daemon.systemd import STORE_PREFIX, Notifier, read_memfd, sealed_memfd

SESSION = b'{"access_token": "not a real token", "expires_at": 1767225600}'


@pytest.fixture
def manager_socket(short_dir: Path) -> Iterator[socket.socket]:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket that receives fds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(short_dir / "notify"))
    sock.settimeout(15)
    yield sock
    sock.close()


def test_a_sealed_memfd_holds_its_data_and_cannot_change() -> None:
    """Content read back; writing, growing, shrinking and resealing refused; mode 0600; an
    anonymous memfd, not a file on any disk; close-on-exec."""
    fd = sealed_memfd("sugard-session", SESSION)
    try:
        assert SESSION == read_memfd(fd)
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:sugard-session")
        assert 0o600 == stat.S_IMODE(os.fstat(fd).st_mode)
        assert not os.get_inheritable(fd)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"X", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, len(SESSION) + 1)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        os.close(fd)


def test_read_memfd_refuses_what_is_not_sealed(tmp_path: Path) -> None:
    """An unsealed memfd, a file and a socket are refused with a one-line ValueError."""
    unsealed = os.memfd_create("x", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    path = tmp_path / "file"
    path.write_bytes(SESSION)
    with path.open("rb") as file, socket.socket() as sock:
        for fd in (unsealed, file.fileno(), sock.fileno()):
            with pytest.raises(ValueError, match=f"fd {fd} is not a sealed memfd"):
                read_memfd(fd)
    os.close(unsealed)


def test_store_fd_sends_the_memfd_to_the_manager(manager_socket: socket.socket) -> None:
    """FDSTORE=1 and FDNAME=store.NAME in one datagram with the fd in SCM_RIGHTS: the manager
    end reads the content from the fd it received; FDSTOREREMOVE=1 carries no fd."""
    notifier = Notifier(manager_socket.getsockname())
    fd = sealed_memfd("sugard-session", SESSION)
    try:
        assert notifier.store_fd("session.prod", fd)
    finally:
        os.close(fd)  # the manager's copy lives on
    message, fds, _, _ = socket.recv_fds(manager_socket, 4096, 4)
    assert b"FDSTORE=1\nFDNAME=store.session.prod" == message
    assert 1 == len(fds)
    try:
        assert SESSION == read_memfd(fds[0])
    finally:
        os.close(fds[0])

    assert notifier.remove_fd("session.prod")
    message, fds, _, _ = socket.recv_fds(manager_socket, 4096, 4)
    assert (b"FDSTOREREMOVE=1\nFDNAME=store.session.prod", []) == (message, fds)
    notifier.close()


@pytest.mark.parametrize("name", ["a:b", "with space", "x" * 250, "caf\u00e9"])
def test_names_systemd_would_refuse_are_refused_here(name: str) -> None:
    """A name LISTEN_FDNAMES could not carry (a colon, a space, non-ASCII, too long) is a
    ValueError before anything is sent."""
    notifier = Notifier("/nonexistent/notify")
    with pytest.raises(ValueError, match="fd store name"):
        notifier.store_fd(name, 0)


def test_without_notify_socket_nothing_is_stored() -> None:
    """No NOTIFY_SOCKET (not under systemd): store_fd says False, and nothing breaks."""
    fd = sealed_memfd("x", b"")
    try:
        assert not Notifier(None).store_fd("session.prod", fd)
    finally:
        os.close(fd)


PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    from sugard.daemon.systemd import passed_fds, read_memfd
    passed = passed_fds()
    json.dump({
        "sockets": [[p.name, p.sock.family, p.sock.getsockname()] for p in passed.sockets],
        "stored": {name: read_memfd(fd).decode() for name, fd in passed.stored.items()},
        "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "inheritable": [os.get_inheritable(fd) for fd in passed.stored.values()],
    }, sys.stdout)
    """
)
LEGACY = textwrap.dedent(
    """
    import json, os, sys
    from sugard.daemon.systemd import listen_fds
    sockets = listen_fds()
    try:
        os.fstat(4)
        closed = False
    except OSError:
        closed = True
    json.dump({"sockets": [p.name for p in sockets], "stored_fd_closed": closed}, sys.stdout)
    """
)


def launch(program: str, fds: list[int], names: str) -> dict[str, object]:
    env = {**os.environ, "LISTEN_FDS": str(len(fds)), "LISTEN_FDNAMES": names}
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, program, *map(str, fds)],
        pass_fds=fds,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_stored_fds_come_back_at_start_told_apart_from_the_socket(short_dir: Path) -> None:
    """A listening socket named `sugard` and two memfds named store.*: the socket is a
    socket, each memfd's content is read back under its name, the variables are gone and the
    fds are not passed on to the program's own children."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_dir / "s.sock"))
    listener.listen()
    prod = sealed_memfd("session-prod", b"prod session")
    test = sealed_memfd("session-test", b"test session")
    try:
        result = launch(
            PROGRAM,
            [listener.fileno(), prod, test],
            f"sugard:{STORE_PREFIX}session.prod:{STORE_PREFIX}session.test",
        )
    finally:
        for fd in (prod, test):
            os.close(fd)
        listener.close()
    assert {
        "sockets": [["sugard", socket.AF_UNIX, str(short_dir / "s.sock")]],
        "stored": {"session.prod": "prod session", "session.test": "test session"},
        "left": [],
        "inheritable": [False, False],
    } == result


def test_listen_fds_alone_still_serves_sockets_and_closes_stored_fds(short_dir: Path) -> None:
    """A daemon that does not take its sessions back (listen_fds) is not upset by a memfd in
    the store: it gets its socket, and the memfd is closed rather than leaked."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(short_dir / "s.sock"))
    listener.listen()
    stored = sealed_memfd("session-prod", b"prod session")
    try:
        result = launch(LEGACY, [listener.fileno(), stored], f"sugard:{STORE_PREFIX}session.prod")
    finally:
        os.close(stored)
        listener.close()
    assert {"sockets": ["sugard"], "stored_fd_closed": True} == result


def test_a_memfd_not_named_as_stored_is_still_refused_as_a_socket() -> None:
    """Only the name decides: a memfd under a socket's name is the old error, not a session."""
    stored = sealed_memfd("session-prod", b"prod session")
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "sugard"}
    program = "from sugard.daemon.systemd import passed_fds\npassed_fds()"
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, program, str(stored)],
        pass_fds=[stored],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    os.close(stored)
    assert 1 == done.returncode
    assert "LISTEN_FDS passed fd 3 (sugard), which is not a socket" in done.stderr
