"""What it costs to learn who owns a loopback TCP peer: netlink sock_diag vs /proc/net/tcp.

`python bench/bench_peer.py [--connections 2000] [--lookups 200]` opens that many loopback
connections in this process (each counts twice in the kernel's table: both ends), then looks
up the owner of randomly chosen peers through each path and prints, side by side, the cost per
lookup (median and mean) and the ratio of /proc to netlink. The /proc path reads the whole
table, so its cost grows with the sockets open on the machine; netlink's does not.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import socket
import statistics
import time
from collections.abc import Callable

from sugard import peer

PATHS: dict[str, Callable[..., peer.TcpPeerOwner | None]] = {
    "netlink sock_diag": peer._owner_via_netlink,
    "/proc/net/tcp": peer._owner_via_proc,
}


def open_connections(count: int) -> tuple[list[socket.socket], list[tuple[object, ...]]]:
    """`count` connections to one listener; (every socket, the lookup ends of each peer)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * count + 64)), hard))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    opened, ends = [listener], []
    for _ in range(count):
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        opened += [client, accepted]
        found = peer._loopback_ends(accepted.getsockname(), accepted.getpeername())
        assert found is not None
        ends.append(found)
    return opened, ends


def time_lookups(
    lookup: Callable[..., peer.TcpPeerOwner | None], ends, lookups: int
) -> list[float]:
    """Seconds per lookup, each of a random peer this process owns."""
    uid = os.getuid()
    costs = []
    for chosen in random.choices(ends, k=lookups):  # noqa: S311 (a sample, not a secret)
        start = time.perf_counter()
        owner = lookup(*chosen)
        costs.append(time.perf_counter() - start)
        assert owner is not None and owner.uid == uid, owner
    return costs


def shown(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:,.2f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--lookups", type=int, default=200, help="per path")
    args = parser.parse_args()
    opened, ends = open_connections(args.connections)
    try:
        medians = {}
        print(f"{args.connections:,} loopback connections ({2 * args.connections:,} sockets)\n")
        print("| path | median per lookup | mean per lookup | vs netlink |")
        print("|---|---|---|---|")
        for name, lookup in PATHS.items():
            costs = time_lookups(lookup, ends, args.lookups)
            medians[name] = statistics.median(costs)
            ratio = medians[name] / medians["netlink sock_diag"]
            print(
                f"| {name} | {shown(medians[name])} | {shown(statistics.fmean(costs))} "
                f"| {ratio:,.1f}x |"
            )
    finally:
        for s in opened:
            s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
