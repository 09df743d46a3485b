"""The reload plan, without a daemon: from the running config, the new one and the running
keepers, which instances are added, removed, adopted (the session stays) or restarted (a new
login), whether a rejected secret stays refused, and which [daemon] settings wait for a restart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.daemon import write_config

from sugard.config import Config, InstanceConfig, load_config
from sugard.daemon.reload import ReloadPlan, plan_reload
from sugard.keeper import Rejection
from sugard.sugar import CredentialsRejected

SITE = "https://sugar.example"


@dataclass(frozen=True)
class Held:
    """A running keeper, as the plan sees one."""

    config: InstanceConfig
    rejection: Rejection | None = None


def config(
    directory: Path, name: str, instances: dict[str, dict[str, Any]], **daemon: Any
) -> Config:
    tables = {n: {"url": SITE, "username": n, "password": "pw", **t} for n, t in instances.items()}
    # One directory for both configs: the same password file is the same setting.
    return load_config(write_config(directory, tables, daemon=daemon, name=f"{name}.toml"))


def running(cfg: Config) -> dict[str, Held]:
    return {name: Held(instance) for name, instance in cfg.instances.items()}


def test_added_removed_and_unchanged_instances(tmp_path: Path) -> None:
    """A new name is added, a missing one removed, an equal one left alone."""
    old = config(tmp_path, "old", {"a": {}, "b": {}})
    new = config(tmp_path, "new", {"b": {}, "c": {}})
    plan = plan_reload(old, new, running(old))
    assert (
        ReloadPlan(
            diff=plan.diff,
            add=("c",),
            remove=("a",),
            adopt=(),
            restart=(),
            keep_rejection=(),
            restart_only=(),
        )
        == plan
    )
    assert ("b",) == plan.diff.unchanged


def test_a_change_that_keeps_the_session_is_adopted(tmp_path: Path) -> None:
    """A new password or backoff keeps the live session: the running keeper adopts it."""
    old = config(tmp_path, "old", {"a": {}})
    new = config(tmp_path, "new", {"a": {"password": "rotated", "backoff_max": 3}})
    plan = plan_reload(old, new, running(old))
    assert (("a",), ()) == (plan.adopt, plan.restart)
    assert ("a",) == plan.diff.changed


def test_a_change_of_session_restarts_the_keeper(tmp_path: Path) -> None:
    """Another user or platform is another session: the keeper is replaced by a new one."""
    old = config(tmp_path, "old", {"a": {}, "b": {}})
    new = config(tmp_path, "new", {"a": {"username": "bob"}, "b": {"platform": "other"}})
    plan = plan_reload(old, new, running(old))
    assert ((), ("a", "b")) == (plan.adopt, plan.restart)


def test_a_rejected_secret_stays_refused_only_if_it_is_sent_again(tmp_path: Path) -> None:
    """Restarting for another platform keeps the rejection of the same password; a new
    username (another account) drops it."""
    old = config(tmp_path, "old", {"same": {}, "other": {}})
    new = config(tmp_path, "new", {"same": {"platform": "other"}, "other": {"username": "bob"}})
    keepers = {
        name: Held(cfg, Rejection.of(CredentialsRejected("no"), cfg))
        for name, cfg in old.instances.items()
    }
    plan = plan_reload(old, new, keepers)
    assert ("other", "same") == plan.restart
    assert ("same",) == plan.keep_rejection


def test_daemon_settings_that_wait_for_a_restart(tmp_path: Path) -> None:
    """shutdown_grace and max_parallel_logins are named as waiting for a restart; the log
    level is not (a reload applies it)."""
    old = config(tmp_path, "old", {"a": {}})
    new = config(
        tmp_path,
        "new",
        {"a": {}},
        shutdown_grace=1,
        max_parallel_logins=2,
        log_level="debug",
    )
    assert ("max_parallel_logins", "shutdown_grace") == plan_reload(
        old, new, running(old)
    ).restart_only
