"""Every Redis command sugard sends, each bounded by a timeout; writes by compare-and-set."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError

from sugard.config import FleetConfig
from sugard.fleet.errors import StoreRefused, StoreUnreachable, WrongKey
from sugard.fleet.sealing import FleetKey
from sugard.text import one_line

REFUSALS = ("NOAUTH", "WRONGPASS", "NOPERM", "invalid username-password", "no permissions")
T = TypeVar("T")


@dataclass(frozen=True)
class RenewalRequest:
    """A follower asks the leader to renew the session at `epoch`. It names the token by its
    fingerprint only: no token ever goes through Redis in plain text."""

    kind: Literal["dead", "refresh"]
    epoch: int
    token: str | None = None  # Secret.fingerprint of the reported token
    sender: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": self.epoch, "token": self.token, "from": self.sender}


@dataclass(frozen=True)
class Written:
    """The record is stored as `epoch` and announced."""

    epoch: int


@dataclass(frozen=True)
class Stale:
    """Not written: the store holds `stored_epoch`, newer than the writer knew."""

    stored_epoch: int


@dataclass(frozen=True)
class NotLeader:
    """Not written: the writer does not hold the lease (any more)."""

    stored_epoch: int


WriteResult = Written | Stale | NotLeader

# Compare-and-set on the epoch, fenced by the lease, and the announcement, in one atomic step:
# a leader that lost its lease, or missed a newer write, cannot overwrite anything.
WRITE_SCRIPT = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {0, stored} end
if stored ~= tonumber(ARGV[2]) then return {-1, stored} end
redis.call('HSET', KEYS[1], 'epoch', ARGV[5], 'blob', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {1, tonumber(ARGV[5])}
"""
# A session a host got from Sugar that no write took (Redis went away, or the lease lapsed,
# while the call ran): stored, lease or not, if the store still holds the epoch it was renewed
# from, or nothing at all (Redis lost its data). Sugar has rotated that epoch's refresh token,
# so this is the only live session; anything newer in the store wins.
OFFER_SCRIPT = """
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if stored ~= 0 and stored ~= tonumber(ARGV[1]) then return {-1, stored} end
redis.call('HSET', KEYS[1], 'epoch', ARGV[4], 'blob', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {1, tonumber(ARGV[4])}
"""
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def redis_client(fleet: FleetConfig) -> aioredis.Redis:
    """The Redis client for `[fleet]`. redis-py retries once, at once, on a lost connection
    (a pooled one that a restarted Redis closed); `FleetStore.call` bounds the whole with
    `timeout`, because the lease arithmetic needs every command to end in time. Beyond that the
    fleet's loops are the retry: the lease loop every lease/3, the pub/sub listener paced by
    redis-py's jittered exponential backoff (no tenacity here: redis-py has both already)."""
    options: dict[str, Any] = {
        "socket_timeout": fleet.timeout,
        "socket_connect_timeout": fleet.timeout,
        "retry": Retry(NoBackoff(), 1),
        "client_name": "sugard",
    }
    if fleet.redis_password is not None:
        options["password"] = fleet.redis_password.reveal()
    if fleet.redis_url.startswith("rediss://"):
        options["ssl_cert_reqs"] = "required" if fleet.verify_tls else "none"
        options["ssl_check_hostname"] = fleet.verify_tls
        if fleet.ca_file:
            options["ssl_ca_certs"] = fleet.ca_file
    return aioredis.Redis.from_url(fleet.redis_url, **options)


class FleetStore:
    """Every command sugard sends to Redis, each bounded by `timeout`, each failure typed.

    Keys (all under `prefix`, so one ACL pattern covers them): `P:ID:session` (a hash of epoch
    and sealed blob), `P:ID:lease` (the holder id, with Redis' expiry); channels `P:ID:epoch`
    (the epoch just stored) and `P:ID:requests` (renewal requests to the leader).
    """

    def __init__(self, client: aioredis.Redis, prefix: str, timeout: float) -> None:
        self.redis = client
        self.prefix = prefix
        self.timeout = timeout
        self._write = client.register_script(WRITE_SCRIPT)
        self._offer = client.register_script(OFFER_SCRIPT)
        self._renew = client.register_script(RENEW_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    @classmethod
    def from_config(cls, fleet: FleetConfig) -> FleetStore:
        return cls(redis_client(fleet), fleet.prefix, fleet.timeout)

    def key(self, identity: str, what: str) -> str:
        return f"{self.prefix}:{identity}:{what}"

    async def call(self, what: str, command: Awaitable[T]) -> T:
        """`command` within the timeout; Redis' and the network's errors as StoreUnreachable."""
        try:
            async with asyncio.timeout(self.timeout):
                return await command
        except TimeoutError:
            raise StoreUnreachable(
                f"Redis did not answer {what} within {self.timeout:g} s"
            ) from None
        except (RedisError, OSError) as exc:
            # redis-py reports a failed AUTH on connect as a plain ConnectionError: the
            # message is what tells a refusal from an outage.
            refused = isinstance(exc, AuthenticationError | NoPermissionError) or any(
                word in str(exc) for word in REFUSALS
            )
            if refused:
                raise StoreRefused(
                    f"Redis refused {what}: {one_line(exc, 200)}; check [fleet] redis_password and "
                    "the ACL user's rights (docs/fleet.md)"
                ) from None
            if isinstance(exc, ResponseError):
                raise StoreUnreachable(f"Redis failed {what}: {one_line(exc, 200)}") from None
            raise StoreUnreachable(f"Redis unreachable ({what}): {one_line(exc, 200)}") from None

    async def ping(self) -> None:
        await self.call("PING", self.redis.ping())

    async def check_key(self, key: FleetKey) -> None:
        """WrongKey unless `key` is the fleet's. The first host to come (after Redis started
        empty, too) sets the mark. Without it a host with another key would see no session
        (identities are keyed) and log in on its own, logging the whole fleet out of Sugar."""
        where = f"{self.prefix}:key-check"
        await self.call("checking the key", self.redis.set(where, key.mark(), nx=True))
        stored = await self.call("checking the key", self.redis.get(where))
        if stored is not None and stored != key.mark().encode():
            raise WrongKey(
                "this host's fleet key is not the one the other hosts use: copy their key file "
                f"(or, if the others are wrong, delete {where} in Redis); not joining the fleet"
            )

    async def read(self, identity: str) -> tuple[int, bytes] | None:
        """(epoch, sealed blob) as stored, or None when nothing is."""
        found = await self.call(
            "reading a session", self.redis.hmget(self.key(identity, "session"), "epoch", "blob")
        )
        epoch, blob = found
        if epoch is None or blob is None:
            return None
        return int(epoch), blob if isinstance(blob, bytes) else blob.encode()

    async def write(
        self, identity: str, holder: str, expected: int, epoch: int, blob: bytes
    ) -> WriteResult:
        """Store `blob` as `epoch` if the store holds `expected` and `holder` holds the lease;
        announce it on the epoch channel. Atomic (one Lua script)."""
        if epoch <= expected:
            raise ValueError("a new epoch must be above the stored one")
        done, stored = await self.call(
            "storing a session",
            self._write(
                keys=[self.key(identity, "session"), self.key(identity, "lease")],
                args=[holder, expected, blob, self.key(identity, "epoch"), epoch],
            ),
        )
        if done == 1:
            return Written(int(stored))
        return NotLeader(int(stored)) if done == 0 else Stale(int(stored))

    async def offer(
        self, identity: str, renewed_from: int, epoch: int, blob: bytes
    ) -> Written | Stale:
        """Store `blob` as `epoch`, a session renewed from the stored epoch `renewed_from` that
        no write took, if the store still holds that epoch or nothing; announce it. Atomic."""
        if epoch <= renewed_from:
            raise ValueError("a new epoch must be above the one it was renewed from")
        done, stored = await self.call(
            "storing a session",
            self._offer(
                keys=[self.key(identity, "session")],
                args=[renewed_from, blob, self.key(identity, "epoch"), epoch],
            ),
        )
        return Written(int(stored)) if done == 1 else Stale(int(stored))

    async def acquire(self, identity: str, holder: str, lease: float) -> bool:
        """Take the lease if nobody holds it (SET NX PX)."""
        taken = await self.call(
            "taking the lease",
            self.redis.set(self.key(identity, "lease"), holder, nx=True, px=_ms(lease)),
        )
        return bool(taken)

    async def renew(self, identity: str, holder: str, lease: float) -> bool:
        """Extend the lease if `holder` still holds it (compare-and-renew)."""
        renewed = await self.call(
            "renewing the lease",
            self._renew(keys=[self.key(identity, "lease")], args=[holder, _ms(lease)]),
        )
        return bool(renewed)

    async def release(self, identity: str, holder: str) -> bool:
        """Give the lease up if `holder` still holds it (compare-and-delete)."""
        released = await self.call(
            "releasing the lease",
            self._release(keys=[self.key(identity, "lease")], args=[holder]),
        )
        return bool(released)

    async def holder(self, identity: str) -> str | None:
        found = await self.call("reading the lease", self.redis.get(self.key(identity, "lease")))
        return found.decode() if isinstance(found, bytes) else None

    async def ask_leader(self, identity: str, request: RenewalRequest) -> None:
        await self.call(
            "forwarding a request",
            self.redis.publish(self.key(identity, "requests"), json.dumps(request.as_dict())),
        )

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
