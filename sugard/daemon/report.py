"""What the daemon says about its instances, in its log and in systemd's `STATUS=`: each
instance's way out (proxy or direct, never with the credentials), TLS checks turned off, what a
reload did.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sugard import __version__
from sugard.config import Config, ConfigDiff, InstanceConfig
from sugard.keeper import Keeper
from sugard.sugar.outbound import route_lines

__all__ = [
    "failed_status",
    "log_instances_changed",
    "log_listening",
    "log_refusals",
    "log_refused",
    "log_reload",
    "log_routes",
    "refused_status",
    "reloaded_status",
    "warn_if_unverified",
    "warn_restart_only",
]

log = logging.getLogger("sugard.daemon")


def log_listening(socket_path: Path, instances: int, *, passed_in: bool) -> None:
    log.info(
        "sugard %s listening on %s%s with %d instance(s)",
        __version__,
        socket_path,
        " (socket passed in by systemd)" if passed_in else "",
        instances,
    )


def warn_if_unverified(instance: InstanceConfig) -> None:
    if not instance.verify_tls:
        log.warning("%s: TLS verification is OFF (verify_tls = false)", instance.name)


def log_routes(keepers: Mapping[str, Keeper], *, together: bool = False) -> None:
    """Which way each instance goes out (proxy or direct), never with the credentials."""
    routes = {name: keeper.upstream.route for name, keeper in keepers.items()}
    for line in route_lines(routes, together=together):
        log.info("%s", line)


def log_instances_changed(
    diff: ConfigDiff, keepers: Mapping[str, Keeper], routes_before: Mapping[str, str]
) -> None:
    """For every instance a reload adds or changes, said again, not only at start (whoever
    edits the file sees it in the log of the reload, whatever else they changed): TLS checks
    off; and its way out, if that is new."""
    for name in (*diff.added, *diff.changed):
        warn_if_unverified(keepers[name].config)
    log_routes(
        {
            name: keepers[name]
            for name in (*diff.added, *diff.changed)
            if routes_before.get(name) != keepers[name].upstream.route.describe()
        }
    )


def warn_restart_only(old: Config, new: Config, pending: Sequence[str]) -> list[str]:
    """Settings a reload read but cannot apply: they wait for a restart of sugard. Returns
    them as the reload's answer names them (`[daemon] metrics_listen`, `[fleet]`)."""
    if old.fleet != new.fleet:
        log.warning("[fleet] changed: takes effect when sugard restarts")
    if pending:
        log.warning(
            "[daemon] %s changed: takes effect when sugard restarts "
            "(systemctl --user restart sugard)",
            ", ".join(pending),
        )
    return [f"[daemon] {key}" for key in pending] + (["[fleet]"] if old.fleet != new.fleet else [])


def log_refusals(keepers: Mapping[str, Keeper]) -> dict[str, str]:
    """The instances that stay failed on a secret Sugar rejected (name -> why), each logged."""
    refused = {
        name: keeper.rejection.refusal(keeper.config)
        for name, keeper in keepers.items()
        if keeper.rejection is not None and keeper.refuses_rejected()
    }
    for message in refused.values():
        log.error("%s", message)
    return refused


def log_reload(diff: ConfigDiff, adopted: int) -> None:
    log.info(
        "reloaded: %d added, %d removed, %d changed (%d logging in again), %d unchanged",
        len(diff.added),
        len(diff.removed),
        len(diff.changed),
        len(diff.changed) - adopted,
        len(diff.unchanged),
    )


def reloaded_status(answer: Mapping[str, Any], summary: str) -> str:
    """`STATUS=` after a reload, from its answer to whoever asked for it."""
    changes = ", ".join(
        f"{len(answer[k])} {k}" for k in ("added", "removed", "changed", "unchanged")
    )
    if answer.get("needs_attention"):
        changes += f", {len(answer['needs_attention'])} needing attention"
    return f"reloaded ({changes}); {summary}"


def failed_status(problems: Sequence[str], summary: str) -> str:
    """`STATUS=` after a reload refused: the first problem, and how many more."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"reload failed, still running the old config: {problems[0]}{more}; {summary}"


def refused_status(problems: Sequence[str]) -> str:
    """`STATUS=` while sugard serves nothing on a config it refused."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (
        f"config refused, serving no instance: {problems[0]}{more}; fix it, then "
        "systemctl --user reload sugard"
    )


def log_refused(problems: Sequence[str], socket_path: Path) -> None:
    """Said once at start: each problem, and what sugard does meanwhile (answers every
    request with them, rather than exit and be restarted in a loop)."""
    for problem in problems:
        log.error("config refused: %s", problem)
    log.error(
        "sugard %s listening on %s with no instance: every request is answered with the "
        "config's problems until it is fixed and reloaded (systemctl --user reload sugard)",
        __version__,
        socket_path,
    )
