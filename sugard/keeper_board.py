"""Where a keeper's requests and its supervisor meet: the one `Demand` and the one condition.

A request joins the demand (however many join, it is made once) and waits on the condition;
the supervisor acts on the demand and settles it. Every change of the demand, the grant or
the state wakes everyone waiting (`notify`), and each waiter re-reads what it needs. The
condition is an event replaced each time it is set, so a waiter never sees a stale `set`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .keeper_model import Demand, Need

__all__ = ["Board"]


class Board:
    """The one demand a keeper's supervisor owes, and the condition its waiters wait on."""

    def __init__(self) -> None:
        self.demand: Demand | None = None  # at most one, pending or in flight
        self.closed = False  # the keeper stopped: waiters give up
        self._changed = asyncio.Event()

    def join(self, need: Need, reason: str, *, forced: bool = False) -> Demand:
        """The demand that will bring what is needed: the one pending or in flight, or a new one."""
        demand = self.demand
        if demand is None or demand.done:
            demand = self.demand = Demand(need, reason)
        elif need is Need.RENEW and demand.need is Need.CHECK:
            demand.need, demand.reason = Need.RENEW, reason
        elif not (forced and not demand.in_flight and not demand.forced):
            return demand  # nothing changed: a thousand joiners wake nobody
        if forced and not demand.in_flight:
            demand.forced = True  # an attempt already under way answers the person as it is
        self.notify()
        return demand

    def pending(self) -> Demand | None:
        """The demand not yet settled, if any."""
        demand = self.demand
        return demand if demand is not None and not demand.done else None

    def settle(self, demand: Demand, *, failed: bool, done: bool = True) -> None:
        """An attempt (or a check) of `demand` has finished: tell its waiters."""
        demand.attempts += 1
        demand.failed = failed
        demand.done = done
        if done and self.demand is demand:
            self.demand = None
        self.notify()

    def drop(self, demand: Demand) -> None:
        """`demand` ends with no attempt counted (a refusal that needs a person)."""
        demand.done = True
        if self.demand is demand:
            self.demand = None
        self.notify()

    def close(self) -> None:
        self.closed = True
        self.notify()

    def notify(self) -> None:
        """Something changed (demand, grant, state): wake everyone waiting, who re-check."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def idle(self, seconds: float) -> bool:
        """Wait up to `seconds` for the next change; whether one came."""
        changed = self._changed
        try:
            async with asyncio.timeout(seconds):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_for(self, condition: Callable[[], bool], deadline: float) -> bool:
        """Wait until `condition()` holds, the board closes or the loop's clock reaches
        `deadline`; whether `condition()` held."""
        loop = asyncio.get_running_loop()
        while not condition():
            left = deadline - loop.time()
            if self.closed or left <= 0:
                return False
            await self.idle(left)
        return True
