"""The reload plan, without a daemon: from the running config, the new one and the running
keepers, which instances are added, removed, adopted (the session stays) or restarted (a new
login), whether a rejected secret stays refused, and which [daemon] settings wait for a restart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.daemon import write_config

from sugard.config import Config, InstanceConfig, load_config
from sugard.daemon.reload import ReloadPlan, plan_reload
from sugard.keeper import Rejection
from sugard.sugar.errors import ClientRejected, CredentialsRejected

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


# ------------------------------------------------------------------------------ tables


@pytest.mark.parametrize(
    ("change", "adopted"),
    [
        pytest.param({"password": "rotated"}, True, id="a rotated password keeps the session"),
        pytest.param({"client_secret": "new-secret"}, True, id="a new client secret keeps it"),
        pytest.param({"refresh_before": 60}, True, id="refresh_before keeps it"),
        pytest.param({"backoff_max": 3}, True, id="backoff_max keeps it"),
        pytest.param({"timeout": 30}, True, id="timeout keeps it"),
        pytest.param({"probe_interval": 0}, True, id="probe_interval keeps it"),
        pytest.param({"old_token_grace": 30}, True, id="old_token_grace keeps it"),
        pytest.param({"proxy": "http://proxy.example:3128"}, True, id="a proxy keeps it"),
        pytest.param({"allowed_uids": [1000]}, True, id="who may use it keeps it"),
        pytest.param({"url": "https://other.example"}, False, id="another site is a new login"),
        pytest.param({"username": "bob"}, False, id="another user is a new login"),
        pytest.param({"client_id": "other-client"}, False, id="another OAuth client too"),
        pytest.param({"platform": "other"}, False, id="another platform too"),
        pytest.param({"verify_tls": False}, False, id="turning TLS checks off too"),
        pytest.param({"ca_file": "/etc/ssl/certs/other.pem"}, False, id="another CA file too"),
    ],
)
def test_what_a_changed_setting_restarts(
    tmp_path: Path, change: dict[str, Any], adopted: bool
) -> None:
    """A change of what identifies the session restarts the keeper; anything else is adopted."""
    old = config(tmp_path, "old", {"a": {}})
    new = config(tmp_path, "new", {"a": change})
    plan = plan_reload(old, new, running(old))
    assert ("a",) == plan.diff.changed
    expected = (("a",), ()) if adopted else ((), ("a",))
    assert expected == (plan.adopt, plan.restart)


@pytest.mark.parametrize(
    ("rejected", "change", "kept"),
    [
        pytest.param(
            CredentialsRejected("no"),
            {"platform": "other"},
            True,
            id="password refused, another platform: still refused",
        ),
        pytest.param(
            CredentialsRejected("no"),
            {"client_id": "other"},
            True,
            id="password refused, another client: still refused",
        ),
        pytest.param(
            CredentialsRejected("no"),
            {"username": "bob"},
            False,
            id="password refused, another user: tried",
        ),
        pytest.param(
            CredentialsRejected("no"),
            {"url": "https://other.example"},
            False,
            id="password refused, another site: tried",
        ),
        pytest.param(
            CredentialsRejected("no"),
            {"platform": "other", "password": "fixed"},
            False,
            id="password refused, then fixed: tried",
        ),
        pytest.param(
            ClientRejected("no"),
            {"platform": "other"},
            True,
            id="client secret refused, another platform: still refused",
        ),
        pytest.param(
            ClientRejected("no"),
            {"client_id": "other"},
            False,
            id="client secret refused, another client: tried",
        ),
        pytest.param(
            ClientRejected("no"),
            {"platform": "other", "client_secret": "fixed"},
            False,
            id="client secret refused, then fixed: tried",
        ),
    ],
)
def test_a_rejected_secret_is_not_sent_again_by_a_restart(
    tmp_path: Path, rejected: Exception, change: dict[str, Any], kept: bool
) -> None:
    """A restarted keeper keeps the old one's rejection only while it would send the very
    secret Sugar refused (same site, same user or client, same secret)."""
    old = config(tmp_path, "old", {"a": {"client_secret": "secret"}})
    new = config(tmp_path, "new", {"a": {"client_secret": "secret", **change}})
    cfg = old.instances["a"]
    plan = plan_reload(old, new, {"a": Held(cfg, Rejection.of(rejected, cfg))})
    assert ("a",) == plan.restart
    assert (("a",) if kept else ()) == plan.keep_rejection


@pytest.mark.parametrize(
    ("setting", "waits"),
    [
        pytest.param({"socket": "/run/sugard/other.sock"}, True, id="socket waits for a restart"),
        pytest.param({"max_parallel_logins": 2}, True, id="max_parallel_logins waits"),
        pytest.param({"shutdown_grace": 1}, True, id="shutdown_grace waits"),
        pytest.param({"metrics_listen": "127.0.0.1:9464"}, True, id="metrics_listen waits"),
        pytest.param({"log_level": "debug"}, False, id="log_level is applied by the reload"),
    ],
)
def test_which_daemon_settings_wait_for_a_restart(
    tmp_path: Path, setting: dict[str, Any], waits: bool
) -> None:
    """A [daemon] setting read only at start is named by the plan, not silently ignored."""
    old = config(tmp_path, "old", {"a": {}})
    new = config(tmp_path, "new", {"a": {}}, **setting)
    assert (tuple(setting) if waits else ()) == plan_reload(old, new, running(old)).restart_only
