"""Tokens of other users: Sugar's sudo, asked with the instance's admin session and kept per
user, so scripts that must act as a record's owner share one token of that user as they share
the instance's own.

For each user asked for (and listed in the instance's `sudo`), `SudoUsers` keeps one token:

- one call to Sugar however many ask at once: a renewal is one task every request waits on;
- renewed ahead of expiry by the rules of the instance's own token (`timing`): a new sudo, or a
  refresh where Sugar gave the sudo session a refresh token; where a renewal kills the old
  token at once (Sugar 13.3+), requests that come while it is in flight wait for the new one,
  and a scheduled renewal waits for a quiet moment first;
- a report that Sugar refused it (the 401 rule) renews it once, however many report it;
- dropped when nobody asked for it for `IDLE_DROP` seconds (never logged out: it expires);
- when Sugar refuses the sudo (sugard's user is no admin, the user is unknown or inactive), it
  is not asked again for that user (for no user, if sugard's user is no admin) until the
  config changes or a person asks (`sugarctl refresh NAME --as USER`).

The sudo is made with the admin session's token, taken from the keeper like any script takes
it (so never one a renewal is about to kill); if Sugar refuses that token, it is reported to
the keeper once and the sudo tried again with the new one. The admin session's renewals do
not touch the tokens of other users: each is a session of its own user (docs/sugarcrm.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from sugard.config import InstanceConfig
from sugard.errors import (
    DaemonError,
    InstanceNeedsAttention,
    InstanceStopped,
    NoValidToken,
    UserNotListed,
)
from sugard.keeper import timing
from sugard.keeper.model import ErrorStatus, LastError
from sugard.observe import Observer, SudoCall, SudoOutcome
from sugard.secret import Secret
from sugard.sugar import Grant, SugarClient
from sugard.sugar.errors import RefreshRejected, RejectedError, TransientError, UpstreamError
from sugard.sugar.sudo import AdminTokenRefused, NotAnAdmin, SudoRefused
from sugard.wire import DEFAULT_WAIT, SUDO_ALL

__all__ = [
    "IDLE_DROP",
    "MAX_USERS",
    "ActingAs",
    "AdminSession",
    "SudoStatus",
    "SudoUsers",
    "UserStatus",
]

log = logging.getLogger("sugard.keeper")

IDLE_DROP = 900.0  # a user's token nobody asked for in this long (15 min) is dropped
MAX_USERS = 1000  # with `sudo = ["*"]`: users kept at most; the longest idle goes first
ADMIN_WAIT = DEFAULT_WAIT  # how long a sudo waits for the admin session's token


class AdminSession(Protocol):
    """The instance's own session, as the sudo needs it (the `Keeper`)."""

    async def token(self, min_ttl: float = 0.0, wait: float = DEFAULT_WAIT) -> Grant: ...

    async def invalidate(
        self, access_token: str, wait: float = DEFAULT_WAIT, *, reporter: str = "a script"
    ) -> Grant: ...


@dataclass(frozen=True)
class UserStatus:
    """One user's token, for STATUS (only where the config names its users)."""

    user: str
    expires_at: float | None
    refresh_at: float | None
    last_error: ErrorStatus | None
    refused: bool  # Sugar refused it: not asked again before a person acts


@dataclass(frozen=True)
class SudoStatus:
    """STATUS.sudo: the users an instance acts as. `allowed`: the config's list, or "*";
    `users`: each user held, None when the config says "*" (their names are anyone's input,
    so only counts are shown); `last_error` the latest of them all."""

    allowed: tuple[str, ...] | str
    held: int  # users with a token now
    refused: int  # users (or, with refused_all, every user) Sugar refused
    refused_all: bool  # Sugar refused sugard's user itself (no admin): no sudo for anyone
    next_expiry: float | None
    last_error: ErrorStatus | None
    users: tuple[UserStatus, ...] | None


@dataclass(frozen=True)
class ActingAs:
    """One user's tokens, asked for as the instance's own are (`token`, `invalidate`): what
    the proxy forwards with under `/as/USER/`."""

    users: SudoUsers
    user: str

    @property
    def name(self) -> str:
        """The instance's name (for its log lines)."""
        return self.users.name

    async def token(self, min_ttl: float = 0.0, wait: float = DEFAULT_WAIT) -> Grant:
        return await self.users.token(self.user, min_ttl, wait)

    async def invalidate(
        self, access_token: str, wait: float = DEFAULT_WAIT, *, reporter: str = "a script"
    ) -> Grant:
        return await self.users.invalidate(self.user, access_token, wait)


class _User:
    """What is kept for one user: the token, the renewal in flight, and what came of them."""

    def __init__(self, name: str, now: float) -> None:
        self.name = name
        self.grant: Grant | None = None
        self.refresh_at: float | None = None  # start of the advisory window
        self.dead: Secret | None = None  # reported as refused by Sugar: never served again
        self.renewal: asyncio.Task[None] | None = None  # the one in flight
        self.renewals = 0  # renewals finished, so a waiter knows its own has
        self.failed = False  # the latest renewal failed
        self.failure: DaemonError | None = None  # what requests are told after a failure
        self.refused: SudoRefused | None = None  # Sugar refused this user: not asked again
        self.last_error: LastError | None = None
        self.failures = 0  # renewals failed in a row (the backoff grows with them)
        self.next_attempt_at: float | None = None  # backing off until then
        self.used_at = now  # the latest request: idle users are dropped
        self.quiet_until = 0.0  # a token handed out until then is taken to be in use
        self.last_ok: float | None = None  # when the latest token arrived


class SudoUsers:
    """The tokens of other users one instance serves (see the module's doc)."""

    def __init__(
        self,
        config: InstanceConfig,
        upstream: SugarClient,
        admin: AdminSession,
        grace: Callable[[], float],
        observer: Observer,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float],
        max_sleep: float,
    ) -> None:
        self._config = config
        self._upstream = upstream
        self._admin = admin
        self._grace = grace  # how long a token outlives its renewal on this Sugar (0: none)
        self._observer = observer
        self._clock = clock
        self._rng = rng
        self._max_sleep = max_sleep
        self._users: dict[str, _User] = {}
        self._refused: RejectedError | None = None  # for every user: sugard's user is no admin
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None  # renews ahead and drops idle users
        self._closed = False

    @property
    def name(self) -> str:
        return self._config.name

    def allows(self, user: str) -> bool:
        listed = self._config.sudo
        return user in listed or listed == (SUDO_ALL,)

    def acting_as(self, user: str) -> ActingAs:
        return ActingAs(self, user)

    # Requests

    async def token(self, user: str, min_ttl: float = 0.0, wait: float = DEFAULT_WAIT) -> Grant:
        """A token of `user` with `min_ttl` seconds left (capped as the instance's own), or
        wait up to `wait` for one; UserNotListed, with no call to Sugar, for a user the
        instance's `sudo` does not name."""
        held = self._user(user)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        asked: int | None = None  # held.renewals when this request asked for a renewal
        while True:
            self._raise_if_closed()
            if self._users.get(user) is not held:  # dropped meanwhile (a reload, idle)
                held = self._user(user)
            self._raise_if_refused(held, held_back=asked is None)
            now = self._clock()
            held.used_at = now
            grant = held.grant
            renewed = asked is not None and held.renewals > asked
            if grant is not None and self._servable(held, grant, now):
                wanted = timing.wanted_ttl(min_ttl, grant)
                if renewed or grant.expires_at - now >= wanted:
                    return self._hand_out(held, grant, wanted)
            if renewed and isinstance(held.failure, InstanceNeedsAttention | InstanceStopped):
                raise held.failure  # the admin session failed: no use waiting
            if held.renewal is None and (
                held.next_attempt_at is None or now >= held.next_attempt_at
            ):
                self._start(held)
            if held.renewal is not None and (asked is None or renewed):
                asked = held.renewals  # the renewal in flight answers this request
            left = deadline - loop.time()
            if held.renewal is None and held.next_attempt_at is not None:
                backoff = held.next_attempt_at - now
                if backoff > left and held.failure is not None:
                    raise self._told(held)
                left = min(left, backoff)
            if deadline - loop.time() <= 0:
                if grant is not None and grant is held.grant and self._valid(held, grant, now):
                    # Held for a renewal that did not answer within the wait: still valid,
                    # and better than nothing (the instance's own token does the same).
                    return self._hand_out(held, grant, 0.0)
                raise self._unavailable(held)
            await self._idle(max(0.0, left))

    async def invalidate(self, user: str, access_token: str, wait: float = DEFAULT_WAIT) -> Grant:
        """A script reports that Sugar refused `access_token` of `user`: if it is the token
        held, it is renewed (once, however many report it); else the token held comes back."""
        held = self._user(user)
        reported = Secret(access_token)
        grant = held.grant
        if grant is not None and grant.access_token == reported and held.dead != reported:
            held.dead = reported
            log.info(
                "%s: token %s of %r reported as refused by Sugar; renewing it",
                self.name,
                reported.fingerprint,
                user,
            )
            if held.renewal is None and held.refused is None and self._refused is None:
                self._start(held)
        return await self.token(user, wait=wait)

    async def refresh_now(self, user: str, wait: float = DEFAULT_WAIT) -> Grant:
        """A new token of `user` now (`sugarctl refresh NAME --as USER`): also after Sugar
        refused the sudo, which this asks again, once; the outcome of that one attempt."""
        held = self._user(user)
        if self._refused is not None:
            log.info("%s: asking Sugar's sudo again, as a person asked", self.name)
            self._refused = None
        held.refused = None
        held.next_attempt_at = None
        if held.renewal is None:
            self._start(held)
        asked = held.renewals
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while held.renewals == asked:
            self._raise_if_closed()
            left = deadline - loop.time()
            if left <= 0:
                raise self._unavailable(held)
            await self._idle(left)
        self._raise_if_refused(held)
        if held.failed or held.grant is None:
            raise self._told(held)
        return self._hand_out(held, held.grant, 0.0)

    # The settings, the status, the end

    def take_config(self, config: InstanceConfig) -> None:
        """New settings (a reload): users no longer listed are dropped, and any change lets
        the users Sugar refused be asked for again (a person may have fixed it in Sugar)."""
        changed = config != self._config
        self._config = config
        if not changed:
            return
        self._refused = None
        for held in list(self._users.values()):
            if not self.allows(held.name):
                self._drop(held, "no longer in the instance's sudo list")
            else:
                held.refused = None
        self._notify()

    def status(self) -> SudoStatus | None:
        """STATUS.sudo; None when the instance acts as no other user."""
        allowed = self._config.sudo
        if not allowed and not self._users:
            return None
        named = allowed != (SUDO_ALL,)
        now = self._clock()
        users = sorted(self._users.values(), key=lambda held: held.name)
        live = [h.grant.expires_at for h in users if h.grant and h.grant.expires_at > now]
        errors = [(h.last_error, h) for h in users if h.last_error is not None]
        latest = max(errors, key=lambda pair: pair[0].at, default=None)
        return SudoStatus(
            allowed=allowed if named else SUDO_ALL,
            held=len(live),
            refused=sum(1 for h in users if h.refused is not None),
            refused_all=self._refused is not None,
            next_expiry=min(live, default=None),
            last_error=None if latest is None else self._error_status(*latest, named=named),
            users=tuple(self._user_status(h) for h in users) if named else None,
        )

    async def stop(self) -> None:
        """Stop renewing; requests waiting get InstanceStopped."""
        self._closed = True
        tasks = [h.renewal for h in self._users.values() if h.renewal is not None]
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        self._notify()

    # Who is kept

    def _user(self, user: str) -> _User:
        self._raise_if_closed()
        if not self.allows(user):
            self._observe("not_listed")
            listed = self._config.sudo
            if not listed:
                why = f'it has no `sudo` list; add sudo = ["{user}"] to [instances.{self.name}]'
            else:
                why = f"its `sudo` list ({', '.join(listed)}) does not name them"
            raise UserNotListed(f"instance {self.name!r} may not act as {user!r}: {why}")
        held = self._users.get(user)
        if held is None:
            if len(self._users) >= MAX_USERS:
                self._make_room()
            held = self._users[user] = _User(user, self._clock())
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"sudo:{self.name}")
        return held

    def _make_room(self) -> None:
        idle = [h for h in self._users.values() if h.renewal is None]
        if idle:
            self._drop(min(idle, key=lambda held: held.used_at), "to make room for another")

    def _drop(self, held: _User, why: str) -> None:
        if self._users.get(held.name) is held:
            del self._users[held.name]
        if held.renewal is not None:
            held.renewal.cancel()
        if held.grant is not None:
            log.info("%s: dropped the token of %r (%s)", self.name, held.name, why)

    # The background: renewals ahead of expiry, idle users dropped

    async def _run(self) -> None:
        while not self._closed:
            now = self._clock()
            wake = now + self._max_sleep
            for held in list(self._users.values()):
                if held.renewal is not None:
                    continue
                if now - held.used_at >= IDLE_DROP and held.refused is None:
                    self._drop(held, f"nobody asked for it in {IDLE_DROP / 60:g} min")
                    continue
                if held.refused is None:
                    wake = min(wake, held.used_at + IDLE_DROP)
                due = self._due(held)
                if due is None:
                    continue
                if now >= due:
                    self._start(held)
                else:
                    wake = min(wake, due)
            await self._idle(max(0.0, wake - now))

    def _due(self, held: _User) -> float | None:
        """When the token of `held` is to be renewed in the background; None: not at all
        (none held, or Sugar refused it: a request asks again, or a person)."""
        grant = held.grant
        if grant is None or held.refused is not None or self._refused is not None:
            return None
        if held.dead == grant.access_token:
            due = self._clock()
        else:
            deadline = timing.refresh_deadline(grant, capped=False) if grant.refresh_token else None
            due = timing.renewal_time(
                grant,
                held.refresh_at,
                grace=self._grace(),
                quiet_until=held.quiet_until,
                deadline=deadline,
            )
        if held.next_attempt_at is not None:
            due = max(due, held.next_attempt_at)
        return due

    # One renewal

    def _start(self, held: _User) -> None:
        held.renewal = asyncio.create_task(self._renew(held), name=f"sudo:{self.name}")
        self._notify()  # requests that must not take a token about to die see it in flight

    async def _renew(self, held: _User) -> None:
        try:
            grant = await self._fetch(held)
        except SudoRefused as exc:
            self._refuse(held, exc, this_user_only=not isinstance(exc, NotAnAdmin))
        except RejectedError as exc:  # the platform, TLS, the proxy: the instance's own problem
            self._refuse(held, exc, this_user_only=False)
        except UpstreamError as exc:
            retry_after = exc.retry_after if isinstance(exc, TransientError) else None
            held.failure = self._back_off(held, exc.kind, exc.message, retry_after)
        except NoValidToken as exc:  # the admin session has no token yet
            held.failure = self._back_off(held, "admin_session", str(exc), exc.retry_after)
        except (InstanceNeedsAttention, InstanceStopped) as exc:
            # The admin session itself failed: what its requests are told, this one's too.
            self._back_off(held, "admin_session", str(exc), None)
            held.failure = exc
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: renewing the token of %r failed", self.name, held.name)
            held.failure = self._back_off(held, "internal", "internal error; see the log", None)
        else:
            self._install(held, grant)
        finally:
            held.renewal = None
            held.renewals += 1
            self._notify()

    async def _fetch(self, held: _User) -> Grant:
        grant, now = held.grant, self._clock()
        if grant is not None and grant.refresh_token and timing.refresh_usable(grant, now):
            try:
                return await self._counted(self._upstream.refresh_user(grant.refresh_token))
            except RefreshRejected as exc:
                log.info("%s: %s; a new sudo for %r", self.name, exc.message, held.name)
        return await self._sudo(held.name)

    async def _sudo(self, user: str) -> Grant:
        admin = await self._admin.token(0.0, ADMIN_WAIT)
        try:
            return await self._counted(self._upstream.sudo(admin.access_token, user))
        except AdminTokenRefused:
            log.info(
                "%s: Sugar refused token %s on a sudo; reporting it, then one more try",
                self.name,
                admin.access_token.fingerprint,
            )
            admin = await self._admin.invalidate(admin.access_token.reveal(), ADMIN_WAIT)
            return await self._counted(self._upstream.sudo(admin.access_token, user))

    async def _counted(self, call: Awaitable[Grant]) -> Grant:
        """One call to Sugar for a user's token, counted by how it ended (metrics)."""
        outcome: SudoOutcome = "transient"
        try:
            grant = await call
        except RejectedError:
            outcome = "rejected"
            raise
        else:
            outcome = "ok"
            return grant
        finally:
            self._observe(outcome)

    def _install(self, held: _User, grant: Grant) -> None:
        old = held.grant
        held.grant = grant
        held.dead = None
        held.failed = False
        held.failure = None
        held.failures = 0
        held.next_attempt_at = None
        held.last_ok = self._clock()
        held.refresh_at = timing.refresh_time(grant, self._config, capped=False, draw=self._rng())
        log.info(
            "%s: token %s of %r%s, valid %.0f s",
            self.name,
            grant.access_token.fingerprint,
            held.name,
            f" replaces {old.access_token.fingerprint}" if old is not None else "",
            grant.lifetime,
        )

    def _refuse(self, held: _User, exc: RejectedError, *, this_user_only: bool) -> None:
        held.failed = True
        held.last_error = LastError(self._clock(), exc.kind, exc.message)
        if this_user_only and isinstance(exc, SudoRefused):
            held.refused = exc
        else:
            self._refused = exc
        log.error("%s: %s", self.name, exc.message)

    def _back_off(
        self, held: _User, kind: str, message: str, retry_after: float | None
    ) -> NoValidToken:
        held.failed = True
        held.failures += 1
        held.last_error = LastError(self._clock(), kind, message)
        seconds = timing.backoff(held.failures, self._config.backoff_max, self._rng(), retry_after)
        held.next_attempt_at = self._clock() + seconds
        log.warning(
            "%s: no token of %r (%s); next try in %.1f s", self.name, held.name, message, seconds
        )
        return self._unavailable(held)

    # What requests get

    def _servable(self, held: _User, grant: Grant, now: float) -> bool:
        """Valid for long enough, and not about to die (a renewal in flight kills it where
        Sugar keeps no grace)."""
        doomed = held.renewal is not None and self._grace() <= 0
        return not doomed and timing.servable(grant, now, held.dead)

    def _valid(self, held: _User, grant: Grant, now: float) -> bool:
        return grant.access_token != held.dead and grant.expires_at > now

    def _hand_out(self, held: _User, grant: Grant, promised: float) -> Grant:
        now = self._clock()
        held.quiet_until = max(held.quiet_until, timing.quiet_until(grant, now, promised))
        return grant

    def _raise_if_refused(self, held: _User, *, held_back: bool = False) -> None:
        """InstanceNeedsAttention if Sugar refused the sudo (`held_back`: no call was made for
        this request, which the metrics count)."""
        refused = held.refused or self._refused
        if refused is not None:
            if held_back:
                self._observe("held_back")
            raise InstanceNeedsAttention(refused.message)

    def _raise_if_closed(self) -> None:
        if self._closed:
            raise InstanceStopped(f"instance {self.name!r} is no longer configured")

    def _told(self, held: _User) -> DaemonError:
        """What a request is told after the renewal it waited for failed."""
        failure = held.failure
        if isinstance(failure, NoValidToken):
            return self._unavailable(held)
        return failure if failure is not None else self._unavailable(held)

    def _unavailable(self, held: _User) -> NoValidToken:
        retry_after = 1.0
        if held.next_attempt_at is not None:
            retry_after = max(1.0, round(held.next_attempt_at - self._clock(), 1))
        why = f": {held.last_error.message}" if held.last_error is not None else ""
        return NoValidToken(
            f"no valid token of {held.name!r} for {self.name!r} yet{why}", retry_after
        )

    def _user_status(self, held: _User) -> UserStatus:
        grant = held.grant
        return UserStatus(
            user=held.name,
            expires_at=grant.expires_at if grant is not None else None,
            refresh_at=held.refresh_at if grant is not None else None,
            last_error=(
                None
                if held.last_error is None
                else self._error_status(held.last_error, held, named=True)
            ),
            refused=held.refused is not None or self._refused is not None,
        )

    def _error_status(self, error: LastError, held: _User, *, named: bool) -> ErrorStatus:
        current = held.failed and (held.last_ok is None or error.at >= held.last_ok)
        message = error.message
        if not named:
            refused = held.refused or self._refused
            message = (
                refused.unnamed
                if isinstance(refused, SudoRefused)
                else message.replace(repr(held.name), "a user")
            )
        return ErrorStatus(error.at, error.kind, message, current)

    # Waiting

    def _observe(self, outcome: SudoOutcome) -> None:
        self._observer.observe(SudoCall(self.name, outcome))

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _idle(self, seconds: float) -> None:
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await changed.wait()
