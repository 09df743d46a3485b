"""The TCP listeners' caps: another uid holds a bounded number of connections, many uids
together leave a reserve to the daemon's own uid and root."""

from __future__ import annotations

from sugard.peer import Peer
from sugard.proxy.tcp import PER_PEER, REFUSED_PER_PEER, TcpCaps

OWNER = 1000


def peer(uid: int) -> Peer:
    return Peer(0, uid, uid, ())


def test_one_uid_holds_at_most_its_cap_and_a_refused_one_fewer() -> None:
    """An allowed uid is turned away (503 busy) past PER_PEER connections, a refused one
    (403) past REFUSED_PER_PEER; closing one lets the next in."""
    caps = TcpCaps(10_000, frozenset({OWNER, 0}))
    held = [caps.admitted(peer(2000), "127.0.0.1") for _ in range(PER_PEER)]
    assert (503, "busy") == caps.refusal(peer(2000), "127.0.0.1", True)[:2]  # type: ignore[index]
    caps.released(held.pop())
    assert caps.refusal(peer(2000), "127.0.0.1", True) is None
    for _ in range(REFUSED_PER_PEER):
        caps.admitted(peer(3000), "127.0.0.1")
    assert (403, "forbidden") == caps.refusal(peer(3000), "127.0.0.1", False)[:2]  # type: ignore[index]


def test_many_uids_leave_the_reserve_to_the_owner_and_root() -> None:
    """Other uids (and ownerless peers, by address) together fill the limit up to the
    reserve; the owner and root are still admitted, up to the limit itself."""
    caps = TcpCaps(256, frozenset({OWNER, 0}))
    uid = 5000
    while caps.refusal(peer(uid), "127.0.0.1", True) is None:
        caps.admitted(peer(uid), "127.0.0.1")
        uid += caps.held(peer(uid)) == PER_PEER
    assert caps.limit - caps.reserve == caps.open
    assert caps.refusal(None, "192.0.2.1", True) is not None
    for _ in range(caps.reserve):
        assert caps.refusal(peer(OWNER), "127.0.0.1", True) is None
        caps.admitted(peer(OWNER), "127.0.0.1")
    assert caps.refusal(peer(0), "127.0.0.1", True) is not None  # the limit is the limit
