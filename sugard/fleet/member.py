"""The lease as the leader sees it, one instance's seat in the fleet, and one daemon's fleet."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from sugard.config import FleetConfig, InstanceConfig
from sugard.fleet.errors import FleetError, StoreUnreachable, WrongKey, one_line
from sugard.fleet.sealing import FleetKey, SessionRecord, identity_of, seal, unseal
from sugard.fleet.store import FleetStore, NotLeader, RenewalRequest, WriteResult, Written

log = logging.getLogger("sugard.fleet")
Clock = Callable[[], float]
LEASE_DRIFT = 0.01  # clocks may run this much apart over one lease


class Lease:
    """The leader's own view of its lease. The deadline counts from when the acquire or renew
    was *sent*: Redis started its expiry no earlier, so a leader that stops by its deadline
    has stopped before Redis can hand the lease to another host (clocks drift less than
    LEASE_DRIFT over one lease)."""

    def __init__(self, length: float, clock: Clock = time.monotonic) -> None:
        self.length = length
        self.clock = clock
        self.deadline = float("-inf")

    def granted(self, sent_at: float) -> None:
        self.deadline = sent_at + self.length * (1 - LEASE_DRIFT)

    def lost(self) -> None:
        self.deadline = float("-inf")

    def remaining(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def held(self) -> bool:
        return self.clock() < self.deadline

    def may_run(self, duration: float) -> bool:
        """Whether something that takes up to `duration` ends within the lease."""
        return self.clock() + duration < self.deadline


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
    _lost: bool = False
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
                self._lost = True
                self.losses += 1
                if self.lease.held() and await self.store.holder(self.identity) != self.holder:
                    # Redis lost the lease with the record: another host may take it now, so
                    # this one must stop calling Sugar at once, not at its local deadline.
                    self.lease.lost()
                    self.holder = None
                    self._log_role()
                log.warning(
                    "%s: the fleet store lost the session (Redis restarted empty?); "
                    "the leader logs in once for the fleet",
                    self.name,
                )
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
        if self.role != "leader" or request.epoch < self.epoch:
            return
        if request.epoch <= self._queued_epoch:
            return
        self._queued_epoch = request.epoch
        self.requests.put_nowait(request)

    def heard_epoch(self, epoch: int) -> bool:
        """An announcement: whether it is news worth a re-read."""
        return epoch != self.epoch


def new_holder_id() -> str:
    """`host:pid:random`: the random part tells apart two processes with one pid (containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Fleet:
    """The fleet as one daemon sees it: the Redis client, this host's holder id, its members,
    one loop per member keeping the lease, and one pub/sub listener for all of them."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        store: FleetStore | None = None,
        clock: Clock = time.monotonic,
        holder: str | None = None,
    ) -> None:
        self.config = config
        self.key = FleetKey.from_text(config.key.reveal())
        self.store = store or FleetStore.from_config(config)
        self.clock = clock
        self.holder = holder or new_holder_id()
        self.members: dict[str, FleetMember] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # identity -> the loop keeping its lease
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def join(self, instance: InstanceConfig) -> FleetMember:
        """The seat of `instance`; two local instances with one identity share one seat."""
        identity = identity_of(instance, self.key)
        member = self.members.get(identity)
        if member is None:
            member = FleetMember(
                instance.name, identity, self, Lease(self.config.lease, self.clock)
            )
            self.members[identity] = member
            if self._listener is not None:  # joined after start: keep it, and listen for it too
                self._tasks[identity] = asyncio.create_task(
                    self._keep(member), name=f"fleet-{member.name}"
                )
                self._listener.cancel()
                self._listener = asyncio.create_task(self._listen(), name="fleet-listener")
        member.seats += 1
        return member

    async def start(self) -> None:
        """Start the keep-alive loops and the listener; neither waits for Redis to answer."""
        self._listener = asyncio.create_task(self._listen(), name="fleet-listener")
        for member in self.members.values():
            self._tasks[member.identity] = asyncio.create_task(
                self._keep(member), name=f"fleet-{member.name}"
            )

    async def leave(self, member: FleetMember) -> None:
        """A local instance no longer uses its seat (a reload removed it): once none does,
        stop keeping its lease and give it up, so another host leads it at once."""
        member.seats -= 1
        if member.seats > 0 or self.members.get(member.identity) is not member:
            return
        del self.members[member.identity]
        task = self._tasks.pop(member.identity, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._release(member)

    async def _release(self, member: FleetMember) -> None:
        if member.holder == self.holder:  # Redis may hold it past our own deadline
            member.lease.lost()
            member.holder = None
            try:
                await self.store.release(member.identity, self.holder)
            except StoreUnreachable as exc:
                log.warning("%s: could not release the fleet lease: %s", member.name, exc)

    async def stop(self) -> None:
        """Stop the loops and give up every lease held, so another host takes over at once."""
        tasks = [*self._tasks.values(), *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for member in self.members.values():
            await self._release(member)
        await self.store.close()

    async def _keep(self, member: FleetMember) -> None:
        while True:
            try:
                await member.tick()
                if member.problem:
                    log.info("%s: the fleet store answers again", member.name)
                member.problem, member.fault = None, None
            except FleetError as exc:
                if member.problem != str(exc):
                    log.error("%s: %s; serving the held token while it lasts", member.name, exc)
                member.problem, member.fault = str(exc), exc
            member.settled.set()
            await asyncio.sleep(self.config.lease / 3)

    def _channels(self) -> dict[str, tuple[FleetMember, str]]:
        return {
            self.store.key(m.identity, what): (m, what)
            for m in self.members.values()
            for what in ("epoch", "requests")
        }

    async def _listen(self) -> None:
        backoff = ExponentialWithJitterBackoff(cap=max(1.0, self.config.lease / 3), base=0.1)
        failures = 0
        while True:
            channels = self._channels()
            if not channels:
                await asyncio.Event().wait()  # until a join restarts the listener
            pubsub = self.store.redis.pubsub()
            try:
                await self.store.call("subscribing", pubsub.subscribe(*channels))
                failures = 0
                self.subscribed.set()
                # Announcements made while we were not listening are lost: read them now.
                await self._reread_all(self.members.values())
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        await self._dispatch(channels, message)
            except (StoreUnreachable, RedisError, OSError) as exc:
                self.subscribed.clear()
                failures += 1
                log.debug("fleet listener: %s; again in a moment", one_line(exc))
                await asyncio.sleep(backoff.compute(failures))
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _dispatch(
        self, channels: dict[str, tuple[FleetMember, str]], message: dict[str, Any]
    ) -> None:
        channel = message["channel"]
        target = channels.get(channel.decode() if isinstance(channel, bytes) else channel)
        if target is None:
            return
        member, what = target
        try:
            if what == "epoch":
                if member.heard_epoch(int(message["data"])):
                    await self._reread_all([member])
            else:
                data = json.loads(message["data"])
                kind: Literal["dead", "refresh"] = (
                    "refresh" if data.get("kind") == "refresh" else "dead"
                )
                token = data.get("token")
                member.heard_request(
                    RenewalRequest(kind, int(data["epoch"]), token, str(data.get("from", "")))
                )
        except (ValueError, KeyError, TypeError):
            log.warning("%s: ignored a malformed fleet message on %s", member.name, what)

    async def _reread_all(self, members: Iterable[FleetMember]) -> None:
        for member in members:
            try:
                await member.reread()
            except WrongKey as exc:
                log.error("%s: %s", member.name, exc)
