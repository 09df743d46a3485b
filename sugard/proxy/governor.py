"""The request governor: at most `rate_limit` requests a second reach an instance's Sugar from
sugard (proxied requests and sugard's own calls together), shared fairly between the client
processes, sugard's own calls first. docs/proxy.md has the rules and why.

- **Pace.** A sliding log: at most `count` (the whole part of the rate, at least 1) requests
  in any window of `window` seconds, a window 10% longer than a second (or than `count` /
  rate, for rates below 1): the time from a request's release here to its arrival at Sugar
  varies (a new connection, a busy host), and the margin keeps every one-second window at
  Sugar within the limit. Releases are spaced at least half a rate's interval apart, so a
  burst reaches Sugar spread out, not as one clump.
- **Slots.** A `SlotSource` says when the next release may be: `LocalLog` (this host), or in
  fleet mode the fleet's log in Redis (`sugard.fleet.ratelimit`), one round trip per release.
- **Fairness.** Round robin between client processes (one request per process per turn),
  sugard's own calls (renewals, probes, replays) before any: every request costs one slot
  whatever its size, so deficit round robin would give the same order.
- **Patience.** A request waits at most `rate_wait` seconds; one that cannot go within it
  (predicted at arrival from the requests ahead of it in the round robin, or found when its
  time is up) gets 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sugard.config import InstanceConfig
from sugard.observe import Governed, Observer

__all__ = ["MARGIN", "Governor", "LocalLog", "Pace", "RateRefused", "SlotSource"]

log = logging.getLogger("sugard.proxy")

MARGIN = 0.1  # the window is this much longer than the second it stands for
OWN_PATIENCE = 3600.0  # sugard's own calls wait for a slot however long it takes


@dataclass(frozen=True)
class Pace:
    """`count` releases in any `window` seconds, at least `spacing` seconds apart."""

    count: int
    window: float
    limit: float  # the rate_limit it keeps

    @classmethod
    def of(cls, rate: float) -> Pace:
        count = max(1, math.floor(rate))
        return cls(count, max(1.0, count / rate) * (1 + MARGIN), rate)

    @property
    def spacing(self) -> float:
        return self.window / self.count / 2

    @property
    def rate(self) -> float:
        """Releases per second, sustained."""
        return self.count / self.window


class SlotSource(Protocol):
    """Where the releases of one instance are counted: this host, or the fleet."""

    async def reserve(self, pace: Pace, patience: float) -> float | None:
        """Take the next free slot if it is at most `patience` seconds away: the seconds
        until it (0: now); None, taking nothing, if it is further away."""
        ...

    def share(self) -> float:
        """The part of the limit this host may use when `reserve` fails (and it counts on
        its own): 1 for a host alone, 1/hosts in a fleet."""
        ...

    def status(self) -> dict[str, Any]:
        """What STATUS says of it."""
        ...


class LocalLog:
    """The slots of one host: the times of the last releases."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._times: deque[float] = deque()

    async def reserve(self, pace: Pace, patience: float) -> float | None:
        now = self._clock()
        times = self._times
        while len(times) > pace.count:
            times.popleft()
        slot = now
        if times:
            slot = max(slot, times[-1] + pace.spacing)
        if len(times) >= pace.count:
            slot = max(slot, times[-pace.count] + pace.window)
        if slot - now > patience:
            return None
        times.append(slot)
        return slot - now

    def share(self) -> float:
        return 1.0

    def status(self) -> dict[str, Any]:
        return {"shared": False}


class RateRefused(Exception):
    """The request cannot go within rate_wait; `retry_after` in whole seconds."""

    def __init__(self, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.message = message


Flow = Hashable  # a client process (proxy.clients.Caller); OWN for sugard's own calls


@dataclass(eq=False)
class _Ticket:
    flow: Flow
    deadline: float
    released: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Lane:
    """One instance's queue and its scheduler task."""

    def __init__(
        self, name: str, rate: float, wait: float, slots: SlotSource, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self.rate = rate
        self.wait = wait
        self.pace = Pace.of(rate)
        self.slots = slots
        self._clock = clock
        self._own: deque[_Ticket] = deque()
        self._queues: dict[Flow, deque[_Ticket]] = {}
        self._turns: deque[Flow] = deque()  # flows with a waiting ticket, in round-robin order
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._alone = LocalLog(clock)  # when `slots` (the fleet's) cannot count

    def take(self, rate: float, wait: float, slots: SlotSource) -> None:
        """New settings (a reload, the fleet's slots): the queue stays."""
        self.rate, self.wait, self.slots = rate, wait, slots
        self.pace = Pace.of(rate)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for ticket in [*self._own, *(t for q in self._queues.values() for t in q)]:
            if not ticket.released.done():
                ticket.released.set_exception(RateRefused(1, "sugard is stopping"))

    @property
    def waiting(self) -> int:
        return len(self._own) + sum(len(q) for q in self._queues.values())

    async def admit(self, flow: Flow) -> float:
        """Wait for this request's turn and slot; the seconds it waited. RateRefused if it
        cannot go within rate_wait."""
        started = self._clock()
        queue = self._queues.get(flow)
        mine = len(queue) if queue is not None else 0
        ahead = len(self._own) + mine
        ahead += sum(min(len(q), mine + 1) for other, q in self._queues.items() if other != flow)
        expected = ahead / self.pace.rate
        if expected > self.wait:
            raise self._refusal(expected)
        # rate_wait 0 means "only if a slot is free now": allow the scheduler one turn.
        wait = max(self.wait, self.pace.spacing)
        ticket = _Ticket(flow, started + wait)
        if queue is None:
            queue = self._queues[flow] = deque()
            self._turns.append(flow)
        queue.append(ticket)
        await self._released(ticket, wait)
        return self._clock() - started

    async def own_call(self) -> None:
        """Wait for the next slot, before any client's request."""
        ticket = _Ticket(None, self._clock() + OWN_PATIENCE)
        self._own.append(ticket)
        await self._released(ticket, OWN_PATIENCE)

    async def _released(self, ticket: _Ticket, wait: float) -> None:
        self._start()
        self._wake.set()
        try:
            async with asyncio.timeout(wait):
                await asyncio.shield(ticket.released)
        except TimeoutError:
            if ticket.released.done():
                ticket.released.result()
                return
            self._drop(ticket)
            raise self._refusal(self.waiting / self.pace.rate) from None
        except BaseException:
            self._drop(ticket)  # cancelled: the client went away
            raise

    def _refusal(self, expected: float) -> RateRefused:
        retry_after = max(1, math.ceil(expected - self.wait))
        return RateRefused(
            retry_after,
            f"sugard keeps {self.name}'s Sugar under rate_limit {self.rate:g} requests/s and "
            f"this request could not go within rate_wait {self.wait:g} s; try again in "
            f"{retry_after} s",
        )

    def _drop(self, ticket: _Ticket) -> None:
        if ticket.released.done():
            return
        ticket.released.cancel()
        if ticket.flow is None:
            with contextlib.suppress(ValueError):
                self._own.remove(ticket)
            return
        queue = self._queues.get(ticket.flow)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(ticket)
            if not queue:
                self._forget(ticket.flow)

    def _forget(self, flow: Flow) -> None:
        del self._queues[flow]
        with contextlib.suppress(ValueError):
            self._turns.remove(flow)

    def _next(self) -> _Ticket | None:
        """sugard's own call first, else the next flow's oldest request (round robin)."""
        while self._own:
            ticket = self._own.popleft()
            if not ticket.released.done():
                return ticket
        while self._turns:
            flow = self._turns.popleft()
            queue = self._queues[flow]
            ticket = queue.popleft()
            if queue:
                self._turns.append(flow)
            else:
                del self._queues[flow]
            if not ticket.released.done():
                return ticket
        return None

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"governor-{self.name}"
            )

    async def _run(self) -> None:
        while True:
            if not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            patience = self._patience()
            try:
                delay = await self.slots.reserve(self.pace, patience)
            except Exception:
                # The fleet's count is out of reach (its source logs why): count here, with
                # this host's share of the limit.
                log.debug("%s: counting locally", self.name, exc_info=True)
                alone = Pace.of(self.rate * self.slots.share())
                delay = await self._alone.reserve(alone, patience)
            if delay is None:
                self._refuse_all()
                continue
            if delay > 0:
                await asyncio.sleep(delay)
            ticket = self._next()
            if ticket is not None:
                ticket.released.set_result(None)

    def _patience(self) -> float:
        """How far away a slot may be and still be used: the most patient request's time."""
        now = self._clock()
        if self._own:
            return OWN_PATIENCE
        return max((t.deadline - now for q in self._queues.values() for t in q), default=0.0)

    def _refuse_all(self) -> None:
        """No slot within any waiting request's time (other hosts took them): all get 429."""
        refusal = self._refusal(self.wait + 1)
        for queue in self._queues.values():
            for ticket in queue:
                if not ticket.released.done():
                    ticket.released.set_exception(refusal)
        self._queues.clear()
        self._turns.clear()


class Governor:
    """The lanes of every instance with a rate_limit; an instance's settings are read from
    its config at each request (`config_of`), so a reload applies at once."""

    def __init__(
        self,
        config_of: Callable[[str], InstanceConfig | None],
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config_of = config_of
        self._observer = observer or Observer()
        self._clock = clock
        self._lanes: dict[str, Lane] = {}
        self._shared: dict[str, SlotSource] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def share(self, name: str, slots: SlotSource | None) -> None:
        """Count `name`'s releases in `slots` (the fleet's), or (None) on this host."""
        if slots is None:
            self._shared.pop(name, None)
        else:
            self._shared[name] = slots

    def lane(self, name: str) -> Lane | None:
        """The lane of `name`, None when it has no rate_limit (or is not configured)."""
        config = self._config_of(name)
        lane = self._lanes.get(name)
        if config is None or config.rate_limit <= 0:
            if lane is not None:
                del self._lanes[name]
                self._close_later(lane)
            return None
        slots = self._shared.get(name)
        if lane is None:
            lane = self._lanes[name] = Lane(
                name, config.rate_limit, config.rate_wait, slots or LocalLog(), self._clock
            )
        elif (lane.rate, lane.wait) != (config.rate_limit, config.rate_wait) or (
            slots is not None and lane.slots is not slots
        ):
            lane.take(config.rate_limit, config.rate_wait, slots or lane.slots)
        return lane

    async def admit(self, name: str, flow: Flow) -> float:
        """A proxied request to `name` may go: the seconds it queued (0 with no limit).
        RateRefused if it cannot go within rate_wait."""
        lane = self.lane(name)
        if lane is None:
            return 0.0
        try:
            queued = await lane.admit(flow)
        except RateRefused:
            self._observer.observe(Governed(name, None))
            raise
        self._observer.observe(Governed(name, queued))
        return queued

    async def own_call(self, name: str) -> None:
        """sugard's own call to `name`'s Sugar (a renewal, a probe, a replay) may go."""
        lane = self.lane(name)
        if lane is not None:
            await lane.own_call()

    def pacer(self, name: str) -> Callable[[], Any]:
        """The wait before each of `name`'s own calls, for its Sugar client."""

        async def pace() -> None:
            await self.own_call(name)

        return pace

    def _close_later(self, lane: Lane) -> None:
        task = asyncio.get_running_loop().create_task(lane.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        lanes, self._lanes = list(self._lanes.values()), {}
        await asyncio.gather(*(lane.close() for lane in lanes), *self._closing)
