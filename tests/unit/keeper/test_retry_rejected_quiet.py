"""The quiet period between two `--retry-rejected` of the same rejected secret runs on the
steady clock: a minute of it, not of the wall clock (the rig's virtual clock, in-process)."""

from __future__ import annotations

from pathlib import Path

from support.rig import NAME, get_json, rig
from support.wait import until


async def test_another_retry_of_a_rejected_password_waits_a_quiet_minute(
    short_dir: Path,
) -> None:
    """Rejected, retried as asked and rejected again: the next retry is refused (saying when)
    for a minute of the steady clock, a wall clock set forward an hour changing nothing;
    then one more is sent."""
    async with rig(short_dir, password="wrong-password") as r:
        await until(lambda: r.keeper.state.value == "failed")

        async def retry() -> str:
            """The message of the answer (502 upstream_rejected either way)."""
            path = f"/v1/instances/{NAME}/refresh"
            code, body = await get_json(r.http, path, "POST", json={"retry_rejected": True})
            assert (502, "upstream_rejected") == (code, body["error"]), body
            return str(body["message"])

        assert 1 == r.fake.calls["password"]
        assert "need_login" in await retry()  # sent once more, and rejected again
        assert 2 == r.fake.calls["password"]
        refused = await retry()
        assert "was sent again at" in refused
        assert "not sending it again before" in refused
        assert "(in 60 s)" in refused
        r.clock.step(3600)  # the wall clock only
        assert "not sending it again before" in await retry()
        r.clock.jump(50)
        assert "(in 10 s)" in await retry()
        assert 2 == r.fake.calls["password"]
        r.clock.jump(11)
        assert "need_login" in await retry()
        assert 3 == r.fake.calls["password"]
