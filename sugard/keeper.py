"""One instance's token life: log in, refresh ahead of expiry, recover, back off, serve.

One supervisor task per instance makes every upstream call, so there is never more than one
in flight per instance (single flight): requests only read the current grant, or ask the
supervisor for a new one and wait for it. Times that matter (expiry, refresh-at) are wall
clock, re-read at every decision, and no sleep lasts longer than `MAX_SLEEP`: asyncio's
monotonic clock stops while a laptop is suspended, the wall clock does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never

from .config import ConfigError, InstanceConfig
from .secret import Secret
from .sugar import (
    ClientRejected,
    CredentialsRejected,
    Grant,
    RefreshRejected,
    RejectedError,
    SugarClient,
    SugarError,
    TransientError,
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
    "TokenUnavailable",
]

log = logging.getLogger("sugard.keeper")

MAX_SLEEP = 30.0
JITTER = 0.10  # spread of the advisory window, so many instances do not refresh together
LONG_BACKOFF = 60.0  # floor for maintenance and license locks: they last minutes, not seconds
MIN_TTL_CAP = 0.9  # a min_ttl above this share of Sugar's token lifetime cannot be met


class State(enum.StrEnum):
    STARTING = "starting"
    LOGGING_IN = "logging_in"
    READY = "ready"
    REFRESHING = "refreshing"
    BACKING_OFF = "backing_off"
    FAILED = "failed"


class TokenUnavailable(Exception):
    """No valid token within the wait; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NeedsAttention(Exception):
    """Sugar refused for a reason a person must fix; sugard will not retry by itself."""


class InstanceStopped(Exception):
    """The instance was removed (reload) or the daemon is stopping."""


@dataclass(frozen=True)
class LastError:
    at: float
    kind: str
    message: str


@dataclass(frozen=True)
class Rejection:
    """A password or client secret that Sugar rejected: never sent again while it is the same
    (each try may count towards a lockout), unless a person insists (`--retry-rejected`)."""

    field: str  # which InstanceConfig field was refused: "password" or "client_secret"
    sent: tuple[object, ...]  # the site, the account or client, and the secret refused

    @classmethod
    def of(cls, exc: SugarError, config: InstanceConfig) -> Rejection | None:
        if isinstance(exc, CredentialsRejected):
            return cls("password", _sent("password", config))
        if isinstance(exc, ClientRejected):
            return cls("client_secret", _sent("client_secret", config))
        return None

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
    ) -> None:
        self.config = config
        self.upstream = upstream
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

        self._grant: Grant | None = None
        self._refresh_token: Secret | None = None  # None once burned or rejected
        self._dead_token: Secret | None = None  # reported by a script as refused by Sugar
        self._want_new = False  # a request needs a newer token than the current one
        self._forced = False  # `sugarctl refresh`: act now, even during backoff
        self._generation = 0  # bumped by every new grant (and by failing)
        self._attempts = 0  # upstream attempts finished, successful or not
        self._last_attempt_failed = False
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()  # ends an idle wait
        self._interrupt = asyncio.Event()  # ends a backoff wait too
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def grant(self) -> Grant | None:
        return self._grant

    # Lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"keeper:{self.name}")

    async def stop(self) -> None:
        """Stop the supervisor; waiting requests get InstanceStopped."""
        self._stopped = True
        self._notify()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

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
        if self._grant is not None:
            self.refresh_at = self._refresh_time(self._grant)
        self._wake.set()

    # Requests

    async def token(self, min_ttl: float = 0.0, wait: float = 10.0) -> Grant:
        """The current token, if it has `min_ttl` seconds left; else wait up to `wait` for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        asked_at_generation: int | None = None
        while True:
            if self._stopped:
                raise InstanceStopped(f"instance {self.name!r} is no longer configured")
            grant = self._grant
            if grant is not None and self._servable(grant):
                remaining = grant.expires_at - self._clock()
                wanted = min(min_ttl, MIN_TTL_CAP * grant.lifetime)
                renewed = asked_at_generation is not None and self._generation > asked_at_generation
                if remaining >= wanted or renewed:
                    return grant
                self._want_new = True
            if self.state is State.FAILED:
                raise NeedsAttention(self._failure_message())
            if asked_at_generation is None:
                asked_at_generation = self._generation
            self._wake.set()
            changed = self._changed
            left = deadline - loop.time()
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    await changed.wait()
            except TimeoutError:
                raise TokenUnavailable(self._unavailable_message(), self._retry_after()) from None

    async def invalidate(self, access_token: str, wait: float = 10.0) -> Grant:
        """A script reports that Sugar refused `access_token`.

        Only a report of the current token starts a refresh, and only once however many
        scripts report it; an older token gets the current one back, with no upstream call.
        """
        grant = self._grant
        reported = Secret(access_token)
        if grant is not None and grant.access_token == reported != self._dead_token:
            log.info(
                "%s: token %s reported as refused by Sugar; renewing",
                self.name,
                grant.access_token.fingerprint,
            )
            self._dead_token = grant.access_token
            self._wake.set()
        return await self.token(wait=wait)

    async def refresh_now(self, wait: float = 10.0, *, retry_rejected: bool = False) -> Grant:
        """Renew now, even from `failed` or during backoff (`sugarctl refresh`), and answer
        with the outcome of that one attempt: the new token, or why there is none.

        After Sugar rejected a secret, the secrets are read again first, and the attempt is
        made only if the rejected one changed, or `retry_rejected` insists."""
        if self._stopped:
            raise InstanceStopped(f"instance {self.name!r} is no longer configured")
        if self.rejection is not None:
            await self._recheck_rejected(retry_rejected)
        attempts = self._attempts
        self._forced = True
        self._wake.set()
        self._interrupt.set()
        try:
            async with asyncio.timeout(wait):
                while self._attempts == attempts and not self._stopped:
                    await self._changed.wait()
        except TimeoutError:
            raise TokenUnavailable(self._unavailable_message(), self._retry_after()) from None
        if self._stopped:
            raise InstanceStopped(f"instance {self.name!r} is no longer configured")
        if self.state is State.FAILED:
            raise NeedsAttention(self._failure_message())
        if self._last_attempt_failed or self._grant is None:
            raise TokenUnavailable(self._unavailable_message(), self._retry_after())
        return self._grant

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
            self._forced = True
            self._wake.set()

    def status(self) -> dict[str, Any]:
        grant = self._grant
        return {
            "name": self.name,
            "url": self.config.url,
            "username": self.config.username,
            "platform": self.config.platform,
            "state": self.state.value,
            "expires_at": grant.expires_at if grant else None,
            "refresh_at": self.refresh_at,
            "last_refresh": self.last_refresh,
            "last_error": (
                {
                    "at": self.last_error.at,
                    "kind": self.last_error.kind,
                    "message": self.last_error.message,
                }
                if self.last_error
                else None
            ),
            "logins": self.logins,
            "refreshes": self.refreshes,
            "failures": self.failures,
        }

    # The supervisor

    async def _supervise(self) -> None:
        while not self._stopped:
            if self.state is State.FAILED and not self._forced:
                await self._idle(self._max_sleep)
                continue
            delay = self._time_to_act()
            if delay > 0:
                await self._idle(min(delay, self._max_sleep))
                continue
            self._forced = self._want_new = False
            self._interrupt.clear()
            await self._renew()

    def _time_to_act(self) -> float:
        """Seconds until the supervisor must call Sugar; 0 means now."""
        grant = self._grant
        if self._forced or self._want_new or grant is None:
            return 0.0
        if self._dead_token is not None and self._dead_token == grant.access_token:
            return 0.0
        assert self.refresh_at is not None
        return max(0.0, self.refresh_at - self._clock())

    async def _idle(self, seconds: float) -> None:
        self._wake.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _renew(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            wait=self._backoff,
            stop=stop_never,
            sleep=self._backoff_sleep,
            before_sleep=self._before_backoff,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._attempt()
        except RejectedError as exc:
            self.state = State.FAILED
            self.next_attempt_at = None
            self.rejection = Rejection.of(exc, self.config) or self.rejection
            log.error("%s: %s", self.name, exc.message)
            self._notify()

    async def _attempt(self) -> None:
        try:
            if self._refresh_token is not None and self._refresh_usable():
                grant = await self._refresh(self._refresh_token)
                if grant is None:
                    grant = await self._login()
            else:
                grant = await self._login()
        except SugarError as exc:
            self.failures += 1
            self.last_error = LastError(self._clock(), exc.kind, exc.message)
            self._attempt_done(failed=True)
            raise
        self._install(grant)
        self._attempt_done(failed=False)

    async def _refresh(self, refresh_token: Secret) -> Grant | None:
        """A refresh; None if Sugar no longer knows the refresh token (then log in)."""
        self.state = State.REFRESHING
        self.refreshes += 1
        try:
            return await self.upstream.refresh(refresh_token)
        except RefreshRejected as exc:
            # Evicted by another login, rotated by a refresh we never saw, or expired:
            # exactly one password login gets the session back.
            self.last_error = LastError(self._clock(), exc.kind, exc.message)
            log.warning("%s: %s; logging in again", self.name, exc.message)
            self._refresh_token = None
            return None
        except TransientError as exc:
            if exc.status == 401:
                # Maintenance or a license lock: Sugar deleted the refresh token before
                # refusing, so the next try must be a password login.
                self._refresh_token = None
            raise

    async def _login(self) -> Grant:
        rejection = self.rejection
        if rejection is not None and rejection.applies_to(self.config):
            # The one gate every password login passes: a rejected secret is never sent.
            refused = CredentialsRejected if rejection.field == "password" else ClientRejected
            raise refused(rejection.refusal(self.config))
        self.state = State.LOGGING_IN
        async with self._login_slots:
            self.logins += 1
            log.info("%s: logging in as %s", self.name, self.config.username)
            return await self.upstream.login()

    def _refresh_usable(self) -> bool:
        grant = self._grant
        if grant is None or grant.refresh_expires_at is None:
            return True
        return grant.refresh_expires_at - self._clock() > 5.0

    def _install(self, grant: Grant) -> None:
        old = self._grant
        self._grant = grant
        self._refresh_token = grant.refresh_token
        self._dead_token = None
        self._forced = False  # a `sugarctl refresh` during this attempt is answered by it
        self.refresh_at = self._refresh_time(grant)
        self.last_refresh = self._clock()
        self.next_attempt_at = None
        self.state = State.READY
        log.info(
            "%s: token %s%s, valid %.0f s, refresh at %s",
            self.name,
            grant.access_token.fingerprint,
            f" replaces {old.access_token.fingerprint}" if old else "",
            grant.lifetime,
            time.strftime("%H:%M:%S", time.localtime(self.refresh_at)),
        )
        self._notify()

    def _refresh_time(self, grant: Grant) -> float:
        """Start of the advisory window: `refresh_before` ahead of expiry, with jitter,
        but never in the first half of a short-lived token's life."""
        lead = min(self.config.refresh_before, grant.lifetime / 2)
        lead *= 1 + JITTER * self._rng()
        # No earlier refresh when the session ends first (max_session_lifetime): renewing
        # then would only shorten the session further, and once the refresh token has
        # expired `_refresh_usable` turns the renewal into a password login.
        return grant.expires_at - min(lead, 0.6 * grant.lifetime)

    def _servable(self, grant: Grant) -> bool:
        """Valid for long enough to be used: outside the mandatory window, not reported dead."""
        if self._dead_token is not None and self._dead_token == grant.access_token:
            return False
        margin = min(10.0, grant.lifetime / 10)
        return grant.expires_at - self._clock() > margin

    # Backoff (tenacity hooks)

    def _backoff(self, retry_state: RetryCallState) -> float:
        """Full-jitter exponential backoff from 1 s to `backoff_max`, honouring Retry-After."""
        cap = self.config.backoff_max
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        ceiling = min(cap, 2.0 ** (retry_state.attempt_number - 1))
        delay = max(min(1.0, cap), ceiling * self._rng())
        if isinstance(exc, TransientError):
            if exc.long:
                delay = max(delay, min(LONG_BACKOFF, cap) * (1 + JITTER * self._rng()))
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, cap))
        return delay

    def _before_backoff(self, retry_state: RetryCallState) -> None:
        seconds = retry_state.upcoming_sleep
        self.state = State.BACKING_OFF
        self.next_attempt_at = self._clock() + seconds
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        log.warning("%s: %s; next try in %.1f s", self.name, exc, seconds)

    async def _backoff_sleep(self, seconds: float) -> None:
        """Sleep until a wall-clock deadline, in steps of at most MAX_SLEEP (suspend-proof);
        `refresh_now` cuts it short."""
        deadline = self._clock() + seconds
        while (left := deadline - self._clock()) > 0 and not self._interrupt.is_set():
            try:
                async with asyncio.timeout(min(left, self._max_sleep)):
                    await self._interrupt.wait()
            except TimeoutError:
                pass
        self._interrupt.clear()
        self._forced = False

    # Waking waiters

    def _notify(self) -> None:
        """A new grant, or a final failure: wake every waiting request."""
        self._generation += 1
        self._wake_waiters()

    def _attempt_done(self, *, failed: bool) -> None:
        self._attempts += 1
        self._last_attempt_failed = failed
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _retry_after(self) -> float:
        if self.next_attempt_at is not None:
            return max(1.0, round(self.next_attempt_at - self._clock(), 1))
        return 1.0

    def _unavailable_message(self) -> str:
        why = f": {self.last_error.message}" if self.last_error else ""
        return f"no valid token for {self.name!r} yet ({self.state.value}){why}"

    def _failure_message(self) -> str:
        return self.last_error.message if self.last_error else f"instance {self.name!r} failed"
