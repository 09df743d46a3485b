"""The TOML config: parsed into frozen dataclasses, validated, secrets resolved.

Every problem is collected (not just the first) and named as `file: table.key: message`,
so one `sugard check` run shows everything there is to fix. This module reads the
document and its `[daemon]` table, and tells what a reload changes (`diff_configs`); the
instances are parsed in `instances`, `[fleet]` in `fleet`, each value by a checker of
`values`, secrets come from `sources`, and `show` is the config as `show-config` prints it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from sugard.config.fleet import (
    FLEET_SECRETS,
    LEASE_MARGIN,
    FleetConfig,
    decode_fleet_key,
    minimum_lease,
    parse_fleet,
    resolve_fleet_secrets,
)
from sugard.config.instances import (
    INSTANCE_DEFAULTS,
    INSTANCE_KEYS_HELP,
    INSTANCE_SCHEMA,
    SECRET_FIELDS,
    InstanceConfig,
    distinct_platform,
    parse_instances,
    session_identity,
)
from sugard.config.sources import (
    SecretRef,
    read_secret,
    readable_by_others,
    secret_file_problem,
)
from sugard.config.values import (
    DIRECT,
    GRACE_AUTO,
    INSTANCE_NAME,
    did_you_mean,
    file_path,
    host_port,
    ids,
    integer,
    log_level,
    number,
    shown_key,
    split_host_port,
    table_of,
)
from sugard.errors import DaemonError
from sugard.secret import Secret

__all__ = [
    "DAEMON_DEFAULTS",
    "DIRECT",
    "GRACE_AUTO",
    "INSTANCE_DEFAULTS",
    "INSTANCE_KEYS_HELP",
    "INSTANCE_NAME",
    "INSTANCE_SCHEMA",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "DaemonConfig",
    "FleetConfig",
    "InstanceConfig",
    "Problem",
    "SecretRef",
    "decode_fleet_key",
    "diff_configs",
    "distinct_platform",
    "load_config",
    "parse_config",
    "read_config",
    "resolve_instance_secrets",
    "resolve_secrets",
    "secret_file_problem",
    "session_identity",
    "split_host_port",
    "toml_problem",
]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config, located precisely enough to fix it."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.file}: {self.key}: {self.message}"
            if self.key
            else f"{self.file}: {self.message}"
        )


class ConfigError(DaemonError):
    """The config cannot be used; `problems` says every reason."""

    code = "invalid_config"

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


@dataclass(frozen=True)
class DaemonConfig:
    socket: str | None = None
    log_level: str = "info"
    max_parallel_logins: int = 4
    shutdown_grace: float = 10.0
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    metrics_listen: str | None = None  # "HOST:PORT" serving /metrics over TCP


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig
    instances: Mapping[str, InstanceConfig]
    fleet: FleetConfig | None = None


DAEMON_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "socket": file_path,
    "log_level": log_level,
    "max_parallel_logins": integer(1, 1000),
    "shutdown_grace": number(0, 600),
    "allowed_uids": ids,
    "allowed_gids": ids,
    "metrics_listen": host_port,
}


DAEMON_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in fields(DaemonConfig)
    if f.name not in ("allowed_uids", "allowed_gids")
}


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    resolve: bool = True,
) -> Config:
    """Read, validate and (by default) resolve the secrets of the config at `path`."""
    config, problems = read_config(path, environ, resolve=resolve)
    if problems or config is None:
        raise ConfigError(problems)
    return config


def read_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    resolve: bool = True,
) -> tuple[Config | None, list[Problem]]:
    """The config at `path` as far as it can be made out, and every problem it has, in one
    pass: a wrong type does not hide a missing secret file. The config (None if the file
    cannot be read as TOML) is for `sugard check` to look at further, never to run while
    there are problems: a bad value is left out of it, a missing url or username is empty."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, [Problem(str(path), "", "no such file; create one with `sugard init`")]
    except OSError as exc:
        return None, [Problem(str(path), "", f"cannot read: {exc.strerror}")]
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, [Problem(str(path), "", "is not UTF-8 text")]
    except tomllib.TOMLDecodeError as exc:
        return None, [Problem(str(path), "", toml_problem(exc, raw.decode("utf-8")))]
    config, problems = _parse(data, str(path))
    problems += _check_file_mode(path, config)
    if resolve:
        config, secret_problems = _resolved(config, environ)
        problems += secret_problems
    return config, list(dict.fromkeys(problems))


_TOML_WORDS = ("true", "false", "inf", "nan")


def toml_problem(exc: tomllib.TOMLDecodeError, text: str) -> str:
    """tomllib's message, which says where, and what to do about the commonest mistakes: a
    string without quotes, a string not closed on its line, a key given twice."""
    message = str(exc)
    where = message.rpartition(" (at line ")[2].rstrip(")").split(", column ")
    if not message.endswith(")") or len(where) != 2 or not all(w.isdigit() for w in where):
        return f"invalid TOML: {message}"
    line_number = int(where[0])
    lines = text.splitlines()
    line = lines[line_number - 1] if 0 < line_number <= len(lines) else ""
    key, equals, value = line.partition("=")
    value = value.strip()
    hint = ""
    if message.startswith("Invalid value") and equals and value:
        # The value is never echoed: it may be a password written inline.
        if value.split()[0].lower() in ("true", "false"):
            hint = "; true and false are written in lower case"
        elif value[0].isalpha() and not value.startswith(_TOML_WORDS):
            hint = f'; a string must be in quotes: {key.strip()} = "..."'
    elif message.startswith("Illegal character") and value[:1] in ("'", '"'):
        hint = "; a string must end on the line it starts, with the quote it opened with"
    elif message.startswith("Cannot overwrite a value"):
        hint = f"; {key.strip() or 'a key'} is set twice: keep one"
    return f"invalid TOML: {message}{hint}"


def _check_file_mode(path: Path, config: Config) -> list[Problem]:
    """An inline secret in a file others can read is as good as published."""
    inline = [
        f"instances.{i.name}.{name}"
        for i in config.instances.values()
        for name in SECRET_FIELDS
        if (ref := getattr(i, name)) is not None and ref.kind == "inline" and ref.value
    ]
    if config.fleet is not None:
        inline += [
            f"fleet.{name}"
            for name in FLEET_SECRETS
            if getattr(config.fleet, name) is not None
            and getattr(config.fleet, name).kind == "inline"
        ]
    try:
        mode = path.stat().st_mode
    except OSError:
        return []
    loose = readable_by_others(path, mode)
    if inline and loose:
        return [Problem(str(path), inline[0], f"holds an inline secret but the file is {loose}")]
    return []


def parse_config(data: Mapping[str, Any], path: str = "<config>") -> Config:
    """Validate a parsed TOML document; secrets are located but not resolved."""
    config, problems = _parse(data, path)
    if problems:
        raise ConfigError(problems)
    return config


def _parse(data: Mapping[str, Any], path: str) -> tuple[Config, list[Problem]]:
    """The config with what is valid in `data`, and a problem for everything that is not."""
    problems: list[Problem] = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(path, key, message))

    for key in data:
        if key not in ("daemon", "defaults", "instances", "fleet"):
            problem(
                shown_key(key),
                "unknown table or key"
                + did_you_mean(key, ("daemon", "defaults", "instances", "fleet"))
                + "; expected [daemon], [defaults] and [instances.NAME]",
            )

    daemon_raw = table_of(data, "daemon", problem)
    daemon_values: dict[str, Any] = {}
    for key, value in daemon_raw.items():
        checker = DAEMON_SCHEMA.get(key)
        if checker is None:
            problem(
                f"daemon.{shown_key(key)}",
                f"unknown key{did_you_mean(key, DAEMON_SCHEMA)}; "
                f"[daemon] keys are {', '.join(DAEMON_SCHEMA)}",
            )
            continue
        try:
            daemon_values[key] = checker(value)
        except ValueError as exc:
            problem(f"daemon.{key}", str(exc))
    daemon = DaemonConfig(**daemon_values)

    instances = parse_instances(data, problem, Path(path).parent)
    if not data.get("instances") and not problems:
        problem("instances", "no instances configured; add an [instances.NAME] table")
    fleet = parse_fleet(data, problem, Path(path).parent) if "fleet" in data else None
    if fleet is not None:
        _check_lease(fleet, instances, problem)
    # A bad secret in [defaults] is met once per instance; say it once.
    config = Config(path=path, daemon=daemon, instances=instances, fleet=fleet)
    return config, list(dict.fromkeys(problems))


def _check_lease(
    fleet: FleetConfig, instances: Mapping[str, InstanceConfig], problem: Callable[[str, str], None]
) -> None:
    shared = [i for i in instances.values() if i.fleet]
    if not shared:
        return
    slowest = max(shared, key=lambda i: i.timeout)
    need = minimum_lease(fleet, slowest.timeout)
    if fleet.lease < need:
        problem(
            "fleet.lease",
            f"must be at least {need:g} s (2 x instances.{slowest.name}.timeout + 2 x "
            f"fleet.timeout + {LEASE_MARGIN:g} s), so that a leader can finish a Sugar call "
            f"and store its answer before its lease can lapse; raise lease to {need:g} or "
            "lower the timeouts",
        )


def resolve_secrets(config: Config, environ: Mapping[str, str] | None = None) -> Config:
    """Read every secret from its source; raise ConfigError naming each one that fails."""
    config, problems = _resolved(config, environ)
    if problems:
        raise ConfigError(problems)
    return config


def _resolved(config: Config, environ: Mapping[str, str] | None) -> tuple[Config, list[Problem]]:
    """`config` with every secret read from its source (one that fails is left unread), and
    a problem for each that fails: `read_config` reports them, `resolve_secrets` raises."""
    env = os.environ if environ is None else environ
    problems: list[Problem] = []
    instances = dict(config.instances)
    for name, instance in instances.items():
        try:
            instances[name] = resolve_instance_secrets(instance, config.path, env)
        except ConfigError as exc:
            problems += exc.problems
    fleet = None
    if config.fleet is not None:

        def problem(key: str, message: str) -> None:
            problems.append(Problem(config.path, key, message))

        base_dir = Path(config.path).parent
        fleet = resolve_fleet_secrets(config.fleet, base_dir, env, problem)
    return replace(config, instances=instances, fleet=fleet), problems


def resolve_instance_secrets(
    instance: InstanceConfig, config_path: str, environ: Mapping[str, str] | None = None
) -> InstanceConfig:
    """`instance` with its secrets read (again) from their sources; ConfigError if one fails.
    Relative paths are relative to the config at `config_path`."""
    env = os.environ if environ is None else environ
    base_dir = Path(config_path).parent
    problems: list[Problem] = []
    resolved: dict[str, Any] = {}
    for base in SECRET_FIELDS:
        ref: SecretRef | None = getattr(instance, base)
        if ref is None:  # an optional secret not configured (proxy_password)
            continue
        key = f"instances.{instance.name}.{base}" + ("" if ref.kind == "inline" else f"_{ref.kind}")
        try:
            resolved[base] = replace(ref, value=Secret(read_secret(ref, env, base_dir)))
        except ValueError as exc:
            problems.append(Problem(config_path, key, str(exc)))
    if problems:
        raise ConfigError(problems)
    return replace(instance, **resolved)


@dataclass(frozen=True)
class ConfigDiff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "unchanged": list(self.unchanged),
        }


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Which instances a reload adds, removes, changes or leaves alone."""
    old_names, new_names = set(old.instances), set(new.instances)
    both = sorted(old_names & new_names)
    return ConfigDiff(
        added=tuple(sorted(new_names - old_names)),
        removed=tuple(sorted(old_names - new_names)),
        changed=tuple(n for n in both if old.instances[n] != new.instances[n]),
        unchanged=tuple(n for n in both if old.instances[n] == new.instances[n]),
    )
