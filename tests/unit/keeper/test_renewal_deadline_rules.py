"""The pure rules of issue 23 in sugard/keeper/timing.py: a refresh token's end is a hard
deadline for the scheduled refresh, which refreshes leave the old token in doubt, and which
reports belong to the burst a check already answered."""

from __future__ import annotations

import pytest

from sugard.keeper import timing
from sugard.secret import Secret
from sugard.sugar import Grant
from sugard.sugar.errors import MaintenanceLogout, RateLimited, ServerError, Timeout


def grant(access: float, refresh: float | None, issued: float = 1000.0) -> Grant:
    return Grant(
        access_token=Secret("a"),
        refresh_token=Secret("r"),
        download_token=Secret("d"),
        token_type="bearer",
        issued_at=issued,
        expires_at=issued + access,
        refresh_expires_at=None if refresh is None else issued + refresh,
    )


def test_a_busy_script_no_longer_pushes_the_refresh_past_the_refresh_tokens_end() -> None:
    """repro_d's figures: 30 s access, 15 s refresh tokens, the window at +7.125 s, a script
    keeping the token busy for ever. Before: halfway to the access token's expiry (+18.6 s,
    after the refresh token died). Now: halfway to the deadline (15 - 5 = +10 s)."""
    g = grant(30, 15)
    start = 1000 + 15 - 10 * 1.05 * 0.75  # refresh_time's start with refresh_before 10
    busy = float("inf")
    deadline = timing.refresh_deadline(g, capped=False)
    assert 1010.0 == deadline
    at = timing.renewal_time(g, start, grace=0.0, quiet_until=busy, deadline=deadline)
    assert at == pytest.approx(start + (1010 - start) / 2)
    assert timing.refresh_usable(g, at)
    assert timing.renewal_time(g, start, grace=0.0, quiet_until=busy) > 1015  # the old rule


def test_a_quiet_moment_before_the_deadline_is_still_taken() -> None:
    g = grant(600, 200)
    deadline = timing.refresh_deadline(g, capped=False)
    assert 1097.0 == timing.renewal_time(
        g, 1095.0, grace=0.0, quiet_until=1097.0, deadline=deadline
    )


def test_with_a_grace_the_window_start_stands_but_never_past_the_deadline() -> None:
    g = grant(600, 200)
    deadline = timing.refresh_deadline(g, capped=False)
    assert 1095.0 == timing.renewal_time(g, 1095.0, grace=120.0, quiet_until=0.0, deadline=deadline)
    assert 1195.0 == timing.renewal_time(g, 1199.0, grace=120.0, quiet_until=0.0, deadline=deadline)


def test_no_deadline_without_a_known_end_or_in_a_capped_session() -> None:
    assert timing.refresh_deadline(grant(600, None), capped=False) is None
    assert timing.refresh_deadline(grant(600, 200), capped=True) is None


@pytest.mark.parametrize(
    ("error", "doubt"),
    [
        (MaintenanceLogout("maintenance"), True),  # the grant ran before the check
        (Timeout("no answer"), True),  # it may have run
        (RateLimited("429"), False),
        (ServerError("503"), False),
    ],
)
def test_which_failed_refreshes_leave_the_old_token_in_doubt(error: Exception, doubt: bool) -> None:
    assert doubt is timing.leaves_doubt(error)


def test_reports_that_keep_coming_belong_to_the_checked_burst_for_a_while() -> None:
    assert timing.report_settled(100.0, 100.0, 100.5)
    assert timing.report_settled(100.0, 108.5, 109.0)  # a burst that kept coming
    assert not timing.report_settled(100.0, 100.0, 101.5)  # a gap: checked again
    assert not timing.report_settled(100.0, 109.9, 110.2)  # at most 10 s after the check
