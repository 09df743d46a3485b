"""Who owns a loopback TCP peer: real connections on 127.0.0.1 and ::1, from this process and
from another uid (setpriv), looked up through netlink sock_diag and through /proc/net/tcp,
which must agree."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import ROOT
from support.nobody import NOBODY, as_nobody

from sugard import peer
from sugard.peer import TcpPeerOwner, account_groups, tcp_peer_owner

Lookup = Callable[[tuple[object, ...], tuple[object, ...]], TcpPeerOwner | None]


def via_netlink(local: tuple[object, ...], remote: tuple[object, ...]) -> TcpPeerOwner | None:
    ends = peer._loopback_ends(local, remote)
    return None if ends is None else peer._owner_via_netlink(*ends)


def via_proc(local: tuple[object, ...], remote: tuple[object, ...]) -> TcpPeerOwner | None:
    ends = peer._loopback_ends(local, remote)
    return None if ends is None else peer._owner_via_proc(*ends)


BOTH_PATHS = pytest.mark.parametrize("lookup", [via_netlink, via_proc], ids=["netlink", "proc"])


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


NEEDS_IPV6 = pytest.mark.skipif(
    not ipv6_loopback(), reason="this machine has no IPv6 loopback (cannot bind ::1)"
)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Every socket a test opens, closed at its end."""
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


def listen(opened: list[socket.socket], family: int, host: str) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM)
    opened.append(listener)
    listener.bind((host, 0))
    listener.listen()
    return listener


def connect(
    opened: list[socket.socket], listener: socket.socket, *, family: int | None = None, host=None
) -> tuple[socket.socket, socket.socket]:
    """(client, accepted server end) of a fresh connection to `listener`."""
    client = socket.socket(family or listener.family, socket.SOCK_STREAM)
    opened.append(client)
    client.connect((host or listener.getsockname()[0], listener.getsockname()[1]))
    accepted, _ = listener.accept()
    opened.append(accepted)
    return client, accepted


def owner_of(accepted: socket.socket, lookup: Lookup) -> TcpPeerOwner | None:
    return lookup(accepted.getsockname(), accepted.getpeername())


def mine(client: socket.socket) -> TcpPeerOwner:
    """What the kernel should say of a socket this process holds."""
    return TcpPeerOwner(os.getuid(), os.fstat(client.fileno()).st_ino)


@BOTH_PATHS
def test_an_ipv4_loopback_peer_is_owned_by_this_process(
    sockets: list[socket.socket], lookup: Lookup
) -> None:
    """A connection from 127.0.0.1: our uid and the client socket's own inode."""
    client, accepted = connect(sockets, listen(sockets, socket.AF_INET, "127.0.0.1"))
    assert mine(client) == owner_of(accepted, lookup)


@BOTH_PATHS
def test_any_address_of_127_0_0_0_8_is_loopback(
    sockets: list[socket.socket], lookup: Lookup
) -> None:
    """A peer bound to 127.3.4.5 connecting to a listener on 127.0.0.2 is found too."""
    listener = listen(sockets, socket.AF_INET, "127.0.0.2")
    client = socket.socket()
    sockets.append(client)
    client.bind(("127.3.4.5", 0))
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    sockets.append(accepted)
    assert mine(client) == owner_of(accepted, lookup)


@NEEDS_IPV6
@BOTH_PATHS
def test_an_ipv6_loopback_peer_is_owned_by_this_process(
    sockets: list[socket.socket], lookup: Lookup
) -> None:
    """A connection from ::1."""
    client, accepted = connect(sockets, listen(sockets, socket.AF_INET6, "::1"))
    assert mine(client) == owner_of(accepted, lookup)


@BOTH_PATHS
def test_a_dual_stack_client_on_ipv4_mapped_addresses_is_found(
    sockets: list[socket.socket], lookup: Lookup
) -> None:
    """An AF_INET6 client connecting to ::ffff:127.0.0.1 reaches an IPv4 listener, which sees
    a plain IPv4 peer; the kernel lists the client among the IPv6 sockets."""
    listener = listen(sockets, socket.AF_INET, "127.0.0.1")
    client, accepted = connect(sockets, listener, family=socket.AF_INET6, host="::ffff:127.0.0.1")
    assert "127.0.0.1" == accepted.getpeername()[0]
    assert mine(client) == owner_of(accepted, lookup)


@BOTH_PATHS
def test_a_listener_on_an_ipv4_mapped_address_sees_its_peer(
    sockets: list[socket.socket], lookup: Lookup
) -> None:
    """An AF_INET6 listener bound to ::ffff:127.0.0.1 names its IPv4 peer in mapped form."""
    listener = listen(sockets, socket.AF_INET6, "::ffff:127.0.0.1")
    client, accepted = connect(sockets, listener, family=socket.AF_INET, host="127.0.0.1")
    assert "::ffff:127.0.0.1" == accepted.getpeername()[0]
    assert mine(client) == owner_of(accepted, lookup)


@pytest.fixture(scope="module")
def nobody_python() -> Iterator[tuple[str, Path]]:
    """(a Python uid 65534 can run, a world-readable directory holding the client script):
    the checkout and this venv may sit in directories the other uid cannot enter."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as uid 65534 with setpriv")
    work = Path(tempfile.mkdtemp(prefix="sd-peer-"))
    work.chmod(0o755)
    script = work / "client.py"
    # Connects, says so, and holds the connection until told to let go.
    script.write_text(
        "import socket, sys\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "print('connected', flush=True)\n"
        "sys.stdin.read(1)\n"
    )
    script.chmod(0o644)
    try:
        for python in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
            ok = subprocess.run(
                as_nobody(python, "-c", "pass"), cwd=work, capture_output=True, check=False
            )
            if ok.returncode == 0:
                yield python, script
                return
        pytest.skip("no Python on this machine that uid 65534 can run")
    finally:
        script.unlink()
        work.rmdir()


@pytest.mark.parametrize(
    "family, host",
    [(socket.AF_INET, "127.0.0.1"), pytest.param(socket.AF_INET6, "::1", marks=NEEDS_IPV6)],
    ids=["ipv4", "ipv6"],
)
def test_a_peer_run_as_another_uid_is_owned_by_that_uid(
    sockets: list[socket.socket], nobody_python: tuple[str, Path], family: int, host: str
) -> None:
    """A client run as uid 65534: both paths name 65534, and agree on the socket's inode."""
    python, script = nobody_python
    listener = listen(sockets, family, host)
    client = subprocess.Popen(
        as_nobody(python, str(script), host, str(listener.getsockname()[1])),
        cwd=script.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "connected\n" == client.stdout.readline()  # type: ignore[union-attr]
        accepted, _ = listener.accept()
        sockets.append(accepted)
        by_netlink, by_proc = owner_of(accepted, via_netlink), owner_of(accepted, via_proc)
        assert by_netlink is not None
        assert (NOBODY, by_netlink) == (by_netlink.uid, by_proc)
        assert by_netlink == tcp_peer_owner(accepted.getsockname(), accepted.getpeername())
    finally:
        client.communicate("x", timeout=30)
    assert 0 == client.returncode


def test_a_peer_on_a_non_loopback_address_has_no_owner(sockets: list[socket.socket]) -> None:
    """A connection between two of this machine's own non-loopback addresses: the kernel could
    name the owner, but only loopback peers are looked up. (It listens on that address with a
    kernel-chosen port only for the one connection the test makes.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("203.0.113.1", 9))  # routing picks our outward address; nothing sent
        except OSError:
            pytest.skip("this machine has no route, hence no non-loopback address, to test with")
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip(f"this machine's outward address is loopback ({address})")
    client, accepted = connect(sockets, listen(sockets, socket.AF_INET, address))
    ip = ipaddress.ip_address(address)
    port, listener_port = client.getsockname()[1], accepted.getsockname()[1]
    assert mine(client) == peer._owner_via_netlink(ip, port, ip, listener_port)  # it could
    assert tcp_peer_owner(accepted.getsockname(), accepted.getpeername()) is None


@pytest.mark.parametrize(
    "remote",
    [
        ("192.0.2.7", 40000),
        ("::ffff:10.0.0.1", 40000, 0, 0),
        ("2001:db8::1", 1, 0, 0),
        ("x", 1),
        ("127.0.0.1", 70000),
    ],
)
def test_an_address_that_is_not_loopback_is_not_looked_up(remote: tuple[object, ...]) -> None:
    """Documentation, mapped private, global IPv6, garbage addresses, a port out of range:
    no owner."""
    assert tcp_peer_owner(("127.0.0.1", 8401), remote) is None


def closed_gracefully(client: socket.socket) -> None:
    client.close()  # FIN: the socket lingers, orphaned, then as a TIME_WAIT remnant


def closed_abortively(client: socket.socket) -> None:
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST: the kernel forgets the socket at once


@BOTH_PATHS
@pytest.mark.parametrize("close", [closed_gracefully, closed_abortively], ids=["fin", "rst"])
def test_a_peer_that_closed_its_socket_has_no_owner(
    sockets: list[socket.socket], lookup: Lookup, close: Callable[[socket.socket], None]
) -> None:
    """Once the client closed (the kernel may still list the socket, without an inode, and as
    uid 0 once in TIME_WAIT), no one owns it: None, not root."""
    client, accepted = connect(sockets, listen(sockets, socket.AF_INET, "127.0.0.1"))
    # As a server's transport does, the addresses are taken at accept: after a reset
    # getpeername() fails.
    local, remote = accepted.getsockname(), accepted.getpeername()
    assert mine(client) == lookup(local, remote)
    close(client)
    assert lookup(local, remote) is None


def test_netlink_is_used_and_says_so_at_debug(
    sockets: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """Where netlink works (here), it answers, and the debug log names the path."""
    client, accepted = connect(sockets, listen(sockets, socket.AF_INET, "127.0.0.1"))
    with caplog.at_level(logging.DEBUG, logger="sugard.peer"):
        assert mine(client) == tcp_peer_owner(accepted.getsockname(), accepted.getpeername())
    assert [f"uid {os.getuid()}"] == [m.rsplit(": ", 1)[1] for m in caplog.messages]
    assert "(via netlink)" in caplog.text


def test_without_netlink_proc_answers_the_same_and_says_so(
    sockets: list[socket.socket], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that refuses the netlink socket (asked for a netlink protocol that does not
    exist, the kernel answers EPROTONOSUPPORT, as a sandbox without sock_diag does): the owner
    comes from /proc/net/tcp, and the debug log says so and why."""
    client, accepted = connect(sockets, listen(sockets, socket.AF_INET, "127.0.0.1"))
    monkeypatch.setattr(peer, "NETLINK_SOCK_DIAG", 32)  # past the kernel's MAX_LINKS
    with caplog.at_level(logging.DEBUG, logger="sugard.peer"):
        assert mine(client) == tcp_peer_owner(accepted.getsockname(), accepted.getpeername())
    assert "(via /proc/net/tcp (netlink: Protocol not supported))" in caplog.text


def test_the_groups_of_an_account_come_from_the_user_database() -> None:
    """root's account: gid 0, among its groups; a uid with no account: none at all."""
    gid, groups = account_groups(0) or (None, ())
    assert (0, True) == (gid, 0 in groups)
    assert account_groups(4_000_000) is None


def test_the_benchmark_runs() -> None:
    """bench/bench_peer.py at a tiny size, so that it cannot rot: both paths, and a ratio."""
    out = subprocess.run(
        [sys.executable, "bench/bench_peer.py", "--connections", "50", "--lookups", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    ).stdout
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("|")}
    assert {"netlink sock_diag", "/proc/net/tcp"} <= rows.keys(), out
    assert "x" in rows["/proc/net/tcp"], out
