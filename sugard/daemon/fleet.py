"""The daemon's side of fleet mode: joining the fleet at start, and each instance's way to
Sugar through it (the leader calls, followers wait for the session it shares).

Fleet mode's own modules (`sugard.fleet`) pull in redis and cryptography: they are imported
here only when `[fleet]` is on, so `import sugard.daemon` loads neither.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from sugard.config import Config, InstanceConfig
from sugard.sugar import SugarClient

if TYPE_CHECKING:
    from sugard.fleet import Fleet
    from sugard.keeper import FleetSeat
    from sugard.proxy.governor import SlotSource

__all__ = ["join_fleet", "shared_slots", "upstream"]

log = logging.getLogger("sugard.daemon")


def join_fleet(config: Config) -> Fleet | None:
    """The fleet, when `[fleet]` is set and an instance shares its session through it."""
    if config.fleet is None or not any(i.fleet for i in config.instances.values()):
        return None
    from sugard.fleet import Fleet
    from sugard.fleet.source import shown_url

    log.info("fleet mode: sessions shared through Redis at %s", shown_url(config.fleet))
    return Fleet(config.fleet)


def upstream(
    fleet: Fleet | None,
    instance: InstanceConfig,
    http: aiohttp.ClientSession,
    clock: Callable[[], float],
) -> tuple[SugarClient, FleetSeat | None]:
    """Sugar itself, or (fleet mode) Sugar as the fleet allows: leader calls, followers
    wait; and the instance's seat in the fleet, if it has one."""
    if fleet is None or not instance.fleet:
        return SugarClient(instance, http, clock=clock), None
    from sugard.fleet.source import FleetSource, shown_url

    member = fleet.join(instance)
    source = FleetSource(instance, http, member, shown_url(fleet.config), clock=clock)
    return source, source


def shared_slots(seat: FleetSeat | None) -> SlotSource | None:
    """Where the governor counts an instance's requests: the fleet's count in Redis for a
    fleet instance (its limit is the fleet's), None (this host's own) for any other."""
    if seat is None:
        return None
    from sugard.fleet.source import FleetSource

    return seat.rate if isinstance(seat, FleetSource) else None
