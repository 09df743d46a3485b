"""The keeper's vocabulary: an instance's states, the errors and the snapshot STATUS shows, the
one demand the supervisor owes, and the rejected-secret rule.

Plain values with no behaviour of their own beyond what they say of themselves; the keeper's
supervisor (sugard/keeper_supervisor.py) is the one place that changes them.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from .config import InstanceConfig
from .sugar import ClientRejected, CredentialsRejected, SugarError

__all__ = ["Demand", "ErrorStatus", "LastError", "Need", "Rejection", "State", "Status"]


class State(enum.StrEnum):
    STARTING = "starting"
    LOGGING_IN = "logging_in"
    READY = "ready"
    REFRESHING = "refreshing"
    BACKING_OFF = "backing_off"
    FAILED = "failed"


@dataclass(frozen=True)
class LastError:
    at: float
    kind: str
    message: str


@dataclass(frozen=True)
class ErrorStatus:
    """The last error as STATUS shows it; `current`: the instance's state now, not a past one."""

    at: float
    kind: str
    message: str
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
    reason: str
    forced: bool = False  # a person asked: act now, even during a backoff or when `failed`
    in_flight: bool = False  # its upstream call is under way
    attempts: int = 0  # upstream attempts finished for it
    failed: bool = False  # the latest attempt failed
    done: bool = False  # settled: a new grant, a verdict, or a refusal (the state says which)


@dataclass(frozen=True)
class Rejection:
    """A password or client secret that Sugar rejected: never sent again while it is the same
    (each try may count towards a lockout), unless a person insists (`--retry-rejected`)."""

    field: str  # which InstanceConfig field was refused: "password" or "client_secret"
    sent: tuple[object, ...]  # the site, the account or client, and the secret refused

    FIELDS: ClassVar[tuple[str, ...]] = ("password", "client_secret")

    @classmethod
    def of(cls, exc: SugarError, config: InstanceConfig) -> Rejection | None:
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
            f"({source}): not sending it again, so the account is not locked. Fix the {what}, "
            f"then run `sugarctl refresh {config.name}`; if an admin unlocked the account "
            f"instead: `sugarctl refresh {config.name} --retry-rejected` (may count as a "
            "failed login)"
        )


def _sent(field: str, config: InstanceConfig) -> tuple[object, ...]:
    if field == "password":
        return (config.url, config.username, config.password.value)
    return (config.url, config.client_id, config.client_secret.value)
