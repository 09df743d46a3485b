"""When to renew, probe and serve, and how long to back off: pure functions of the session
and the config, so each rule reads in one place and is tested by tables.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never

from sugard.config import GRACE_AUTO, InstanceConfig
from sugard.secret import Secret
from sugard.sugar import Grant
from sugard.sugar.errors import Locked, RefreshConsumed, Timeout, TransientError

__all__ = [
    "JITTER",
    "LONG_BACKOFF",
    "MIN_TTL_CAP",
    "REFUSED_AT_ONCE",
    "REJECTED_RETRY_QUIET",
    "SESSION_CHECK_INTERVAL",
    "backoff",
    "delay",
    "grace_for_version",
    "leaves_doubt",
    "next_probe",
    "old_token_grace",
    "quiet_until",
    "refresh_deadline",
    "refresh_time",
    "refresh_usable",
    "refused_token_backoff",
    "renewal_retries",
    "renewal_time",
    "report_settled",
    "servable",
    "session_capped",
    "steady_clock",
    "wanted_ttl",
]


JITTER = 0.10  # spread of the advisory window, so many instances do not refresh together
MIN_TTL_CAP = 0.9  # a min_ttl above this share of Sugar's token lifetime cannot be met
# Up to Sugar 13.0 a rotated or evicted access token lives until its session's next check,
# at most this long after the rotation; from 13.3 on it dies at once (docs/sugarcrm.md).
SESSION_CHECK_INTERVAL = 120.0
FIRST_VERSION_WITHOUT_GRACE = (13, 3)
# Without a grace period a scheduled refresh waits, inside its window, for a moment when no
# script has just taken the token: a handout is taken to be in use this long (or its min_ttl).
QUIET = 2.0
SESSION_END_SLACK = 2.0  # a refresh that moves refresh_expires_at less than this: a capped session
REFRESH_MARGIN = 5.0  # a refresh token this close to its end is not worth a try
# A check that found a reported token alive answers the reports of it that keep coming less
# than REPORT_GAP apart (one burst of scripts that saw the same 401), up to REPORT_SETTLED
# after the check; then a report is checked again.
REPORT_GAP = 1.0
REPORT_SETTLED = 10.0
# After a rejected secret was sent again as asked (`--retry-rejected`), the next such retry of
# the same secret waits this long: a loop of retries must not lock the account.
REJECTED_RETRY_QUIET = 60.0
# A new token Sugar refuses at its first check within this long of its arrival was "refused at
# once": the next renewal waits (refused_token_backoff) instead of following every report.
REFUSED_AT_ONCE = 30.0


def steady_clock() -> float:
    """Seconds on a clock that setting the wall clock never moves, and that counts a suspend
    (Linux's CLOCK_BOOTTIME): what every interval (probe, backoff, quiet moment) runs on,
    so a wall clock stepped back does not postpone them, and a laptop that slept catches up."""
    return time.clock_gettime(BOOTTIME)


BOOTTIME = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def grace_for_version(version: str | None) -> float:
    """Seconds the old access token lives after a refresh on this Sugar version; an unknown
    version counts as the newest (no grace), the safe side."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    if match is None:
        return 0.0
    major_minor = (int(match[1]), int(match[2]))
    return 0.0 if major_minor >= FIRST_VERSION_WITHOUT_GRACE else SESSION_CHECK_INTERVAL


def leaves_doubt(refused: Exception) -> bool:
    """Whether a refresh that failed so may still have run at Sugar, killing the old access
    token where no grace keeps it: refused after the grant ran (maintenance, a license lock:
    Sugar checks them after the grant), or no answer at all (a timeout)."""
    return isinstance(refused, RefreshConsumed | Timeout)


def old_token_grace(config: InstanceConfig, observed: float | None) -> float:
    """The grace in force: the configured one, or on `auto` what was learned (none yet: 0)."""
    configured = config.old_token_grace
    if configured != GRACE_AUTO:
        return configured
    return observed if observed is not None else 0.0


def refresh_time(grant: Grant, config: InstanceConfig, *, capped: bool, draw: float) -> float:
    """Start of the advisory window: `refresh_before` ahead of expiry, with jitter (`draw`, in
    [0, 1)), but never in the first half of a short-lived token's life. When the refresh token
    ends first (a short refresh lifetime), the window is set by its end instead: a refresh
    before it keeps the session, where waiting would need a password login."""
    lead = min(config.refresh_before, grant.lifetime / 2)
    spread = 1 + JITTER * draw
    at = grant.expires_at - min(lead * spread, 0.6 * grant.lifetime)
    ends = grant.refresh_expires_at
    if ends is not None and not capped:
        # Unless the session is known to be capped (max_session_lifetime): then renewing
        # sooner would only add refreshes, and the login at the end cannot be avoided.
        life = ends - grant.issued_at
        at = min(at, ends - min(min(config.refresh_before, life / 2) * spread, life))
    return at


def refresh_deadline(grant: Grant, *, capped: bool) -> float | None:
    """The last moment a refresh can keep the session by the local clock: the refresh token's
    end, less a margin (`refresh_usable`). None: no end known, or a capped session
    (max_session_lifetime), whose end a refresh does not move: a login ends it anyway."""
    ends = grant.refresh_expires_at
    if ends is None or capped:
        return None
    return ends - REFRESH_MARGIN


def renewal_time(
    grant: Grant,
    refresh_at: float | None,
    *,
    grace: float,
    quiet_until: float,
    deadline: float | None = None,
) -> float:
    """When the scheduled renewal starts. With a grace period, at the advisory window's
    start: scripts keep the old token a while. Without, the refresh kills the token every
    script holds, so it waits for a quiet moment (no token just handed out, no min_ttl
    promise open) until halfway to expiry, keeping half the window for retries.

    A refresh token that ends first (`deadline`, from `refresh_deadline`) is a hard limit,
    quiet moment or not: the wait ends halfway to it, keeping the other half for retries;
    past it only a password login is left."""
    start = refresh_at if refresh_at is not None else grant.expires_at
    at = start
    if grace <= 0:
        latest = start + (grant.expires_at - start) / 2
        if deadline is not None:
            latest = min(latest, start + (deadline - start) / 2)
        at = max(start, min(quiet_until, latest))
    return at if deadline is None else min(at, deadline)


def quiet_until(grant: Grant, now: float, promised: float) -> float:
    """Until when a token handed out now is taken to be in use (or promised to last)."""
    return now + max(min(QUIET, grant.lifetime / 20), promised)


def wanted_ttl(min_ttl: float, grant: Grant) -> float:
    """The `min_ttl` a request can be given: at most a share of Sugar's token lifetime."""
    return min(min_ttl, MIN_TTL_CAP * grant.lifetime)


def servable(grant: Grant, now: float, dead_token: Secret | None) -> bool:
    """Valid for long enough to be used: outside the mandatory window, not refused."""
    if dead_token is not None and dead_token == grant.access_token:
        return False
    margin = min(10.0, grant.lifetime / 10)
    return grant.expires_at - now > margin


def refresh_usable(grant: Grant | None, now: float) -> bool:
    """Whether the refresh token of `grant` (none yet: the one in hand) is still good by the
    local clock. It only explains a refusal: the refresh is tried anyway, since the clock may
    have been set and only Sugar knows."""
    if grant is None or grant.refresh_expires_at is None:
        return True
    return grant.refresh_expires_at - now > REFRESH_MARGIN


def report_settled(checked_at: float, last_report: float, now: float) -> bool:
    """Whether a report made `now` belongs to the burst a check at `checked_at` answered (the
    latest report of it at `last_report`): no new check, the same token back."""
    return now - last_report < REPORT_GAP and now - checked_at < REPORT_SETTLED


def next_probe(now: float, interval: float) -> float | None:
    return now + interval if interval > 0 else None


def session_capped(old: Grant | None, new: Grant) -> bool:
    """A refresh that left the refresh token's expiry where it was: the session has a fixed end."""
    if old is None or old.refresh_expires_at is None or new.refresh_expires_at is None:
        return False
    # Two refreshes close together leave the expiry in place too; they say nothing.
    apart = new.issued_at - old.issued_at > SESSION_END_SLACK
    return apart and abs(new.refresh_expires_at - old.refresh_expires_at) < SESSION_END_SLACK


LONG_BACKOFF = 60.0  # floor for maintenance and license locks: they last minutes, not seconds


def backoff(attempt: int, cap: float, draw: float, retry_after: float | None = None) -> float:
    """Full-jitter exponential backoff from 1 s to `cap` before try `attempt` + 1 (`draw` in
    [0, 1)), at least Retry-After (itself at most `cap`)."""
    seconds = max(min(1.0, cap), min(cap, 2.0 ** (attempt - 1)) * draw)
    if retry_after is not None:
        seconds = max(seconds, min(retry_after, cap))
    return seconds


def delay(retry_state: RetryCallState, cap: float, rng: Callable[[], float]) -> float:
    """`backoff` for tenacity, with a long floor for maintenance and license locks."""
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    retry_after = exc.retry_after if isinstance(exc, TransientError) else None
    seconds = backoff(retry_state.attempt_number, cap, rng(), retry_after)
    if isinstance(exc, Locked):
        seconds = max(seconds, min(LONG_BACKOFF, cap) * (1 + JITTER * rng()))
    return seconds


def refused_token_backoff(in_a_row: int, cap: float) -> float:
    """Seconds to wait before renewing again after the token the last renewal brought was
    refused at its first check, `in_a_row` times running: 1 s, doubling up to `cap`. A site
    that refuses every token it issues (one that checks the client's IP, a broken front) must
    not cost a renewal per request."""
    return min(cap, 2.0 ** (in_a_row - 1))


def renewal_retries(
    *,
    wait: Callable[[RetryCallState], float],
    sleep: Callable[[float], Awaitable[None]],
    before_sleep: Callable[[RetryCallState], None],
) -> AsyncRetrying:
    """Attempts of one renewal: transient errors again after `wait`, the rest raised as they are."""
    return AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        wait=wait,
        stop=stop_never,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )
