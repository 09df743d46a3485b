"""Who is connecting, and whether they may: the peer of a Unix socket (`SO_PEERCRED`,
`SO_PEERGROUPS`), the owner of a loopback TCP peer, and the access policy (`may_use`), a pure
function of the config.

A Unix socket tells its peer's credentials (`SO_PEERCRED`); a TCP socket does not. But on
loopback the peer's socket lives in our own kernel, so the kernel can be asked who owns it:

- netlink sock_diag (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY` with an exact
  `inet_diag_sockid`): the kernel looks the one socket up in its hash table and answers for it
  alone, in tens of microseconds however many sockets are open (see bench/bench_peer.py).
- `/proc/net/tcp` and `/proc/net/tcp6`, the fallback where netlink is not available (some
  sandboxes refuse it): the kernel prints every TCP socket of the namespace, milliseconds once
  there are thousands.

Both report the socket's uid (the credentials it was created with) and inode. A socket no
process holds any more (inode 0: orphaned after close(), or a TIME_WAIT remnant, which the
kernel reports as uid 0) has no owner; neither has an address the kernel does not know. Ask
while the accepted connection is still open: its 4-tuple cannot be taken by another socket
until both ends let go of it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "AccessLists",
    "Peer",
    "TcpPeerOwner",
    "account_groups",
    "may_use",
    "peer_of_socket",
    "peer_of_tcp_socket",
    "process_name",
    "refusal",
    "tcp_peer_owner",
]

log = logging.getLogger("sugard.peer")

# The kernel's sock_diag ABI (include/uapi/linux/{netlink,sock_diag,inet_diag}.h), packed by
# hand: the standard library has AF_NETLINK sockets but no netlink message codec, and the
# libraries that have one (pyroute2) are large third-party packages for what is four structs.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid: sport, dport
# (big-endian), src[4], dst[4] (network order bytes), if, cookie[2].
INET_DIAG_REQ_V2 = struct.Struct("=BBBxI2s2s16s16sI8s")
# inet_diag_msg: family, state, timer, retrans, inet_diag_sockid, expires, rqueue, wqueue,
# uid, inode. Attributes may follow; none is asked for.
INET_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
NLMSGERR = struct.Struct("=i")  # the negative errno heading struct nlmsgerr
INET_DIAG_NOCOOKIE = b"\xff" * 8  # "any socket with this 4-tuple", not one incarnation of it
ALL_STATES = 0xFFFFFFFF
SEQ = 1
RECV_SIZE = 8192
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python has no name for it
MAX_PEER_GROUPS = 256  # Python's getsockopt reads at most 1024 bytes

Address = tuple[Any, ...]  # (host, port) or, for AF_INET6, (host, port, flowinfo, scope_id)
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # supplementary groups; `gid` is not necessarily among them

    def executable(self) -> str:
        """The peer's program, for the log: its path, else (another user's process) its name."""
        try:
            return os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return process_name(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} uid {self.uid} ({self.executable()!r})"


def process_name(pid: int) -> str:
    """The process's name from /proc, in brackets (what is left to read of another user's
    process); "?" when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f"[{f.read().strip()}]"
    except OSError:
        return "?"


def peer_of_socket(sock: Any) -> Peer | None:
    """SO_PEERCRED (and SO_PEERGROUPS) of a Unix socket; None for any other kind of socket."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, _peer_groups(sock))


def peer_of_tcp_socket(sock: Any) -> Peer | None:
    """The owner of a loopback TCP peer, with its account's groups (a TCP socket keeps none);
    None if the kernel names no owner. Its pid is unknown (0): a socket has no process."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        owner = tcp_peer_owner(sock.getsockname(), sock.getpeername())
    except OSError:
        return None
    if owner is None:
        return None
    account = account_groups(owner.uid)
    gid, groups = account if account is not None else (-1, ())
    return Peer(0, owner.uid, gid, groups)


def _peer_groups(sock: Any) -> tuple[int, ...]:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
    except OSError as exc:
        # ERANGE: more groups than we read; the peer is then judged by uid and primary gid.
        if exc.errno not in (errno.ERANGE, errno.ENOPROTOOPT):
            log.debug("cannot read SO_PEERGROUPS: %s", exc.strerror)
        return ()
    count = len(raw) // 4
    return tuple(struct.unpack(f"{count}I", raw[: 4 * count]))


class AccessLists(Protocol):
    """Who a config lets in: `[daemon]`'s lists, or an instance's (None: not narrowed)."""

    @property
    def allowed_uids(self) -> tuple[int, ...] | None: ...

    @property
    def allowed_gids(self) -> tuple[int, ...] | None: ...


def may_use(
    peer: Peer, daemon: AccessLists, instance: AccessLists | None, owner: int | None = None
) -> bool:
    """The daemon's owner (`owner`, by default our uid) and root always; others only if
    `daemon`'s allowed_uids / allowed_gids list them (widen), and, for an `instance` with
    lists of its own, those too (narrow). A gid matches the peer's primary or supplementary
    groups."""
    if peer.uid in (os.getuid() if owner is None else owner, 0):
        return True

    def listed(uids: tuple[int, ...] | None, gids: tuple[int, ...] | None) -> bool:
        return peer.uid in (uids or ()) or any(g in (gids or ()) for g in (peer.gid, *peer.groups))

    if not listed(daemon.allowed_uids, daemon.allowed_gids):
        return False
    if instance is None or (instance.allowed_uids is None and instance.allowed_gids is None):
        return True
    return listed(instance.allowed_uids, instance.allowed_gids)


def refusal(peer: Peer, instance: str | None) -> str:
    """Why `peer` is refused `instance` (None: the daemon itself), and who can change that."""
    if instance is not None:
        shown = instance if len(instance) <= 80 else instance[:80] + "..."
        return (
            f"uid {peer.uid} may not use instance {shown!r}; its allowed_uids / "
            "allowed_gids in the config decide who may"
        )
    return (
        f"uid {peer.uid} may not use this sugard; its owner can add the uid to allowed_uids "
        "(or a group to allowed_gids) in [daemon]"
    )


@dataclass(frozen=True)
class TcpPeerOwner:
    """The owner of the peer's socket, as the kernel reports it."""

    uid: int
    inode: int  # the socket's inode: `socket:[inode]` among the owning process's fds


def tcp_peer_owner(local: Address, remote: Address) -> TcpPeerOwner | None:
    """The owner of the socket that connected from `remote` to our `local` (an accepted
    connection's sockname and peername). None if `remote` is not a loopback address or the
    kernel names no live owner: the caller must then refuse the connection. It blocks for
    tens of microseconds via netlink; via /proc, milliseconds once thousands of sockets are
    open."""
    ends = _loopback_ends(local, remote)
    if ends is None:
        log.debug("no owner looked up for non-loopback peer %r", remote[:2])
        return None
    try:
        owner = _owner_via_netlink(*ends)
        path = "netlink"
    except OSError as exc:
        owner = _owner_via_proc(*ends)
        path = f"/proc/net/tcp (netlink: {exc.strerror or exc})"
    log.debug(
        "owner of the peer %s:%d (via %s): %s",
        ends[0].compressed,
        ends[1],
        path,
        f"uid {owner.uid}" if owner else "none",
    )
    return owner


def account_groups(uid: int) -> tuple[int, tuple[int, ...]] | None:
    """The primary gid and all groups of `uid`'s account in the user database; None for a
    uid with no account, which can then be judged by its uid alone.

    A TCP socket keeps no group list (the kernel records only its creator's uid), so
    `allowed_gids` can only be applied to a TCP peer through its account: this is what the
    list means to an administrator ("the members of group G"), and a change to /etc/group
    applies at once rather than at the next login. A process that dropped groups is judged
    by its account's groups: here the uid, not one process's group set, is what is trusted.
    NSS may ask a directory (sssd, LDAP): call this only when the uid alone does not decide."""
    try:
        account = pwd.getpwuid(uid)
        return account.pw_gid, tuple(os.getgrouplist(account.pw_name, account.pw_gid))
    except (KeyError, OSError):
        return None


def _loopback_ends(local: Address, remote: Address) -> tuple[IP, int, IP, int] | None:
    """(peer address, peer port, our address, our port), IPv4-mapped addresses unwrapped;
    None unless the peer's address is loopback (127.0.0.0/8, ::1)."""
    try:
        peer_ip = _unmapped(ipaddress.ip_address(remote[0]))
        our_ip = _unmapped(ipaddress.ip_address(local[0]))
        peer_port, our_port = int(remote[1]), int(local[1])
    except (ValueError, TypeError, IndexError):
        return None
    if not peer_ip.is_loopback or peer_ip.version != our_ip.version:
        return None
    if not (0 < peer_port < 65536 and 0 < our_port < 65536):
        return None
    return peer_ip, peer_port, our_ip, our_port


def _unmapped(ip: IP) -> IP:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _owner_via_netlink(
    peer_ip: IP, peer_port: int, our_ip: IP, our_port: int
) -> TcpPeerOwner | None:
    """Ask sock_diag for the one socket whose local end is the peer and remote end is us.
    Raises OSError when netlink cannot answer (then /proc can); None when it says no owner.
    An AF_INET question also finds a dual-stack AF_INET6 client on IPv4-mapped addresses:
    the kernel keeps both in the same table under their IPv4 addresses."""
    family = socket.AF_INET if peer_ip.version == 4 else socket.AF_INET6
    sport, dport = peer_port.to_bytes(2, "big"), our_port.to_bytes(2, "big")
    request = INET_DIAG_REQ_V2.pack(
        family,
        socket.IPPROTO_TCP,
        0,
        ALL_STATES,
        sport,
        dport,
        peer_ip.packed.ljust(16, b"\0"),
        our_ip.packed.ljust(16, b"\0"),
        0,
        INET_DIAG_NOCOOKIE,
    )
    header = NLMSGHDR.pack(NLMSGHDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, SEQ, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.sendto(header + request, (0, 0))
        # sock_diag answers inside sendto(), so the reply is already queued: a non-blocking
        # read never stalls the event loop, and a kernel that did not answer is an OSError.
        reply = nl.recv(RECV_SIZE, socket.MSG_DONTWAIT)
    length, kind, _, seq, _ = NLMSGHDR.unpack_from(reply)
    if seq != SEQ or length > len(reply):
        raise OSError(errno.EPROTO, "unexpected sock_diag reply")
    if kind == NLMSG_ERROR:
        (error,) = NLMSGERR.unpack_from(reply, NLMSGHDR.size)
        if -error == errno.ENOENT:
            # No socket with that 4-tuple: the peer is gone. (A kernel without the tcp_diag
            # module says the same; that refuses every peer, which fails closed.)
            return None
        raise OSError(-error, os.strerror(-error))
    if kind != SOCK_DIAG_BY_FAMILY:
        raise OSError(errno.EPROTO, f"unexpected sock_diag reply type {kind}")
    fields = INET_DIAG_MSG.unpack_from(reply, NLMSGHDR.size)
    if (fields[4], fields[5]) != (sport, dport):
        raise OSError(errno.EPROTO, "sock_diag answered for another socket")
    uid, inode = fields[-2], fields[-1]
    return TcpPeerOwner(uid, inode) if inode else None


def _owner_via_proc(peer_ip: IP, peer_port: int, our_ip: IP, our_port: int) -> TcpPeerOwner | None:
    """The same answer from /proc/net/tcp{,6}: the whole table, searched for one line. An
    IPv4 peer may be an AF_INET6 socket on IPv4-mapped addresses, listed in tcp6."""
    tables = [("/proc/net/tcp6", peer_ip.packed, our_ip.packed)]
    if peer_ip.version == 4:
        mapped = b"\0" * 10 + b"\xff\xff"
        tables = [
            ("/proc/net/tcp", peer_ip.packed, our_ip.packed),
            ("/proc/net/tcp6", mapped + peer_ip.packed, mapped + our_ip.packed),
        ]
    for path, peer_packed, our_packed in tables:
        # The kernel prints each address as 32-bit words in host byte order, ports in hex.
        key = f": {_proc_hex(peer_packed)}:{peer_port:04X} {_proc_hex(our_packed)}:{our_port:04X} "
        try:
            with open(path, "rb") as f:
                table = f.read()
        except OSError as exc:
            log.debug("cannot read %s: %s", path, exc.strerror)
            continue
        start = table.find(key.encode())
        if start < 0:
            continue
        end = table.find(b"\n", start)
        # Fields after the key: st, tx:rx, tr:when, retrnsmt, uid, timeout, inode.
        fields = table[start + len(key) : end if end >= 0 else None].split()
        uid, inode = int(fields[4]), int(fields[6])
        return TcpPeerOwner(uid, inode) if inode else None
    return None


def _proc_hex(packed: bytes) -> str:
    return "".join(f"{word:08X}" for word in struct.unpack(f"={len(packed) // 4}I", packed))
