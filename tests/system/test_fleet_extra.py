"""Fleet mode without its extra: an install without redis-py and cryptography (plain
`pip install sugard`) refuses a config with a `[fleet]` table in one line that says what to
install, in `check`, `run` and a reload; the instances already running keep running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from sugard.testing import FakeSugar

BIN = Path(sys.executable).parent
INSTALL_HINT = "pip install 'sugard[fleet]'"

# Loaded by `site` at every interpreter start of the subprocesses: redis and cryptography are
# then as absent as in an install without the extra (no import of them can succeed).
HIDE_FLEET_LIBRARIES = """
import sys


class _WithoutFleetExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("redis", "cryptography"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _WithoutFleetExtra())
"""


@pytest.fixture
def without_extra(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE_FLEET_LIBRARIES)
    return {**os.environ, "PYTHONPATH": str(site)}


def config_with_fleet(directory: Path, fake: FakeSugar, *, fleet: bool) -> Path:
    password = directory / "prod.password"
    password.write_text("alice-secret-pw\n")
    password.chmod(0o600)
    key = directory / "fleet.key"
    key.write_text("A" * 43 + "=\n")
    key.chmod(0o600)
    document: dict[str, Any] = {
        "instances": {
            "prod": {"url": fake.url, "username": "alice", "password_file": str(password)}
        }
    }
    if fleet:
        document["fleet"] = {"redis_url": "redis://127.0.0.1:1/0", "key_file": str(key)}
    path = directory / "config.toml"
    path.write_text(tomli_w.dumps(document))
    path.chmod(0o600)
    return path


def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_the_hidden_libraries_really_are_absent(without_extra: dict[str, str]) -> None:
    """The stand-in for an install without the extra: importing redis fails there."""
    done = run(without_extra, sys.executable, "-c", "import redis")
    assert done.returncode == 1
    assert "No module named 'redis'" in done.stderr


def test_check_and_run_refuse_fleet_mode_naming_the_extra(
    fake: FakeSugar, short_dir: Path, without_extra: dict[str, str]
) -> None:
    """`sugard check` and `sugard run` name the install command, in one line each."""
    config = config_with_fleet(short_dir, fake, fleet=True)
    check = run(without_extra, str(BIN / "sugard"), "check", "-c", str(config))
    assert check.returncode != 0
    lines = [line for line in check.stdout.splitlines() + check.stderr.splitlines() if line]
    refusals = [line for line in lines if INSTALL_HINT in line]
    assert len(refusals) == 1, lines
    assert "fleet" in refusals[0]
    started = run(
        without_extra,
        str(BIN / "sugard"),
        "run",
        "-c",
        str(config),
        "--socket",
        str(short_dir / "s.sock"),
    )
    assert started.returncode != 0
    assert INSTALL_HINT in started.stderr


def test_the_same_config_is_accepted_with_the_extra(fake: FakeSugar, short_dir: Path) -> None:
    """With redis-py and cryptography installed the fleet table is read (the control case)."""
    config = config_with_fleet(short_dir, fake, fleet=True)
    check = run(dict(os.environ), str(BIN / "sugard"), "check", "-c", str(config))
    assert INSTALL_HINT not in check.stdout + check.stderr


def test_a_reload_into_fleet_mode_is_refused_and_the_old_config_keeps_serving(
    fake: FakeSugar, short_dir: Path, without_extra: dict[str, str], start_daemon: Any
) -> None:
    """A reload that adds `[fleet]` is refused with the install command; tokens still flow."""
    config = config_with_fleet(short_dir, fake, fleet=False)
    daemon = start_daemon(config, env={"PYTHONPATH": without_extra["PYTHONPATH"]})
    config_with_fleet(short_dir, fake, fleet=True)
    sugarctl = str(BIN / "sugarctl")
    reload = run(without_extra, sugarctl, "--socket", str(daemon.socket), "reload")
    assert reload.returncode == 6, reload.stderr
    assert INSTALL_HINT in reload.stderr
    token = run(without_extra, sugarctl, "--socket", str(daemon.socket), "token", "prod")
    assert token.returncode == 0, token.stderr
    assert token.stdout.strip()
