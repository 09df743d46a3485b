"""The fleet's rate limit: the releases of one instance by every host, counted in Redis, so
that all hosts together stay under its `rate_limit` (docs/fleet.md).

One atomic Lua script per release (one round trip): it keeps the release times of the last
window in a sorted set, reserves the next slot the pace allows (at least `count` releases
back plus the window, and a spacing after the last), on Redis' clock so the hosts' clocks
never matter, and notes this host as seen. No token request touches it: only a request that
is about to reach Sugar does.

When Redis does not answer, `reserve` raises and the governor counts on this host alone, with
this host's share of the limit: the limit divided by the hosts seen in the last minute. The
log says so once per outage, STATUS (`fleet.rate`) while it lasts; Redis is tried again after
`RETRY` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from sugard.fleet.errors import StoreUnreachable
from sugard.fleet.store import FleetStore

__all__ = ["HOST_TTL", "RESERVE_SCRIPT", "RETRY", "FleetRate"]

log = logging.getLogger("sugard.fleet")

HOST_TTL = 60.0  # a host that released nothing for this long is no longer counted
RETRY = 5.0  # seconds before Redis is asked again after it failed
TIMEOUT = 0.5  # at most this long for a release's round trip, whatever [fleet] timeout says

# KEYS: the log (sorted set of release times, in microseconds of Redis' clock), the hosts
# (hash: holder -> last seen). ARGV: count, window, spacing, patience, host TTL (all in
# microseconds), the holder. Returns {1 reserved | 0 too far away, delay in us, hosts seen}.
RESERVE_SCRIPT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local count, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local spacing, patience, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HSET', KEYS[2], ARGV[6], now)
local hosts = 0
local seen = redis.call('HGETALL', KEYS[2])
for i = 1, #seen, 2 do
  if now - tonumber(seen[i + 1]) <= ttl then
    hosts = hosts + 1
  else
    redis.call('HDEL', KEYS[2], seen[i])
  end
end
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl / 1000) * 2)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local slot = now
local held = redis.call('ZCARD', KEYS[1])
if held > 0 then
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  slot = math.max(slot, tonumber(last[2]) + spacing)
end
if held >= count then
  local nth = redis.call('ZRANGE', KEYS[1], held - count, held - count, 'WITHSCORES')
  slot = math.max(slot, tonumber(nth[2]) + window)
end
if slot - now > patience then return {0, slot - now, hosts} end
redis.call('ZADD', KEYS[1], slot, ARGV[6] .. ':' .. slot)
redis.call('PEXPIRE', KEYS[1], math.ceil((slot - now + window) / 1000) + 1000)
return {1, slot - now, hosts}
"""


class Pace(Protocol):
    """The governor's pace (sugard.proxy.governor.Pace), as far as Redis needs it."""

    @property
    def count(self) -> int: ...

    @property
    def window(self) -> float: ...

    @property
    def spacing(self) -> float: ...


class FleetRate:
    """One instance's releases, fleet-wide: the governor's slot source in fleet mode."""

    def __init__(
        self,
        store: FleetStore,
        identity: str,
        holder: str,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._keys = [store.key(identity, "rate"), store.key(identity, "rate-hosts")]
        self._holder = holder
        self._name = name
        self._clock = clock
        self._script = store.redis.register_script(RESERVE_SCRIPT)
        self.hosts = 1  # hosts seen at the last answer: a host's share is 1/hosts
        self._down_until = 0.0
        self.down: str | None = None  # why Redis cannot count now

    async def reserve(self, pace: Pace, patience: float) -> float | None:
        """The seconds until this host's next release (reserved), None if that is more than
        `patience` away; StoreUnreachable when Redis cannot say (count locally then)."""
        if self._clock() < self._down_until and self.down is not None:
            raise StoreUnreachable(self.down)
        micro = [pace.count, _us(pace.window), _us(pace.spacing), _us(patience), _us(HOST_TTL)]
        try:
            try:
                async with asyncio.timeout(TIMEOUT):
                    reserved, delay, hosts = await self._store.call(
                        "reserving a slot",
                        self._script(keys=self._keys, args=[*micro, self._holder]),
                    )
            except TimeoutError:
                raise StoreUnreachable(
                    f"Redis did not answer within {TIMEOUT:g} s (reserving a slot)"
                ) from None
        except StoreUnreachable as exc:
            if self.down is None:
                log.warning(
                    "%s: %s; keeping the rate limit on this host alone, with its share (1/%d "
                    "of the limit) until Redis answers again",
                    self._name,
                    exc,
                    self.hosts,
                )
            self.down = str(exc)
            self._down_until = self._clock() + RETRY
            raise
        if self.down is not None:
            log.info("%s: Redis counts the fleet's rate limit again", self._name)
            self.down = None
        self.hosts = max(1, int(hosts))
        return int(delay) / 1e6 if int(reserved) == 1 else None

    def share(self) -> float:
        """The part of the limit this host may use alone: 1 / the hosts seen."""
        return 1.0 / self.hosts

    def status(self) -> dict[str, Any]:
        """STATUS.fleet.rate: counted in Redis, or on this host alone (and why)."""
        if self.down is not None:
            return {"shared": False, "hosts": self.hosts, "fallback": self.down}
        return {"shared": True, "hosts": self.hosts}


def _us(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1e6))
