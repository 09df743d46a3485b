"""A token that is still valid is served while its renewal fails, however the renewal fails and
however many ask at once: the figure is the number of token requests that failed (0). On the
rig (in-process, virtual clock), several failing instances at once on one event loop."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.daemon import fake_profile
from support.rig import Rig, first_token, rig
from support.wait import until

CLIENTS = 40


async def hammer(
    r: Rig, seconds: float, wait: float, done: Callable[[], bool] = lambda: False
) -> collections.Counter[object]:
    """CLIENTS concurrent clients asking for the token for `seconds` or until `done()`: the
    answers' statuses, the tokens served and the refusals' messages, counted."""
    seen: collections.Counter[object] = collections.Counter()
    end = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < end and not done():
            code, body = await r.token(wait=wait)
            seen[code] += 1
            if code == 200:
                seen[body["access_token"]] += 1
            else:
                seen[body["message"]] += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return seen


async def test_a_token_left_in_doubt_by_a_hung_refresh_is_served_while_it_is_checked(
    short_dir: Path,
) -> None:
    """13.3: a refresh that hangs past `timeout` leaves the still valid token in doubt until a
    check says Sugar still takes it: requests that cannot wait (wait=0) get that token, none a
    503 "no valid token ... (backing_off)"."""
    sugar = {**fake_profile("13.3"), "access_lifetime": 600}
    async with rig(short_dir, sugar=sugar, timeout=0.5, refresh_before=300, backoff_max=5) as r:
        first = (await first_token(r, "13.3"))["access_token"]
        r.fake.delay = 5.0  # every token request hangs past the timeout
        assert r.keeper.refresh_at is not None
        r.clock.jump(r.keeper.refresh_at - r.clock())  # straight to the advisory window
        await until(lambda: r.keeper.state.value == "backing_off", timeout=10)
        seen = await hammer(r, 2.0, wait=0.0)
        assert 0 == sum(n for code, n in seen.items() if isinstance(code, int) and code != 200), (
            seen
        )
        assert seen[200] > 0
        assert seen[200] == seen[first]


@pytest.mark.slow
async def test_no_token_request_fails_while_renewals_fail_in_every_way_at_once(
    short_dir: Path,
) -> None:
    """Five instances on one loop, each failing three refreshes its own way (503, 429 with a
    huge Retry-After, a reset, an HTML 502, garbage), CLIENTS requests at once on each until
    the fourth try renews: every request gets the still valid token, then the new one."""
    faults = [("503", None), ("429", 10**6), ("reset", None), ("html502", None), ("garbage", None)]
    failed: dict[str, int] = {}

    async def one(kind: str, retry_after: int | None, directory: Path) -> None:
        directory.mkdir(mode=0o700)
        sugar = {**fake_profile("13.3"), "access_lifetime": 60}
        async with rig(directory, speed=5.0, sugar=sugar, refresh_before=30, backoff_max=2) as r:
            await first_token(r, "13.3")
            r.fake.fail_next(3, kind, retry_after=retry_after)  # type: ignore[arg-type]
            assert r.keeper.refresh_at is not None
            r.clock.jump(r.keeper.refresh_at - r.clock())
            seen = await hammer(r, 20.0, wait=10, done=lambda: r.keeper.refreshes >= 4)
            failed[kind] = sum(n for k, n in seen.items() if isinstance(k, int) and k != 200)
            assert [kind] * 3 == [q.fault for q in r.fake.requests if q.fault]
            assert r.keeper.refreshes >= 4  # the three that failed, then the one that did

    await asyncio.gather(*(one(kind, ra, short_dir / kind) for kind, ra in faults))
    assert {kind: 0 for kind, _ in faults} == failed
