"""How long the keeper waits between failed renewals: the tenacity policy, apart from the
keeper's state (it only sleeps and says when the next try is; see `Supervisor._renew`).

Transient failures (sugard/sugar.py's `TransientError`) are tried again forever, anything else
ends the renewal; the wait is full-jitter exponential from 1 s to `backoff_max`, at least
Sugar's Retry-After, and at least a minute for a maintenance or license lock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_never

from .renewal_timing import JITTER
from .sugar import Locked, TransientError

__all__ = ["LONG_BACKOFF", "delay", "renewal_retries"]

LONG_BACKOFF = 60.0  # floor for maintenance and license locks: they last minutes, not seconds


def delay(retry_state: RetryCallState, cap: float, rng: Callable[[], float]) -> float:
    """Full-jitter exponential backoff from 1 s to `cap`, honouring Retry-After."""
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    ceiling = min(cap, 2.0 ** (retry_state.attempt_number - 1))
    seconds = max(min(1.0, cap), ceiling * rng())
    if isinstance(exc, TransientError):
        if isinstance(exc, Locked):
            seconds = max(seconds, min(LONG_BACKOFF, cap) * (1 + JITTER * rng()))
        if exc.retry_after is not None:
            seconds = max(seconds, min(exc.retry_after, cap))
    return seconds


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
