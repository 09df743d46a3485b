"""`[fleet]`: where the shared sessions live (Redis), the key that seals them, and the lease.

Its own module because only fleet mode reads it: `config` calls `parse_fleet` and
`resolve_fleet_secrets` for the table, and `sugard.fleet` takes the `FleetConfig` it makes.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sugard.config.sources import SECRET_KINDS, SecretRef, read_secret, resolve_path
from sugard.config.values import (
    PLAIN_KEY,
    boolean,
    did_you_mean,
    file_path,
    nonempty,
    number,
    secret_ref,
    shown_key,
    string,
    table_of,
)
from sugard.secret import Secret

__all__ = [
    "FLEET_SECRETS",
    "LEASE_MARGIN",
    "FleetConfig",
    "decode_fleet_key",
    "minimum_lease",
    "parse_fleet",
    "resolve_fleet_secrets",
]


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


def _redis_url(v: Any) -> str:
    s = nonempty(v)
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
    s = string(v)
    if not PLAIN_KEY.fullmatch(s) or len(s) > 64:
        raise ValueError(f"must be 1-64 of A-Z, a-z, 0-9, '_', '.' and '-', not {s!r}")
    return s


FLEET_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "redis_url": _redis_url,
    "prefix": _prefix,
    "lease": number(2, 3600),
    "timeout": number(0.05, 60),
    "verify_tls": boolean,
    "ca_file": file_path,
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


FLEET_KEYS_HELP = (
    "[fleet] keys are redis_url, key_file (or key, key_env, key_command, key_credential), "
    "redis_password_file (same sources), prefix, lease, timeout, verify_tls and ca_file"
)


FLEET_LIBRARIES = ("redis", "cryptography")  # the [fleet] extra's


def missing_fleet_libraries() -> list[str]:
    """The fleet extra's libraries this install lacks (looked up without importing them)."""
    return [name for name in FLEET_LIBRARIES if not _installed(name)]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it; sys.modules[name] = None
        return False


def parse_fleet(
    data: Mapping[str, Any], problem: Callable[[str, str], None], base_dir: Path
) -> FleetConfig | None:
    missing = missing_fleet_libraries()
    if missing:
        problem(
            "fleet",
            f"fleet mode needs {' and '.join(missing)}, not installed here: "
            "pip install 'sugard[fleet]' (or pipx install 'sugard[fleet]')",
        )
        return None
    table = table_of(data, "fleet", problem)
    values: dict[str, Any] = {}
    ok = True
    for key, value in table.items():
        if key in FLEET_SECRET_KEYS:
            continue
        checker = FLEET_SCHEMA.get(key)
        if checker is None:
            hint = did_you_mean(key, [*FLEET_SCHEMA, *sorted(FLEET_SECRET_KEYS)])
            problem(f"fleet.{shown_key(key)}", f"unknown key{hint or '; ' + FLEET_KEYS_HELP}")
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
    shared_key = secret_ref("key", table, "fleet", problem)
    if shared_key is None:
        problem(
            "fleet.key_file",
            "missing; give the shared key as one of key_file, key_env, key_command, "
            "key_credential or key (make one with: sugard init --fleet-key FILE)",
        )
    password = secret_ref("redis_password", table, "fleet", problem)
    if not ok or shared_key is None or shared_key is False or password is False:
        return None
    if "ca_file" in values:
        values["ca_file"] = str(resolve_path(values["ca_file"], base_dir))
    return FleetConfig(key=shared_key, redis_password=password, **values)


def resolve_fleet_secrets(
    fleet: FleetConfig,
    base_dir: Path,
    env: Mapping[str, str],
    problem: Callable[[str, str], None],
) -> FleetConfig:
    """`fleet` with its Redis password and shared key read; a problem for each that fails."""
    fleet_secrets: dict[str, Any] = {}
    for base in FLEET_SECRETS:
        ref = getattr(fleet, base)
        if ref is None:
            continue
        key = f"fleet.{base}" + ("" if ref.kind == "inline" else f"_{ref.kind}")
        try:
            value = read_secret(ref, env, base_dir)
            if base == "key":
                decode_fleet_key(value)
        except ValueError as exc:
            problem(key, str(exc))
            continue
        fleet_secrets[base] = replace(ref, value=Secret(value))
    return replace(fleet, **fleet_secrets)
