"""`[fleet]` in the config, `sugard init --fleet-key`, and `sugard check [--online]` with a
fleet: one-line `file: table.key: message` errors, keys of the one form, nothing secret shown."""

from __future__ import annotations

import base64
import json
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from support.daemon import SUGARD
from support.redis_server import RedisServer

from sugard.config import ConfigError, decode_fleet_key, load_config

INSTANCE = {"url": "https://crm.example.com", "username": "alice", "password": "pw"}


def write(directory: Path, fleet_table: dict[str, Any] | None, **instance: Any) -> Path:
    document: dict[str, Any] = {"instances": {"prod": {**INSTANCE, **instance}}}
    if fleet_table is not None:
        document["fleet"] = fleet_table
    path = directory / "config.toml"
    path.write_text(tomli_w.dumps(document))
    path.chmod(0o600)
    return path


def new_key(directory: Path, name: str = "fleet.key") -> Path:
    path = directory / name
    done = run("init", "--fleet-key", str(path))
    assert 0 == done.returncode, done.stderr
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SUGARD, *args], capture_output=True, text=True, timeout=60, check=False, stdin=None
    )


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    return [str(p) for p in caught.value.problems]


def test_init_fleet_key_writes_32_random_bytes_in_base64_mode_0600(tmp_path: Path) -> None:
    """One line of base64 for 32 bytes, mode 0600, a new key each time, and never over an
    existing file without --force."""
    first = new_key(tmp_path, "a.key")
    second = new_key(tmp_path, "b.key")
    text = first.read_text()
    assert text.endswith("\n") and 1 == text.count("\n")
    assert 32 == len(base64.b64decode(text.strip(), validate=True))
    assert 0o600 == stat.S_IMODE(first.stat().st_mode)
    assert text != second.read_text()
    again = run("init", "--fleet-key", str(first))
    assert 1 == again.returncode
    assert f"sugard init: {first} exists; use --force" in again.stderr
    assert text == first.read_text()
    assert 0 == run("init", "--fleet-key", str(first), "--force").returncode
    assert text != first.read_text()


def test_a_fleet_config_loads_with_its_defaults(tmp_path: Path) -> None:
    """redis_url and a key file are enough: prefix sugard, lease 30, timeout 2, TLS verified;
    an instance shares by default and `fleet = false` keeps it local."""
    key = new_key(tmp_path)
    table = {"redis_url": "redis://redis.internal:6379/0", "key_file": str(key)}
    config = load_config(write(tmp_path, table), environ={})
    assert config.fleet is not None
    assert ("sugard", 30.0, 2.0, True) == (
        config.fleet.prefix,
        config.fleet.lease,
        config.fleet.timeout,
        config.fleet.verify_tls,
    )
    assert 32 == len(decode_fleet_key(config.fleet.key.reveal()))
    assert config.instances["prod"].fleet
    local = load_config(write(tmp_path, {**table, "lease": 2}, fleet=False), environ={})
    assert local.fleet is not None and not local.instances["prod"].fleet


@pytest.mark.parametrize(
    ("fleet", "expected"),
    [
        (
            {"redis_url": "http://redis:6379"},
            "fleet.redis_url: must start with redis://, rediss:// (TLS) or unix:///path, "
            "not 'http://redis:6379'",
        ),
        (
            {"redis_url": "redis://:hunter2@redis:6379"},
            "fleet.redis_url: holds a password: put it in redis_password_file (or _env, "
            "_command, _credential) instead, so it never shows in the config or a log",
        ),
        (
            {"redis_url": "unix://relative.sock"},
            "fleet.redis_url: a unix socket needs an absolute path, like unix:///run/redis.sock",
        ),
        ({"redis_url": "redis://r", "prefix": "a b"}, "fleet.prefix: must be 1-64 of A-Z"),
        ({"redis_url": "redis://r", "leese": 30}, "fleet.leese: unknown key (did you mean lease?)"),
        ({}, "fleet.redis_url: missing; say where Redis is"),
    ],
)
def test_a_bad_fleet_table_is_a_one_line_error_naming_the_key(
    tmp_path: Path, fleet: dict[str, Any], expected: str
) -> None:
    """Each mistake in [fleet] is reported as `file: fleet.key: what to do`, on one line."""
    fleet.setdefault("key_file", str(new_key(tmp_path)))
    path = write(tmp_path, fleet)
    found = problems(path)
    assert any(p.startswith(f"{path}: {expected}") for p in found), found
    assert all("\n" not in p and "hunter2" not in p for p in found)


def test_a_missing_key_says_how_to_make_one(tmp_path: Path) -> None:
    """No key source at all: the error names key_file and `sugard init --fleet-key`."""
    path = write(tmp_path, {"redis_url": "redis://r"})
    assert [
        f"{path}: fleet.key_file: missing; give the shared key as one of key_file, key_env, "
        "key_command, key_credential or key (make one with: sugard init --fleet-key FILE)"
    ] == problems(path)


@pytest.mark.parametrize(
    "text", ["not base64 at all!", base64.b64encode(b"short").decode(), "", "  "]
)
def test_a_key_of_the_wrong_form_is_refused_from_any_source(tmp_path: Path, text: str) -> None:
    """From a file or a variable, a key that is not 32 bytes in base64 is one clear error
    that does not repeat the key."""
    key = tmp_path / "k"
    key.write_text(text + "\n")
    key.chmod(0o600)
    path = write(tmp_path, {"redis_url": "redis://r", "key_file": str(key)})
    [found] = problems(path)
    assert found.startswith(f"{path}: fleet.key_file: ")
    if text.strip():
        assert "is not a fleet key (32 random bytes in base64 on one line)" in found
        assert text not in found
    path = write(tmp_path, {"redis_url": "redis://r", "key_env": "FLEET_KEY"})
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={"FLEET_KEY": text or "x"})
    assert [f"{path}: fleet.key_env: "] == [
        str(p)[: len(f"{path}: fleet.key_env: ")] for p in caught.value.problems
    ]


def test_a_lease_too_short_for_the_timeouts_says_why(tmp_path: Path) -> None:
    """lease below 2 x the largest instance timeout + 2 x the Redis timeout + 1 s is refused,
    naming the instance and the value to set; an instance kept local does not count."""
    key = str(new_key(tmp_path))
    path = write(tmp_path, {"redis_url": "redis://r", "key_file": key, "lease": 20}, timeout=15)
    assert [
        f"{path}: fleet.lease: must be at least 35 s (2 x instances.prod.timeout + 2 x "
        "fleet.timeout + 1 s), so that a leader can finish a Sugar call and store its answer "
        "before its lease can lapse; raise lease to 35 or lower the timeouts"
    ] == problems(path)
    local = write(
        tmp_path, {"redis_url": "redis://r", "key_file": key, "lease": 20}, timeout=15, fleet=False
    )
    assert load_config(local, environ={}).fleet is not None


def test_show_config_shows_the_fleet_with_secrets_redacted(tmp_path: Path) -> None:
    """`sugard show-config --json` shows [fleet] as used, the key and password as *** with
    where they come from."""
    key = new_key(tmp_path)
    password = tmp_path / "redis.pw"
    password.write_text("redis-secret-pw\n")
    password.chmod(0o600)
    path = write(
        tmp_path,
        {
            "redis_url": "rediss://r:6380",
            "key_file": str(key),
            "redis_password_file": str(password),
        },
    )
    done = run("show-config", "-c", str(path), "--json")
    assert 0 == done.returncode, done.stderr
    fleet = json.loads(done.stdout)["fleet"]
    assert f"*** (file: {key})" == fleet["key"]
    assert f"*** (file: {password})" == fleet["redis_password"]
    assert "redis-secret-pw" not in done.stdout and key.read_text().strip() not in done.stdout


@pytest.mark.slow
def test_check_online_reaches_redis_and_proves_the_key(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`sugard check --online`: Redis reached, nothing stored yet for the instance; with a
    record sealed under another key, a one-line problem naming the instance and the key."""
    key = new_key(tmp_path)
    path = write(tmp_path, {"redis_url": redis_server.url, "key_file": str(key)})
    done = run("check", "-c", str(path), "--online", "--socket", str(tmp_path / "none.sock"))
    assert f"the fleet store at {redis_server.url}: reached" in done.stdout
    assert "prod: nothing stored yet" in done.stdout
    assert 4 == done.returncode  # no daemon runs: the daemon half of --online says so

    other = new_key(tmp_path, "other.key")
    other_path = write(tmp_path, {"redis_url": redis_server.url, "key_file": str(other)})
    done = run("check", "-c", str(other_path), "--online", "--socket", str(tmp_path / "n.sock"))
    assert "this host's fleet key is not the one the other hosts use" in done.stderr
    assert other.read_text().strip() not in done.stderr + done.stdout


def test_check_online_says_when_redis_cannot_be_reached(tmp_path: Path) -> None:
    """No Redis at the URL: one line on fleet.redis_url, exit 1."""
    key = new_key(tmp_path)
    url = f"unix://{tmp_path}/no-redis.sock"
    path = write(tmp_path, {"redis_url": url, "key_file": str(key), "timeout": 0.5})
    done = run("check", "-c", str(path), "--online", "--socket", str(tmp_path / "n.sock"))
    assert f"{path}: fleet.redis_url: Redis unreachable (PING)" in done.stderr
    assert 0 != done.returncode
