"""The keeper's vocabulary: instance states, STATUS, the last error, a rejected secret, the
renewal demand, and the Board on which requests and the supervisor meet.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from sugard.config import InstanceConfig
from sugard.observe import RenewalReason
from sugard.sugar.errors import ClientRejected, CredentialsRejected, UpstreamError

if TYPE_CHECKING:
    from sugard.keeper.sudo import SudoStatus

__all__ = ["Board", "Demand", "ErrorStatus", "LastError", "Need", "Rejection", "State", "Status"]


class State(enum.StrEnum):
    """The instance states of sugard.wire.STATES, typed (a test pins that both agree)."""

    STARTING = "starting"
    LOGGING_IN = "logging_in"
    READY = "ready"
    REFRESHING = "refreshing"
    BACKING_OFF = "backing_off"
    FAILED = "failed"


@dataclass(frozen=True)
class LastError:
    """The last error: when (epoch seconds), its kind, and its one-line message."""

    at: float
    kind: str
    message: str


@dataclass(frozen=True)
class ErrorStatus(LastError):
    """The last error as STATUS shows it; `current`: the instance's state now, not a past one."""

    current: bool


@dataclass(frozen=True)
class Status:
    """One instance at one moment (`Keeper.status()`); times are epoch seconds."""

    name: str
    url: str
    username: str
    platform: str
    state: str
    expires_at: float | None
    refresh_at: float | None
    last_refresh: float | None
    last_error: ErrorStatus | None
    logins: int
    refreshes: int
    failures: int
    token_fingerprint: str | None
    # Fleet mode: {"role", "holder", "epoch"} of this host's seat; None for a local instance.
    fleet: dict[str, Any] | None = None
    # The users the instance acts as (Sugar's sudo); None: it acts as no other user.
    sudo: SudoStatus | None = None

    def as_dict(self) -> dict[str, Any]:
        """The STATUS object's fields and order, times still epoch seconds."""
        return asdict(self)


class Need(enum.Enum):
    RENEW = "renew"  # a new grant: a refresh, or a password login when that is the way
    CHECK = "check"  # ask Sugar whether the current token still works (a probe)


@dataclass(eq=False)
class Demand:
    """What the supervisor must do next, and what those waiting on it can read of its course.

    There is at most one (`Board.demand`). A CHECK that someone needs a renewal for becomes a
    RENEW; a renewal that fails for a passing reason stays the demand through the backoff.
    """

    need: Need
    reason: RenewalReason
    forced: bool = False  # a person asked: act now, even during a backoff or when `failed`
    in_flight: bool = False  # its upstream call is under way
    attempts: int = 0  # upstream attempts finished for it
    failed: bool = False  # the latest attempt failed
    done: bool = False  # settled: a new grant, a verdict, or a refusal (the state says which)
    revoke: bool = False  # end the session at Sugar first (`sugarctl revoke`), then log in
    reporter: str = "a script"  # for a REPORTED check: who saw Sugar refuse the token


@dataclass(frozen=True)
class Rejection:
    """A password or client secret that Sugar rejected: never sent again while it is the same
    (each try may count towards a lockout), unless a person insists (`--retry-rejected`)."""

    field: str  # which InstanceConfig field was refused: "password" or "client_secret"
    sent: tuple[object, ...]  # the site, the account or client, and the secret refused

    FIELDS: ClassVar[tuple[str, ...]] = ("password", "client_secret")

    @classmethod
    def of(cls, exc: UpstreamError, config: InstanceConfig) -> Rejection | None:
        if isinstance(exc, CredentialsRejected):
            return cls.would_send("password", config)
        if isinstance(exc, ClientRejected):
            return cls.would_send("client_secret", config)
        return None

    @classmethod
    def would_send(cls, field: str, config: InstanceConfig) -> Rejection:
        """The rejection of `field` as `config` would send it now."""
        return cls(field, _sent(field, config))

    def applies_to(self, config: InstanceConfig) -> bool:
        """Whether `config` would send the very secret that was rejected."""
        return self.sent == _sent(self.field, config)

    def refusal(self, config: InstanceConfig) -> str:
        what = self.field.replace("_", " ")
        source = getattr(config, self.field).describe()
        return (
            f"Sugar rejected the {what} of {config.name!r} and it has not changed since "
            f"({source}): not sending it again (each try may count towards a lockout). Fix "
            f"the {what}, then run `sugarctl refresh {config.name}`; if an admin unlocked the "
            f"account instead: `sugarctl refresh {config.name} --retry-rejected` (may count "
            "as a failed login)"
        )

    def retry_refused(
        self, config: InstanceConfig, sent_at: float, until: float, left: float
    ) -> str:
        """Why `--retry-rejected` is refused now: the secret was sent again at `sent_at` and
        rejected again; not before `until` (wall-clock times), `left` seconds from now."""
        what = self.field.replace("_", " ")
        return (
            f"the rejected {what} of {config.name!r} was sent again at "
            f"{time.strftime('%H:%M:%S', time.localtime(sent_at))}, as asked, and Sugar "
            f"rejected it again: not sending it again before "
            f"{time.strftime('%H:%M:%S', time.localtime(until))} (in {math.ceil(left)} s) "
            f"unless it changes (each try may count towards a lockout). Fix the {what}, then "
            f"run `sugarctl refresh {config.name}`"
        )


def _sent(field: str, config: InstanceConfig) -> tuple[object, ...]:
    if field == "password":
        return (config.url, config.username, config.password.value)
    return (config.url, config.client_id, config.client_secret.value)


class Board:
    """The one demand a keeper's supervisor owes, and the condition its waiters wait on."""

    def __init__(self) -> None:
        self.demand: Demand | None = None  # at most one, pending or in flight
        self.closed = False  # the keeper stopped: waiters give up
        self._changed = asyncio.Event()

    def join(
        self, need: Need, reason: RenewalReason, *, forced: bool = False, reporter: str = ""
    ) -> Demand:
        """The demand that will bring what is needed: the one pending or in flight, or a new one.
        `reporter`: who reported the token refused (a new REPORTED demand names them)."""
        demand = self.demand
        if demand is None or demand.done:
            demand = self.demand = Demand(need, reason)
            if reporter:
                demand.reporter = reporter
        elif need is Need.RENEW and demand.need is Need.CHECK:
            demand.need, demand.reason = Need.RENEW, reason
        elif not (forced and not demand.in_flight and not demand.forced):
            return demand  # nothing changed: a thousand joiners wake nobody
        if forced and not demand.in_flight:
            demand.forced = True  # an attempt already under way answers the person as it is
        self.notify()
        return demand

    def revocation(self) -> Demand | None:
        """The demand that ends the session at Sugar and logs in anew: the one pending, made
        so, or a new one; None while an attempt is in flight (its outcome is the session to
        end: ask again once it settles)."""
        if self.in_flight():
            return None
        demand = self.join(Need.RENEW, RenewalReason.REVOKED, forced=True)
        demand.reason, demand.revoke = RenewalReason.REVOKED, True
        self.notify()
        return demand

    def in_flight(self) -> bool:
        """Whether an upstream attempt of the pending demand is under way."""
        demand = self.pending()
        return demand is not None and demand.in_flight

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
