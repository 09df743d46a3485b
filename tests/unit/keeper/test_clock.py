"""The clock: intervals (the probe, the backoff, quiet moments) run on the steady clock, so a
wall clock set back does not postpone them; and the local clock never decides that a refresh
token is dead: Sugar does (the refresh is tried; a refused one costs one call, no lockout).
The rig's `step` sets the daemon's wall clock apart from Sugar's and from its steady clock."""

from __future__ import annotations

from pathlib import Path

from support.daemon import USER, fake_profile
from support.rig import first_token, rig, token_calls
from support.wait import until

TWO_HOURS = 2 * 3600.0


async def test_a_wall_clock_set_back_does_not_postpone_the_probe(short_dir: Path) -> None:
    """Evicted, then the wall clock set back 2 h: the probe still comes within its interval,
    finds the dead token, and a working one is served."""
    async with rig(short_dir, speed=100.0, sugar=fake_profile("13.3"), probe_interval=60) as r:
        dead = (await first_token(r, "13.3"))["access_token"]
        r.fake.reset_counters()
        r.clock.step(-TWO_HOURS)
        assert 1 == r.fake.evict(USER, "sugard")
        evicted = r.clock()
        await until(lambda: r.fake.calls["ping"] >= 1, timeout=10)
        assert r.clock() - evicted <= 60 + 5
        await until(lambda: r.keeper.grant.access_token.reveal() != dead, timeout=10)
        code, now = await r.token()
        assert 200 == code
        assert r.fake.valid(now["access_token"])


async def test_a_wall_clock_set_forward_refreshes_instead_of_logging_in(short_dir: Path) -> None:
    """The wall clock set forward 2 h, past the refresh token's end by the local clock but not
    by Sugar's: sugard refreshes (Sugar takes it) and sends no password."""
    lifetimes = {"access_lifetime": 600, "refresh_lifetime": 3600}
    async with rig(short_dir, sugar=lifetimes, probe_interval=0) as r:
        first = await first_token(r)
        r.fake.reset_counters()
        r.clock.step(TWO_HOURS)
        code, after = await r.token(wait=5)
        assert 200 == code, after
        assert first["access_token"] != after["access_token"]
        assert r.fake.valid(after["access_token"])
        assert {"token": 1, "refresh_token": 1} == token_calls(r.fake)


async def test_a_wall_clock_set_back_during_a_backoff_does_not_postpone_the_next_try(
    short_dir: Path,
) -> None:
    """A renewal backing off (503s), then the wall clock set back 2 h: the next try still comes
    after the backoff's few seconds, not 2 h later."""
    async with rig(short_dir, speed=10.0, backoff_max=4, probe_interval=0) as r:
        await first_token(r)
        r.fake.reset_counters()
        r.fake.fail_next(2, "503")
        assert r.keeper.refresh_at is not None
        r.clock.jump(r.keeper.refresh_at - r.clock())  # straight to the advisory window
        await until(lambda: r.keeper.state.value == "backing_off", timeout=10)
        r.clock.step(-TWO_HOURS)
        stepped = r.clock()
        await until(lambda: r.keeper.refreshes >= 1 and r.keeper.state.value == "ready", timeout=10)
        assert r.clock() - stepped <= 2 * 4 + 5
        tries = [q.grant_type for q in r.fake.requests]
        assert ["refresh_token"] * 3 == tries  # two refused with 503, then the one that worked
