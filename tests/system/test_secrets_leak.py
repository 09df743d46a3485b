"""Secrets: every source works, loose file modes are refused, and no secret ever reaches the
daemon's output, a status, or an error, whatever happens upstream.

The leak test drives a real daemon (`--log-level debug`) through the token lifecycle against the
fake SugarCRM, then scans everything the daemon and its clients printed for every secret the fake
issued or received and every configured password and client secret.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from support.daemon import SUGARD, sugarctl
from support.http import curl
from support.wait import wait_for

from sugard.config import ConfigError, load_config
from sugard.config import sources as secrets_module
from sugard.secret import Secret, fingerprint
from sugard.testing import FakeSugar, running_fake

CLIENT_ID = "sugard-app"
CLIENT_SECRET = "client-secret-5d1f0c8a93e2b7"
SOURCES = ("inline", "file", "env", "cmd", "cred")
PASSWORDS = {name: f"pw-{name}-7c1e93a0b2d4f6" for name in SOURCES}
NEW_PASSWORD = "pw-rotated-by-admin-3f9a77c2"
WRONG_CLIENT_SECRET = "client-secret-wrong-a81c0d42"


def user(name: str) -> str:
    return f"user-{name}"


@pytest.fixture
def leak_fake() -> Iterator[FakeSugar]:
    """A fake with one user per instance, a confidential OAuth client and 3 s access tokens."""
    with running_fake(
        users={user(n): pw for n, pw in PASSWORDS.items()},
        clients={CLIENT_ID: CLIENT_SECRET},
        access_lifetime=3,
    ) as server:
        yield server


def private(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def write_sources_config(d: Path, fake: FakeSugar) -> tuple[Path, dict[str, str]]:
    """Five instances, each taking its password and client secret from a different source;
    returns the config and the environment the daemon needs."""
    creds = d / "creds"
    creds.mkdir(mode=0o700)
    private(creds / "cred-pw", PASSWORDS["cred"])
    private(creds / "cred-cs", CLIENT_SECRET)
    cs_file = private(d / "cs.secret", CLIENT_SECRET)
    cmd_pw = private(d / "cmd.pw", PASSWORDS["cmd"])

    def table(name: str, **secrets: Any) -> dict[str, Any]:
        return {
            "url": fake.url,
            "username": user(name),
            "client_id": CLIENT_ID,
            "backoff_max": 0.2,
            **secrets,
        }

    instances = {
        "inline": table("inline", password=PASSWORDS["inline"], client_secret=CLIENT_SECRET),
        "file": table(
            "file",
            password_file=str(private(d / "file.pw", PASSWORDS["file"])),
            client_secret_file=str(cs_file),
        ),
        "env": table("env", password_env="LEAK_TEST_PW", client_secret_env="LEAK_TEST_CS"),
        # The command also echoes the password to stderr, which must be dropped.
        "cmd": table(
            "cmd",
            password_command=["sh", "-c", f"cat {cmd_pw}; cat {cmd_pw} >&2"],
            client_secret_command=f"cat {cs_file}",
        ),
        "cred": table("cred", password_credential="cred-pw", client_secret_credential="cred-cs"),
    }
    config = d / "config.toml"
    config.write_text(tomli_w.dumps({"instances": instances}))
    config.chmod(0o600)
    env = {
        "LEAK_TEST_PW": PASSWORDS["env"],
        "LEAK_TEST_CS": CLIENT_SECRET,
        "CREDENTIALS_DIRECTORY": str(creds),
    }
    return config, env


class Transcript:
    """Everything a user could see from the daemon, except the token bodies meant for them."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.texts: list[tuple[str, str]] = []

    def ctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = sugarctl(self.socket, *args, input=input)
        self.texts.append((f"sugarctl {' '.join(args)} (stderr)", result.stderr))
        if args[0] not in ("token", "refresh", "invalidate", "header") or result.returncode:
            self.texts.append((f"sugarctl {' '.join(args)} (stdout)", result.stdout))
        return result

    def api(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        code, body = curl(self.socket, path, "-X", method, timeout=30)
        status = str(code)
        if int(status) >= 400 or not path.endswith("/token"):
            self.texts.append((f"{method} {path} -> {status}", body))
        return int(status), json.loads(body)

    def status(self, name: str) -> dict[str, Any]:
        result = self.ctl("status", name, "--json")
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def token(self, name: str, *args: str) -> str:
        result = self.ctl("token", name, *args)
        assert 0 == result.returncode, result.stderr
        return result.stdout.strip()


@pytest.mark.slow
def test_no_secret_leaks_through_the_token_lifecycle(
    leak_fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Login, refresh, eviction, invalidate, wrong password, maintenance, proxy faults, a rejected
    client secret and a refused reload: no password, client secret, access, refresh or download
    token appears in the daemon's output, any status, or any error."""
    fake = leak_fake
    config, env = write_sources_config(short_dir, fake)
    daemon = start_daemon(config, env=env)
    t = Transcript(daemon.socket)

    # Every source works: each instance logs in with its own password and the client secret.
    for name in SOURCES:
        assert fake.valid(t.token(name))
    assert set(PASSWORDS.values()) | {CLIENT_SECRET} <= set(fake.received_secrets())

    # Refresh ahead of expiry (3 s tokens), and on demand.
    wait_for(lambda: all(t.status(n)["refreshes"] >= 1 for n in SOURCES), "natural refreshes")
    before = t.token("inline")
    forced = t.ctl("refresh", "inline")
    assert 0 == forced.returncode, forced.stderr
    assert before != forced.stdout.strip()

    # Eviction by a login elsewhere; a script reports the dead token (argument, then stdin).
    dead = t.token("inline")
    fake.evict(user("inline"), "sugard")
    assert not fake.valid(dead)
    renewed = t.ctl("invalidate", "inline", dead)
    assert 0 == renewed.returncode, renewed.stderr
    assert fake.valid(renewed.stdout.strip())
    again = t.ctl("invalidate", "inline", input=dead + "\n")
    assert renewed.stdout == again.stdout

    # Wrong password: the admin changed it, and the session is gone.
    fake.set_password(user("file"), NEW_PASSWORD)
    fake.evict(user("file"), "sugard")
    rejected = t.ctl("refresh", "file")
    assert 6 == rejected.returncode, rejected.stderr
    status, body = t.api("POST", "/v1/instances/file/refresh")
    assert (502, "upstream_rejected") == (status, body["error"])
    assert "credentials" == t.status("file")["last_error"]["kind"]
    private(short_dir / "file.pw", NEW_PASSWORD)
    assert 0 == t.ctl("reload").returncode
    wait_for(lambda: t.status("file")["state"] == "ready", "login with the new password")

    # Maintenance: the refresh burns the refresh token, then logins fail until it ends.
    fake.maintenance = True
    wait_for(lambda: t.ctl("token", "env", "--wait", "0.2").returncode == 5, "the token to run out")
    unavailable = t.ctl("token", "env", "--wait", "0.2")
    assert 5 == unavailable.returncode, unavailable.stderr
    assert "maintenance" in unavailable.stderr
    t.api("GET", "/v1/instances/env/token?min_ttl=3&wait=0.5")
    fake.maintenance = False
    wait_for(lambda: all(t.status(n)["state"] == "ready" for n in SOURCES), "recovery")

    # A proxy's bad days: an HTML 502, garbage, a reset, 429 and 503 before an answer.
    for kind in ("html502", "garbage", "reset", "429", "503"):
        fake.fail_next(1, kind, retry_after=0)  # type: ignore[arg-type]
    # `sugarctl refresh` answers with each attempt's outcome: exit 5 until the faults are gone.
    wait_for(lambda: t.ctl("refresh", "cmd").returncode == 0, "a refresh through the faults")
    assert any(r.fault == "reset" for r in fake.requests)

    # A wrong client secret (the credential was replaced), then the right one again. The
    # reload keeps the session; the next renewal sends the new secret, and Sugar refuses it.
    private(short_dir / "creds" / "cred-cs", WRONG_CLIENT_SECRET)
    assert 0 == t.ctl("reload").returncode
    refused = t.ctl("refresh", "cred")
    assert 6 == refused.returncode, refused.stderr
    # This refresh sent the new secret, or a renewal that came due just before it did (then
    # the refresh refuses to send a rejected secret again): either way Sugar refused the client.
    assert "invalid_client" in refused.stderr or "rejected the client secret" in refused.stderr
    assert "client" == t.status("cred")["last_error"]["kind"]
    private(short_dir / "creds" / "cred-cs", CLIENT_SECRET)
    assert 0 == t.ctl("reload").returncode
    assert fake.valid(t.token("cred"))

    # A reload refused: the inline secret's file became readable by others.
    config.chmod(0o644)
    assert 0 != t.ctl("reload").returncode
    status, body = t.api("POST", "/v1/reload")
    assert 422 == status
    assert any("chmod 600" in e for e in body["errors"])
    config.chmod(0o600)

    # Everything else a user can look at.
    t.ctl("status")
    t.ctl("ping")
    t.api("GET", "/v1/instances")
    t.api("GET", "/v1/health")
    for command in ("check", "show-config"):
        done = subprocess.run(
            [SUGARD, command, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
            check=False,
        )
        t.texts.append((f"sugard {command}", done.stdout + done.stderr))
    current = t.token("inline")
    assert 0 == daemon.stop()
    log = daemon.log_path.read_text(errors="replace")
    t.texts.append(("daemon output", log))

    # Logs name tokens by fingerprint: the scan below is looking at a log that talks about them.
    assert fingerprint(current) in log
    secrets = (
        set(fake.issued)
        | set(fake.received_secrets())
        | set(PASSWORDS.values())
        | {NEW_PASSWORD, CLIENT_SECRET, WRONG_CLIENT_SECRET}
    )
    assert len(fake.issued) >= 3 * 20  # access, refresh and download token per session
    leaks = [
        f"{label}: {needle[:4]}... ({len(needle)} chars)"
        for secret in secrets
        for needle in _needles(secret)
        for label, text in t.texts
        if needle in text
    ]
    print(
        f"\nleak scan: {len(secrets)} secrets (and their heads and tails) in {len(t.texts)} outputs"
    )
    assert [] == leaks


def _needles(secret: str) -> set[str]:
    """The secret, and its head and tail: a truncated secret is a leak too."""
    needles = {secret}
    if len(secret) >= 16:
        needles |= {secret[:12], secret[-12:]}
    return needles


def _sugard_run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SUGARD, "run", "-c", str(config), "--socket", str(config.parent / "s.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("mode", [0o640, 0o604])
def test_a_config_with_an_inline_secret_others_can_read_is_refused(
    short_dir: Path, mode: int
) -> None:
    """`sugard run` refuses a config holding an inline secret that group or others can read,
    naming the chmod that fixes it, without showing the secret."""
    config = short_dir / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "instances": {
                    "prod": {
                        "url": "https://crm.example.com",
                        "username": "u",
                        "password": PASSWORDS["inline"],
                    }
                }
            }
        )
    )
    config.chmod(mode)
    result = _sugard_run(config)
    assert 1 == result.returncode
    assert "instances.prod.password: holds an inline secret" in result.stderr
    assert f"run: chmod 600 {config}" in result.stderr
    assert PASSWORDS["inline"] not in result.stdout + result.stderr


@pytest.mark.slow
def test_a_group_readable_config_without_inline_secrets_is_fine(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Mode 0644 is refused only for a config that holds a secret itself."""
    secret = private(short_dir / "prod.password", "alice-secret-pw")
    config = short_dir / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "instances": {
                    "prod": {
                        "url": fake.url,
                        "username": "alice",
                        "password_file": str(secret),
                    }
                }
            }
        )
    )
    config.chmod(0o644)
    daemon = start_daemon(config)
    assert 0 == sugarctl(daemon.socket, "token", "prod").returncode


def test_a_secret_file_others_can_read_is_refused(short_dir: Path) -> None:
    """A password_file readable by group or others is refused with the chmod that fixes it."""
    secret = short_dir / "prod.password"
    secret.write_text(PASSWORDS["file"] + "\n")
    secret.chmod(0o640)
    config = short_dir / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "instances": {
                    "prod": {
                        "url": "https://crm.example.com",
                        "username": "u",
                        "password_file": str(secret),
                    }
                }
            }
        )
    )
    config.chmod(0o600)
    result = _sugard_run(config)
    assert 1 == result.returncode
    assert re.search(
        rf"instances\.prod\.password_file: .*run: chmod 600 {re.escape(str(secret))}",
        result.stderr,
    ), result.stderr
    assert PASSWORDS["file"] not in result.stdout + result.stderr


def test_a_secret_command_is_bounded_by_its_timeout(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password_command that hangs is stopped at the timeout and reported as such."""
    monkeypatch.setattr(secrets_module, "SECRET_COMMAND_TIMEOUT", 0.5)
    config = short_dir / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "instances": {
                    "prod": {
                        "url": "https://crm.example.com",
                        "username": "u",
                        "password_command": "sleep 5; echo x",
                    }
                }
            }
        )
    )
    config.chmod(0o600)
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert time.monotonic() - started < 3
    assert ["command did not finish within 0.5 s"] == [p.message for p in caught.value.problems]


def test_secrets_print_as_stars_everywhere(short_dir: Path) -> None:
    """Secret's repr, str and format print ***, and so does a loaded config's repr."""
    secret = Secret(PASSWORDS["inline"])
    assert ("Secret('***')", "***", "***") == (repr(secret), str(secret), f"{secret:>20}")
    config = short_dir / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "instances": {
                    "prod": {
                        "url": "https://crm.example.com",
                        "username": "u",
                        "password": PASSWORDS["inline"],
                        "client_secret": CLIENT_SECRET,
                    }
                }
            }
        )
    )
    config.chmod(0o600)
    loaded = load_config(config)
    assert PASSWORDS["inline"] == loaded.instances["prod"].password.reveal()
    assert PASSWORDS["inline"] not in repr(loaded)
    assert CLIENT_SECRET not in repr(loaded)
