"""What happens to an instance, told to whoever watches: metrics and event commands.

The keeper, the api and the proxy hand an `Observer` one frozen event per thing that happens;
the daemon's fans out to the Prometheus metrics (`metrics`) and the `on_event` commands
(`events`). `observe` is synchronous, cheap and never raises into the caller: an observer that
does slow work (running a command) schedules it and returns at once.

The words in the labels are fixed here, so that a typo at a call site is a type error (mypy)
and the set of time series stays small: an instance's local name is the only free label
value, and no event carries a token, a username or a URL.

Standard library only: every layer may import it at no cost.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "EVICTION_FOUND_BY",
    "RENEWAL_REASONS",
    "SUDO_OUTCOMES",
    "TOKEN_OUTCOMES",
    "UPSTREAM_GRANTS",
    "UPSTREAM_OUTCOMES",
    "Event",
    "Evicted",
    "EvictionFoundBy",
    "Fanout",
    "Forgotten",
    "Governed",
    "Observer",
    "Proxied",
    "RenewalReason",
    "RenewalStarted",
    "Renewed",
    "Revoked",
    "StateChanged",
    "SudoCall",
    "SudoOutcome",
    "TokenOutcome",
    "TokenRequested",
    "UpstreamCall",
    "UpstreamGrant",
    "UpstreamOutcome",
]

log = logging.getLogger("sugard.observe")


# `logout` ends the session at Sugar: only when a person asks (`sugarctl revoke`).
UpstreamGrant = Literal["password", "refresh", "probe", "serverinfo", "logout"]
UPSTREAM_GRANTS: Final[tuple[UpstreamGrant, ...]] = (
    "password",
    "refresh",
    "probe",
    "serverinfo",
    "logout",
)
# ok: Sugar answered what was asked; rejected: Sugar said no (RejectedError, a dead token on a
# probe); transient: no usable answer (TransientError: network, 5xx, maintenance...).
UpstreamOutcome = Literal["ok", "rejected", "transient"]
UPSTREAM_OUTCOMES: Final[tuple[UpstreamOutcome, ...]] = ("ok", "rejected", "transient")


# Why a renewal (a refresh, or a login) starts: the refresh-ahead schedule, a script's report
# of a dead token, a probe that found it dead, `sugarctl refresh` (or a reload retrying a
# failed instance), a request whose min_ttl the current token cannot meet, no token at all.
class RenewalReason(enum.StrEnum):
    """Why a renewal (a refresh, or a login) starts; each value is its metric label."""

    SCHEDULED = "scheduled"  # the refresh-ahead schedule
    REPORTED = "reported"  # a script's report of a dead token
    PROBE = "probe"  # a probe found the token dead
    FORCED = "forced"  # `sugarctl refresh`, or a reload retrying a failed instance
    DEMANDED = "demanded"  # a request whose min_ttl the token cannot meet, a fleet follower
    INITIAL = "initial"  # no usable token at all
    REVOKED = "revoked"  # `sugarctl revoke`: the session was ended at Sugar, a login follows


RENEWAL_REASONS: Final[tuple[RenewalReason, ...]] = tuple(RenewalReason)

# How a TOKEN request (token, invalidate, refresh, revoke) was answered: 200, 503 token_unavailable,
# 502 upstream_rejected, 403 forbidden, 404 for an instance a reload removed meanwhile, 400.
TokenOutcome = Literal["served", "unavailable", "rejected", "forbidden", "gone", "bad_request"]
TOKEN_OUTCOMES: Final[tuple[TokenOutcome, ...]] = (
    "served",
    "unavailable",
    "rejected",
    "forbidden",
    "gone",
    "bad_request",
)

# How sugard learnt that Sugar no longer accepts the session.
EvictionFoundBy = Literal["report", "probe", "refresh"]
EVICTION_FOUND_BY: Final[tuple[EvictionFoundBy, ...]] = ("report", "probe", "refresh")


# How a token of another user (Sugar's sudo) was asked for: ok, Sugar gave it (a sudo or a
# refresh of one); rejected, Sugar refused it (not an admin, no such user); transient, no
# usable answer; not_listed, sugard refused a user its config does not list (no call made);
# held_back, a user (or an instance) Sugar refused before, not asked again before a person acts.
SudoOutcome = Literal["ok", "rejected", "transient", "not_listed", "held_back"]
SUDO_OUTCOMES: Final[tuple[SudoOutcome, ...]] = (
    "ok",
    "rejected",
    "transient",
    "not_listed",
    "held_back",
)


# One frozen event per kind of thing that happens; an observer takes them all through one
# method (`observe`), so a new kind touches its dataclass and the observers that care.


@dataclass(frozen=True)
class UpstreamCall:
    """One call to Sugar finished (a password or refresh grant, a probe, a version lookup)."""

    instance: str
    grant: UpstreamGrant
    outcome: UpstreamOutcome


@dataclass(frozen=True)
class RenewalStarted:
    """The keeper starts renewing the session (before its first upstream attempt)."""

    instance: str
    reason: RenewalReason


@dataclass(frozen=True, kw_only=True)
class _SessionNews:
    """What the `on_event` hooks are told with each event: the token's expiry (epoch seconds,
    None without one) and the kind of the last error."""

    expires_at: float | None
    error_kind: str | None


@dataclass(frozen=True)
class StateChanged(_SessionNews):
    """The keeper's state is now `state` (one of wire.STATES)."""

    instance: str
    state: str


@dataclass(frozen=True)
class Renewed(_SessionNews):
    """A new token from a login or a refresh is in place."""

    instance: str


@dataclass(frozen=True)
class Evicted(_SessionNews):
    """Sugar no longer accepts the session: a script reported the current token, a probe
    found it dead, or Sugar refused the refresh token."""

    instance: str
    found_by: EvictionFoundBy


@dataclass(frozen=True)
class Revoked(_SessionNews):
    """The session was ended at Sugar as a person asked (`sugarctl revoke`): every token it
    handed out is dead, and a new login follows."""

    instance: str


@dataclass(frozen=True)
class Forgotten:
    """These instances are gone (a reload removed them): drop what is kept about them."""

    instances: tuple[str, ...]


@dataclass(frozen=True)
class TokenRequested:
    """A TOKEN request for a configured instance was answered."""

    instance: str
    outcome: TokenOutcome


@dataclass(frozen=True)
class SudoCall:
    """A token of another user was asked of Sugar, or refused without asking (`outcome`).
    Never the user's name: it is free text from any allowed caller."""

    instance: str
    outcome: SudoOutcome


@dataclass(frozen=True)
class Proxied:
    """A proxied request finished with Sugar's (or sugard's) HTTP `status`, None if no answer
    was sent at all, after `seconds`."""

    instance: str
    status: int | None
    seconds: float


@dataclass(frozen=True)
class Governed:
    """A proxied request passed the instance's request governor after `queued` seconds in
    its queue; None: refused (429), it could not go within rate_wait."""

    instance: str
    queued: float | None


Event = (
    UpstreamCall
    | RenewalStarted
    | StateChanged
    | Renewed
    | Evicted
    | Revoked
    | Forgotten
    | TokenRequested
    | Proxied
    | SudoCall
    | Governed
)


class Observer:
    """Receives what happens to instances. `observe` does nothing here: an observer overrides
    it for the events it cares about, and an `Observer()` is the one that watches nothing."""

    def observe(self, event: Event) -> None:
        """Called synchronously by the keeper, the api and the proxy; must not block."""


class Fanout(Observer):
    """Tells every observer in turn; one that raises is logged and the others still hear."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def observe(self, event: Event) -> None:
        for observer in self.observers:
            try:
                observer.observe(event)
            except Exception:
                # A bug in a watcher must never break the keeper or a request.
                log.exception("%s failed on %s", type(observer).__name__, type(event).__name__)
