"""One instance's token life, as requests see it: serve the current token, or wait for one.

A request reads the current grant, or joins the one `Demand` the supervisor owes (a renewal,
or a check of a reported token) and waits for it: however many ask while it is pending or in
flight, it is made once and answers them all. The demand, and the one condition set at each
change, live on its `Board` (`model`); the one task that calls Sugar, and what it keeps
(state, counters, times), is the `Supervisor` (`supervisor`). This module decides what a
request gets; it never calls Sugar itself.

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
from dataclasses import replace
from typing import Any, Protocol

from sugard.config import ConfigError, InstanceConfig
from sugard.errors import InstanceNeedsAttention, InstanceStopped, LeaderOnly
from sugard.keeper import timing as timing
from sugard.keeper.model import Board, Demand, LastError, Need, Rejection, State, Status
from sugard.keeper.sudo import SudoUsers
from sugard.keeper.supervisor import Leadership, Supervisor
from sugard.keeper.timing import grace_for_version
from sugard.observe import Observer, RenewalReason
from sugard.secret import Secret
from sugard.sugar import Grant, SugarClient

__all__ = [
    "MAX_SLEEP",  # what a keeper hands out: the api serves it without knowing the sugar module
    "Keeper",
    "LastError",
    "Rejection",
    "State",
    "Status",
    "grace_for_version",
]

log = logging.getLogger("sugard.keeper")

MAX_SLEEP = 30.0


class FleetSeat(Leadership, Protocol):
    """An instance's seat in a fleet (sugard/fleet/source.py): its upstream then decides who
    calls Sugar, and the seat hands the keeper sessions renewed on other hosts (`offer`) and
    followers' requests (`request_renewal`)."""

    def attach(self, keeper: Keeper) -> None: ...

    async def detach(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class Keeper:
    """Keeps one live session for one instance."""

    def __init__(
        self,
        config: InstanceConfig,
        upstream: SugarClient,
        *,
        login_slots: asyncio.Semaphore | None = None,
        clock: Callable[[], float] = time.time,
        ticks: Callable[[], float] = timing.steady_clock,
        rng: Callable[[], float] = random.random,
        max_sleep: float = MAX_SLEEP,
        reread: Callable[[InstanceConfig], InstanceConfig] | None = None,
        observer: Observer | None = None,
        fleet: FleetSeat | None = None,
        on_rejection: Callable[[Rejection | None], None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.fleet = fleet
        self._clock = clock  # the wall clock: token expiries, times shown
        self._ticks = ticks  # the steady one: intervals (timing.steady_clock)
        # Reads the secrets from their sources again (blocking: a file, a command).
        self._reread = reread
        self._board = Board()  # the one demand and the one condition (sugard/keeper/model.py)
        self._supervisor = Supervisor(
            config,
            upstream,
            self._board,
            observer or Observer(),  # metrics and on_event hear of what happens
            fleet=fleet,
            login_slots=login_slots or asyncio.Semaphore(1),
            clock=clock,
            ticks=ticks,
            rng=rng,
            max_sleep=max_sleep,
            on_rejection=on_rejection,  # told of each change of `rejection`
        )
        self._progress = self._supervisor.progress  # what requests are told comes from it
        # When (steady clock, and wall clock) a rejected secret was last sent again as asked:
        # the next such retry of the same secret waits timing.REJECTED_RETRY_QUIET.
        self._insisted: tuple[float, float] | None = None
        self._task: asyncio.Task[None] | None = None
        # Tokens of other users, by Sugar's sudo with this session (sugard/keeper/sudo.py).
        self.sudo = SudoUsers(
            config,
            upstream,
            self,
            lambda: self._supervisor.session.old_token_grace(self.config),
            observer or Observer(),
            clock=clock,
            rng=rng,
            max_sleep=max_sleep,
        )

    @property
    def name(self) -> str:
        return self._supervisor.name

    @property
    def config(self) -> InstanceConfig:
        return self._supervisor.config

    @property
    def state(self) -> State:
        return self._progress.state

    @property
    def rejection(self) -> Rejection | None:
        """The secret Sugar rejected, if any: no login sends it again until it changes."""
        return self._progress.rejection

    @rejection.setter
    def rejection(self, rejection: Rejection | None) -> None:
        self._progress.rejection = rejection  # a reload carries it to the new keeper

    @property
    def refreshes(self) -> int:
        return self._progress.refreshes

    @property
    def refresh_at(self) -> float | None:
        return self._progress.refresh_at

    @property
    def grant(self) -> Grant | None:
        return self._supervisor.session.grant

    @property
    def sugar_version(self) -> str | None:
        """As the site published it (its metadata), read after the first login."""
        return self._supervisor.session.sugar_version

    # Lifecycle

    def start(self) -> None:
        if self.fleet is not None:
            self.fleet.attach(self)
        self._task = asyncio.create_task(self._supervisor.run(), name=f"keeper:{self.name}")

    async def stop(self) -> None:
        """Stop the supervisor; waiting requests get InstanceStopped."""
        self._board.close()
        await self.sudo.stop()
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
        self._supervisor.reschedule()

    def status(self) -> Status:
        """A frozen snapshot of the instance now, for the API to render and metrics to read."""
        fleet = self.fleet.status() if self.fleet is not None else None
        return replace(self._progress.status(self.config, fleet), sudo=self.sudo.status())

    # Requests

    async def token(self, min_ttl: float = 0.0, wait: float = 10.0) -> Grant:
        """The current token, if it has `min_ttl` seconds left; else wait up to `wait` for one.

        On a server where a refresh kills the old token, a request that arrives while a renewal
        is in flight waits for the new token rather than take one about to die.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        joined: Demand | None = None
        while True:
            self._raise_if_stopped()
            grant = self._supervisor.session.grant
            if grant is not None and self._supervisor.session.servable():
                # A renewal this request waited for answers it, even if Sugar's lifetime is
                # shorter than min_ttl (the cap); else the token must have min_ttl left.
                renewed = joined is not None and joined.done
                wanted = timing.wanted_ttl(min_ttl, grant)
                enough = grant.expires_at - self._clock() >= wanted
                if renewed or (enough and not self._supervisor.doomed()):
                    self._supervisor.session.handed_out(grant, wanted)
                    return grant
            if self.state is State.FAILED:
                raise self._progress.needs_attention()
            if (joined is None or joined.done) and self._supervisor.resumed is None:
                # A check of a token in doubt decides whether a renewal is needed at all.
                joined = self._supervisor.doubt_check() or self._board.join(
                    Need.RENEW, RenewalReason.DEMANDED
                )
            left = deadline - loop.time()
            if left <= 0 or not await self._board.idle(left):
                last = self._last_resort(min_ttl)
                if last is not None:
                    return last
                raise self._progress.unavailable()

    def _last_resort(self, min_ttl: float) -> Grant | None:
        """At the end of a request's wait: the current token if it is still valid (outside the
        mandatory window), not refused by Sugar, and has `min_ttl` left, even though a renewal
        in flight may kill it or a refresh Sugar may have run left it in doubt. A renewal this
        slow is likely failing, a check this slow likely stuck: a token still valid is better
        than none, and the script was told how long it may wait."""
        grant = self._supervisor.session.grant
        if grant is None or not timing.servable(
            grant, self._clock(), self._supervisor.session.dead_token
        ):
            return None
        if grant.expires_at - self._clock() < timing.wanted_ttl(min_ttl, grant):
            return None
        self._supervisor.session.handed_out(grant, 0.0)
        return grant

    async def invalidate(
        self, access_token: str, wait: float = 10.0, *, reporter: str = "a script"
    ) -> Grant:
        """A script (or `reporter`: the proxy) reports that Sugar refused `access_token`.

        A report of the current token is checked first with one probe, however many scripts
        report it (those that come while the check is under way join it; those that keep
        coming after it found the token alive get its answer): a token that still works (a
        401 for another reason) is not renewed for everyone. An older token gets the current
        one back, with no upstream call.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        grant = self._supervisor.session.grant
        reported = Secret(access_token)
        session = self._supervisor.session
        current = grant is not None and grant.access_token == reported
        if current and self.state is State.FAILED:
            session.mark_dead(reported)  # nothing to check with; never serve it again
        elif (
            grant is not None
            and current
            and reported != session.dead_token
            # A report in the burst a check just answered gets that answer: the same token.
            and not session.alive_for_report(reported)
        ):
            # Logged by the report that starts the check: the others only join it.
            starts_check = self._board.pending() is None
            check = self._board.join(Need.CHECK, RenewalReason.REPORTED, reporter=reporter)
            if starts_check:
                log.info(
                    "%s: token %s reported as refused by Sugar (by %s); checking it",
                    self.name,
                    grant.access_token.fingerprint,
                    reporter,
                )
            await self._wait_for(lambda: check.done, deadline)
        return await self.token(wait=max(0.0, deadline - loop.time()))

    async def refresh_now(self, wait: float = 10.0, *, retry_rejected: bool = False) -> Grant:
        """Renew now, even from `failed` or during backoff (`sugarctl refresh`), and answer
        with the outcome of that one attempt: the new token, or why there is none.

        After Sugar rejected a secret, the secrets are read again first, and the attempt is
        made only if the rejected one changed, or `retry_rejected` insists."""
        self._raise_if_stopped()
        if self.rejection is not None:
            await self._recheck_rejected(retry_rejected)
        demand = self._board.join(Need.RENEW, RenewalReason.FORCED, forced=True)
        attempts = demand.attempts
        loop = asyncio.get_running_loop()
        await self._wait_for(lambda: demand.attempts > attempts, loop.time() + wait)
        if self.state is State.FAILED:
            raise self._progress.needs_attention()
        if demand.failed or self._supervisor.session.grant is None:
            raise self._progress.unavailable()
        return self._supervisor.session.grant

    async def revoke(self, wait: float = 10.0) -> Grant:
        """End the session at Sugar (a logout with its refresh token: every token handed out
        dies), then log in anew, and answer with the outcome of that one login: the new token,
        or why there is none (`sugarctl revoke`, for a token that leaked). A password Sugar
        rejected is never sent: then nothing is ended either."""
        self._raise_if_stopped()
        if self.fleet is not None and not self.fleet.leads():
            holder = self.fleet.status().get("holder") or "the leading host"
            raise LeaderOnly(
                f"{self.name!r} shares its session through the fleet, led by {holder}: run "
                f"`sugarctl revoke {self.name}` there"
            )
        rejection = self.rejection
        if rejection is not None and self.refuses_rejected():
            raise InstanceNeedsAttention(rejection.refusal(self.config))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        demand = self._board.revocation()
        while demand is None:
            # A renewal under way settles first: the session it brings is the one to end.
            await self._wait_for(lambda: not self._board.in_flight(), deadline)
            demand = self._board.revocation()
        attempts = demand.attempts
        await self._wait_for(lambda: demand.attempts > attempts, deadline)
        if self.state is State.FAILED:
            raise self._progress.needs_attention()
        if demand.failed or self._supervisor.session.grant is None:
            raise self._progress.unavailable()
        return self._supervisor.session.grant

    async def _recheck_rejected(self, insist: bool) -> None:
        rejection = self.rejection
        assert rejection is not None
        if self._reread is not None:
            try:
                self._take(await asyncio.to_thread(self._reread, self.config))
            except ConfigError as exc:
                raise InstanceNeedsAttention(
                    f"cannot read the secrets of {self.name!r} again: {exc.problems[0]}"
                ) from None
        if not self.refuses_rejected():
            log.info("%s: the rejected %s changed; trying it once", self.name, rejection.field)
            self._insisted = None
        elif insist:
            self._insist(rejection)
            log.warning("%s: sending the rejected %s again, as asked", self.name, rejection.field)
        else:
            raise InstanceNeedsAttention(rejection.refusal(self.config))
        self.rejection = None

    def _insist(self, rejection: Rejection) -> None:
        """One retry of a rejected secret per rejection: after a retry Sugar rejected too, the
        next waits for a quiet period (the secret unchanged), so a loop cannot lock the account."""
        now = self._ticks()
        if self._insisted is not None:
            left = self._insisted[0] + timing.REJECTED_RETRY_QUIET - now
            if left > 0:
                until = self._clock() + left
                raise InstanceNeedsAttention(
                    rejection.retry_refused(self.config, self._insisted[1], until, left)
                )
        self._insisted = (now, self._clock())

    def _take(self, config: InstanceConfig) -> None:
        self._supervisor.take_config(config)
        self.sudo.take_config(config)
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
            self._board.join(Need.RENEW, RenewalReason.FORCED, forced=True)

    # A session handed over a restart (sugard/daemon/fdstore.py)

    def session(self) -> Grant | None:
        """The session to hand to the next sugard: the grant being served, if no renewal was
        cut short (a refresh Sugar may have answered would leave it dead) and its refresh
        token is still good."""
        return self._supervisor.session.kept(self.state is State.READY)

    def resume(self, grant: Grant, sugar_version: str | None) -> None:
        """Take back the session the sugard before this one handed over; before start().
        Nothing is served from it until one probe says Sugar still takes its token."""
        self._supervisor.resume(grant, sugar_version)

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
        self._supervisor.install(grant)
        if demand is not None:
            self._board.settle(
                demand, failed=False
            )  # a pending check: the token it was about is gone
        self._board.notify()
        return True

    def suspect(self, token: Secret, *, hold: bool) -> None:
        """The fleet has reason to think `token` replaced at Sugar by a renewal this host could
        not hear of: check it now (one probe); with `hold`, it is not served until then."""
        if self._board.closed or self.grant is None or self.grant.access_token != token:
            return
        if hold:
            self._supervisor.session.doubt(token)
        self._board.join(Need.CHECK, RenewalReason.PROBE)
        self._board.notify()  # a backoff checks a doubted token at once

    def request_renewal(self, reason: RenewalReason) -> None:
        """Renew once for a follower that asked (joins a renewal pending or in flight)."""
        if not self._board.closed:
            self._board.join(Need.RENEW, reason)

    # Waiting on the supervisor

    async def _wait_for(self, condition: Callable[[], bool], deadline: float) -> None:
        """Wait until `condition()` holds or the loop's clock reaches `deadline`."""
        if not await self._board.wait_for(condition, deadline):
            self._raise_if_stopped()
            raise self._progress.unavailable()

    def _raise_if_stopped(self) -> None:
        if self._board.closed:
            raise InstanceStopped(f"instance {self.name!r} is no longer configured")
