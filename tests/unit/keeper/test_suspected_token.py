"""A token the fleet has reason to think replaced at Sugar (a renewal this host could not hear
of, before Redis lost its data): with `hold`, it is not served until one probe says Sugar still
takes it, and then it needs no renewal (the rig, in-process)."""

from __future__ import annotations

from pathlib import Path

from support.rig import first_token, rig, token_calls

from sugard.secret import Secret


async def test_a_suspected_token_sugar_still_takes_is_served_again_without_a_renewal(
    short_dir: Path,
) -> None:
    """A request that comes while the held token is in doubt waits for the one probe, not for
    a renewal: it gets the same token, and Sugar's token endpoint is not called."""
    async with rig(short_dir, probe_interval=0) as r:
        await first_token(r)
        held = r.keeper.grant.access_token
        r.fake.reset_counters()
        r.keeper.suspect(held, hold=True)
        answer = await r.keeper.token(wait=10)
        assert held == answer.access_token
        assert {} == token_calls(r.fake)
        assert 1 == r.fake.calls["ping"]
        assert held == (await r.keeper.token(wait=0)).access_token  # no longer in doubt


async def test_a_suspected_token_sugar_refuses_is_never_served(short_dir: Path) -> None:
    """Sugar replaced the held token: the probe finds it dead, the request gets the renewed
    token (a refresh, no login), never the dead one."""
    async with rig(short_dir, probe_interval=0) as r:
        await first_token(r)
        held = r.keeper.grant.access_token
        r.fake.reset_counters()
        r.fake.revoke(held.reveal())
        r.keeper.suspect(held, hold=True)
        answer = await r.keeper.token(wait=10)
        assert held != answer.access_token
        assert {"token": 1, "refresh_token": 1} == token_calls(r.fake)


async def test_a_suspicion_about_another_token_changes_nothing(short_dir: Path) -> None:
    """The fleet suspects a token this keeper no longer serves: no probe, no wait."""
    async with rig(short_dir, probe_interval=0) as r:
        await first_token(r)
        held = r.keeper.grant.access_token
        r.fake.reset_counters()
        r.keeper.suspect(Secret("a-token-replaced-long-ago"), hold=True)
        assert held == (await r.keeper.token(wait=0)).access_token
        assert 0 == r.fake.calls["ping"]
