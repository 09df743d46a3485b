"""What happens to an instance, told to whoever watches: metrics and event commands.

The keeper, the api, the proxy and fleet code call an `Observer`; the daemon hands them one
that fans out to the Prometheus metrics (`metrics`) and the `on_event` commands (`events`).
Every method is synchronous, cheap and never raises into the caller: an observer that does
slow work (running a command) schedules it and returns at once, so the keeper never waits.

The words in the labels are fixed here, so that a typo at a call site is a type error (mypy)
and the set of time series stays small: an instance's local name is the only free label
value, and no method takes a token, a username or a URL.

Standard library only: every layer may import it at no cost.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable
from typing import Final, Literal

__all__ = [
    "EVICTION_FOUND_BY",
    "RENEWAL_REASONS",
    "TOKEN_OUTCOMES",
    "UPSTREAM_GRANTS",
    "UPSTREAM_OUTCOMES",
    "EvictionFoundBy",
    "Fanout",
    "Observer",
    "RenewalReason",
    "TokenOutcome",
    "UpstreamGrant",
    "UpstreamOutcome",
]

log = logging.getLogger("sugard.observe")


UpstreamGrant = Literal["password", "refresh", "probe", "serverinfo"]
UPSTREAM_GRANTS: Final[tuple[UpstreamGrant, ...]] = ("password", "refresh", "probe", "serverinfo")
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


RENEWAL_REASONS: Final[tuple[RenewalReason, ...]] = tuple(RenewalReason)

# How a TOKEN request (token, invalidate, refresh) was answered: 200, 503 token_unavailable,
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


class Observer:
    """Receives what happens to instances. Every method does nothing here: an observer
    overrides the ones it cares about, and an `Observer()` is the one that watches nothing."""

    # Called by the keeper

    def upstream_call(self, instance: str, grant: UpstreamGrant, outcome: UpstreamOutcome) -> None:
        """One call to Sugar finished (a password or refresh grant, a probe, ServerInfo)."""

    def renewal(self, instance: str, reason: RenewalReason) -> None:
        """The keeper starts renewing the session (before its first upstream attempt)."""

    def state_changed(
        self, instance: str, state: str, *, expires_at: float | None, error_kind: str | None
    ) -> None:
        """The keeper's state is now `state` (one of STATES); `expires_at` is the current
        token's expiry (epoch seconds, None without one), `error_kind` the last error's."""

    def renewed(self, instance: str, *, expires_at: float, error_kind: str | None) -> None:
        """A new token from a login or a refresh is in place."""

    def evicted(
        self,
        instance: str,
        found_by: EvictionFoundBy,
        *,
        expires_at: float | None,
        error_kind: str | None,
    ) -> None:
        """Sugar no longer accepts the session: a script reported the current token, a probe
        found it dead, or Sugar refused the refresh token."""

    def forget(self, instances: Iterable[str]) -> None:
        """These instances are gone (a reload removed them): drop what is kept about them."""

    # Called by the api

    def token_request(self, instance: str, outcome: TokenOutcome) -> None:
        """A TOKEN request for a configured instance was answered."""

    # Called by the proxy

    def proxied(self, instance: str, status: int | None, seconds: float) -> None:
        """A proxied request finished with Sugar's (or sugard's) HTTP `status`, None if no
        answer was sent at all, after `seconds`."""


class Fanout(Observer):
    """Tells every observer in turn; one that raises is logged and the others still hear."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def _each(self, method: str, *args: object, **kwargs: object) -> None:
        for observer in self.observers:
            try:
                getattr(observer, method)(*args, **kwargs)
            except Exception:
                # A bug in a watcher must never break the keeper or a request.
                log.exception("%s.%s failed", type(observer).__name__, method)

    def upstream_call(self, instance: str, grant: UpstreamGrant, outcome: UpstreamOutcome) -> None:
        self._each("upstream_call", instance, grant, outcome)

    def renewal(self, instance: str, reason: RenewalReason) -> None:
        self._each("renewal", instance, reason)

    def state_changed(
        self, instance: str, state: str, *, expires_at: float | None, error_kind: str | None
    ) -> None:
        self._each("state_changed", instance, state, expires_at=expires_at, error_kind=error_kind)

    def renewed(self, instance: str, *, expires_at: float, error_kind: str | None) -> None:
        self._each("renewed", instance, expires_at=expires_at, error_kind=error_kind)

    def evicted(
        self,
        instance: str,
        found_by: EvictionFoundBy,
        *,
        expires_at: float | None,
        error_kind: str | None,
    ) -> None:
        self._each("evicted", instance, found_by, expires_at=expires_at, error_kind=error_kind)

    def forget(self, instances: Iterable[str]) -> None:
        self._each("forget", tuple(instances))

    def token_request(self, instance: str, outcome: TokenOutcome) -> None:
        self._each("token_request", instance, outcome)

    def proxied(self, instance: str, status: int | None, seconds: float) -> None:
        self._each("proxied", instance, status, seconds)
