"""The renewal timing rules of sugard.keeper.timing as tables: when a token is refreshed, when
a refresh waits for a quiet moment, when a token may still be served, when the session is
known to be capped, when to probe, and how long to back off after a failed attempt.

Times are seconds from the grant's issue (issued_at = 0). Each row is a case a user relies on.
"""

from __future__ import annotations

import tomllib

import pytest
from tenacity import AsyncRetrying, RetryCallState

from sugard.config import InstanceConfig, parse_config
from sugard.keeper import timing
from sugard.secret import Secret
from sugard.sugar import Grant
from sugard.sugar.errors import (
    CredentialsRejected,
    LicenseLocked,
    Maintenance,
    RateLimited,
    ServerError,
)

HOUR = 3600.0
TWO_WEEKS = 14 * 86400.0


def settings(**table: object) -> InstanceConfig:
    """Instance `prod` of a tiny TOML config, with `table`'s settings, read by sugard.config."""
    text = '[instances.prod]\nurl = "https://crm.example.com"\nusername = "api"\npassword = "pw"\n'
    text += "".join(f"{key} = {value!r}\n".replace("'", '"') for key, value in table.items())
    return parse_config(tomllib.loads(text)).instances["prod"]


def grant(
    lifetime: float = HOUR, refresh_ends: float | None = TWO_WEEKS, issued: float = 0.0
) -> Grant:
    """A token set issued at `issued` whose access token lives `lifetime` seconds and whose
    refresh token ends at `refresh_ends` (None: Sugar did not say)."""
    return Grant(
        access_token=Secret("access"),
        refresh_token=Secret("refresh"),
        download_token=Secret("download"),
        token_type="bearer",
        issued_at=issued,
        expires_at=issued + lifetime,
        refresh_expires_at=refresh_ends,
    )


# ------------------------------------------------------------------------- refresh_time


@pytest.mark.parametrize(
    ("token", "config", "capped", "draw", "expected"),
    [
        pytest.param(
            grant(),
            settings(),
            False,
            0.0,
            HOUR - 300,
            id="an hour token is refreshed refresh_before (300 s) ahead of its end",
        ),
        pytest.param(
            grant(),
            settings(refresh_before=600),
            False,
            0.0,
            HOUR - 600,
            id="refresh_before sets how far ahead",
        ),
        pytest.param(
            grant(),
            settings(),
            False,
            1.0,
            HOUR - 330,
            id="the jitter moves the window up to 10 % earlier, never later",
        ),
        pytest.param(
            grant(lifetime=60),
            settings(),
            False,
            0.0,
            30.0,
            id="a short-lived token is not refreshed in the first half of its life",
        ),
        pytest.param(
            grant(lifetime=100),
            settings(refresh_before=90),
            False,
            1.0,
            45.0,
            id="however large refresh_before, jitter included, 45 % of the life is used",
        ),
        pytest.param(
            grant(refresh_ends=1800),
            settings(),
            False,
            0.0,
            1500.0,
            id="a refresh token that ends before the access token is refreshed before its end",
        ),
        pytest.param(
            grant(refresh_ends=400),
            settings(),
            False,
            0.0,
            200.0,
            id="a short refresh lifetime: refreshed halfway through it",
        ),
        pytest.param(
            grant(refresh_ends=1800),
            settings(),
            True,
            0.0,
            HOUR - 300,
            id="a capped session is not renewed sooner for its refresh token's end",
        ),
        pytest.param(
            grant(refresh_ends=None),
            settings(),
            False,
            0.0,
            HOUR - 300,
            id="without a refresh expiry only the access token counts",
        ),
    ],
)
def test_refresh_time(
    token: Grant, config: InstanceConfig, capped: bool, draw: float, expected: float
) -> None:
    """The advisory window starts refresh_before ahead of the earlier end, jittered earlier."""
    assert expected == pytest.approx(timing.refresh_time(token, config, capped=capped, draw=draw))


@pytest.mark.parametrize(
    ("left", "due"),
    [
        pytest.param(301.0, False, id="more than refresh_before left: not yet"),
        pytest.param(300.0, True, id="refresh_before left: due"),
        pytest.param(120.0, True, id="less than refresh_before left: renewed"),
    ],
)
def test_a_token_with_less_than_refresh_before_left_is_renewed(left: float, due: bool) -> None:
    """Once the time left is refresh_before or less, the refresh time has come."""
    token = grant()
    now = token.expires_at - left
    assert due == (timing.refresh_time(token, settings(), capped=False, draw=0.0) <= now)


# ------------------------------------------------------------------ renewal_time, quiet


@pytest.mark.parametrize(
    ("refresh_at", "grace", "quiet", "expected"),
    [
        pytest.param(
            3300.0,
            120.0,
            3500.0,
            3300.0,
            id="with a grace period: at the window's start, scripts keep the old token",
        ),
        pytest.param(
            3300.0, 0.0, 0.0, 3300.0, id="no grace, nobody holds the token: at the window's start"
        ),
        pytest.param(
            3300.0,
            0.0,
            3320.0,
            3320.0,
            id="no grace: waits for the token just handed out to be done with",
        ),
        pytest.param(
            3300.0,
            0.0,
            9999.0,
            3450.0,
            id="never quiet: halfway to expiry at the latest, half the window left for retries",
        ),
        pytest.param(None, 120.0, 0.0, HOUR, id="no advisory window: at expiry"),
    ],
)
def test_renewal_time(
    refresh_at: float | None, grace: float, quiet: float, expected: float
) -> None:
    """A refresh that kills the old token waits for a quiet moment, but not past halfway."""
    assert expected == timing.renewal_time(grant(), refresh_at, grace=grace, quiet_until=quiet)


@pytest.mark.parametrize(
    ("lifetime", "promised", "expected"),
    [
        pytest.param(HOUR, 0.0, 1002.0, id="a token handed out is taken to be in use 2 s"),
        pytest.param(20.0, 0.0, 1001.0, id="a short-lived token: a twentieth of its life"),
        pytest.param(HOUR, 60.0, 1060.0, id="a min_ttl promise keeps the moment busy as long"),
    ],
)
def test_quiet_until(lifetime: float, promised: float, expected: float) -> None:
    """A token handed out at 1000 keeps a refresh that would kill it away this long."""
    assert expected == timing.quiet_until(grant(lifetime), 1000.0, promised)


@pytest.mark.parametrize(
    ("min_ttl", "expected"),
    [
        pytest.param(600.0, 600.0, id="a min_ttl well inside the lifetime is given"),
        pytest.param(HOUR, 0.9 * HOUR, id="a min_ttl of the whole lifetime is cut to 90 % of it"),
    ],
)
def test_wanted_ttl(min_ttl: float, expected: float) -> None:
    """A request's min_ttl is honoured up to 90 % of Sugar's token lifetime."""
    assert expected == pytest.approx(timing.wanted_ttl(min_ttl, grant()))


# ---------------------------------------------------------------------------- serving


@pytest.mark.parametrize(
    ("lifetime", "left", "dead", "expected"),
    [
        pytest.param(HOUR, 11.0, None, True, id="more than 10 s left: served"),
        pytest.param(
            HOUR, 10.0, None, False, id="10 s or less left: the mandatory window, not served"
        ),
        pytest.param(30.0, 4.0, None, True, id="a 30 s token: served until its last tenth"),
        pytest.param(30.0, 3.0, None, False, id="a 30 s token in its last tenth: not served"),
        pytest.param(
            HOUR, 1800.0, Secret("access"), False, id="a token Sugar refused is never served"
        ),
        pytest.param(
            HOUR, 1800.0, Secret("older"), True, id="another token's refusal does not count"
        ),
    ],
)
def test_servable(lifetime: float, left: float, dead: Secret | None, expected: bool) -> None:
    """A token is served while it is outside the mandatory window and not known dead."""
    token = grant(lifetime)
    assert expected == timing.servable(token, token.expires_at - left, dead)


@pytest.mark.parametrize(
    ("token", "now", "expected"),
    [
        pytest.param(None, 0.0, True, id="no session yet: the refresh token in hand is tried"),
        pytest.param(grant(refresh_ends=None), 0.0, True, id="no refresh expiry said: tried"),
        pytest.param(grant(refresh_ends=1000), 990.0, True, id="more than 5 s left: tried"),
        pytest.param(
            grant(refresh_ends=1000),
            995.0,
            False,
            id="5 s or less left: not worth a try, a login instead",
        ),
    ],
)
def test_refresh_usable(token: Grant | None, now: float, expected: bool) -> None:
    """A refresh token about to end is not tried: the renewal logs in with the password."""
    assert expected == timing.refresh_usable(token, now)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(None, grant(refresh_ends=7200), False, id="a first login says nothing"),
        pytest.param(
            grant(refresh_ends=7200),
            grant(refresh_ends=7200, issued=600),
            True,
            id="a refresh that left the refresh token's end in place: capped",
        ),
        pytest.param(
            grant(refresh_ends=7200),
            grant(refresh_ends=7200, issued=1),
            False,
            id="two refreshes close together say nothing",
        ),
        pytest.param(
            grant(refresh_ends=7200),
            grant(refresh_ends=7800, issued=600),
            False,
            id="a refresh that moved the end: a sliding session",
        ),
        pytest.param(
            grant(refresh_ends=None),
            grant(refresh_ends=None, issued=600),
            False,
            id="no refresh expiry: not known",
        ),
    ],
)
def test_session_capped(old: Grant | None, new: Grant, expected: bool) -> None:
    """A session is capped (max_session_lifetime) when refreshes no longer move its end."""
    assert expected == timing.session_capped(old, new)


@pytest.mark.parametrize(
    ("interval", "expected"),
    [
        pytest.param(60.0, 1060.0, id="probe_interval 60: the next probe a minute on"),
        pytest.param(0.0, None, id="probe_interval 0: never probed"),
    ],
)
def test_next_probe(interval: float, expected: float | None) -> None:
    """The token is checked every probe_interval seconds, or never with 0."""
    assert expected == timing.next_probe(1000.0, interval)


# ------------------------------------------------------------------- old token's grace


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        pytest.param("12.0", 120.0, id="12.0: the old token lives until the next session check"),
        pytest.param("13.0", 120.0, id="13.0: still a grace"),
        pytest.param("13.2.1", 120.0, id="a patch release counts by major.minor"),
        pytest.param("13.3", 0.0, id="13.3: the old token dies at once"),
        pytest.param("25.1", 0.0, id="a newer version: no grace"),
        pytest.param(None, 0.0, id="an unknown version counts as the newest: no grace"),
        pytest.param("unknown", 0.0, id="an unreadable version: no grace"),
    ],
)
def test_grace_for_version(version: str | None, expected: float) -> None:
    """How long the old access token outlives a refresh on each Sugar version."""
    assert expected == timing.grace_for_version(version)


@pytest.mark.parametrize(
    ("configured", "observed", "expected"),
    [
        pytest.param(30, 120.0, 30.0, id="a configured grace wins over the version's"),
        pytest.param(0, 120.0, 0.0, id="a configured 0 wins too"),
        pytest.param("auto", 120.0, 120.0, id="auto: what the version says"),
        pytest.param("auto", None, 0.0, id="auto before the version is known: none"),
    ],
)
def test_old_token_grace(configured: object, observed: float | None, expected: float) -> None:
    """old_token_grace = "auto" learns the grace from Sugar's version; a number is kept."""
    assert expected == timing.old_token_grace(settings(old_token_grace=configured), observed)


# ---------------------------------------------------------------------------- backoff


def after(attempt: int, error: BaseException) -> RetryCallState:
    """tenacity's state after the `attempt`-th attempt failed with `error`."""
    state = RetryCallState(AsyncRetrying(), None, (), {})
    state.attempt_number = attempt
    state.set_exception((type(error), error, None))
    return state


@pytest.mark.parametrize(
    ("attempt", "error", "cap", "draw", "expected"),
    [
        pytest.param(1, ServerError("502"), 300.0, 1.0, 1.0, id="the first retry after 1 s"),
        pytest.param(
            5, ServerError("502"), 300.0, 1.0, 16.0, id="backoff doubles with each attempt"
        ),
        pytest.param(
            4, ServerError("502"), 300.0, 0.5, 4.0, id="full jitter: anywhere up to the ceiling"
        ),
        pytest.param(4, ServerError("502"), 300.0, 0.0, 1.0, id="never sooner than 1 s"),
        pytest.param(
            10,
            ServerError("502"),
            300.0,
            1.0,
            300.0,
            id="backoff grows and is capped at backoff_max",
        ),
        pytest.param(
            3, ServerError("502"), 0.2, 1.0, 0.2, id="a backoff_max under 1 s is the whole wait"
        ),
        pytest.param(
            1, RateLimited("429", retry_after=30), 300.0, 1.0, 30.0, id="a Retry-After is honoured"
        ),
        pytest.param(
            1,
            RateLimited("429", retry_after=1000),
            300.0,
            1.0,
            300.0,
            id="a Retry-After longer than backoff_max is capped",
        ),
        pytest.param(
            7,
            RateLimited("429", retry_after=5),
            300.0,
            1.0,
            64.0,
            id="a Retry-After shorter than the backoff does not shorten it",
        ),
        pytest.param(
            1,
            Maintenance("maintenance"),
            300.0,
            0.0,
            60.0,
            id="maintenance backs off a minute at least",
        ),
        pytest.param(
            1,
            LicenseLocked("seats"),
            300.0,
            0.5,
            63.0,
            id="a license lock backs off a minute, jittered",
        ),
        pytest.param(
            1,
            Maintenance("maintenance"),
            10.0,
            0.0,
            10.0,
            id="a lock's minute is cut to backoff_max",
        ),
        pytest.param(
            1,
            CredentialsRejected("no"),
            300.0,
            1.0,
            1.0,
            id="an error that is not transient: plain backoff",
        ),
    ],
)
def test_backoff_delay(
    attempt: int, error: BaseException, cap: float, draw: float, expected: float
) -> None:
    """Full-jitter exponential backoff from 1 s to backoff_max, at least the server's
    Retry-After (capped), a minute at least for maintenance and license locks."""
    seconds = timing.delay(after(attempt, error), cap, lambda: draw)
    assert expected == pytest.approx(seconds)
