"""What one instance holds and has come to: the session (grant, refresh and refused tokens,
the learned Sugar version), the calls made to Sugar as the observer hears them, and the
progress (state, counters, last error) with the words STATUS and errors use.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sugard.config import GRACE_AUTO, InstanceConfig
from sugard.errors import InstanceNeedsAttention, NoValidToken
from sugard.keeper import timing as timing
from sugard.keeper.model import Demand, ErrorStatus, LastError, Rejection, State, Status
from sugard.observe import (
    Evicted,
    EvictionFoundBy,
    Observer,
    RenewalReason,
    Renewed,
    Revoked,
    StateChanged,
    UpstreamCall,
    UpstreamGrant,
    UpstreamOutcome,
)
from sugard.secret import Secret
from sugard.sugar import Grant, Probe, ServerInfo, SugarClient
from sugard.sugar.errors import RejectedError, UpstreamError

__all__ = ["CountedCalls", "HeldSession", "Progress", "renewal_reason"]

log = logging.getLogger("sugard.keeper")  # the keeper's log lines, wherever they are made


PROBE_OUTCOMES: dict[Probe, UpstreamOutcome] = {
    Probe.ALIVE: "ok",
    Probe.DEAD: "rejected",
    Probe.UNKNOWN: "transient",
}

# SugarClient.logout's answer: ended, refused (the token was dead already), no answer.
LOGOUT_OUTCOMES: dict[bool | None, UpstreamOutcome] = {
    True: "ok",
    False: "rejected",
    None: "transient",
}


def renewal_reason(demand: Demand, grant: Grant | None) -> RenewalReason:
    return RenewalReason.INITIAL if grant is None else demand.reason


@dataclass(frozen=True)
class CountedCalls:
    """One instance's calls to Sugar, each told to the observer as it ends."""

    upstream: SugarClient
    observer: Observer
    name: str

    async def login(self) -> Grant:
        return await self._grant("password", self.upstream.login())

    async def refresh(self, refresh_token: Secret) -> Grant:
        return await self._grant("refresh", self.upstream.refresh(refresh_token))

    async def logout(self, grant: Grant) -> bool | None:
        """End `grant`'s session at Sugar (see SugarClient.logout for the answer)."""
        ended = await self.upstream.logout(grant)
        outcome = LOGOUT_OUTCOMES[ended]
        self.observer.observe(UpstreamCall(self.name, "logout", outcome))
        return ended

    async def probe(self, access_token: Secret) -> Probe:
        verdict = await self.upstream.probe(access_token)
        self.observer.observe(UpstreamCall(self.name, "probe", PROBE_OUTCOMES[verdict]))
        return verdict

    async def server_version(self, access_token: Secret) -> str | None:
        return (await self.version_info(access_token)).version

    async def version_info(self, access_token: Secret) -> ServerInfo:
        """The version read, each of its calls counted (under the label "serverinfo", the
        call's old name) as a ping is: a 401 is Sugar refusing the token, whatever the body."""
        info = await self.upstream.server_info(access_token)
        for verdict in info.calls:
            self.observer.observe(UpstreamCall(self.name, "serverinfo", PROBE_OUTCOMES[verdict]))
        return info

    async def _grant(self, grant: UpstreamGrant, call: Awaitable[Grant]) -> Grant:
        """A password or refresh grant, counted by how Sugar answered it."""
        outcome: UpstreamOutcome = "ok"
        try:
            return await call
        except RejectedError:
            outcome = "rejected"
            raise
        except UpstreamError:
            outcome = "transient"
            raise
        finally:
            self.observer.observe(UpstreamCall(self.name, grant, outcome))


class HeldSession:
    """One keeper's session state; its methods are the only ones that replace a grant."""

    def __init__(
        self,
        calls: CountedCalls,
        clock: Callable[[], float],
        rng: Callable[[], float],
        ticks: Callable[[], float],
    ) -> None:
        self._calls = calls  # the keeper's, counted: learning the version is a call to Sugar
        self._clock = clock  # the wall clock: token expiries
        self._ticks = ticks  # the steady one: quiet moments, report bursts
        self._rng = rng
        self.grant: Grant | None = None
        self.refresh_token: Secret | None = None  # None once burned or rejected
        self.dead_token: Secret | None = None  # refused by Sugar (a report, or a probe)
        # A token a refresh's outcome left in doubt (no grace: Sugar may have run the grant
        # and killed it): not served until a check says Sugar still takes it.
        self.doubted: Secret | None = None
        # What was learned of the server, kept across logins (the same site, user and platform:
        # a reload that changes them makes a new keeper); forgotten after maintenance, which
        # is when a site is upgraded.
        self.sugar_version: str | None = None  # as the site published it
        self.version_asked = False  # the site answered a version read: not asked again
        self.observed_grace: float | None = None  # learned: by the version, or by watching
        # The token a check made for a report found alive, when, and the latest report of it
        # answered so (reports that keep coming are answered alike: timing.report_settled).
        self.found_alive: tuple[Secret, float, float] | None = None
        # No-grace servers: until then (steady clock) a handed-out token is in use.
        self.quiet_until = 0.0
        self.ends_at: float | None = None  # a capped session's end (max lifetime)

    def install(self, grant: Grant, *, logged_in: bool) -> Grant | None:
        """Serve `grant` from now on; the grant it replaces."""
        old = self.grant
        self.grant = grant
        self.refresh_token = grant.refresh_token
        self.dead_token = self.doubted = None
        if logged_in:
            self.ends_at = None
        elif timing.session_capped(old, grant):
            # The refresh token inherited the old one's expiry: max_session_lifetime caps
            # this session, and refreshing earlier would not keep it past that end.
            self.ends_at = grant.refresh_expires_at
        return old

    def mark_dead(self, token: Secret) -> None:
        """Sugar refused `token`: it is never served again."""
        self.dead_token = token

    def drop_refresh_token(self) -> None:
        """Sugar burned or refused it: the next renewal is a password login."""
        self.refresh_token = None

    def doubt(self, token: Secret | None) -> None:
        """`token` may be dead (a refused refresh may have killed it): not served before a
        check says it works (None: no token is in doubt)."""
        self.doubted = token

    def remember_version(self, sugar_version: str | None) -> None:
        """The Sugar version learnt before (a session handed over a restart)."""
        self.sugar_version = sugar_version

    def take_back_dead(self, grant: Grant) -> None:
        """A kept session whose token Sugar no longer takes: its refresh token may still work."""
        self.grant, self.refresh_token, self.dead_token = (
            grant,
            grant.refresh_token,
            grant.access_token,
        )

    def usable(self) -> bool:
        """Whether there is a grant whose token Sugar has not refused."""
        return self.grant is not None and self.grant.access_token != self.dead_token

    def servable(self) -> bool:
        grant = self.grant
        if grant is None or grant.access_token == self.doubted:
            return False
        return timing.servable(grant, self._clock(), self.dead_token)

    # Reports of a token Sugar still takes

    def alive_for_report(self, token: Secret) -> bool:
        """Whether a check found `token` alive so recently that a report of it is answered
        by that check (it counts as one more of the same burst)."""
        found, now = self.found_alive, self._ticks()
        if found is None or found[0] != token or not timing.report_settled(found[1], found[2], now):
            return False
        self.found_alive = (token, found[1], now)
        return True

    def checked_alive(self, token: Secret) -> None:
        now = self._ticks()
        self.found_alive = (token, now, now)

    def kept(self, ready: bool) -> Grant | None:
        """The session to hand to the next sugard (see `Keeper.session`)."""
        if not ready or self.refresh_token is None or not self.usable():
            return None
        return self.grant

    # Timing (the rules: sugard/keeper/timing.py)

    def refresh_time(self, grant: Grant, config: InstanceConfig) -> float:
        capped = self.ends_at is not None
        return timing.refresh_time(grant, config, capped=capped, draw=self._rng())

    def renewal_time(self, grant: Grant, config: InstanceConfig, refresh_at: float | None) -> float:
        # The quiet moment is kept on the steady clock, and read as a wall-clock time here.
        grace, quiet = (
            self.old_token_grace(config),
            self._clock() + self.quiet_until - self._ticks(),
        )
        deadline = timing.refresh_deadline(grant, capped=self.ends_at is not None)
        return timing.renewal_time(
            grant, refresh_at, grace=grace, quiet_until=quiet, deadline=deadline
        )

    def handed_out(self, grant: Grant, promised: float) -> None:
        self.quiet_until = max(self.quiet_until, timing.quiet_until(grant, self._ticks(), promised))

    def why_login(self) -> str:
        """Why a password login is needed although sugard holds a refresh token."""
        grant = self.grant
        ends = grant.refresh_expires_at if grant is not None else None
        when = time.strftime("%H:%M:%S", time.localtime(ends)) if ends is not None else "?"
        if self.ends_at is not None:
            return f"session reached the site's max_session_lifetime at {when}"
        return f"refresh token expired at {when}"

    # What the server does to the old token on a refresh

    def old_token_grace(self, config: InstanceConfig) -> float:
        return timing.old_token_grace(config, self.observed_grace)

    def resume_version(self, config: InstanceConfig) -> None:
        """A kept session's version, as the sugard before this one learned it."""
        if self.sugar_version is not None and config.old_token_grace == GRACE_AUTO:
            self.observed_grace = timing.grace_for_version(self.sugar_version)

    def forget_version(self) -> None:
        """The site went into maintenance: it may come back as another version."""
        self.sugar_version, self.version_asked, self.observed_grace = None, False, None

    async def learn_version(self, grant: Grant, config: InstanceConfig) -> None:
        """After a login, unless known: read the server's version (one call where the metadata
        answers it). Asked again at a later login only if nobody answered this time."""
        if config.old_token_grace != GRACE_AUTO or self.version_asked:
            return
        if self.sugar_version is not None:  # kept across a restart
            self.version_asked = True
            return
        info = await self._calls.version_info(grant.access_token)
        self.version_asked = info.answered
        version = self.sugar_version = info.version
        if version is not None:
            self.observed_grace = timing.grace_for_version(version)
            log.info(
                "%s: Sugar %s: a refresh %s",
                config.name,
                version,
                "kills the old token at once"
                if self.observed_grace == 0
                else f"leaves the old token up to {self.observed_grace:.0f} s",
            )

    async def watch_old_token(self, old: Grant, config: InstanceConfig) -> None:
        """Version unknown: see whether the token a refresh replaced still works (one ping,
        once per session). Either way, until then it behaves as if the token died."""
        if config.old_token_grace != GRACE_AUTO or self.observed_grace is not None:
            return
        verdict = await self._calls.probe(old.access_token)
        if verdict is not Probe.UNKNOWN:
            self.observed_grace = timing.SESSION_CHECK_INTERVAL if verdict is Probe.ALIVE else 0.0
            log.info(
                "%s: the token a refresh replaced %s",
                config.name,
                "still works: Sugar keeps old tokens a while"
                if verdict is Probe.ALIVE
                else "died at once",
            )


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
        self._observer.observe(
            StateChanged(
                self.name,
                state.value,
                expires_at=self._expires_at(),
                error_kind=self._error_kind(),
            )
        )

    def evicted(self, found_by: EvictionFoundBy) -> None:
        self._observer.observe(
            Evicted(
                self.name,
                found_by,
                expires_at=self._expires_at(),
                error_kind=self._error_kind(),
            )
        )

    def revoked(self) -> None:
        # No expiry: the token there was is dead, and the new one is not there yet.
        self._observer.observe(Revoked(self.name, expires_at=None, error_kind=self._error_kind()))

    def renewed(self, expires_at: float) -> None:
        self._observer.observe(
            Renewed(self.name, expires_at=expires_at, error_kind=self._error_kind())
        )

    def error(self, exc: UpstreamError) -> None:
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
        # A token Sugar refused (evicted, reported) expires nowhere: it is not served.
        live = grant is not None and self._session.usable()
        return Status(
            name=self.name,
            url=config.url,
            username=config.username,
            platform=config.platform,
            state=self.state.value,
            expires_at=grant.expires_at if grant and live else None,
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

    def refused_at_once(self, message: str, seconds: float) -> None:
        """The new token was refused at its first check: back off `seconds`, saying why."""
        self.last_error = LastError(self._clock(), "token_refused", message)
        self.next_attempt_at = self._clock() + seconds
        self.set_state(State.BACKING_OFF)

    def unavailable(self) -> NoValidToken:
        """Why there is no token now, and when to ask again."""
        retry_after = 1.0
        if self.next_attempt_at is not None:
            retry_after = max(1.0, round(self.next_attempt_at - self._clock(), 1))
        why = f": {self.last_error.message}" if self.last_error else ""
        message = f"no valid token for {self.name!r} yet ({self.state.value}){why}"
        return NoValidToken(message, retry_after)

    def needs_attention(self) -> InstanceNeedsAttention:
        """Why the instance `failed` (it waits for a person)."""
        if self.last_error is not None:
            return InstanceNeedsAttention(self.last_error.message)
        return InstanceNeedsAttention(f"instance {self.name!r} failed")
