"""The lease as the leader sees it: its local deadline, and whether a call ends before it.

The deadline is counted from when the acquire or renew was sent, with room for clock drift; a
pure rule, tested apart from Redis.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
