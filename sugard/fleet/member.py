"""One instance's seat in the fleet, on this host: leader or follower, the record it holds.

The seat keeps or takes its lease, reads the store, publishes what Sugar gave the leader and
forwards a follower's requests. The hub that owns the seats (one Redis client, the pub/sub
listener, the loops) is `hub`, and the lease's deadline rule is `lease`: split so that this
module is only the seat's own state and rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from sugard.fleet.errors import FleetError
from sugard.fleet.lease import Lease
from sugard.fleet.sealing import SessionRecord, seal, unseal
from sugard.fleet.store import (
    FleetStore,
    NotLeader,
    RenewalRequest,
    Stale,
    WriteResult,
    Written,
)
from sugard.secret import Secret

if TYPE_CHECKING:  # the hub imports this module: the seat names its hub only as a type
    from sugard.fleet.hub import Fleet

log = logging.getLogger("sugard.fleet")


@dataclass
class FleetMember:
    """One instance in the fleet, on this host. The keeper reads `current` (memory only, no
    Redis round trip), calls Sugar only while `may_call_sugar(timeout)` says so, and
    `publish`es what Sugar gave it; followers `ask_leader` instead of calling Sugar."""

    name: str
    identity: str
    fleet: Fleet
    lease: Lease
    current: SessionRecord | None = None
    holder: str | None = None  # who holds the lease, as last seen
    stored_epoch: int = 0  # what the store held at the last read (0: nothing)
    losses: int = 0  # how many times a session held here vanished from the store
    problem: str | None = None  # why this host cannot take part now (a wrong key), for STATUS
    requests: asyncio.Queue[RenewalRequest] = field(default_factory=asyncio.Queue)
    seats: int = 0  # local instances using this seat (two may share one identity)
    fault: FleetError | None = None  # the error behind `problem`, for the keeper to tell apart
    # Set once the first round ended (lease taken or not, record read or not): until then a
    # host cannot tell "nothing stored" from "not asked yet".
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    # Called with each record adopted (a follower hears of the leader's new session).
    on_adopt: list[Callable[[SessionRecord], None]] = field(default_factory=list)
    # Called with the held record's token when a renewal this host could not hear of may have
    # replaced it at Sugar, and whether to hold it back until a check says Sugar takes it.
    on_suspect: list[Callable[[Secret, bool], None]] = field(default_factory=list)
    # A session Sugar gave this host that no write took, with the stored epoch it was renewed
    # from: the refresh token of that epoch is spent, so this is the fleet's live session.
    unstored: tuple[int, SessionRecord] | None = None
    _lost: bool = False
    _lost_at: float = float("-inf")  # when this host noticed the loss (lease clock)
    _queued_epoch: int = -1
    _asked: dict[int, float] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def store(self) -> FleetStore:
        return self.fleet.store

    @property
    def role(self) -> Literal["leader", "follower"]:
        return "leader" if self.lease.held() else "follower"

    @property
    def epoch(self) -> int:
        return self.current.epoch if self.current else 0

    def status(self) -> dict[str, Any]:
        """STATUS.fleet: `{"role", "holder", "epoch"}`."""
        return {"role": self.role, "holder": self.holder, "epoch": self.epoch}

    def may_call_sugar(self, timeout: float) -> bool:
        """Whether this host may start a Sugar call that takes up to `timeout` now: it holds
        the lease, and the call and storing its answer end before the lease can lapse."""
        return self.lease.may_run(timeout + self.store.timeout)

    async def tick(self) -> None:
        """One round of the keep-alive loop (every lease/3): keep or take the lease, then
        re-read the record (the safety net under pub/sub)."""
        was = (self.role, self.holder)
        await self.store.check_key(self.fleet.key)
        sent_at = self.lease.clock()
        me = self.fleet.holder
        try:
            # Renew whenever Redis may still hold our lease, even past our own deadline: while
            # the key names us, nobody else can have it.
            ok = self.holder == me and await self.store.renew(self.identity, me, self.lease.length)
            ok = ok or await self.store.acquire(self.identity, me, self.lease.length)
            if ok:
                self.lease.granted(sent_at)
                self.holder = me
            else:
                self.lease.lost()
                self.holder = await self.store.holder(self.identity)
        finally:
            if (self.role, self.holder) != was:
                self._log_role()
        await self.reread()
        await self.store_unstored()

    def unreachable(self) -> None:
        """A round found the store unreachable. A follower checks the token it holds (one
        ping, which evicts nobody): the leader may have renewed as Redis went away, and then
        Sugar refuses it, and no announcement can come."""
        if self.role == "follower" and self.current is not None:
            self._suspect(hold=False)

    def _suspect(self, *, hold: bool) -> None:
        assert self.current is not None
        for listener in self.on_suspect:
            listener(self.current.access_token, hold)

    async def retake(self) -> bool:
        """Take the lease if nobody holds it (after Redis lost it); whether this host leads."""
        sent_at = self.lease.clock()
        if not await self.store.acquire(self.identity, self.fleet.holder, self.lease.length):
            return False
        self.lease.granted(sent_at)
        if self.holder != self.fleet.holder:
            self.holder = self.fleet.holder
            self._log_role()
        return True

    def _log_role(self) -> None:
        if self.role == "leader":
            log.info("%s: this host leads the fleet for it (epoch %d)", self.name, self.epoch)
        else:
            log.info("%s: fleet leader is %s", self.name, self.holder or "nobody (yet)")

    async def reread(self) -> SessionRecord | None:
        """Read the store now (before any password login, on each announcement, and each
        tick). Adopts a record that differs from the one held; keeps serving the held one
        when the store lost it, and signals that loss once."""
        found = await self.store.read(self.identity)
        if found is None:
            self.stored_epoch = 0
            if self.current is not None and not self._lost:
                self._lost, self._lost_at = True, self.lease.clock()
                self.losses += 1
                if self.lease.held() and await self.store.holder(self.identity) != self.holder:
                    # Redis lost the lease with the record: another host may take it now, so
                    # this one must stop calling Sugar at once, not at its local deadline.
                    self.lease.lost()
                    self.holder = None
                    self._log_role()
                log.warning(
                    "%s: the fleet store lost the session (Redis restarted empty?); checking "
                    "the held token before serving it again",
                    self.name,
                )
                # A leader may have renewed as Redis went away: until the store holds an epoch
                # again, or Sugar takes the token, it is not served.
                self._suspect(hold=True)
                self._wake()
            return None
        epoch, blob = found
        self.stored_epoch = epoch
        self._lost = False
        if epoch != self.epoch:
            self._adopt(unseal(self.fleet.key, self.identity, epoch, blob))
        return self.current

    @property
    def session_lost(self) -> bool:
        """The store has no record although this host held one: the leader logs in once."""
        return self._lost

    def _adopt(self, record: SessionRecord) -> None:
        self.current = record
        if self.unstored is not None and record.epoch > self.unstored[0]:
            self.unstored = None  # the store moved on from the epoch it was renewed from
        self._asked = {e: t for e, t in self._asked.items() if e >= record.epoch}
        log.debug("%s: holding fleet epoch %d", self.name, record.epoch)
        self._wake()
        for listener in self.on_adopt:
            listener(record)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def publish(self, record: SessionRecord) -> WriteResult:
        """Store what Sugar just gave the leader, as the next epoch after the one read last.
        On Written the record is held here too; on Stale or NotLeader nothing changed in
        Redis and the caller must re-read (and, if it lost the lease, stop)."""
        # Above the held epoch too: after Redis lost its data the count starts again from 0,
        # and a follower that holds epoch 5 must see the new session as news.
        epoch = max(self.stored_epoch, self.epoch) + 1
        blob = seal(self.fleet.key, self.identity, epoch, record)
        result = await self.store.write(
            self.identity, self.fleet.holder, self.stored_epoch, epoch, blob
        )
        if isinstance(result, Written):
            self.stored_epoch = result.epoch
            self._lost = False
            self._adopt(replace(record, epoch=result.epoch))
        elif isinstance(result, NotLeader):
            self.lease.lost()
        return result

    def keep_unstored(self, record: SessionRecord) -> None:
        """Sugar gave this host `record` and no write took it (Redis went away, or the lease
        lapsed, while the call ran): store it as soon as the store answers (`store_unstored`)."""
        self.unstored = (self.stored_epoch, record)

    async def store_unstored(self) -> Written | Stale | None:
        """Store the session no write took, lease or not, if the store still holds the epoch
        it was renewed from, or nothing (Redis lost its data); None if there is none. Sugar
        rotated that epoch's refresh token, so this is the live session: the other hosts adopt
        it at once, and nobody logs in."""
        if self.unstored is None:
            return None
        renewed_from, record = self.unstored
        self.unstored = None  # taken: a round and the listener may both try at once
        epoch = max(self.stored_epoch, self.epoch, renewed_from) + 1
        blob = seal(self.fleet.key, self.identity, epoch, record)
        try:
            result = await self.store.offer(self.identity, renewed_from, epoch, blob)
        except FleetError:
            if self.unstored is None and self.stored_epoch in (0, renewed_from):
                self.unstored = (renewed_from, record)  # still the live one: next time
            raise
        if isinstance(result, Written):
            log.info(
                "%s: stored the session renewed as the store went away (epoch %d)",
                self.name,
                result.epoch,
            )
            self.stored_epoch = result.epoch
            self._lost = False
            self._adopt(replace(record, epoch=result.epoch))
        else:
            log.warning(
                "%s: the session renewed as the store went away is outdated (epoch %d is "
                "stored); taking that one",
                self.name,
                result.stored_epoch,
            )
            await self.reread()
        return result

    async def gather(self, wait: float) -> None:
        """After the store lost its record, before this leader calls Sugar: ask the other
        hosts for a session no write took (one that renewed as Redis went away holds the only
        live one) and wait for it to be stored, until `wait` s after the loss was noticed.
        A host holding one stores it at its first round anyway, so later there is nothing to
        wait for, and the leader goes on (its refresh token, else a login) at once."""
        deadline = self._lost_at + wait
        if not self._lost or self.lease.clock() >= deadline:
            return
        request = RenewalRequest("refresh", self.epoch, None, self.fleet.holder)
        await self.store.ask_leader(self.identity, request)
        while self._lost and (left := deadline - self.lease.clock()) > 0:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    async def ask_leader(
        self, kind: Literal["dead", "refresh"], token: str | None, wait: float
    ) -> SessionRecord | None:
        """Ask the leader to renew the session held now and wait up to `wait` s for a newer
        epoch. One request per epoch from this host, however many callers ask (repeated each
        lease/3 in case no leader heard it); None if nothing newer came in time."""
        asked_at = self.epoch
        deadline = self.lease.clock() + wait
        while self.epoch == asked_at:
            now = self.lease.clock()
            if now - self._asked.get(asked_at, float("-inf")) >= self.lease.length / 3:
                self._asked[asked_at] = now
                request = RenewalRequest(kind, asked_at, token, self.fleet.holder)
                await self.store.ask_leader(self.identity, request)
            if now >= deadline:
                return None
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(deadline - now, self.lease.length / 3))
        return self.current

    def heard_request(self, request: RenewalRequest) -> None:
        """A request from a follower: queued for the keeper once per epoch, and only while
        this host leads; one for an older epoch was answered already."""
        if request.sender == self.fleet.holder:
            return  # our own, from `gather`
        if self.role != "leader" or request.epoch < self.epoch:
            return
        if request.epoch <= self._queued_epoch:
            return
        self._queued_epoch = request.epoch
        self.requests.put_nowait(request)

    def heard_epoch(self, epoch: int) -> bool:
        """An announcement: whether it is news worth a re-read."""
        return epoch != self.epoch
