"""`sugard check --online` for `[fleet]`: Redis reached, the key proven on what is stored."""

from __future__ import annotations

import asyncio

from sugard.config import Config, Problem
from sugard.fleet.errors import FleetError, StoreUnreachable
from sugard.fleet.sealing import FleetKey, identity_of, unseal
from sugard.fleet.store import FleetStore


def check_fleet_online(config: Config) -> tuple[list[str], list[Problem]]:
    """For `sugard check --online`: reach Redis (AUTH, PING) and prove the key opens what is
    stored for each fleet instance. (lines to print, problems)."""
    return asyncio.run(_check_fleet(config))


async def _check_fleet(config: Config) -> tuple[list[str], list[Problem]]:
    fleet = config.fleet
    assert fleet is not None
    lines: list[str] = []
    problems: list[Problem] = []
    store = FleetStore.from_config(fleet)
    key = FleetKey.from_text(fleet.key.reveal())
    try:
        await store.ping()
        lines.append(f"the fleet store at {fleet.redis_url}: reached")
        await store.check_key(key)
        for name, instance in config.instances.items():
            if not instance.fleet:
                lines.append(f"  {name}: local (fleet = false)")
                continue
            identity = identity_of(instance, key)
            found = await store.read(identity)
            if found is None:
                lines.append(f"  {name}: nothing stored yet ({identity})")
                continue
            try:
                unseal(key, identity, *found)
            except FleetError as exc:
                problems.append(Problem(config.path, f"instances.{name}", str(exc)))
                continue
            holder = await store.holder(identity)
            lines.append(
                f"  {name}: stored session epoch {found[0]} opens with this key "
                f"(leader: {holder or 'none now'})"
            )
    except StoreUnreachable as exc:
        problems.append(Problem(config.path, "fleet.redis_url", str(exc)))
    finally:
        await store.close()
    return lines, problems
