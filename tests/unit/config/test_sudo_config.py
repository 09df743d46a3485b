"""The `sudo` key: the users an instance may act as (Sugar's sudo), and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from sugard.cli.check import audit_config
from sugard.config import ConfigError, load_config

INSTANCE = '[instances.prod]\nurl = "https://crm.example.com"\nusername = "u"\npassword = "p"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    return [str(p) for p in caught.value.problems]


def test_sudo_is_a_list_of_users_or_any_and_none_when_absent(tmp_path: Path) -> None:
    """Absent: no user; a list of names (duplicates once); ["*"]: any; [defaults] applies."""
    assert () == load_config(write(tmp_path, INSTANCE), {}).instances["prod"].sudo
    listed = load_config(write(tmp_path, INSTANCE + 'sudo = ["jim", "sally", "jim"]\n'), {})
    assert ("jim", "sally") == listed.instances["prod"].sudo
    anyone = load_config(write(tmp_path, '[defaults]\nsudo = ["*"]\n' + INSTANCE), {})
    assert ("*",) == anyone.instances["prod"].sudo


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (
            '"jim"',
            'must be a list of Sugar user names, like ["jim", "sally"], or ["*"] for any '
            "user, not a string",
        ),
        ("[1]", "not a list holding an integer"),
        ('["a b"]', "bad user name 'a b'"),
        ('["a/b"]', "bad user name 'a/b'"),
        ('["a\\tb"]', "bad user name 'a\\tb'"),
        ('[""]', "bad user name ''"),
        ('["*", "jim"]', '"*" already means any user'),
    ],
)
def test_a_sudo_that_is_no_list_of_user_names_is_a_problem_naming_the_key(
    tmp_path: Path, value: str, says: str
) -> None:
    """Anything but a list of user names (or ["*"] alone) is one problem at instances.X.sudo."""
    path = write(tmp_path, INSTANCE + f"sudo = {value}\n")
    [problem] = problems(path)
    assert problem.startswith(f"{path}: instances.prod.sudo: ")
    assert says in problem


def test_check_warns_of_sudo_on_the_base_platform(tmp_path: Path) -> None:
    """Sudo sessions use the instance's platform: on `base` each logs the user out of the
    web UI, which `sugard check` warns of (and not without sudo)."""
    base = INSTANCE + 'platform = "base"\n'
    _, quiet = audit_config(load_config(write(tmp_path, base), {}))
    assert not [w for w in quiet if w.key.endswith(".sudo")]
    _, warnings = audit_config(load_config(write(tmp_path, base + 'sudo = ["jim"]\n'), {}))
    [warning] = [w for w in warnings if w.key == "instances.prod.sudo"]
    assert warning.message.startswith("warning: sudo sessions use the instance's platform 'base'")
