"""Fleet mode: the sugard of many hosts share one Sugar session per instance through Redis.

The pieces, each usable and tested on its own; the keeper wires them (see docs/fleet.md):

- `FleetKey`, `identity_of`: the shared key and the name an instance's session has in Redis
  (a keyed hash of url, username, platform and client_id: no username in plain text).
- `seal` / `unseal`: a `SessionRecord` to AES-GCM bytes and back, bound to its identity and epoch.
- `FleetStore`: every Redis command sugard sends, each bounded by a timeout; the session is
  written only by compare-and-set on the epoch, fenced by the lease.
- `Lease`: the leader's local deadline, counted from when it *sent* the acquire or renew.
- `FleetMember`: one instance's seat: role, the record held in memory, forwarding to the leader.
- `Fleet`: one per daemon: the Redis client, this host's holder id, one pub/sub listener.

Errors (nothing here ever carries a token, a password or the key):

    FleetError
    +-- StoreUnreachable    Redis did not answer in time, or the connection failed
    |   +-- StoreRefused    Redis answered but refused us (password, ACL rights)
    +-- WrongKey            a stored record does not open with this host's key
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError

from .config import Config, FleetConfig, InstanceConfig, Problem, decode_fleet_key
from .secret import Secret

__all__ = [
    "Fleet",
    "FleetError",
    "FleetKey",
    "FleetMember",
    "FleetStore",
    "Lease",
    "NotLeader",
    "RenewalRequest",
    "SessionRecord",
    "Stale",
    "StoreRefused",
    "StoreUnreachable",
    "Written",
    "WrongKey",
    "check_fleet_online",
    "identity_of",
    "seal",
    "unseal",
]

log = logging.getLogger("sugard.fleet")
REFUSALS = ("NOAUTH", "WRONGPASS", "NOPERM", "invalid username-password", "no permissions")
T = TypeVar("T")
Clock = Callable[[], float]
RECORD_VERSION = b"\x01"
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, random per record
LEASE_DRIFT = 0.01  # clocks may run this much apart over one lease


class FleetError(Exception):
    """Fleet mode cannot do what was asked; the message says what to fix."""


class StoreUnreachable(FleetError):
    """Redis did not answer within the timeout, or the connection failed."""


class StoreRefused(StoreUnreachable):
    """Redis answered but refused: wrong password, or the ACL user lacks a right."""


class WrongKey(FleetError):
    """A stored record does not open with this host's fleet key."""


# --- the key and the identity ------------------------------------------------------------------


class FleetKey:
    """The shared key; two subkeys derived from it (HKDF), one to seal records, one to name
    them, so neither use can weaken the other. Never shows itself."""

    __slots__ = ("_aead", "_naming")

    def __init__(self, raw: bytes) -> None:
        self._aead = AESGCM(_derive(raw, b"sugard fleet record v1"))
        self._naming = _derive(raw, b"sugard fleet identity v1")

    @classmethod
    def from_text(cls, text: str) -> FleetKey:
        """From the one-line form `sugard init --fleet-key` writes; ValueError if it is not."""
        return cls(decode_fleet_key(text))

    def mark(self) -> str:
        """A public check value of the key (a MAC of a constant): equal marks, equal keys."""
        return hmac.new(self._naming, b"sugard fleet key check", hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return "FleetKey(***)"


def _derive(raw: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(raw)


def identity_of(instance: InstanceConfig, key: FleetKey) -> str:
    """The fleet-wide name of an instance's session: what Sugar's one-session rule is keyed on
    (url, username, platform, client_id), hashed under the key so Redis shows no username.
    The local name is not part of it: hosts may call the same instance differently."""
    fields = [instance.url, instance.username, instance.platform, instance.client_id]
    digest = hmac.new(key._naming, json.dumps(fields).encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


# --- the record -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRecord:
    """One Sugar session as the fleet shares it. Times are wall clock (`time.time()`): hosts
    share them, and their monotonic clocks mean nothing to each other."""

    access_token: Secret
    refresh_token: Secret
    expires_at: float
    refresh_expires_at: float | None = None
    download_token: Secret | None = None
    epoch: int = 0  # given by the store: 0 means never stored

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "access_token": self.access_token.reveal(),
                "refresh_token": self.refresh_token.reveal(),
                "download_token": self.download_token.reveal() if self.download_token else None,
                "expires_at": self.expires_at,
                "refresh_expires_at": self.refresh_expires_at,
            }
        ).encode()


def _aad(identity: str, epoch: int) -> bytes:
    # Bound to its identity and epoch: a record copied to another instance's key, or an old
    # record put back under a newer epoch, does not open.
    return f"sugard-fleet:{identity}:{epoch}".encode()


def seal(key: FleetKey, identity: str, epoch: int, record: SessionRecord) -> bytes:
    """`record` encrypted for `identity` at `epoch`: version, random nonce, AES-GCM output."""
    nonce = os.urandom(NONCE_BYTES)
    return (
        RECORD_VERSION + nonce + key._aead.encrypt(nonce, record.as_json(), _aad(identity, epoch))
    )


def unseal(key: FleetKey, identity: str, epoch: int, blob: bytes) -> SessionRecord:
    """The record in `blob`; WrongKey if it does not open (another key, moved, or altered)."""
    body = blob[len(RECORD_VERSION) + NONCE_BYTES :]
    nonce = blob[len(RECORD_VERSION) : len(RECORD_VERSION) + NONCE_BYTES]
    if not blob.startswith(RECORD_VERSION) or not body:
        raise FleetError(
            f"the stored session {identity} has a form this sugard does not read; "
            "run the same sugard version on every host"
        )
    try:
        data = json.loads(key._aead.decrypt(nonce, body, _aad(identity, epoch)))
    except InvalidTag:
        raise WrongKey(
            f"the stored session {identity} does not open with this host's fleet key: every "
            "host needs the same key (copy the key file of the others, then sugard check --online)"
        ) from None
    return SessionRecord(
        access_token=Secret(data["access_token"]),
        refresh_token=Secret(data["refresh_token"]),
        download_token=Secret(data["download_token"]) if data["download_token"] else None,
        expires_at=float(data["expires_at"]),
        refresh_expires_at=data["refresh_expires_at"],
        epoch=epoch,
    )


# --- the store --------------------------------------------------------------------------------


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
                    f"Redis refused {what}: {_one_line(exc)}; check [fleet] redis_password and "
                    "the ACL user's rights (docs/fleet.md)"
                ) from None
            if isinstance(exc, ResponseError):
                raise StoreUnreachable(f"Redis failed {what}: {_one_line(exc)}") from None
            raise StoreUnreachable(f"Redis unreachable ({what}): {_one_line(exc)}") from None

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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


# --- the lease, as the leader sees it ---------------------------------------------------------


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


# --- one instance's seat in the fleet ---------------------------------------------------------


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


# --- one per daemon ---------------------------------------------------------------------------


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
        self._tasks: list[asyncio.Task[None]] = []
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
                self._tasks.append(
                    asyncio.create_task(self._keep(member), name=f"fleet-{member.name}")
                )
                self._listener.cancel()
                self._listener = asyncio.create_task(self._listen(), name="fleet-listener")
        return member

    async def start(self) -> None:
        """Start the keep-alive loops and the listener; neither waits for Redis to answer."""
        self._listener = asyncio.create_task(self._listen(), name="fleet-listener")
        for member in self.members.values():
            self._tasks.append(asyncio.create_task(self._keep(member), name=f"fleet-{member.name}"))

    async def stop(self) -> None:
        """Stop the loops and give up every lease held, so another host takes over at once."""
        tasks = [*self._tasks, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for member in self.members.values():
            if member.lease.held():
                member.lease.lost()
                try:
                    await self.store.release(member.identity, self.holder)
                except StoreUnreachable as exc:
                    log.warning("%s: could not release the fleet lease: %s", member.name, exc)
        await self.store.close()

    async def _keep(self, member: FleetMember) -> None:
        while True:
            try:
                await member.tick()
                if member.problem:
                    log.info("%s: the fleet store answers again", member.name)
                member.problem = None
            except FleetError as exc:
                if member.problem != str(exc):
                    log.error("%s: %s; serving the held token while it lasts", member.name, exc)
                member.problem = str(exc)
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
                log.debug("fleet listener: %s; again in a moment", _one_line(exc))
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


# --- sugard check --online ----------------------------------------------------------------------


def check_fleet_online(config: Config) -> tuple[list[str], list[Problem]]:
    """For `sugard check --online`: reach Redis (AUTH, PING) and prove the key opens what is
    stored for each fleet instance. (lines to print, problems)."""
    return asyncio.run(_check_fleet(config))


async def _check_fleet(config: Config) -> tuple[list[str], list[Problem]]:
    fleet = config.fleet
    assert fleet is not None
    lines: list[str] = []
    problems: list[Problem] = []
    store = FleetStore.from_config(fleet)
    key = FleetKey.from_text(fleet.key.reveal())
    try:
        await store.ping()
        lines.append(f"the fleet store at {fleet.redis_url}: reached")
        await store.check_key(key)
        for name, instance in config.instances.items():
            if not instance.fleet:
                lines.append(f"  {name}: local (fleet = false)")
                continue
            identity = identity_of(instance, key)
            found = await store.read(identity)
            if found is None:
                lines.append(f"  {name}: nothing stored yet ({identity})")
                continue
            try:
                unseal(key, identity, *found)
            except FleetError as exc:
                problems.append(Problem(config.path, f"instances.{name}", str(exc)))
                continue
            holder = await store.holder(identity)
            lines.append(
                f"  {name}: stored session epoch {found[0]} opens with this key "
                f"(leader: {holder or 'none now'})"
            )
    except StoreUnreachable as exc:
        problems.append(Problem(config.path, "fleet.redis_url", str(exc)))
    finally:
        await store.close()
    return lines, problems
