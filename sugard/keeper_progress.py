"""What an instance has come to: its state, counters and times, the last error, a rejected
secret; what the observer hears of each change, and what requests and STATUS are told of it.

Split from the supervisor (which changes it: sugard/keeper_supervisor.py) and the keeper
(which answers requests from it), so the two read as what they do, and the words a person
sees (STATUS, a 503's message and Retry-After) are made in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import InstanceConfig
from .errors import NeedsAttention, TokenUnavailable
from .keeper_model import ErrorStatus, LastError, Rejection, State, Status
from .keeper_session import HeldSession
from .observe import EvictionFoundBy, Observer
from .sugar import SugarError

__all__ = ["Progress"]


class Progress:
    """One instance's progress, changed only by its supervisor (and a reload's rejection)."""

    def __init__(
        self,
        name: str,
        session: HeldSession,
        observer: Observer,
        clock: Callable[[], float],
        on_rejection: Callable[[Rejection | None], None] | None = None,
    ) -> None:
        self.name = name
        self._session = session  # for the expiry the observer and STATUS are told
        self._observer = observer  # metrics and on_event hear of what happens
        self._clock = clock
        self.state = State.STARTING
        self._rejection: Rejection | None = None  # a secret Sugar refused: never sent again
        self._on_rejection = on_rejection  # told of each change (kept across a restart)
        self.logins = 0
        self.refreshes = 0
        self.failures = 0
        self.last_refresh: float | None = None
        self.last_error: LastError | None = None
        self.refresh_at: float | None = None
        self.next_attempt_at: float | None = None

    @property
    def rejection(self) -> Rejection | None:
        return self._rejection

    @rejection.setter
    def rejection(self, rejection: Rejection | None) -> None:
        if rejection == self._rejection:
            return
        self._rejection = rejection
        if self._on_rejection is not None:
            self._on_rejection(rejection)

    def set_state(self, state: State) -> None:
        """Every change of state goes through here, so `failed` and `recovered` are told."""
        if state is self.state:
            return
        self.state = state
        self._observer.state_changed(
            self.name, state.value, expires_at=self._expires_at(), error_kind=self._error_kind()
        )

    def evicted(self, found_by: EvictionFoundBy) -> None:
        self._observer.evicted(
            self.name, found_by, expires_at=self._expires_at(), error_kind=self._error_kind()
        )

    def renewed(self, expires_at: float) -> None:
        self._observer.renewed(self.name, expires_at=expires_at, error_kind=self._error_kind())

    def error(self, exc: SugarError) -> None:
        self.last_error = LastError(self._clock(), exc.kind, exc.message)

    def _expires_at(self) -> float | None:
        grant = self._session.grant
        return grant.expires_at if grant is not None else None

    def _error_kind(self) -> str | None:
        return self.last_error.kind if self.last_error is not None else None

    # What requests and STATUS are told

    def status(self, config: InstanceConfig, fleet: dict[str, Any] | None) -> Status:
        """A frozen snapshot of the instance now, for the API to render and metrics to read."""
        grant = self._session.grant
        error = self.last_error
        return Status(
            name=self.name,
            url=config.url,
            username=config.username,
            platform=config.platform,
            state=self.state.value,
            expires_at=grant.expires_at if grant else None,
            refresh_at=self.refresh_at,
            last_refresh=self.last_refresh,
            last_error=(
                ErrorStatus(error.at, error.kind, error.message, self._error_is_current(error))
                if error
                else None
            ),
            logins=self.logins,
            refreshes=self.refreshes,
            failures=self.failures,
            # The name the log gives the current token, so a log line can be matched to it.
            token_fingerprint=grant.access_token.fingerprint if grant else None,
            fleet=fleet,
        )

    def _error_is_current(self, error: LastError) -> bool:
        """Whether the instance's state is caused by this error (else it is history)."""
        if self.state is State.READY:
            return False
        return self.last_refresh is None or error.at >= self.last_refresh

    def unavailable(self) -> TokenUnavailable:
        """Why there is no token now, and when to ask again."""
        retry_after = 1.0
        if self.next_attempt_at is not None:
            retry_after = max(1.0, round(self.next_attempt_at - self._clock(), 1))
        why = f": {self.last_error.message}" if self.last_error else ""
        message = f"no valid token for {self.name!r} yet ({self.state.value}){why}"
        return TokenUnavailable(message, retry_after)

    def needs_attention(self) -> NeedsAttention:
        """Why the instance `failed` (it waits for a person)."""
        if self.last_error is not None:
            return NeedsAttention(self.last_error.message)
        return NeedsAttention(f"instance {self.name!r} failed")
