"""Loading the TOML config: validation that names file, table and key; secret sources."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import SUGARD
from sugard.config import ConfigError, diff_configs, load_config
from sugard.secret import Secret


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def problems(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ or {})
    return [str(p) for p in caught.value.problems]


def test_every_problem_names_file_table_and_key(tmp_path: Path) -> None:
    """All problems are reported at once, each as `file: table.key: message`."""
    path = write(
        tmp_path,
        '[daemon]\nlog_level = "loud"\n'
        '[instances.prod]\nurl = "https://crm.example.com"\nusername = "u"\n'
        'password = "p"\ntimeout = "10"\ncolour = "blue"\n',
    )
    found = problems(path)
    assert [
        f"{path}: daemon.log_level: must be one of debug, info, warning, error, not 'loud'",
        f"{path}: instances.prod.timeout: must be a number, not a string",
        f"{path}: instances.prod.colour: unknown key",
    ] == found


def test_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    """[defaults] fills every instance; an instance's own value wins."""
    path = write(
        tmp_path,
        '[defaults]\nplatform = "scripts"\ntimeout = 5\n'
        '[instances.a]\nurl = "https://a.example.com/"\nusername = "u"\npassword = "p"\n'
        '[instances.b]\nurl = "https://b.example.com"\nusername = "u"\npassword = "p"\n'
        'platform = "other"\n',
    )
    config = load_config(path, {})
    assert "scripts" == config.instances["a"].platform
    assert "other" == config.instances["b"].platform
    assert 5.0 == config.instances["b"].timeout
    assert "https://a.example.com" == config.instances["a"].url


def test_secret_sources_resolve(tmp_path: Path) -> None:
    """password_file, password_env, password_command and password_credential all resolve."""
    secret_file = tmp_path / "p.txt"
    secret_file.write_text("from-file\n")
    secret_file.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "prod.pw").write_text("from-credential")
    path = write(
        tmp_path,
        '[defaults]\nurl = "https://x.example.com"\nusername = "u"\n'
        '[instances.f]\npassword_file = "p.txt"\n'
        '[instances.e]\npassword_env = "PW"\n'
        '[instances.c]\npassword_command = "echo from-command"\n'
        '[instances.l]\npassword_credential = "prod.pw"\n',
    )
    config = load_config(path, {"PW": "from-env", "CREDENTIALS_DIRECTORY": str(creds)})
    got = {name: i.password.reveal() for name, i in config.instances.items()}
    assert {
        "f": "from-file",
        "e": "from-env",
        "c": "from-command",
        "l": "from-credential",
    } == got
    assert "***" not in got.values()
    assert "Secret('***')" == repr(config.instances["f"].password.value)
    assert "from-file" not in repr(config)


def test_missing_and_loose_secrets_are_reported(tmp_path: Path) -> None:
    """A missing env var, a failing command and a world-readable secret file each say the fix."""
    loose = tmp_path / "loose.pw"
    loose.write_text("x")
    loose.chmod(0o644)
    path = write(
        tmp_path,
        '[defaults]\nurl = "https://x.example.com"\nusername = "u"\n'
        '[instances.e]\npassword_env = "NOPE"\n'
        '[instances.c]\npassword_command = "echo secret-on-stderr >&2; exit 3"\n'
        '[instances.f]\npassword_file = "loose.pw"\n',
    )
    found = problems(path)
    assert f"{path}: instances.e.password_env: environment variable NOPE is not set" in found
    assert f"{path}: instances.c.password_command: command exited with status 3" in found
    assert any(f"chmod 600 {loose}" in p for p in found)
    assert not any("secret-on-stderr" in p for p in found)


def test_two_sources_for_one_secret_is_an_error(tmp_path: Path) -> None:
    """A secret comes from exactly one source."""
    path = write(
        tmp_path,
        '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\n'
        'password = "p"\npassword_env = "X"\n',
    )
    assert [f"{path}: instances.a.password_env: give only one of password, password_env"] == (
        problems(path)
    )


def test_bad_instance_name_and_platform(tmp_path: Path) -> None:
    """Instance names and platforms follow Sugar's and the design's patterns."""
    path = write(
        tmp_path,
        '[instances."-bad"]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
        '[instances.ok]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n'
        'platform = "Not Valid"\n',
    )
    found = problems(path)
    assert 2 == len(found)
    assert found[0].startswith(f"{path}: instances.-bad: bad instance name")
    assert found[1].startswith(f"{path}: instances.ok.platform: 'Not Valid' is not a valid")


def test_diff_sees_secret_changes(tmp_path: Path) -> None:
    """A changed password counts as a change even when its source is the same."""
    secret = tmp_path / "pw"
    secret.write_text("one")
    secret.chmod(0o600)
    text = '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword_file = "pw"\n'
    old = load_config(write(tmp_path, text), {})
    secret.write_text("two")
    new = load_config(write(tmp_path, text), {})
    assert ("a",) == diff_configs(old, new).changed
    assert Secret("one") != Secret("two")


def test_sugard_check_exit_codes(tmp_path: Path) -> None:
    """`sugard check` exits 0 on a good config and 1 with the problems on stderr."""
    good = write(tmp_path, '[instances.a]\nurl = "https://a.example.com"\nusername = "u"\npassword = "p"\n')
    ok = subprocess.run([SUGARD, "check", "-c", str(good)], capture_output=True, text=True, check=False)
    assert 0 == ok.returncode
    assert "ok (1 instance(s): a)" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[instances.a]\nurl = 3\n")
    result = subprocess.run([SUGARD, "check", "-c", str(bad)], capture_output=True, text=True, check=False)
    assert 1 == result.returncode
    assert f"{bad}: instances.a.url: must be a string, not an integer\n" == result.stderr
