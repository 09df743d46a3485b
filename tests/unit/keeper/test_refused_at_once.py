"""A site that refuses every token it issues (one that checks the client's IP, a broken
front): after a renewal whose new token Sugar refuses at its first check, sugard backs off
(saying why in STATUS) instead of renewing once per report (the rig, in-process)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from support.rig import NAME, Rig, first_token, get_json, rig, token_calls

REPORTS = 20


async def report(r: Rig, token: str) -> tuple[int, dict[str, Any]]:
    """`POST .../invalidate`, as a script whose request Sugar refused with a 401."""
    path = f"/v1/instances/{NAME}/invalidate"
    return await get_json(r.http, path, "POST", json={"access_token": token})


async def test_a_site_that_refuses_every_new_token_is_not_asked_for_one_per_report(
    short_dir: Path,
) -> None:
    """Every token Sugar issues is dead at once, and a script reports each one it gets, 20
    times over 20 s: sugard renews a handful of times (at once, then 1, 2, 4, 8 s apart),
    not 20, and STATUS says why it backs off."""
    async with rig(short_dir, speed=10.0, backoff_max=300, probe_interval=0) as r:
        await first_token(r)
        r.fake.reset_counters()
        pending: set[asyncio.Task[Any]] = set()
        for _ in range(REPORTS):
            current = r.keeper.grant.access_token.reveal()
            r.fake.revoke(current)  # refused by Sugar the moment it is used
            pending.add(asyncio.create_task(report(r, current)))
            await r.clock.sleep(1.0)
        renewals = token_calls(r.fake).get("token", 0)
        assert 3 <= renewals <= 6, token_calls(r.fake)
        status = r.keeper.status()
        assert status.last_error is not None
        assert "token_refused" == status.last_error.kind
        assert "at its first check, right after issuing it" in status.last_error.message
        assert "not per request" in status.last_error.message
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
