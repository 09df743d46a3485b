"""The TOML config: parsed into frozen dataclasses, validated, secrets resolved, diffed.

Every problem is collected (not just the first) and named as `file: table.key: message`,
so one `sugard check` run shows everything there is to fix.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import json
import os
import re
import shlex
import ssl
import stat
import subprocess
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from .errors import DaemonError
from .secret import Secret
from .wire import INSTANCE_NAME_PATTERN, INSTANCE_NAME_RULE

__all__ = [
    "DAEMON_DEFAULTS",
    "GRACE_AUTO",
    "INSTANCE_DEFAULTS",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "DaemonConfig",
    "FleetConfig",
    "InstanceConfig",
    "Problem",
    "SecretRef",
    "audit_config",
    "decode_fleet_key",
    "diff_configs",
    "distinct_platform",
    "effective_config",
    "load_config",
    "parse_config",
    "read_config",
    "resolve_instance_secrets",
    "resolve_secrets",
    "secret_file_problem",
    "session_identity",
    "split_host_port",
]

# Used with fullmatch: `$` would also match before a trailing newline ("prod\n").
INSTANCE_NAME = re.compile(INSTANCE_NAME_PATTERN)
PLATFORM_NAME = re.compile(r"[a-z0-9_-]{1,127}")
PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+")
LOG_LEVELS = ("debug", "info", "warning", "error")
SECRET_KINDS = ("", "_file", "_env", "_command", "_credential")
SECRET_FIELDS = ("password", "client_secret", "proxy_password")
SECRET_COMMAND_TIMEOUT = 15.0
DIRECT = "none"  # the `proxy` value that means: no proxy, whatever the environment says


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
class SecretRef:
    """Where a secret comes from, and, once resolved, its value.

    `kind` is `inline`, `file`, `env`, `command` or `credential`; `ref` is the path, variable,
    command or credential name (empty for inline). `value` stays None until resolved.
    """

    kind: str
    ref: str | tuple[str, ...] = ""
    value: Secret | None = None

    def describe(self) -> str:
        """Where the secret comes from, for humans (never the secret itself)."""
        if self.kind == "inline":
            return "inline"
        ref = shlex.join(self.ref) if isinstance(self.ref, tuple) else self.ref
        return f"{self.kind}: {ref}"

    def reveal(self) -> str:
        if self.value is None:
            raise RuntimeError("secret was not resolved")
        return self.value.reveal()


GRACE_AUTO: Final = "auto"  # old_token_grace: learn it from Sugar's version


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
class FleetConfig:
    """`[fleet]`: where the shared sessions live (Redis) and the key that seals them."""

    redis_url: str
    key: SecretRef
    redis_password: SecretRef | None = None
    prefix: str = "sugard"
    lease: float = 30.0
    timeout: float = 2.0  # seconds per Redis command
    verify_tls: bool = True
    ca_file: str | None = None


@dataclass(frozen=True)
class Config:
    path: str
    daemon: DaemonConfig
    instances: Mapping[str, InstanceConfig]
    fleet: FleetConfig | None = None


# Schema: key -> (checker, default). A checker returns the normalized value or raises ValueError
# with a message that says what a valid value looks like.


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, not {_tname(v)}")
    return v


def _nonempty(v: Any) -> str:
    s = _str(v)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def _unquote_hint(v: Any) -> str:
    """TOML's commonest slip: a number or boolean written in quotes."""
    if isinstance(v, str):
        text = v.strip()
        if text in ("true", "false"):
            return f"; write {text} without quotes"
        try:
            float(text)
        except ValueError:
            return ""
        return f"; write {text} without quotes"
    return ""


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {_tname(v)}{_unquote_hint(v)}")
    return v


def _number(low: float, high: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"must be a number, not {_tname(v)}{_unquote_hint(v)}")
        if not low <= v <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, not {v:g}")
        return float(v)

    return check


def _int(low: int, high: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer, not {_tname(v)}{_unquote_hint(v)}")
        if not low <= v <= high:
            raise ValueError(f"must be between {low} and {high}, not {v}")
        return v

    return check


def _ids(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v
    ):
        raise ValueError("must be a list of numeric ids, like [1000, 1001]")
    return tuple(v)


def _url(v: Any) -> str:
    s = _nonempty(v).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", s):
        raise ValueError(f"must start with https:// (or http://), not {s!r}")
    if any(c.isspace() or not c.isprintable() for c in s):
        raise ValueError(f"must not contain spaces or control characters, not {s!r}")
    if "/rest/v" in s:
        raise ValueError("give the site root (like https://crm.example.com), without /rest/v10")
    return s


def _platform(v: Any) -> str:
    s = _str(v)
    if not PLATFORM_NAME.fullmatch(s):
        like = re.sub(r"[^a-z0-9_-]+", "_", s.lower()).strip("_")[:127] or "sugard"
        raise ValueError(
            f"{s!r} is not a valid platform name: use 1-127 of a-z, 0-9, '_' and '-', "
            f"like {like!r} (and register it in Sugar: Admin > Configure API Platforms)"
        )
    return s


def _log_level(v: Any) -> str:
    s = _str(v).lower()
    if s not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {v!r}")
    return s


def _optional_path(v: Any) -> str:
    return _nonempty(v)


def _proxy(v: Any) -> str:
    s = _str(v).strip()
    if s.lower() in ("", DIRECT):
        return DIRECT
    if "@" in s:  # never echoed: it may hold the proxy's password
        raise ValueError(
            "must not hold credentials: give the user as proxy_username and the password as "
            "proxy_password_file (or proxy_password_env, _command, _credential)"
        )
    if not re.fullmatch(r"http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?/?", s):
        raise ValueError(
            f'must be an http:// proxy URL like "http://proxy.example:3128" (https sites are '
            f'tunnelled through it), or "none" to connect directly; not {s!r}'
        )
    return s.rstrip("/")


def _proxy_username(v: Any) -> str:
    s = _nonempty(v)
    if ":" in s:
        raise ValueError("must not contain ':' (HTTP Basic authentication cannot carry it)")
    return s


def _grace(v: Any) -> float | Literal["auto"]:
    if v == GRACE_AUTO:
        return GRACE_AUTO
    try:
        return _number(0, 86400)(v)
    except ValueError as exc:
        raise ValueError(f'must be "auto" or seconds; {exc}') from None


def _listen(v: Any) -> str:
    """A loopback "HOST:PORT" for the proxy: other addresses would serve the token beyond
    this machine's users, whom only loopback lets sugard tell apart."""
    s = _nonempty(v).strip()
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'must be HOST:PORT, like "127.0.0.1:8401", not {s!r}')
    try:
        loopback = ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback or (":" in host and not host.startswith("[")):
        raise ValueError(
            f"must be a loopback address (127.0.0.0/8, or [::1]) and a port, like "
            f'"127.0.0.1:8401", not {s!r}: sugard serves only peers on this machine'
        )
    return s


def _argv(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v) or not v[0]:
        raise ValueError('must be a list of a command and its arguments, like ["notify", "-u"]')
    return tuple(v)


def split_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9101` for IPv6; an empty HOST is every address) as (host, port)."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f'must be "HOST:PORT" with a port of 0-65535, like "127.0.0.1:9101", not {text!r}'
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'an IPv6 address needs brackets, like "[::1]:9101", not {text!r}')
    if any(c.isspace() or c in "[]/" for c in host):
        raise ValueError(f"must be a host name or address and a port, not {text!r}")
    return host, int(port)


def _host_port(v: Any) -> str:
    split_host_port(_nonempty(v))
    return str(v)


INSTANCE_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "url": _url,
    "username": _nonempty,
    "client_id": _nonempty,
    "platform": _platform,
    "timeout": _number(0.1, 300),
    "verify_tls": _bool,
    "ca_file": _optional_path,
    "proxy": _proxy,
    "proxy_username": _proxy_username,
    "refresh_before": _number(0, 86400),
    "backoff_max": _number(0.01, 86400),
    "old_token_grace": _grace,
    "probe_interval": _number(0, 86400),
    "allowed_uids": _ids,
    "allowed_gids": _ids,
    "listen": _listen,
    "proxy_connections": _int(1, 1024),
    "proxy_timeout": _number(1, 86400),
    "on_event": _argv,
    "fleet": _bool,
}
INSTANCE_DEFAULTS: dict[str, Any] = {
    "client_id": "sugar",
    "platform": "sugard",
    "timeout": 10.0,
    "verify_tls": True,
    "refresh_before": 300.0,
    "backoff_max": 300.0,
    "old_token_grace": GRACE_AUTO,
    "probe_interval": 60.0,
}
DAEMON_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "socket": _optional_path,
    "log_level": _log_level,
    "max_parallel_logins": _int(1, 1000),
    "shutdown_grace": _number(0, 600),
    "allowed_uids": _ids,
    "allowed_gids": _ids,
    "metrics_listen": _host_port,
}
DAEMON_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in fields(DaemonConfig)
    if f.name not in ("allowed_uids", "allowed_gids")
}
SECRET_KEYS = {base + kind for base in SECRET_FIELDS for kind in SECRET_KINDS}


def _redis_url(v: Any) -> str:
    s = _nonempty(v)
    parts = urlsplit(s)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"must start with redis://, rediss:// (TLS) or unix:///path, not {s!r}")
    if parts.password is not None:
        raise ValueError(
            "holds a password: put it in redis_password_file (or _env, _command, "
            "_credential) instead, so it never shows in the config or a log"
        )
    if parts.scheme == "unix" and not parts.path.startswith("/"):
        raise ValueError("a unix socket needs an absolute path, like unix:///run/redis.sock")
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"names no host, like redis://redis.internal:6379/0, not {s!r}")
    return s


def _prefix(v: Any) -> str:
    s = _str(v)
    if not PLAIN_KEY.fullmatch(s) or len(s) > 64:
        raise ValueError(f"must be 1-64 of A-Z, a-z, 0-9, '_', '.' and '-', not {s!r}")
    return s


FLEET_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "redis_url": _redis_url,
    "prefix": _prefix,
    "lease": _number(2, 3600),
    "timeout": _number(0.05, 60),
    "verify_tls": _bool,
    "ca_file": _optional_path,
}
FLEET_SECRETS = ("key", "redis_password")
FLEET_SECRET_KEYS = {base + kind for base in FLEET_SECRETS for kind in SECRET_KINDS}
LEASE_MARGIN = 1.0  # seconds, for clock rates and scheduling on top of the timeouts


def minimum_lease(fleet: FleetConfig, instance_timeout: float) -> float:
    """The shortest lease in which a leader can finish a Sugar call, store its answer and
    renew: 2 x the upstream timeout + 2 x the Redis timeout + a margin."""
    return 2 * instance_timeout + 2 * fleet.timeout + LEASE_MARGIN


def decode_fleet_key(text: str) -> bytes:
    """The shared fleet key from its one-line form: 32 random bytes in base64."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValueError(
            "is not a fleet key (32 random bytes in base64 on one line); make one with "
            "`sugard init --fleet-key FILE` and copy that file to every host"
        )
    return key


def _tname(v: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)


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
        return None, [Problem(str(path), "", f"invalid TOML: {exc}")]
    config, problems = _parse(data, str(path))
    problems += _check_file_mode(path, config)
    if resolve:
        env = os.environ if environ is None else environ
        instances = dict(config.instances)
        for name, instance in instances.items():
            try:
                instances[name] = resolve_instance_secrets(instance, config.path, env)
            except ConfigError as exc:
                problems += exc.problems
        fleet, fleet_problems = _resolve_fleet_secrets(config, env)
        problems += fleet_problems
        config = replace(config, instances=instances, fleet=fleet)
    return config, list(dict.fromkeys(problems))


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
    if inline and mode & 0o077:
        return [
            Problem(
                str(path),
                inline[0],
                f"holds an inline secret but the file is readable by others "
                f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}",
            )
        ]
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
                _key(key),
                "unknown table or key"
                + _did_you_mean(key, ("daemon", "defaults", "instances", "fleet"))
                + "; expected [daemon], [defaults] and [instances.NAME]",
            )

    daemon_raw = _table(data, "daemon", problem)
    daemon_values: dict[str, Any] = {}
    for key, value in daemon_raw.items():
        checker = DAEMON_SCHEMA.get(key)
        if checker is None:
            problem(
                f"daemon.{_key(key)}",
                f"unknown key{_did_you_mean(key, DAEMON_SCHEMA)}; "
                f"[daemon] keys are {', '.join(DAEMON_SCHEMA)}",
            )
            continue
        try:
            daemon_values[key] = checker(value)
        except ValueError as exc:
            problem(f"daemon.{key}", str(exc))
    daemon = DaemonConfig(**daemon_values)

    defaults_raw = _table(data, "defaults", problem)
    defaults = _valid_instance_keys(defaults_raw, "defaults", problem)
    base_dir = Path(path).parent

    instances_raw = _table(data, "instances", problem)
    instances: dict[str, InstanceConfig] = {}
    if not instances_raw and not problems:
        problem("instances", "no instances configured; add an [instances.NAME] table")
    for name, table in instances_raw.items():
        where = f"instances.{_key(name)}"
        if not INSTANCE_NAME.fullmatch(name):
            problem(
                where,
                f"bad instance name: {INSTANCE_NAME_RULE}",
            )
            continue
        if not isinstance(table, dict):
            problem(
                where,
                f"must be a table, not {_tname(table)}; "
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
    problems += _duplicate_sessions(path, instances)
    problems += _shared_listen_addresses(instances.values(), path)
    fleet = _parse_fleet(data, problem, Path(path).parent) if "fleet" in data else None
    if fleet is not None:
        _check_lease(fleet, instances, problem)
    # A bad secret in [defaults] is met once per instance; say it once.
    config = Config(path=path, daemon=daemon, instances=instances, fleet=fleet)
    return config, list(dict.fromkeys(problems))


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


def _duplicate_sessions(path: str, instances: Mapping[str, InstanceConfig]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[tuple[str, ...], InstanceConfig] = {}
    for instance in instances.values():
        identity = session_identity(instance.url, instance.username, instance.platform)
        first = seen.setdefault(identity, instance) if identity else instance
        if first is instance:
            continue
        suggestion = distinct_platform(instance.name)
        problems.append(
            Problem(
                path,
                f"instances.{instance.name}.platform",
                f"instances {first.name} and {instance.name} log in as {instance.username} "
                f"at {instance.url} on the same platform {instance.platform!r}: Sugar keeps "
                "one session per user and platform, so each would log the other out, forever; "
                f'give one a platform of its own, like platform = "{suggestion}" '
                "(register it in Sugar: Admin > Configure API Platforms)",
            )
        )
    return problems


def _shared_listen_addresses(instances: Iterable[InstanceConfig], path: str) -> list[Problem]:
    """Two instances cannot serve one address (port 0 picks a free port for each)."""
    first: dict[str, str] = {}
    problems = []
    for instance in instances:
        address = instance.listen
        if address is None or address.endswith(":0"):
            continue
        if address in first:
            problems.append(
                Problem(
                    path,
                    f"instances.{instance.name}.listen",
                    f"{address} is already the listen address of instance {first[address]}",
                )
            )
        first.setdefault(address, instance.name)
    return problems


FLEET_KEYS_HELP = (
    "[fleet] keys are redis_url, key_file (or key, key_env, key_command, key_credential), "
    "redis_password_file (same sources), prefix, lease, timeout, verify_tls and ca_file"
)


def _parse_fleet(
    data: Mapping[str, Any], problem: Callable[[str, str], None], base_dir: Path
) -> FleetConfig | None:
    table = _table(data, "fleet", problem)
    values: dict[str, Any] = {}
    ok = True
    for key, value in table.items():
        if key in FLEET_SECRET_KEYS:
            continue
        checker = FLEET_SCHEMA.get(key)
        if checker is None:
            hint = _did_you_mean(key, [*FLEET_SCHEMA, *sorted(FLEET_SECRET_KEYS)])
            problem(f"fleet.{_key(key)}", f"unknown key{hint or '; ' + FLEET_KEYS_HELP}")
            ok = False
            continue
        try:
            values[key] = checker(value)
        except ValueError as exc:
            problem(f"fleet.{key}", str(exc))
            ok = False
    if "redis_url" not in values and "redis_url" not in table:
        problem(
            "fleet.redis_url", "missing; say where Redis is, like redis://redis.internal:6379/0"
        )
        ok = False
    shared_key = _secret_ref("key", table, "fleet", problem)
    if shared_key is None:
        problem(
            "fleet.key_file",
            "missing; give the shared key as one of key_file, key_env, key_command, "
            "key_credential or key (make one with: sugard init --fleet-key FILE)",
        )
    password = _secret_ref("redis_password", table, "fleet", problem)
    if not ok or shared_key is None or shared_key is False or password is False:
        return None
    if "ca_file" in values:
        values["ca_file"] = str(_resolve_path(values["ca_file"], base_dir))
    return FleetConfig(key=shared_key, redis_password=password, **values)


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


INSTANCE_KEYS_HELP = (
    "instance keys are url, username, password (or password_file, _env, _command, "
    "_credential), client_id, client_secret (same sources), platform, timeout, verify_tls, "
    "ca_file, proxy, proxy_username, proxy_password (same sources), refresh_before, "
    "backoff_max, old_token_grace, probe_interval, allowed_uids, allowed_gids, listen, "
    "proxy_connections, proxy_timeout, on_event and fleet"
)


def _key(name: str) -> str:
    """A key as written in a problem: bare if it is plain, else quoted and escaped as TOML
    writes it, so a newline or a space in a key cannot break or blur the one-line message."""
    return name if PLAIN_KEY.fullmatch(name) else json.dumps(name)


def _did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key.lower(), list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _table(
    data: Mapping[str, Any], name: str, problem: Callable[[str, str], None]
) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        problem(name, f"must be a table ([{name}]), not {_tname(value)}")
        return {}
    return value


def _valid_instance_keys(
    table: Mapping[str, Any], where: str, problem: Callable[[str, str], None]
) -> dict[str, Any]:
    """`table` without its unknown keys and bad values (each one a problem); the secret keys
    are kept as they are, for `_secret_ref` to judge."""
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
            hint = _did_you_mean(key, [*INSTANCE_SCHEMA, *sorted(SECRET_KEYS)])
            if not hint and key.startswith("password"):
                hint = " (did you mean password_file?)"
            if not hint and isinstance(value, dict) and where.startswith("instances."):
                # TOML reads [instances.crm.eu] as table eu inside instance crm.
                dotted = json.dumps(f"{where.removeprefix('instances.')}.{key}")
                hint = f"; a name with a dot must be quoted: [instances.{dotted}]"
            problem(f"{where}.{_key(key)}", f"unknown key{hint or '; ' + INSTANCE_KEYS_HELP}")
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
        ref = _secret_ref(base, table, where, problem)
        if ref is None:
            ref = _secret_ref(base, defaults, "defaults", problem)
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
    if "ca_file" in values:
        # Like password_file: relative to the config, not to wherever the daemon was started.
        values["ca_file"] = str(_resolve_path(values["ca_file"], base_dir))
    return InstanceConfig(name=name, **values, **secrets)


def _secret_ref(
    base: str, table: Mapping[str, Any], where: str, problem: Callable[[str, str], None]
) -> SecretRef | Literal[False] | None:
    """The one source of secret `base` in `table`; None if there is none, False if it is wrong."""
    given = [base + kind for kind in SECRET_KINDS if base + kind in table]
    if not given:
        return None
    if len(given) > 1:
        problem(f"{where}.{given[1]}", f"give only one of {', '.join(given)}")
        return False
    key = given[0]
    value = table[key]
    kind = key[len(base) + 1 :] or "inline"
    if kind == "command":
        if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
            return SecretRef(kind, tuple(value))
        if isinstance(value, str) and value.strip():
            return SecretRef(kind, value)
        problem(f"{where}.{key}", "must be a shell command string or a list of arguments")
        return False
    if not isinstance(value, str):
        problem(f"{where}.{key}", f"must be a string, not {_tname(value)}")
        return False
    if kind == "inline":
        return SecretRef("inline", "", Secret(value))
    if not value.strip():
        problem(f"{where}.{key}", "must not be empty")
        return False
    if kind == "credential" and "/" in value:
        problem(
            f"{where}.{key}", "is a credential name (as in LoadCredential=NAME:...), not a path"
        )
        return False
    return SecretRef(kind, value)


def resolve_secrets(config: Config, environ: Mapping[str, str] | None = None) -> Config:
    """Read every secret from its source; raise ConfigError naming each one that fails."""
    problems: list[Problem] = []
    instances: dict[str, InstanceConfig] = {}
    for name, instance in config.instances.items():
        try:
            instances[name] = resolve_instance_secrets(instance, config.path, environ)
        except ConfigError as exc:
            problems += exc.problems
    fleet, fleet_problems = _resolve_fleet_secrets(config, environ)
    problems += fleet_problems
    if problems:
        raise ConfigError(problems)
    return replace(config, instances=instances, fleet=fleet)


def _resolve_fleet_secrets(
    config: Config, environ: Mapping[str, str] | None
) -> tuple[FleetConfig | None, list[Problem]]:
    """`[fleet]` with its Redis password and shared key read; the problems of those that fail."""
    fleet = config.fleet
    if fleet is None:
        return None, []
    env = os.environ if environ is None else environ
    problems: list[Problem] = []
    fleet_secrets: dict[str, Any] = {}
    for base in FLEET_SECRETS:
        ref = getattr(fleet, base)
        if ref is None:
            continue
        key = f"fleet.{base}" + ("" if ref.kind == "inline" else f"_{ref.kind}")
        try:
            value = _read_secret(ref, env, Path(config.path).parent)
            if base == "key":
                decode_fleet_key(value)
        except ValueError as exc:
            problems.append(Problem(config.path, key, str(exc)))
            continue
        fleet_secrets[base] = replace(ref, value=Secret(value))
    return replace(fleet, **fleet_secrets), problems


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
            resolved[base] = replace(ref, value=Secret(_read_secret(ref, env, base_dir)))
        except ValueError as exc:
            problems.append(Problem(config_path, key, str(exc)))
    if problems:
        raise ConfigError(problems)
    return replace(instance, **resolved)


def _read_secret(ref: SecretRef, env: Mapping[str, str], base_dir: Path) -> str:
    if ref.kind == "inline":
        return ref.reveal()
    if ref.kind == "env":
        assert isinstance(ref.ref, str)
        if ref.ref not in env:
            raise ValueError(f"environment variable {ref.ref} is not set")
        if not env[ref.ref]:
            raise ValueError(f"environment variable {ref.ref} is empty")
        return env[ref.ref]
    if ref.kind == "file":
        assert isinstance(ref.ref, str)
        return _read_secret_file(_resolve_path(ref.ref, base_dir), check_mode=True)
    if ref.kind == "credential":
        assert isinstance(ref.ref, str)
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError(
                "$CREDENTIALS_DIRECTORY is not set; use LoadCredential= in the systemd unit"
            )
        return _read_secret_file(Path(directory) / ref.ref, check_mode=False)
    if ref.kind == "command":
        return _run_secret_command(ref.ref, env)
    raise ValueError(f"unknown secret source {ref.kind}")


def secret_file_problem(value: str, base_dir: Path) -> str | None:
    """What is wrong with `value` as a password_file (relative to `base_dir`, the config's
    directory, as the daemon reads it), or None if the daemon could use it."""
    try:
        _read_secret_file(_resolve_path(value, base_dir), check_mode=True)
    except ValueError as exc:
        return str(exc)
    return None


def _resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _read_secret_file(path: Path, *, check_mode: bool) -> str:
    try:
        st = path.stat()
        text = path.read_text("utf-8")
    except FileNotFoundError:
        if not check_mode:
            raise ValueError(
                f"credential {path.name} is not in $CREDENTIALS_DIRECTORY ({path.parent}); "
                "check LoadCredential= in the systemd unit"
            ) from None
        raise ValueError(
            f"file {path} does not exist; create it with the secret on one line "
            f"(chmod 600 {path}), or fix the path"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if check_mode and st.st_mode & 0o077:
        raise ValueError(
            f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    secret = text.rstrip("\r\n")
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def _run_secret_command(command: str | tuple[str, ...], env: Mapping[str, str]) -> str:
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    try:
        done = subprocess.run(
            argv,
            capture_output=True,  # stderr is captured and dropped: it may echo the secret
            stdin=subprocess.DEVNULL,
            timeout=SECRET_COMMAND_TIMEOUT,
            env=dict(env),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ValueError(f"command did not finish within {SECRET_COMMAND_TIMEOUT:g} s") from None
    except OSError as exc:
        raise ValueError(f"command cannot run: {exc.strerror}") from None
    if done.returncode != 0:
        why = {
            126: " (not executable)",
            127: " (command not found: check its name, and the daemon's PATH under systemd)",
        }.get(done.returncode, "")
        raise ValueError(f"command exited with status {done.returncode}{why}")
    secret = done.stdout.decode("utf-8", "replace").rstrip("\r\n")
    if not secret:
        raise ValueError("command printed nothing")
    return secret


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


def effective_config(config: Config) -> dict[str, Any]:
    """The config with defaults merged into each instance; every secret shown as `***` with
    where it comes from. Ready for tomli-w or json."""
    daemon = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in vars(config.daemon).items()
        if v is not None and v != ()
    }
    base_dir = Path(config.path).parent
    instances = {name: _shown(i, base_dir) for name, i in config.instances.items()}
    shown: dict[str, Any] = {"daemon": daemon, "instances": instances}
    if config.fleet is not None:
        shown["fleet"] = _shown(config.fleet, base_dir)
    return shown


def _shown(item: InstanceConfig | FleetConfig, base_dir: Path) -> dict[str, Any]:
    """One table of `effective_config`: secrets as `***` and where they come from."""
    table: dict[str, Any] = {}
    for f in fields(item):
        value = getattr(item, f.name)
        if f.name == "name" or value is None:
            continue
        if isinstance(value, SecretRef):
            if value.kind == "file" and isinstance(value.ref, str):
                # The path sugard reads, not the one written: relative ones confuse.
                value = replace(value, ref=str(_resolve_path(value.ref, base_dir)))
            value = "(empty)" if _is_empty_inline(value) else f"*** ({value.describe()})"
        elif isinstance(value, tuple):
            value = list(value)
        table[f.name] = value
    return table


def _is_empty_inline(ref: SecretRef) -> bool:
    return ref.kind == "inline" and ref.value is not None and not ref.value


BUILTIN_PLATFORMS = ("base", "mobile", "portal")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def audit_config(config: Config) -> tuple[list[Problem], list[Problem]]:
    """What `sugard check` reports beyond what `load_config` refuses: (problems, warnings).

    The daemon starts despite these, so that a stricter check never breaks a running setup;
    `sugard check` makes them visible so they get fixed. Secrets are looked at, never shown.
    """
    problems: list[Problem] = []
    warnings: list[Problem] = []
    path = Path(config.path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0
    if mode & 0o022:
        problems.append(
            Problem(
                config.path,
                "",
                f"is writable by others (mode {mode:04o}): whoever can edit it can make sugard "
                f"run a password_command or send the password elsewhere; run: chmod 600 {path}",
            )
        )
    for name, instance in config.instances.items():
        where = f"instances.{name}"
        if instance.ca_file:
            message = _ca_file_problem(instance.ca_file)
            if message:
                problems.append(Problem(config.path, f"{where}.ca_file", message))
        secret = instance.client_secret
        if instance.client_id == "sugar" and secret.value and not _is_empty_inline(secret):
            suffix = "" if secret.kind == "inline" else f"_{secret.kind}"
            problems.append(
                Problem(
                    config.path,
                    f"{where}.client_secret{suffix}",
                    "the built-in client 'sugar' has an empty secret and Sugar refuses any "
                    "other; remove the client secret, or set client_id to your own OAuth key",
                )
            )
        if instance.platform in BUILTIN_PLATFORMS:
            warnings.append(
                Problem(
                    config.path,
                    f"{where}.platform",
                    f"warning: {instance.platform!r} is one of Sugar's own platforms: each login "
                    f"of sugard logs {instance.username} out of it everywhere else (one session "
                    "per user and platform); register a platform for sugard, like sugard",
                )
            )
        host = instance.url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if instance.url.startswith("http://") and host not in LOOPBACK_HOSTS:
            warnings.append(
                Problem(
                    config.path,
                    f"{where}.url",
                    "warning: http:// sends the password unencrypted; use https://",
                )
            )
        if not instance.verify_tls:
            warnings.append(
                Problem(
                    config.path,
                    f"{where}.verify_tls",
                    "warning: TLS verification is off, so anyone on the way can pose as the "
                    "site and read the password; set ca_file for a private CA instead",
                )
            )
    return problems, warnings


def _ca_file_problem(ca_file: str) -> str:
    try:
        ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        return (
            f"file {ca_file} does not exist; give the PEM file of the CA that signed the "
            "site's certificate"
        )
    except ssl.SSLError:
        return f"{ca_file} holds no usable PEM certificate; give the CA certificate in PEM form"
    except OSError as exc:
        return f"cannot read {ca_file}: {exc.strerror}"
    return ""
