"""Where a fleet instance's keeper gets its grants: from Sugar while this host leads, from the
fleet's store otherwise.

`FleetSource` stands where the keeper's `SugarClient` stands (login, refresh, probe, version)
and decides, per call, who may talk to Sugar's token endpoint:

- the leader calls Sugar only while `may_call_sugar` says its lease outlasts the call, reads
  the store again before any password login, and stores every new grant by compare-and-set;
- a follower never calls the token endpoint: it asks the leader (one request per epoch) and
  answers with the record the leader stored;
- either way, a record in the store newer than what the keeper holds is answered at once, with
  no call at all: a cold start, a failover or a restart continues the fleet's session.

Records adopted in the background (pub/sub) go to the keeper through `Seat.offer`; renewal
requests from followers reach the leader's keeper through `Seat.request_renewal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import aiohttp

from sugard.config import FleetConfig, InstanceConfig
from sugard.fleet.errors import FleetError, WrongKey
from sugard.fleet.member import FleetMember
from sugard.fleet.ratelimit import FleetRate
from sugard.fleet.sealing import SessionRecord
from sugard.fleet.store import NotLeader, Stale, WriteResult, Written
from sugard.observe import RenewalReason
from sugard.secret import Secret
from sugard.sugar import Grant, SugarClient
from sugard.sugar.errors import RejectedError, TransientError

log = logging.getLogger("sugard.fleet")
TOKEN_TYPE = "bearer"  # noqa: S105 - the type Sugar gives every token; the record omits it


class FleetWaiting(TransientError):
    """No session from the fleet yet (the leader has not stored one, or Redis is out of reach):
    serve the held token while it is valid, and ask again after a backoff."""

    kind = "fleet"


class FleetRefused(RejectedError):
    """This host cannot take part in the fleet (another shared key): a person must fix it."""

    kind = "fleet_key"


class Seat(Protocol):
    """What the source needs of the keeper it feeds."""

    def offer(self, grant: Grant) -> bool: ...

    def request_renewal(self, reason: RenewalReason) -> None: ...

    def suspect(self, token: Secret, *, hold: bool) -> None: ...


def shown_url(fleet: FleetConfig) -> str:
    """Where Redis is, for messages: its URL without a password in it."""
    url = urllib.parse.urlsplit(fleet.redis_url)
    if url.password is None:
        return fleet.redis_url
    host = url.netloc.rpartition("@")[2]
    user = f"{url.username}@" if url.username else ""
    return urllib.parse.urlunsplit(url._replace(netloc=user + host))


def grant_of(record: SessionRecord) -> Grant:
    issued = record.issued_at if record.issued_at is not None else record.expires_at - 3600
    return Grant(
        access_token=record.access_token,
        refresh_token=record.refresh_token,
        download_token=record.download_token or Secret(""),
        token_type=TOKEN_TYPE,
        issued_at=issued,
        expires_at=record.expires_at,
        refresh_expires_at=record.refresh_expires_at,
    )


def record_of(grant: Grant) -> SessionRecord:
    return SessionRecord(
        access_token=grant.access_token,
        refresh_token=grant.refresh_token,
        download_token=grant.download_token if grant.download_token.reveal() else None,
        expires_at=grant.expires_at,
        refresh_expires_at=grant.refresh_expires_at,
        issued_at=grant.issued_at,
    )


class FleetSource(SugarClient):
    """One fleet instance's grants, as its keeper asks for them (see the module's doc): a
    SugarClient whose token-endpoint calls the fleet decides on."""

    def __init__(
        self,
        instance: InstanceConfig,
        session: aiohttp.ClientSession,
        member: FleetMember,
        where: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(instance, session, clock)
        self.member = member
        # The instance's rate_limit is the fleet's: the governor counts here (ratelimit.py).
        self.rate = FleetRate(member.store, member.identity, member.fleet.holder, member.name)
        self._where = f"the fleet store (Redis at {where})"
        self._handed = 0  # the epoch the keeper holds: a newer stored one is answered at once
        self._served: Secret | None = None  # the token of the grant the keeper holds from us
        self._seat: Seat | None = None
        self._task: asyncio.Task[None] | None = None

    def status(self) -> dict[str, Any]:
        """STATUS.fleet, with `rate`: whether Redis counts the rate limit now."""
        if self.instance.rate_limit <= 0:
            return self.member.status()
        return {**self.member.status(), "rate": self.rate.status()}

    def leads(self) -> bool:
        return self.member.role == "leader"

    # Wiring to the keeper

    def attach(self, seat: Seat) -> None:
        """Feed `seat`: adopted records, and (while leading) the followers' requests."""
        self._seat = seat
        self.member.on_adopt.append(self._adopted)
        self.member.on_suspect.append(self._suspected)
        self._task = asyncio.create_task(
            self._serve_requests(), name=f"fleet-requests:{self.member.name}"
        )

    async def detach(self) -> None:
        with contextlib.suppress(ValueError):
            self.member.on_adopt.remove(self._adopted)
        with contextlib.suppress(ValueError):
            self.member.on_suspect.remove(self._suspected)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._seat = None
        await self.member.fleet.leave(self.member)

    def _adopted(self, record: SessionRecord) -> None:
        # Not taken while a renewal of the keeper's own is under way: that renewal answers
        # with this record (see _newer), so nothing is handed over twice.
        seat = self._seat
        if seat is None or record.epoch <= self._handed:
            return
        if record.access_token == self._served:
            self._handed = record.epoch  # what this host stored: the keeper serves it already
        elif seat.offer(grant_of(record)):
            self._handed, self._served = record.epoch, record.access_token

    def _suspected(self, token: Secret, hold: bool) -> None:
        if self._seat is not None:
            self._seat.suspect(token, hold=hold)

    async def _serve_requests(self) -> None:
        while True:
            request = await self.member.requests.get()
            current = self.member.current
            if request.epoch != self.member.epoch or self._seat is None:
                continue  # answered already: a newer epoch is stored
            if request.kind == "dead" and (
                current is None or request.token != current.access_token.fingerprint
            ):
                continue
            log.info(
                "%s: %s asks for a renewal (%s)", self.member.name, request.sender, request.kind
            )
            self._seat.request_renewal(RenewalReason.DEMANDED)

    # The calls the keeper makes

    # The token endpoint. (Probes and the version are pings with the token: they evict
    # nobody, so every host makes its own.)

    async def login(self) -> Grant:
        return self._hand(await self._renew(None))

    async def refresh(self, refresh_token: Secret) -> Grant:
        return self._hand(await self._renew(refresh_token))

    def _hand(self, grant: Grant) -> Grant:
        self._served = grant.access_token
        return grant

    async def _renew(self, refresh_token: Secret | None) -> Grant:
        member = self.member
        with self._unreachable_is_transient():
            await asyncio.wait_for(member.settled.wait(), member.lease.length)
        if isinstance(member.fault, WrongKey):
            raise FleetRefused(f"{member.name}: {member.fault}; fix the key, then restart sugard")
        newer = self._newer()
        if newer is not None:
            return newer
        if member.role != "leader":
            return await self._from_leader(refresh_token)
        with self._unreachable_is_transient():
            if member.session_lost:
                # Redis lost the record: a host that renewed as it went away may hold the
                # live session, whose refresh token is the only one Sugar still takes. Before
                # this leader spends its own (a reused one ends the chain in IdM mode) or logs
                # in (which ends that session), it gives that host the rest of a round after
                # the loss to store it (`gather`).
                await member.store_unstored()
                await member.gather(member.lease.length / 3)
                if (newer := self._newer()) is not None:
                    return newer
            if refresh_token is None:
                # Before any password login: another leader may have stored a session since.
                await member.reread()
                if (newer := self._newer()) is not None:
                    return newer
            if not member.may_call_sugar(self.instance.timeout):
                raise self._waiting("the fleet lease is about to lapse; not calling Sugar")
            if member.problem:
                # What Sugar answers could not be shared: the other hosts' tokens would die
                # with the old session. Everyone serves the held token while it is valid.
                raise self._waiting("not renewing while the fleet store is unreachable")
            if refresh_token is None:
                grant = await super().login()
            else:
                grant = await super().refresh(refresh_token)
            return await self._store(grant)

    def _newer(self) -> Grant | None:
        current = self.member.current
        if current is None or current.epoch <= self._handed:
            return None
        self._handed = current.epoch
        if current.access_token == self._served:
            return None  # what this host stored itself: no news for the keeper
        return grant_of(current)

    async def _store(self, grant: Grant) -> Grant:
        member = self.member
        record = record_of(grant)
        try:
            result: WriteResult | None = await member.publish(record)
            if isinstance(result, NotLeader) and await member.retake():
                # Redis lost the lease (restarted empty) while the call ran: nobody else
                # holds it, and this is the only live session, so store it.
                result = await member.publish(record)
            if isinstance(result, NotLeader):
                # The lease lapsed while the call ran, and Sugar rotated the stored session's
                # refresh token: store this one all the same if nobody wrote since.
                member.keep_unstored(record)
                result = await member.store_unstored()
        except FleetError as exc:
            # Sugar rotated the session already: the new one lives only here now, so keep it,
            # and store it when the store answers again (or the next leader asks for it).
            member.keep_unstored(record)
            log.warning(
                "%s: could not store the new session (%s); serving it here, and storing it "
                "when the fleet store answers again",
                member.name,
                exc,
            )
            return grant
        if isinstance(result, Written):
            self._handed = result.epoch
            return grant
        if isinstance(result, Stale):
            await member.reread()
            stored = self._newer()
            if stored is not None:
                return stored
        # Sugar gave us this session and the store will not take it (another host wrote
        # since): serve it here; its session is the fleet's from now on.
        assert isinstance(result, (NotLeader, Stale))
        log.warning(
            "%s: could not store the new session (%s); serving it on this host only",
            member.name,
            type(result).__name__,
        )
        return grant

    async def _from_leader(self, refresh_token: Secret | None) -> Grant:
        """A follower's renewal: the leader makes it, this host waits for the stored record."""
        member = self.member
        kind: Literal["dead", "refresh"] = "refresh"
        token = member.current.access_token.fingerprint if member.current else None
        with self._unreachable_is_transient():
            # A lease: by then the leader answered, or this host took over (and calls Sugar).
            record = await member.ask_leader(kind, token, member.lease.length)
        if record is not None and (newer := self._newer()) is not None:
            return newer
        who = member.holder or "nobody yet"
        raise self._waiting(f"waiting for the fleet leader ({who}) to store a new session")

    def _waiting(self, why: str) -> TransientError:
        problem = f"; {self._where}: {self.member.problem}" if self.member.problem else ""
        return FleetWaiting(f"{why}{problem}")

    @contextlib.contextmanager
    def _unreachable_is_transient(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError:
            raise self._waiting(f"{self._where} has not answered yet") from None
        except WrongKey as exc:
            raise FleetRefused(
                f"{self.member.name}: {exc}; fix the key, then restart sugard"
            ) from None
        except FleetError as exc:
            raise FleetWaiting(
                f"{self._where} is unreachable ({exc}); serving the held token while it is "
                "valid, nobody logs in meanwhile"
            ) from None
