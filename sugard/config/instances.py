"""`[defaults]` and `[instances.NAME]`: the keys an instance takes, their defaults (stated
once, on `InstanceConfig`), and the rules between instances (one Sugar session each, one
listen address each). `config` calls `parse_instances` for the document's instances.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from sugard.config.sources import SECRET_KINDS, SecretRef, resolve_path
from sugard.config.values import (
    GRACE_AUTO,
    INSTANCE_NAME,
    api_version,
    argv,
    boolean,
    did_you_mean,
    file_path,
    grace,
    ids,
    integer,
    listen_address,
    nonempty,
    number,
    platform_name,
    proxy_url,
    proxy_username,
    secret_ref,
    shown_key,
    site_url,
    sudo_users,
    table_of,
    type_name,
)
from sugard.secret import Secret
from sugard.wire import INSTANCE_NAME_RULE

__all__ = [
    "INSTANCE_DEFAULTS",
    "INSTANCE_KEYS_HELP",
    "INSTANCE_SCHEMA",
    "SECRET_FIELDS",
    "InstanceConfig",
    "distinct_platform",
    "effective_rate_limit",
    "parse_instances",
    "session_identity",
]


@dataclass(frozen=True)
class InstanceConfig:
    """One SugarCRM instance, with `[defaults]` merged in."""

    name: str
    url: str
    username: str
    password: SecretRef
    client_id: str = "sugar"
    client_secret: SecretRef = field(default_factory=lambda: SecretRef("inline", "", Secret("")))
    platform: str = "sugard"
    api_version: str = "v10"  # the REST version `sugarctl api` puts before a PATH without one
    timeout: float = 10.0
    verify_tls: bool = True
    ca_file: str | None = None
    # None: the daemon's environment decides (HTTPS_PROXY, ...); DIRECT: no proxy.
    proxy: str | None = None
    proxy_username: str | None = None
    proxy_password: SecretRef | None = None
    refresh_before: float = 300.0
    backoff_max: float = 300.0
    old_token_grace: float | Literal["auto"] = GRACE_AUTO  # seconds an old token outlives a refresh
    probe_interval: float = 60.0  # seconds between checks that the token still works; 0: never
    allowed_uids: tuple[int, ...] | None = None
    allowed_gids: tuple[int, ...] | None = None
    listen: str | None = None  # the proxy's loopback "HOST:PORT", if any
    proxy_connections: int = 16
    proxy_timeout: float = 300.0
    on_event: tuple[str, ...] | None = None  # argv run on renewed/failed/recovered/evicted
    fleet: bool = True  # with a [fleet] table: share this instance's session through Redis
    sudo: tuple[str, ...] = ()  # users whose tokens sugard may get by Sugar's sudo; ("*",): any
    # Requests per second Sugar gets from sugard (proxied and its own); 0: no limit. Not
    # given: SUGARCLOUD_RATE_LIMIT for a SugarCloud site, else 0 (effective_rate_limit).
    rate_limit: float = 0.0
    rate_wait: float = 30.0  # seconds a proxied request may queue for the rate before a 429

    def session_key(self) -> tuple[object, ...]:
        """What identifies the upstream session: while it is unchanged, the live token stays.

        The secrets are not part of it: a new password or client secret (a rotation, or a
        typo) is used at the next password login, and a working session is never thrown
        away for one that may not work."""
        return (
            self.url,
            self.username,
            self.client_id,
            self.platform,
            self.verify_tls,
            self.ca_file,
        )


# The schema: key -> the checker (in `values`) that returns its normalised value.
INSTANCE_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "url": site_url,
    "username": nonempty,
    "client_id": nonempty,
    "platform": platform_name,
    "api_version": api_version,
    "timeout": number(0.1, 300),
    "verify_tls": boolean,
    "ca_file": file_path,
    "proxy": proxy_url,
    "proxy_username": proxy_username,
    "refresh_before": number(0, 86400),
    "backoff_max": number(0.01, 86400),
    "old_token_grace": grace,
    "probe_interval": number(0, 86400),
    "allowed_uids": ids,
    "allowed_gids": ids,
    "listen": listen_address,
    "proxy_connections": integer(1, 1024),
    "proxy_timeout": number(1, 86400),
    "on_event": argv,
    "fleet": boolean,
    "sudo": sudo_users,
    "rate_limit": number(0, 100000),
    "rate_wait": number(0, 3600),
}

# SugarCloud blocks a client's IP for a while above about 20 requests a second per instance
# (docs/sugarcrm.md); sugard keeps its own sites under that by default, with room to spare.
SUGARCLOUD_RATE_LIMIT = 15.0
SUGARCLOUD_SUFFIX = ".sugarondemand.com"


def effective_rate_limit(url: object) -> float:
    """rate_limit when the config gives none: SUGARCLOUD_RATE_LIMIT for a SugarCloud site."""
    if not isinstance(url, str):
        return 0.0
    host = url.partition("://")[2].split("/", 1)[0].rpartition("@")[2].split(":", 1)[0]
    return SUGARCLOUD_RATE_LIMIT if host.lower().endswith(SUGARCLOUD_SUFFIX) else 0.0


# The defaults are stated once, on the dataclasses; these tables are read from them.
INSTANCE_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(InstanceConfig) if f.default not in (MISSING, None)
}


SECRET_FIELDS = ("password", "client_secret", "proxy_password")


SECRET_KEYS = {base + kind for base in SECRET_FIELDS for kind in SECRET_KINDS}


def distinct_platform(name: str) -> str:
    """A platform of its own for instance `name`, like sugard_prod (Sugar's platform rule)."""
    return ("sugard_" + re.sub(r"[^a-z0-9_-]", "_", name.lower()))[:127]


def session_identity(url: object, username: object, platform: object) -> tuple[str, ...] | None:
    """What Sugar keeps one session per: the site, the user (whatever the client) and the
    platform; user and host names ignore case. None unless all three are known strings."""
    if not (isinstance(url, str) and isinstance(username, str) and isinstance(platform, str)):
        return None
    if not url or not username:
        return None
    scheme, _, rest = url.rstrip("/").partition("://")
    host, slash, tail = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{tail}", username.casefold(), platform


def _duplicate_sessions(
    instances: Mapping[str, InstanceConfig], problem: Callable[[str, str], None]
) -> None:
    seen: dict[tuple[str, ...], InstanceConfig] = {}
    for instance in instances.values():
        identity = session_identity(instance.url, instance.username, instance.platform)
        first = seen.setdefault(identity, instance) if identity else instance
        if first is instance:
            continue
        suggestion = distinct_platform(instance.name)
        problem(
            f"instances.{instance.name}.platform",
            f"instances {first.name} and {instance.name} log in as {instance.username} "
            f"at {instance.url} on the same platform {instance.platform!r}: Sugar keeps "
            "one session per user and platform, so each would log the other out, forever; "
            f'give one a platform of its own, like platform = "{suggestion}" '
            "(register it in Sugar: Admin > Configure API Platforms)",
        )


def _shared_listen_addresses(
    instances: Iterable[InstanceConfig], problem: Callable[[str, str], None]
) -> None:
    """Two instances cannot serve one address (port 0 picks a free port for each)."""
    first: dict[str, str] = {}
    for instance in instances:
        address = instance.listen
        if address is None or address.endswith(":0"):
            continue
        if address in first:
            problem(
                f"instances.{instance.name}.listen",
                f"{address} is already the listen address of instance {first[address]}",
            )
        first.setdefault(address, instance.name)


INSTANCE_KEYS_HELP = (
    "instance keys are url, username, password (or password_file, _env, _command, "
    "_credential), client_id, client_secret (same sources), platform, api_version, timeout, "
    "verify_tls, ca_file, proxy, proxy_username, proxy_password (same sources), refresh_before, "
    "backoff_max, old_token_grace, probe_interval, allowed_uids, allowed_gids, listen, "
    "proxy_connections, proxy_timeout, on_event, fleet, sudo, rate_limit and rate_wait"
)


def _valid_instance_keys(
    table: Mapping[str, Any], where: str, problem: Callable[[str, str], None]
) -> dict[str, Any]:
    """`table` without its unknown keys and bad values (each one a problem); the secret keys
    are kept as they are, for `secret_ref` to judge."""
    valid: dict[str, Any] = {}
    for key, value in table.items():
        if key in SECRET_KEYS:
            valid[key] = value
            continue
        checker = INSTANCE_SCHEMA.get(key)
        if key == "listen" and where == "defaults":
            problem(f"{where}.listen", "one address per instance: set it in [instances.NAME]")
            continue
        if checker is None:
            hint = did_you_mean(key, [*INSTANCE_SCHEMA, *sorted(SECRET_KEYS)])
            if not hint and key.startswith("password"):
                hint = " (did you mean password_file?)"
            if not hint and isinstance(value, dict) and where.startswith("instances."):
                # TOML reads [instances.crm.eu] as table eu inside instance crm.
                dotted = json.dumps(f"{where.removeprefix('instances.')}.{key}")
                hint = f"; a name with a dot must be quoted: [instances.{dotted}]"
            problem(f"{where}.{shown_key(key)}", f"unknown key{hint or '; ' + INSTANCE_KEYS_HELP}")
            continue
        try:
            valid[key] = checker(value)
        except ValueError as exc:
            problem(f"{where}.{key}", str(exc))
    return valid


def _build_instance(
    name: str,
    defaults: Mapping[str, Any],
    table: Mapping[str, Any],
    given: set[str],
    where: str,
    problem: Callable[[str, str], None],
    base_dir: Path,
) -> InstanceConfig:
    """The instance from valid keys; what is missing is a problem, and empty in the result."""
    values: dict[str, Any] = dict(INSTANCE_DEFAULTS)
    for source in (defaults, table):
        values.update((k, v) for k, v in source.items() if k not in SECRET_KEYS)
    for required in ("url", "username"):
        if required not in given:
            problem(f"{where}.{required}", "missing; every instance needs url and username")
        values.setdefault(required, "")
    secrets: dict[str, Any] = {}
    for base in SECRET_FIELDS:
        ref = secret_ref(base, table, where, problem)
        if ref is None:
            ref = secret_ref(base, defaults, "defaults", problem)
        if ref is None and base == "proxy_password":
            continue  # no proxy credentials
        if ref is None and base == "password":
            problem(
                f"{where}.password_file",
                "missing; give the password as one of password_file, password_env, "
                "password_command, password_credential or password",
            )
        if not ref:
            ref = SecretRef("inline", "", Secret(""))
        secrets[base] = ref
    if ("proxy_password" in secrets) != ("proxy_username" in values):
        present, missing = (
            ("proxy_password", "proxy_username")
            if "proxy_password" in secrets
            else ("proxy_username", "proxy_password_file")
        )
        problem(
            f"{where}.{missing}",
            f"missing; {present} needs it: the proxy's credentials are proxy_username and "
            "proxy_password (or proxy_password_file, _env, _command, _credential)",
        )
    if "rate_limit" not in defaults and "rate_limit" not in table:
        values["rate_limit"] = effective_rate_limit(values.get("url"))
    if "ca_file" in values:
        # Like password_file: relative to the config, not to wherever the daemon was started.
        values["ca_file"] = str(resolve_path(values["ca_file"], base_dir))
    return InstanceConfig(name=name, **values, **secrets)


def parse_instances(
    data: Mapping[str, Any], problem: Callable[[str, str], None], base_dir: Path
) -> dict[str, InstanceConfig]:
    """Each valid `[instances.NAME]` with `[defaults]` merged in; a problem for every slip, and
    for two instances that would share a Sugar session or a listen address."""
    defaults_raw = table_of(data, "defaults", problem)
    defaults = _valid_instance_keys(defaults_raw, "defaults", problem)

    instances_raw = table_of(data, "instances", problem)
    instances: dict[str, InstanceConfig] = {}
    for name, table in instances_raw.items():
        where = f"instances.{shown_key(name)}"
        if not INSTANCE_NAME.fullmatch(name):
            problem(
                where,
                f"bad instance name: {INSTANCE_NAME_RULE}",
            )
            continue
        if not isinstance(table, dict):
            problem(
                where,
                f"must be a table, not {type_name(table)}; "
                f"each instance is a table of its own: [instances.NAME]",
            )
            continue
        if any(isinstance(v, dict) and k not in INSTANCE_SCHEMA for k, v in table.items()):
            # [instances.crm.eu]: one slip, said once, not again as a missing url and password.
            _valid_instance_keys(table, where, problem)
            continue
        given = {*defaults_raw, *table}  # a required key given but wrong is not also missing
        table = _valid_instance_keys(table, where, problem)
        instances[name] = _build_instance(name, defaults, table, given, where, problem, base_dir)
    _duplicate_sessions(instances, problem)
    _shared_listen_addresses(instances.values(), problem)
    return instances
