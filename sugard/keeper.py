"""One instance's token life: log in, refresh ahead of expiry, probe, recover, back off, serve.

One supervisor task per instance makes every upstream call, so there is never more than one
in flight per instance (single flight). Requests read the current grant, or join the one
`Demand` the supervisor owes (a renewal, or a check of a reported token) and wait for it:
however many ask while it is pending or in flight, it is made once and answers them all.
The demand, and the one condition set at each change, live on its `Board` (keeper_board).

Times that matter (expiry, refresh-at, probes) are wall clock, re-read at every decision, and
no sleep lasts longer than `MAX_SLEEP`: asyncio's monotonic clock stops while a laptop is
suspended, the wall clock does not.

How a refresh treats the token scripts hold depends on the Sugar version (docs/sugarcrm.md):
up to 13.0 the old access token lives on for a while (a grace period), from 13.3 it dies the
moment the refresh answers. docs/lifecycle.md explains the timing chosen for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Protocol

from tenacity import RetryCallState

from . import backoff
from . import renewal_timing as timing
from .config import ConfigError, InstanceConfig
from .errors import InstanceStopped, NeedsAttention, TokenUnavailable
from .keeper_board import Board
from .keeper_model import Demand, ErrorStatus, LastError, Need, Rejection, State, Status
from .keeper_reports import CountedCalls, renewal_reason
from .keeper_session import HeldSession
from .observe import EvictionFoundBy, Observer
from .renewal_timing import grace_for_version
from .secret import Secret
from .sugar import (
    ClientRejected,
    CredentialsRejected,
    Grant,
    Probe,
    RefreshConsumed,
    RefreshRejected,
    RejectedError,
    SugarClient,
    SugarError,
)

__all__ = [
    "MAX_SLEEP",
    "Grant",  # what a keeper hands out: the api serves it without knowing the sugar module
    "InstanceStopped",
    "Keeper",
    "LastError",
    "NeedsAttention",
    "Rejection",
    "State",
    "Status",
    "TokenUnavailable",
    "grace_for_version",
]

log = logging.getLogger("sugard.keeper")

MAX_SLEEP = 30.0


class FleetSeat(Protocol):
    """An instance's seat in a fleet (sugard/fleet/source.py): its upstream then decides who
    calls Sugar, and the seat hands the keeper sessions renewed on other hosts (`offer`) and
    followers' requests (`request_renewal`)."""

    def attach(self, keeper: Keeper) -> None: ...

    async def detach(self) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def leads(self) -> bool:
        """Whether this host's renewals go to Sugar now (else the leader's answer them)."""
        ...


class Keeper:
    """Keeps one live session for one instance."""

    def __init__(
        self,
        config: InstanceConfig,
        upstream: SugarClient,
        *,
        login_slots: asyncio.Semaphore | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        max_sleep: float = MAX_SLEEP,
        reread: Callable[[InstanceConfig], InstanceConfig] | None = None,
        observer: Observer | None = None,
        fleet: FleetSeat | None = None,
    ) -> None:
        self.config = config
        self._observer = observer or Observer()  # metrics and on_event hear of what happens
        self.upstream = upstream
        self._calls = CountedCalls(upstream, self._observer, config.name)  # each one counted
        self.fleet = fleet
        self._login_slots = login_slots or asyncio.Semaphore(1)
        self._clock = clock
        self._rng = rng
        self._max_sleep = max_sleep
        # Reads the secrets from their sources again (blocking: a file, a command).
        self._reread = reread
        self.rejection: Rejection | None = None

        self.state = State.STARTING
        self.logins = 0
        self.refreshes = 0
        self.failures = 0
        self.last_refresh: float | None = None
        self.last_error: LastError | None = None
        self.refresh_at: float | None = None
        self.next_attempt_at: float | None = None

        self._session = HeldSession(self._calls, clock, rng)  # the grant and what it learned of it
        self._board = Board()  # the one demand and the one condition (sugard/keeper_board.py)
        self._probe_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._resumed: Grant | None = None  # a session kept across a restart, not yet checked

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def grant(self) -> Grant | None:
        return self._session.grant

    @property
    def sugar_version(self) -> str | None:
        """As ServerInfo published it, once per session."""
        return self._session.sugar_version

    # Lifecycle

    def start(self) -> None:
        if self.fleet is not None:
            self.fleet.attach(self)
        self._task = asyncio.create_task(self._supervise(), name=f"keeper:{self.name}")

    async def stop(self) -> None:
        """Stop the supervisor; waiting requests get InstanceStopped."""
        self._board.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.fleet is not None:
            await self.fleet.detach()

    def adopt(self, config: InstanceConfig) -> None:
        """Take settings that do not touch the session (timeouts, windows, the secrets)
        without a new login; new secrets are sent at the next password login."""
        assert config.session_key() == self.config.session_key()
        for secret, when in (("password", "password login"), ("client_secret", "renewal")):
            if getattr(config, secret).value != getattr(self.config, secret).value:
                log.info(
                    "%s: new %s; the session stays, the next %s uses it", self.name, secret, when
                )
        self._take(config)
        if self._session.grant is not None:
            self.refresh_at = self._session.refresh_time(self._session.grant, self.config)
            self._probe_at = self._next_probe()
        self._board.notify()

    # Requests

    async def token(self, min_ttl: float = 0.0, wait: float = 10.0) -> Grant:
        """The current token, if it has `min_ttl` seconds left; else wait up to `wait` for one.

        On a server where a refresh kills the old token, a request that arrives while a renewal
        is in flight waits for the new token rather than take one about to die.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        joined: Demand | None = None
        held = False  # the token met the request, but a renewal in flight is about to kill it
        while True:
            self._raise_if_stopped()
            grant = self._session.grant
            if grant is not None and self._session.servable():
                # A renewal this request waited for answers it, even if Sugar's lifetime is
                # shorter than min_ttl (the cap); else the token must have min_ttl left.
                renewed = joined is not None and joined.done
                wanted = timing.wanted_ttl(min_ttl, grant)
                enough = grant.expires_at - self._clock() >= wanted
                held = enough and self._doomed()
                if renewed or (enough and not held):
                    self._session.handed_out(grant, wanted)
                    return grant
            if self.state is State.FAILED:
                raise NeedsAttention(self._failure_message())
            if (joined is None or joined.done) and self._resumed is None:
                joined = self._board.join(Need.RENEW, "a token request")
            left = deadline - loop.time()
            if left <= 0 or not await self._board.idle(left):
                if held and grant is not None and grant is self._session.grant:
                    # Held for a renewal that has not answered within the wait: the token is
                    # still valid now, and a renewal this slow is likely failing. Better than
                    # no token at all; the script was told how long it may wait.
                    self._session.handed_out(grant, 0.0)
                    return grant
                raise TokenUnavailable(self._unavailable_message(), self._retry_after())

    async def invalidate(self, access_token: str, wait: float = 10.0) -> Grant:
        """A script reports that Sugar refused `access_token`.

        A report of the current token is checked first with one probe, however many scripts
        report it: a token that still works (a 401 for another reason) is not renewed for
        everyone. An older token gets the current one back, with no upstream call.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        grant = self._session.grant
        reported = Secret(access_token)
        if (
            grant is not None
            and grant.access_token == reported != self._session.dead_token
            and self.state is not State.FAILED
        ):
            # Logged by the report that starts the check: the others only join it.
            starts_check = self._board.pending() is None
            check = self._board.join(Need.CHECK, "a script's report")
            if starts_check:
                log.info(
                    "%s: token %s reported as refused by Sugar; checking it",
                    self.name,
                    grant.access_token.fingerprint,
                )
            await self._wait_for(lambda: check.done, deadline)
        elif grant is not None and grant.access_token == reported:
            # `failed`: nothing to check with; never serve it again
            self._session.dead_token = reported
        return await self.token(wait=max(0.0, deadline - loop.time()))

    async def refresh_now(self, wait: float = 10.0, *, retry_rejected: bool = False) -> Grant:
        """Renew now, even from `failed` or during backoff (`sugarctl refresh`), and answer
        with the outcome of that one attempt: the new token, or why there is none.

        After Sugar rejected a secret, the secrets are read again first, and the attempt is
        made only if the rejected one changed, or `retry_rejected` insists."""
        self._raise_if_stopped()
        if self.rejection is not None:
            await self._recheck_rejected(retry_rejected)
        demand = self._board.join(Need.RENEW, "sugarctl refresh", forced=True)
        attempts = demand.attempts
        loop = asyncio.get_running_loop()
        await self._wait_for(lambda: demand.attempts > attempts, loop.time() + wait)
        if self.state is State.FAILED:
            raise NeedsAttention(self._failure_message())
        if demand.failed or self._session.grant is None:
            raise TokenUnavailable(self._unavailable_message(), self._retry_after())
        return self._session.grant

    async def _recheck_rejected(self, insist: bool) -> None:
        rejection = self.rejection
        assert rejection is not None
        if self._reread is not None:
            try:
                self._take(await asyncio.to_thread(self._reread, self.config))
            except ConfigError as exc:
                raise NeedsAttention(
                    f"cannot read the secrets of {self.name!r} again: {exc.problems[0]}"
                ) from None
        if not self.refuses_rejected():
            log.info("%s: the rejected %s changed; trying it once", self.name, rejection.field)
        elif insist:
            log.warning("%s: sending the rejected %s again, as asked", self.name, rejection.field)
        else:
            raise NeedsAttention(rejection.refusal(self.config))
        self.rejection = None

    def _take(self, config: InstanceConfig) -> None:
        self.config = config
        self.upstream.instance = config
        if self.rejection is not None and not self.rejection.applies_to(config):
            self.rejection = None  # a new secret: it gets its one try

    def refuses_rejected(self) -> bool:
        """Whether the configured secret is one Sugar rejected (so no login will send it)."""
        return self.rejection is not None and self.rejection.applies_to(self.config)

    def retry_if_failed(self) -> None:
        """A reload asks a failed instance to try once more: the person who reloaded may have
        fixed what Sugar refused (unlocked the user, registered the platform). Never with a
        secret Sugar rejected that has not changed since."""
        if self.state is State.FAILED and not self.refuses_rejected():
            self._board.join(Need.RENEW, "a reload", forced=True)

    # A session handed over a restart (sugard/handoff.py)

    def session(self) -> Grant | None:
        """The session to hand to the next sugard: the grant being served, if no renewal was
        cut short (a refresh Sugar may have answered would leave it dead) and its refresh
        token is still good."""
        return self._session.kept(self.state is State.READY)

    def resume(self, grant: Grant, sugar_version: str | None) -> None:
        """Take back the session the sugard before this one handed over; before start().
        Nothing is served from it until one probe says Sugar still takes its token."""
        self._resumed = grant
        self._session.sugar_version = sugar_version

    async def _check_resumed(self, grant: Grant) -> None:
        try:
            self._session.resume_version(self.config)
            expired = grant.expires_at <= self._clock()
            verdict = Probe.DEAD if expired else await self._calls.probe(grant.access_token)
            if verdict is Probe.DEAD:
                log.info(
                    "%s: Sugar no longer takes token %s kept across the restart; renewing",
                    self.name,
                    grant.access_token.fingerprint,
                )
                # Its refresh token may still work (an expired token): one refresh, no login.
                self._session.take_back_dead(grant)
                if not expired:
                    self._evicted("probe")
                self._board.join(Need.RENEW, "no usable token")
                return
            self._install(grant)
            self.last_refresh = grant.issued_at
            log.info(
                "%s: took back the session kept across the restart (token %s%s)",
                self.name,
                grant.access_token.fingerprint,
                "" if verdict is Probe.ALIVE else "; Sugar gave no verdict on it",
            )
        finally:
            self._resumed = None
            self._board.notify()

    def status(self) -> Status:
        """A frozen snapshot of the instance now, for the API to render and metrics to read."""
        grant = self._session.grant
        error = self.last_error
        return Status(
            name=self.name,
            url=self.config.url,
            username=self.config.username,
            platform=self.config.platform,
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
            fleet=self.fleet.status() if self.fleet is not None else None,
        )

    # Sessions from the fleet

    def offer(self, grant: Grant) -> bool:
        """A session another host renewed (the fleet's leader stored it): serve it, with no
        upstream call. Declined (False) while a renewal of our own is pending: that renewal
        gets it from the fleet instead, at once (a backoff is cut short)."""
        demand = self._board.pending()
        if demand is not None and (demand.in_flight or demand.need is Need.RENEW):
            if not demand.in_flight:
                demand.forced = True
                self._board.notify()
            return False
        self._install(grant)
        if demand is not None:
            self._board.settle(
                demand, failed=False
            )  # a pending check: the token it was about is gone
        self._board.notify()
        return True

    def request_renewal(self, reason: str) -> None:
        """Renew once for a follower that asked (joins a renewal pending or in flight)."""
        if not self._board.closed:
            self._board.join(Need.RENEW, reason)

    # Waiting on the supervisor

    async def _wait_for(self, condition: Callable[[], bool], deadline: float) -> None:
        """Wait until `condition()` holds or the loop's clock reaches `deadline`."""
        if not await self._board.wait_for(condition, deadline):
            self._raise_if_stopped()
            raise TokenUnavailable(self._unavailable_message(), self._retry_after())

    def _raise_if_stopped(self) -> None:
        if self._board.closed:
            raise InstanceStopped(f"instance {self.name!r} is no longer configured")

    # The supervisor

    async def _supervise(self) -> None:
        if self._resumed is not None:
            await self._check_resumed(self._resumed)
        while not self._board.closed:
            demand = self._next_demand()
            if demand is None:
                await self._board.idle(self._seconds_to_next_action())
            elif demand.need is Need.CHECK:
                await self._check(demand)
            else:
                await self._renew(demand)

    def _next_demand(self) -> Demand | None:
        """The demand to act on now, making one when the schedule says so; None: nothing yet."""
        demand = self._board.demand
        if self.state is State.FAILED:
            return demand if demand is not None and demand.forced else None
        if demand is not None and not demand.done:
            return demand
        grant, now = self._session.grant, self._clock()
        if grant is None or not self._session.usable():
            return self._board.join(Need.RENEW, "no usable token")
        if now >= self._renewal_time(grant):
            return self._board.join(Need.RENEW, "the schedule")
        if self._probe_at is not None and now >= self._probe_at:
            return self._board.join(Need.CHECK, "the probe interval")
        return None

    def _seconds_to_next_action(self) -> float:
        grant = self._session.grant
        if self.state is State.FAILED or grant is None:
            return self._max_sleep
        due = self._renewal_time(grant)
        if self._probe_at is not None:
            due = min(due, self._probe_at)
        return min(self._max_sleep, max(0.0, due - self._clock()))

    async def _check(self, demand: Demand) -> None:
        """Probe the current token; if Sugar refuses it, the demand becomes its renewal."""
        grant = self._session.grant
        assert grant is not None
        demand.in_flight = True
        verdict = await self._calls.probe(grant.access_token)
        demand.in_flight = False
        self._probe_at = self._next_probe()
        if demand.need is Need.RENEW:  # someone needed a new token meanwhile
            await self._renew(demand)
            return
        reported = demand.reason == "a script's report"
        if verdict is Probe.ALIVE:
            if reported:
                log.info(
                    "%s: token %s still works (the script's 401 had another cause); not renewing",
                    self.name,
                    grant.access_token.fingerprint,
                )
            self._board.settle(demand, failed=False)
            return
        if verdict is Probe.UNKNOWN and not reported:
            log.debug("%s: probe gave no verdict; trying again later", self.name)
            self._board.settle(demand, failed=False)
            return
        # Refused (or, for a report, no verdict: the script did see a 401, so act on it).
        log.warning(
            "%s: Sugar refused token %s (%s); renewing",
            self.name,
            grant.access_token.fingerprint,
            "reported by a script" if reported else "evicted, found by the probe",
        )
        self._session.dead_token = grant.access_token
        self._evicted("report" if reported else "probe")
        demand.need = Need.RENEW  # its waiters (the reporters) get the renewal's token
        self._board.notify()
        await self._renew(demand)

    async def _renew(self, demand: Demand) -> None:
        self._observer.renewal(self.name, renewal_reason(demand, self._session.grant))
        retrying = backoff.renewal_retries(
            wait=lambda state: backoff.delay(state, self.config.backoff_max, self._rng),
            sleep=lambda seconds: self._backoff_sleep(seconds, demand),
            before_sleep=self._before_backoff,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt(demand)
        except RejectedError as exc:
            self.next_attempt_at = None
            self.rejection = Rejection.of(exc, self.config) or self.rejection
            self._set_state(State.FAILED)
            log.error("%s: %s", self.name, exc.message)
            self._board.drop(demand)

    async def _attempt(self, demand: Demand) -> None:
        demand.forced = False  # this attempt is the one a person asked for
        demand.in_flight = True
        self._board.notify()  # requests that must not take the doomed token see it is in flight
        old = self._session.grant
        try:
            refresh_token = self._session.refresh_token
            if refresh_token is not None and timing.refresh_usable(old, self._clock()):
                grant = await self._refresh(refresh_token)
                if grant is None:
                    grant = await self._login()
            else:
                if refresh_token is not None:
                    why = self._session.why_login()
                    log.info("%s: %s; logging in with the password", self.name, why)
                grant = await self._login()
        except SugarError as exc:
            self.failures += 1
            self.last_error = LastError(self._clock(), exc.kind, exc.message)
            demand.in_flight = False
            self._board.settle(demand, failed=True, done=False)
            raise
        logged_in = self.state is State.LOGGING_IN
        self._install(grant)
        self._observer.renewed(
            self.name, expires_at=grant.expires_at, error_kind=self._error_kind()
        )
        demand.in_flight = False
        self._board.settle(demand, failed=False)
        if logged_in:
            await self._session.learn_version(grant, self.config)
        elif old is not None:
            await self._session.watch_old_token(old, self.config)

    async def _refresh(self, refresh_token: Secret) -> Grant | None:
        """A refresh; None if Sugar no longer knows the refresh token (then log in)."""
        self._set_state(State.REFRESHING)
        if self.fleet is None or self.fleet.leads():
            self.refreshes += 1
        try:
            return await self._calls.refresh(refresh_token)
        except RefreshRejected as exc:
            # Evicted by another login, rotated by a refresh we never saw, or expired:
            # exactly one password login gets the session back.
            self.last_error = LastError(self._clock(), exc.kind, exc.message)
            log.warning("%s: %s; logging in again", self.name, exc.message)
            self._session.refresh_token = None
            self._evicted("refresh")
            return None
        except RefreshConsumed:
            # Maintenance or a license lock: Sugar deleted the refresh token before
            # refusing, so the next try must be a password login.
            self._session.refresh_token = None
            raise

    async def _login(self) -> Grant:
        rejection = self.rejection
        if rejection is not None and rejection.applies_to(self.config):
            # The one gate every password login passes: a rejected secret is never sent.
            refused = CredentialsRejected if rejection.field == "password" else ClientRejected
            raise refused(rejection.refusal(self.config))
        if self.fleet is not None and not self.fleet.leads():
            return await self.upstream.login()  # the fleet's session: no login of this host's
        self._set_state(State.LOGGING_IN)
        async with self._login_slots:
            self.logins += 1
            log.info("%s: logging in as %s", self.name, self.config.username)
            return await self._calls.login()

    def _install(self, grant: Grant) -> None:
        old = self._session.install(grant, logged_in=self.state is State.LOGGING_IN)
        self.refresh_at = self._session.refresh_time(grant, self.config)
        self.last_refresh = self._clock()
        self.next_attempt_at = None
        self._probe_at = self._next_probe()
        self._set_state(State.READY)
        log.info(
            "%s: token %s%s, valid %.0f s, refresh at %s",
            self.name,
            grant.access_token.fingerprint,
            f" replaces {old.access_token.fingerprint}" if old else "",
            grant.lifetime,
            time.strftime("%H:%M:%S", time.localtime(self.refresh_at)),
        )

    # What the observer hears (metrics, on_event)

    def _set_state(self, state: State) -> None:
        """Every change of state goes through here, so `failed` and `recovered` are told."""
        if state is self.state:
            return
        self.state = state
        grant = self._session.grant
        self._observer.state_changed(
            self.name,
            state.value,
            expires_at=grant.expires_at if grant is not None else None,
            error_kind=self._error_kind(),
        )

    def _evicted(self, found_by: EvictionFoundBy) -> None:
        grant = self._session.grant
        self._observer.evicted(
            self.name,
            found_by,
            expires_at=grant.expires_at if grant is not None else None,
            error_kind=self._error_kind(),
        )

    def _error_kind(self) -> str | None:
        return self.last_error.kind if self.last_error is not None else None

    # Timing (the rules: sugard/renewal_timing.py)

    def _renewal_time(self, grant: Grant) -> float:
        return self._session.renewal_time(grant, self.config, self.refresh_at)

    def _next_probe(self) -> float | None:
        return timing.next_probe(self._clock(), self.config.probe_interval)

    def _doomed(self) -> bool:
        """The current token dies when the renewal now in flight answers (no grace)."""
        demand = self._board.demand
        return (
            demand is not None
            and demand.in_flight
            and demand.need is Need.RENEW
            and self._session.old_token_grace(self.config) <= 0
        )

    # Backoff (the policy: sugard/backoff.py)

    def _before_backoff(self, retry_state: RetryCallState) -> None:
        seconds = retry_state.upcoming_sleep
        self.next_attempt_at = self._clock() + seconds
        self._set_state(State.BACKING_OFF)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning("%s: %s; next try in %.1f s", self.name, exc, seconds)

    async def _backoff_sleep(self, seconds: float, demand: Demand) -> None:
        """Sleep until a wall-clock deadline, in steps of at most MAX_SLEEP (suspend-proof);
        a forced demand (`sugarctl refresh`) cuts it short."""
        deadline = self._clock() + seconds
        while (
            (left := deadline - self._clock()) > 0 and not demand.forced and not self._board.closed
        ):
            await self._board.idle(min(left, self._max_sleep))

    # Words for humans

    def _error_is_current(self, error: LastError) -> bool:
        """Whether the instance's state is caused by this error (else it is history)."""
        if self.state is State.READY:
            return False
        return self.last_refresh is None or error.at >= self.last_refresh

    def _retry_after(self) -> float:
        if self.next_attempt_at is not None:
            return max(1.0, round(self.next_attempt_at - self._clock(), 1))
        return 1.0

    def _unavailable_message(self) -> str:
        why = f": {self.last_error.message}" if self.last_error else ""
        return f"no valid token for {self.name!r} yet ({self.state.value}){why}"

    def _failure_message(self) -> str:
        return self.last_error.message if self.last_error else f"instance {self.name!r} failed"
