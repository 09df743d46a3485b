"""What a reload does, decided before anything is touched: a pure function of the running
config, the new one and the running keepers, which the daemon then applies in one swap.

Kept apart from the daemon so the decision (which keeper stays, which logs in again) is
tested on its own, with no socket, loop or Sugar behind it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from .config import Config, InstanceConfig
from .config_diff import ConfigDiff, diff_configs
from .keeper import Rejection

__all__ = ["RESTART_ONLY", "ReloadPlan", "Running", "plan_reload"]

# Daemon settings that only take effect at start: a reload says so instead of ignoring them.
RESTART_ONLY = ("socket", "max_parallel_logins", "shutdown_grace", "metrics_listen")


class Running(Protocol):
    """What the plan reads of a running keeper."""

    @property
    def config(self) -> InstanceConfig: ...

    @property
    def rejection(self) -> Rejection | None: ...


@dataclass(frozen=True)
class ReloadPlan:
    """The keepers a reload adds, removes, adopts (the running one takes the new settings
    and keeps its session) and restarts (stopped, and a new one logs in), each sorted."""

    diff: ConfigDiff
    add: tuple[str, ...]
    remove: tuple[str, ...]
    adopt: tuple[str, ...]
    restart: tuple[str, ...]
    # Of `restart`: the old keeper's rejected secret is still the one the new config sends.
    keep_rejection: tuple[str, ...]
    # [daemon] settings that changed but wait for a restart of sugard.
    restart_only: tuple[str, ...]


def plan_reload(old: Config, new: Config, running: Mapping[str, Running]) -> ReloadPlan:
    """The plan that takes `running` (the keepers of `old`) to `new`."""
    diff = diff_configs(old, new)
    adopt: list[str] = []
    restart: list[str] = []
    keep_rejection: list[str] = []
    for name in diff.changed:
        cfg, keeper = new.instances[name], running[name]
        if keeper.config.session_key() == cfg.session_key():
            adopt.append(name)
            continue
        restart.append(name)
        # Another platform or client is no reason to send a rejected secret again.
        if keeper.rejection is not None and keeper.rejection.applies_to(cfg):
            keep_rejection.append(name)
    return ReloadPlan(
        diff=diff,
        add=diff.added,
        remove=diff.removed,
        adopt=tuple(adopt),
        restart=tuple(restart),
        keep_rejection=tuple(keep_rejection),
        restart_only=tuple(
            key for key in RESTART_ONLY if getattr(old.daemon, key) != getattr(new.daemon, key)
        ),
    )
