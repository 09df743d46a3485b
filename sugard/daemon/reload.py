"""A reload: what changed between two configs, the plan (what restarts, what is refused),
and carrying it out without losing what works.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from sugard.config import Config, ConfigDiff, ConfigError, InstanceConfig, diff_configs, load_config
from sugard.daemon.report import log_instances_changed, log_refusals, log_reload
from sugard.errors import ReloadFailed
from sugard.keeper import Keeper, Rejection

__all__ = [
    "RESTART_ONLY",
    "NextKeepers",
    "ReloadPlan",
    "Running",
    "apply_daemon_settings",
    "build_aside",
    "plan_reload",
    "read_config_again",
]

log = logging.getLogger("sugard.daemon")


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


# The daemon's logger, as in its other parts: journal filters and tests match on its name.


async def read_config_again(path: str, environ: Mapping[str, str] | None) -> Config:
    """The config at `path`, loaded and validated in a thread; ReloadFailed if any of it is
    wrong (each problem logged), and then nothing else happens."""
    try:
        return await asyncio.to_thread(load_config, path, environ)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, old config kept: %s", problem)
        raise ReloadFailed([str(p) for p in exc.problems]) from None


@dataclass
class NextKeepers:
    """The keepers the new config runs, built aside: nothing live is touched until the
    daemon swaps `keepers` in, so a failure before then leaves the old config as it was."""

    keepers: dict[str, Keeper]
    retired: list[Keeper]  # removed or replaced: stopped once swapped out
    adopted: list[Keeper]  # running ones that take the new settings and keep their session
    fresh: list[Keeper]  # added or replacements: started once the retired have stopped

    def adopt(self, new: Config, running: Mapping[str, Keeper], diff: ConfigDiff) -> None:
        """Hand the adopted keepers their new settings and log what changed; part of the
        daemon's swap, so no await."""
        routes_before = {name: k.upstream.route.describe() for name, k in running.items()}
        for keeper in self.adopted:
            keeper.adopt(new.instances[keeper.name])
        log_instances_changed(diff, self.keepers, routes_before)

    async def settle(self, diff: ConfigDiff, stopping: Callable[[], bool]) -> dict[str, Any]:
        """After the swap: stop the retired, start the fresh (unless sugard began stopping
        meanwhile), retry the failed that stay; the reload's answer."""
        # Retired keepers stop (their waiting requests get InstanceStopped) before any
        # replacement starts: a refresh still in flight for a replaced instance is cancelled
        # and awaited, so it can never land after, or on top of, the new session.
        await asyncio.gather(*(keeper.stop() for keeper in self.retired))
        for keeper in self.fresh:
            if not stopping():
                keeper.start()
        for name in (*diff.unchanged, *(k.name for k in self.adopted)):
            self.keepers[name].retry_if_failed()
        refused = log_refusals(self.keepers)  # said to whoever reloaded: these stay failed
        log_reload(diff, len(self.adopted))
        answer: dict[str, Any] = diff.as_dict()
        if refused:
            answer["needs_attention"] = refused
        return answer


def build_aside(
    plan: ReloadPlan,
    new: Config,
    running: Mapping[str, Keeper],
    new_keeper: Callable[[InstanceConfig], Keeper],
) -> NextKeepers:
    """The keepers `plan` takes `running` to, none of them started; ReloadFailed if one
    cannot be made."""
    keepers = dict(running)
    retired = [keepers.pop(name) for name in plan.remove]
    adopted = [keepers[name] for name in plan.adopt]
    fresh: list[Keeper] = []
    try:
        for name in plan.restart:
            retired.append(keepers[name])
            keepers[name] = new_keeper(new.instances[name])
            if name in plan.keep_rejection:
                keepers[name].rejection = running[name].rejection
            fresh.append(keepers[name])
        for name in plan.add:
            keepers[name] = new_keeper(new.instances[name])
            fresh.append(keepers[name])
    except Exception as exc:  # whatever it is, the old config must survive it
        log.exception("reload refused, old config kept: cannot set up the new instances")
        raise ReloadFailed([f"cannot set up the new instances: {exc}"]) from None
    return NextKeepers(keepers, retired, adopted, fresh)


def apply_daemon_settings(old: Config, new: Config, *, log_level: bool) -> None:
    """The [daemon] settings a reload changes at once: the log level, if sugard sets it."""
    if log_level and old.daemon.log_level != new.daemon.log_level:
        logging.getLogger().setLevel(new.daemon.log_level.upper())
        log.info("log level is now %s", new.daemon.log_level)
