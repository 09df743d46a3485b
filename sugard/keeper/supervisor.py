"""The one task per instance that calls Sugar: it waits for a demand, checks or renews the
session under tenacity's backoff, and installs what Sugar answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from tenacity import RetryCallState

from sugard.config import InstanceConfig
from sugard.keeper import timing as timing
from sugard.keeper.model import Board, Demand, Need, Rejection, State
from sugard.keeper.session import CountedCalls, HeldSession, Progress, renewal_reason
from sugard.observe import EvictionFoundBy, Observer, RenewalReason, RenewalStarted
from sugard.secret import Secret
from sugard.sugar import Grant, Probe, SugarClient
from sugard.sugar.errors import (
    ClientRejected,
    CredentialsRejected,
    Maintenance,
    RefreshConsumed,
    RefreshRejected,
    RejectedError,
    UpstreamError,
)

__all__ = ["Leadership", "Supervisor"]

log = logging.getLogger("sugard.keeper")


class Leadership(Protocol):
    """What the supervisor asks of an instance's fleet seat (the keeper's `FleetSeat`)."""

    def leads(self) -> bool:
        """Whether this host's renewals go to Sugar now (else the leader's answer them)."""
        ...


class Supervisor:
    """Makes every upstream call of one instance, and keeps what came of them."""

    def __init__(
        self,
        config: InstanceConfig,
        upstream: SugarClient,
        board: Board,
        observer: Observer,
        *,
        fleet: Leadership | None,
        login_slots: asyncio.Semaphore,
        clock: Callable[[], float],
        ticks: Callable[[], float],
        rng: Callable[[], float],
        max_sleep: float,
        on_rejection: Callable[[Rejection | None], None] | None = None,
    ) -> None:
        self.config = config  # replaced by the keeper when settings change (adopt, a re-read)
        self.upstream = upstream
        self.calls = CountedCalls(upstream, observer, config.name)  # each one counted
        self.session = HeldSession(self.calls, clock, rng, ticks)  # the grant and what it learned
        self.board = board
        self.fleet = fleet
        self._observer = observer  # hears why each renewal is made
        self._login_slots = login_slots
        self._clock = clock  # the wall clock: token expiries, times shown
        self._ticks = ticks  # the steady one: probe and backoff intervals
        self._rng = rng
        self._max_sleep = max_sleep

        # What came of it all (state, counters, times, the last error): sugard/keeper/session.py
        self.progress = Progress(config.name, self.session, observer, clock, on_rejection)
        self.resumed: Grant | None = None  # a session kept across a restart, not yet checked
        self._probe_at: float | None = None
        # The grant a renewal of ours brought and when (steady clock), until a check finds
        # Sugar takes it; and how many such grants running were refused at their first check
        # soon after (then: back off, not renew).
        self._unproven: tuple[Grant, float] | None = None
        self._refused_at_once = 0
        self._eviction_told = False  # the eviction of the current session was counted

    def take_config(self, config: InstanceConfig) -> None:
        """New settings (a reload, a re-read secret): the next call to Sugar uses them."""
        self.config = config
        self.upstream.take_config(config)

    def resume(self, grant: Grant, sugar_version: str | None) -> None:
        """Start from the session a sugard before this one handed over (probed first)."""
        self.resumed = grant
        self.session.remember_version(sugar_version)

    @property
    def name(self) -> str:
        return self.config.name

    # The loop

    async def run(self) -> None:
        if self.resumed is not None:
            await self._check_resumed(self.resumed)
        while not self.board.closed:
            demand = self._next_demand()
            if demand is None:
                await self.board.idle(self._seconds_to_next_action())
            elif demand.need is Need.CHECK:
                await self._check(demand)
            else:
                await self._renew(demand)

    def _next_demand(self) -> Demand | None:
        """The demand to act on now, making one when the schedule says so; None: nothing yet."""
        demand = self.board.demand
        if self.progress.state is State.FAILED:
            return demand if demand is not None and demand.forced else None
        if demand is not None and not demand.done:
            return demand
        grant, now = self.session.grant, self._clock()
        if grant is None or not self.session.usable():
            return self.board.join(Need.RENEW, RenewalReason.INITIAL)
        if now >= self._renewal_time(grant):
            return self.board.join(Need.RENEW, RenewalReason.SCHEDULED)
        if self._probe_at is not None and self._ticks() >= self._probe_at:
            return self.board.join(Need.CHECK, RenewalReason.PROBE)
        return None

    def _seconds_to_next_action(self) -> float:
        grant = self.session.grant
        if self.progress.state is State.FAILED or grant is None:
            return self._max_sleep
        wait = self._renewal_time(grant) - self._clock()
        if self._probe_at is not None:
            wait = min(wait, self._probe_at - self._ticks())
        return min(self._max_sleep, max(0.0, wait))

    async def _check_resumed(self, grant: Grant) -> None:
        """One probe of the session the sugard before this one handed over."""
        try:
            self.session.resume_version(self.config)
            expired = grant.expires_at <= self._clock()
            verdict = Probe.DEAD if expired else await self.calls.probe(grant.access_token)
            if verdict is Probe.DEAD:
                log.info(
                    "%s: Sugar no longer takes token %s kept across the restart; renewing",
                    self.name,
                    grant.access_token.fingerprint,
                )
                # Its refresh token may still work (an expired token): one refresh, no login.
                self.session.take_back_dead(grant)
                if not expired:
                    self._evicted("probe")
                self.board.join(Need.RENEW, RenewalReason.INITIAL)
                return
            self.install(grant)
            self.progress.last_refresh = grant.issued_at
            log.info(
                "%s: took back the session kept across the restart (token %s%s)",
                self.name,
                grant.access_token.fingerprint,
                "" if verdict is Probe.ALIVE else "; Sugar gave no verdict on it",
            )
        finally:
            self.resumed = None
            self.board.notify()

    async def _check(self, demand: Demand) -> None:
        """Probe the current token; if Sugar refuses it, the demand becomes its renewal."""
        grant = self.session.grant
        assert grant is not None
        demand.in_flight = True
        verdict = await self.calls.probe(grant.access_token)
        demand.in_flight = False
        self._probe_at = self._next_probe()
        if verdict is not Probe.DEAD and self.session.doubted == grant.access_token:
            self.session.doubt(None)  # Sugar still takes it (or gave no verdict): serve it
        if demand.need is Need.RENEW:  # someone needed a new token meanwhile
            await self._renew(demand)
            return
        reported = demand.reason is RenewalReason.REPORTED
        if verdict is Probe.ALIVE:
            if self._unproven is not None and self._unproven[0] is grant:
                self._unproven, self._refused_at_once = None, 0
            if reported:
                self.session.checked_alive(grant.access_token)
                log.info(
                    "%s: token %s still works (the 401 %s saw had another cause); not renewing",
                    self.name,
                    grant.access_token.fingerprint,
                    demand.reporter,
                )
            self.board.settle(demand, failed=False)
            return
        if verdict is Probe.UNKNOWN and not reported:
            log.debug("%s: probe gave no verdict; trying again later", self.name)
            self.board.settle(demand, failed=False)
            return
        # Refused (or, for a report, no verdict: the script did see a 401, so act on it).
        log.warning(
            "%s: Sugar refused token %s (%s); renewing",
            self.name,
            grant.access_token.fingerprint,
            f"reported by {demand.reporter}" if reported else "evicted, found by the probe",
        )
        self.session.mark_dead(grant.access_token)
        self._evicted("report" if reported else "probe")
        demand.need = Need.RENEW  # its waiters (the reporters) get the renewal's token
        self.board.notify()
        if self._refused_at_once_now(grant):
            await self._back_off_refused(grant, demand)
        await self._renew(demand)

    def _refused_at_once_now(self, grant: Grant) -> bool:
        """Whether `grant`, just found refused, is the one our last renewal brought, refused at
        its first check and soon after it came (not a session evicted after long service)."""
        unproven = self._unproven
        return (
            unproven is not None
            and unproven[0] is grant
            and self._ticks() - unproven[1] < timing.REFUSED_AT_ONCE
        )

    async def _back_off_refused(self, grant: Grant, demand: Demand) -> None:
        """The token our last renewal brought was refused at its first check. Once, it may have
        been evicted by chance: renew at once. Twice running, renewing at once would likely
        bring one more Sugar refuses, for every request that reports it: back off (a person's
        `sugarctl refresh` cuts it short), and say why in STATUS and the log."""
        self._refused_at_once += 1
        if self._refused_at_once < 2:
            return
        seconds = timing.refused_token_backoff(self._refused_at_once - 1, self.config.backoff_max)
        message = (
            f"Sugar refused token {grant.access_token.fingerprint} at its first check, right "
            f"after issuing it ({self._refused_at_once} in a row; a site that checks the "
            "client's IP address, or a broken front?); renewing again after a backoff, not "
            "per request"
        )
        log.warning("%s: %s; next try in %.1f s", self.name, message, seconds)
        self.progress.refused_at_once(message, seconds)
        await self._backoff_sleep(seconds, demand)

    # Renewing

    async def _renew(self, demand: Demand) -> None:
        self._observer.observe(
            RenewalStarted(self.name, renewal_reason(demand, self.session.grant))
        )
        retrying = timing.renewal_retries(
            wait=lambda state: timing.delay(state, self.config.backoff_max, self._rng),
            sleep=lambda seconds: self._backoff_sleep(seconds, demand),
            before_sleep=self._before_backoff,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(demand)
        except RejectedError as exc:
            p = self.progress
            p.next_attempt_at = None
            p.rejection = Rejection.of(exc, self.config) or p.rejection
            p.set_state(State.FAILED)
            log.error("%s: %s", self.name, exc.message)
            self.board.drop(demand)

    async def _attempt(self, demand: Demand) -> None:
        demand.forced = False  # this attempt is the one a person asked for
        demand.in_flight = True
        self.board.notify()  # requests that must not take the doomed token see it is in flight
        if demand.revoke:
            demand.revoke = False  # once: a retry after a failed login only logs in
            await self._end_session()
        old = self.session.grant
        refreshing = False
        try:
            refresh_token = self.session.refresh_token
            # Tried even when the local clock says the refresh token has ended: only Sugar
            # knows (the clock may have been set), and a refused refresh costs one call.
            if refresh_token is not None:
                refreshing = True
                grant = await self._refresh(refresh_token)
                refreshing = False
                if grant is None:
                    grant = await self._login()
            else:
                grant = await self._login()
        except UpstreamError as exc:
            self.progress.failures += 1
            self.progress.error(exc)
            if isinstance(exc, Maintenance):
                self.session.forget_version()  # the site may come back upgraded
            if refreshing and old is not None and timing.leaves_doubt(exc):
                self._doubt(old)
            demand.in_flight = False
            self.board.settle(demand, failed=True, done=False)
            raise
        logged_in = self.progress.state is State.LOGGING_IN
        self.install(grant)
        self._unproven = (grant, self._ticks())
        self.progress.renewed(grant.expires_at)
        demand.in_flight = False
        self.board.settle(demand, failed=False)
        if logged_in:
            await self.session.learn_version(grant, self.config)
        elif old is not None:
            await self.session.watch_old_token(old, self.config)

    async def _end_session(self) -> None:
        """`sugarctl revoke`: log the session out at Sugar with its refresh token, so that no
        token it handed out works any more, and serve none of them again; the login that
        follows starts a new session (which on its own would evict the old one too, at Sugar's
        next session check)."""
        grant = self.session.grant
        if grant is None:
            log.warning("%s: revoke asked, but there is no session to end; logging in", self.name)
        else:
            ended = await self.calls.logout(grant)
            self.session.mark_dead(grant.access_token)
            log.warning(
                "%s: revoked: %s the session of token %s at Sugar, as asked; logging in anew",
                self.name,
                {True: "ended", False: "Sugar refused to end", None: "no answer ending"}[ended],
                grant.access_token.fingerprint,
            )
        self.session.drop_refresh_token()
        self.progress.revoked()

    async def _refresh(self, refresh_token: Secret) -> Grant | None:
        """A refresh; None if Sugar no longer knows the refresh token (then log in)."""
        self.progress.set_state(State.REFRESHING)
        if self.fleet is None or self.fleet.leads():
            self.progress.refreshes += 1
        try:
            return await self.calls.refresh(refresh_token)
        except RefreshRejected as exc:
            # Evicted by another login, rotated by a refresh we never saw, or expired:
            # exactly one password login gets the session back.
            self.progress.error(exc)
            ended = not timing.refresh_usable(self.session.grant, self._clock())
            why = f" ({self.session.why_login()})" if ended else ""
            log.warning("%s: %s%s; logging in again", self.name, exc.message, why)
            self.session.drop_refresh_token()
            if not self._eviction_told:  # a report or probe that found it told it already
                self._evicted("refresh")
            return None
        except RefreshConsumed:
            # Maintenance or a license lock: Sugar deleted the refresh token before
            # refusing, so the next try must be a password login.
            self.session.drop_refresh_token()
            raise

    async def _login(self) -> Grant:
        rejection = self.progress.rejection
        if rejection is not None and rejection.applies_to(self.config):
            # The one gate every password login passes: a rejected secret is never sent.
            refused = CredentialsRejected if rejection.field == "password" else ClientRejected
            raise refused(rejection.refusal(self.config))
        if self.fleet is not None and not self.fleet.leads():
            return await self.upstream.login()  # the fleet's session: no login of this host's
        self.progress.set_state(State.LOGGING_IN)
        async with self._login_slots:
            self.progress.logins += 1
            log.info("%s: logging in as %s", self.name, self.config.username)
            return await self.calls.login()

    def _evicted(self, found_by: EvictionFoundBy) -> None:
        """Tell one eviction once: the refresh that follows a report or a probe finding the
        session gone is refused too, and is the same eviction, not another."""
        self._eviction_told = True
        self.progress.evicted(found_by)

    def install(self, grant: Grant) -> None:
        """Serve `grant` from now on (renewed here, kept across a restart, or the fleet's)."""
        self._eviction_told = False
        old = self.session.install(grant, logged_in=self.progress.state is State.LOGGING_IN)
        self.progress.refresh_at = self.session.refresh_time(grant, self.config)
        self.progress.last_refresh = self._clock()
        self.progress.next_attempt_at = None
        self._probe_at = self._next_probe()
        self.progress.set_state(State.READY)
        log.info(
            "%s: token %s%s, valid %.0f s, refresh at %s",
            self.name,
            grant.access_token.fingerprint,
            f" replaces {old.access_token.fingerprint}" if old else "",
            grant.lifetime,
            time.strftime("%H:%M:%S", time.localtime(self.progress.refresh_at)),
        )

    def reschedule(self) -> None:
        """The settings changed (a reload adopted them): renew and probe by the new ones."""
        grant = self.session.grant
        if grant is not None:
            self.progress.refresh_at = self.session.refresh_time(grant, self.config)
            self._probe_at = self._next_probe()
        self.board.notify()

    # Timing (the rules: sugard/keeper/timing.py)

    def _renewal_time(self, grant: Grant) -> float:
        return self.session.renewal_time(grant, self.config, self.progress.refresh_at)

    def _next_probe(self) -> float | None:
        return timing.next_probe(self._ticks(), self.config.probe_interval)

    def doubt_check(self) -> Demand | None:
        """The pending check of the token in doubt, if that is the demand: requests wait for
        its verdict rather than demand a renewal (a token Sugar still takes needs none)."""
        demand, grant = self.board.pending(), self.session.grant
        if demand is None or demand.need is not Need.CHECK or grant is None:
            return None
        return demand if grant.access_token == self.session.doubted else None

    def doomed(self) -> bool:
        """The current token dies when the renewal now in flight answers (no grace)."""
        demand = self.board.demand
        return (
            demand is not None
            and demand.in_flight
            and demand.need is Need.RENEW
            and self.session.old_token_grace(self.config) <= 0
        )

    def _doubt(self, old: Grant) -> None:
        """A refresh whose outcome may have killed the token it was to replace: where a
        refresh kills it at once, it is not served again before a check (made at once)."""
        if self.session.grant is old and self.session.old_token_grace(self.config) <= 0:
            self.session.doubt(old.access_token)
            log.info(
                "%s: Sugar may have run the refused refresh and killed token %s; checking it "
                "before serving it again",
                self.name,
                old.access_token.fingerprint,
            )

    # Backoff (the policy: sugard/keeper/timing.py)

    def _before_backoff(self, retry_state: RetryCallState) -> None:
        seconds = retry_state.upcoming_sleep
        self.progress.next_attempt_at = self._clock() + seconds
        self.progress.set_state(State.BACKING_OFF)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning("%s: %s; next try in %.1f s", self.name, exc, seconds)

    async def _backoff_sleep(self, seconds: float, demand: Demand) -> None:
        """Sleep until a deadline on the steady clock, in steps of at most `max_sleep` (it
        counts a suspend; asyncio's clock does not); a forced demand (`sugarctl refresh`) cuts
        it short. Meanwhile the token still served is checked: at once if a refresh left it in
        doubt, else when the probe is due."""
        deadline = self._ticks() + seconds
        while (
            (left := deadline - self._ticks()) > 0 and not demand.forced and not self.board.closed
        ):
            probe_in = self._probe_in_backoff()
            if probe_in is not None and probe_in <= 0:
                await self._check_in_backoff()
                continue
            wake = left if probe_in is None else min(left, probe_in)
            await self.board.idle(min(wake, self._max_sleep))

    def _probe_in_backoff(self) -> float | None:
        """Seconds until the token served during a backoff is to be checked; None: never."""
        grant = self.session.grant
        if grant is None or not self.session.usable():
            return None
        if self.session.doubted == grant.access_token:
            return 0.0
        if self._probe_at is None or grant.expires_at <= self._clock():
            return None
        return self._probe_at - self._ticks()

    async def _check_in_backoff(self) -> None:
        """One probe of the token served while the renewal backs off: a dead one is not
        served again (requests then wait for the renewal or get 503 with when to retry)."""
        grant = self.session.grant
        assert grant is not None
        verdict = await self.calls.probe(grant.access_token)
        self._probe_at = self._next_probe()
        if self.session.grant is not grant:
            return
        if verdict is Probe.DEAD:
            log.warning(
                "%s: Sugar refused token %s (found by the probe during the backoff); "
                "not serving it",
                self.name,
                grant.access_token.fingerprint,
            )
            self.session.mark_dead(grant.access_token)
            self._evicted("probe")
        elif self.session.doubted == grant.access_token:
            log.info(
                "%s: token %s %s; serving it",
                self.name,
                grant.access_token.fingerprint,
                "still works" if verdict is Probe.ALIVE else "gave no verdict",
            )
        self.session.doubt(None)
        self.board.notify()
