"""`sugarctl completion bash|zsh|fish`: the scripts the real sugarctl prints, run in the real
shells. bash runs its completion function on COMP_WORDS as readline would set them; fish
answers `complete -C`; zsh has no completion outside its line editor, so its function runs
with `compadd` and friends standing in, after zsh parsed the whole script. Instance names
come from a real daemon."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from support.daemon import BIN, SUGARCTL, instance, write_config

from sugard.client.ctl import COMMANDS
from sugard.testing import FakeSugar


def script(shell: str) -> str:
    result = subprocess.run(
        [SUGARCTL, "completion", shell], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip()
    return result.stdout


def shell_env() -> dict[str, str]:
    """sugarctl on PATH, as an installed one is; no daemon unless the words name one."""
    return {
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "SUGARD_SOCKET": "/nonexistent/sugard.sock",
    }


def bash_complete(*words: str) -> list[str]:
    """What the bash script offers for the command line `words` (the last one being typed)."""
    code = (
        script("bash")
        + f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
        + f"COMP_CWORD={len(words) - 1}\n"
        + '_sugarctl\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env=shell_env(),
        check=False,
    )
    assert (0, "") == (result.returncode, result.stderr)
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture
def sock(fake: FakeSugar, short_dir: Path, start_daemon) -> str:
    """A daemon serving `prod` and `staging`."""
    fake.add_platform("sugard_staging")  # one session per user and platform: a platform each
    staging = instance(fake, platform="sugard_staging")
    config = write_config(short_dir, {"prod": instance(fake), "staging": staging})
    return str(start_daemon(config).socket)


@pytest.mark.slow
def test_bash_completes_commands_options_and_their_values() -> None:
    """Commands, each command's own options (those its parser takes), and option values."""
    assert list(COMMANDS) == bash_complete("sugarctl", "")
    assert ["token"] == bash_complete("sugarctl", "to")
    assert ["--socket", "--help", "--version"] == bash_complete("sugarctl", "--")
    for command, (_, _, takes) in COMMANDS.items():
        offered = set(bash_complete("sugarctl", command, "-"))
        assert takes | {"--socket", "--help"} == offered, command
    assert ["bare", "header", "json", "env"] == bash_complete(
        "sugarctl", "token", "x", "--format", ""
    )
    assert ["sh", "bash", "zsh", "fish"] == bash_complete("sugarctl", "env", "--shell", "")
    assert ["bash", "zsh", "fish"] == bash_complete("sugarctl", "completion", "")
    assert ["status", "shutdown"] == bash_complete("sugarctl", "help", "s")


@pytest.mark.slow
def test_bash_completes_instance_names_from_the_running_daemon(sock: str) -> None:
    """NAME is offered from the daemon on the --socket the line names (or $SUGARD_SOCKET);
    with no daemon nothing is offered and nothing is printed."""
    assert ["prod", "staging"] == bash_complete("sugarctl", "--socket", sock, "token", "")
    assert ["prod"] == bash_complete("sugarctl", "status", "--socket", sock, "p")
    assert ["staging"] == bash_complete(
        "sugarctl", "--socket", sock, "refresh", "--retry-rejected", "s"
    )
    assert [] == bash_complete("sugarctl", "--socket", sock, "token", "prod", "")  # one NAME
    assert [] == bash_complete("sugarctl", "token", "")  # no daemon there


def test_bash_completes_the_command_exec_runs(sock: str) -> None:
    """After `exec NAME` (and after `--`), the word is a command to run."""
    offered = bash_complete("sugarctl", "--socket", sock, "exec", "prod", "--", "bas")
    assert "bash" in offered
    assert "bash" in bash_complete("sugarctl", "exec", "prod", "bas")
    assert "--wait" in bash_complete("sugarctl", "exec", "prod", "--w")


@pytest.mark.slow
def test_fish_completes_commands_options_and_instance_names(sock: str) -> None:
    """fish's own `complete -C` on the fish script: commands with descriptions, options,
    values, and the daemon's instance names."""
    fish = shutil.which("fish")
    if fish is None:
        pytest.skip("fish is not installed (apt-get install fish): its script is not tested")

    def complete(line: str) -> list[str]:
        result = subprocess.run(
            [fish, "--no-config", "-c", f"source; complete -C {shlex.quote(line)}"],
            input=script("fish"),
            capture_output=True,
            text=True,
            timeout=30,
            env=shell_env(),
            check=False,
        )
        assert (0, "") == (result.returncode, result.stderr)
        return [entry.split("\t")[0] for entry in result.stdout.splitlines()]

    assert set(COMMANDS) <= set(complete("sugarctl "))
    assert ["token"] == complete("sugarctl tok")
    assert {"--fingerprint", "--format"} <= set(complete("sugarctl token prod --f"))
    assert ["bare", "env", "header", "json"] == sorted(complete("sugarctl token prod --format "))
    assert ["prod", "staging"] == sorted(complete(f"sugarctl --socket {sock} token "))
    assert [] == [n for n in complete(f"sugarctl --socket {sock} token prod ") if n == "prod"]


def test_zsh_parses_the_script_and_its_function_offers_names(sock: str) -> None:
    """zsh parses the script (zsh -n); its function, with compadd recording what it is
    given, offers commands, options and the daemon's instance names."""
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (apt-get install zsh): its script is not tested")
    text = script("zsh")
    parsed = subprocess.run([zsh, "-n"], input=text, capture_output=True, text=True, check=False)
    assert (0, "") == (parsed.returncode, parsed.stderr)

    def complete(*words: str) -> list[str]:
        stand_ins = (
            'compadd() { [[ $1 == -- ]] && shift; print -rl -- "$@" }\n'
            "compdef() { : }\n_files() { print -r -- '<files>' }\n"
            "_command_names() { print -r -- '<commands>' }\n_normal() { print -r -- '<normal>' }\n"
        )
        call = (
            f"words=({' '.join(shlex.quote(w) for w in words)})\nCURRENT={len(words)}\n_sugarctl\n"
        )
        result = subprocess.run(
            [zsh, "-f", "-c", stand_ins + text + call],
            capture_output=True,
            text=True,
            timeout=30,
            env=shell_env(),
            check=False,
        )
        assert (0, "") == (result.returncode, result.stderr)
        return result.stdout.splitlines()

    assert list(COMMANDS) == complete("sugarctl", "")
    assert ["prod", "staging"] == complete("sugarctl", "--socket", sock, "token", "")
    assert {"--min-ttl", "--wait", "--socket", "--help"} <= set(
        complete("sugarctl", "header", "--")
    )
    assert ["<files>"] == complete("sugarctl", "--socket", "")
    assert ["<normal>"] == complete("sugarctl", "exec", "prod", "--", "ls", "")
