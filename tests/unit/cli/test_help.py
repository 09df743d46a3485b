"""Help that explains itself: `sugarctl help [COMMAND]`, `sugarctl COMMAND --help`, and the
same for `sugard`'s subcommands, through the real console scripts. Every option the parsers
take is described, the socket order is listed, and the exit codes include 130."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest
from support.daemon import SUGARCTL, SUGARD

from sugard import cli
from sugard.client.ctl import COMMANDS

SOCKET_ORDER_WORDS = (
    "--socket",
    "$SUGARD_SOCKET",
    "[daemon].socket",
    "$XDG_RUNTIME_DIR/sugard/sugard.sock",
    "/tmp/sugard-$UID/sugard.sock",
)


def run(program: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """`program argv...` with no daemon anywhere: help must not need one."""
    env = {**os.environ, "SUGARD_SOCKET": "/nonexistent/sugard.sock", "COLUMNS": "80"}
    return subprocess.run(
        [program, *argv], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def in_one_line(text: str) -> str:
    return " ".join(text.split())


def test_sugarctl_help_lists_every_command_the_socket_order_and_exit_codes() -> None:
    """`sugarctl --help`, `-h` and `help` print the same: every command, the socket order,
    exit codes 0 to 7 and 130, within 80 columns."""
    shown = run(SUGARCTL, "--help")
    assert (0, "") == (shown.returncode, shown.stderr)
    assert shown.stdout == run(SUGARCTL, "-h").stdout == run(SUGARCTL, "help").stdout
    for command in COMMANDS:
        assert f"\n  {command}" in shown.stdout, command
    flat = in_one_line(shown.stdout)
    for word in SOCKET_ORDER_WORDS:
        assert word in flat
    for code in (*range(8), 130):
        assert f"\n  {code}  " in shown.stdout, code
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_sugarctl_command_describes_every_option_it_takes(command: str) -> None:
    """`sugarctl help CMD` equals `sugarctl CMD --help`; it shows the usage, describes each
    option the parser lets CMD take (and --socket with its order), and ends with the exit
    codes, 130 included."""
    shown = run(SUGARCTL, "help", command)
    assert (0, "") == (shown.returncode, shown.stderr)
    assert shown.stdout == run(SUGARCTL, command, "--help").stdout
    assert shown.stdout.startswith(f"usage: sugarctl [--socket PATH] {command}")
    options = shown.stdout.split("\noptions:\n", 1)[1]
    described = {line.split()[0].rstrip(",") for line in options.splitlines() if line[:3] == "  -"}
    assert COMMANDS[command][2] | {"--socket", "-h"} == described
    flat = in_one_line(shown.stdout)
    for word in SOCKET_ORDER_WORDS:
        assert word in flat
    assert "130 interrupted" in flat
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())


def test_help_of_an_unknown_command_is_a_usage_error() -> None:
    """`sugarctl help nosuch` exits 2 with one line naming the commands."""
    shown = run(SUGARCTL, "help", "nosuch")
    assert (2, "") == (shown.returncode, shown.stdout)
    assert "COMMAND must be one of token, header" in shown.stderr


def test_refresh_help_warns_that_retry_rejected_may_count_as_a_failed_login() -> None:
    """The one override of "never send a rejected password again" says what it costs."""
    flat = in_one_line(run(SUGARCTL, "refresh", "--help").stdout)
    assert "--retry-rejected" in flat
    assert "may count as a failed login at Sugar" in flat


# sugard


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", list(subcommands()))
def test_each_sugard_subcommand_describes_every_option_and_its_exit_codes(command: str) -> None:
    """`sugard help CMD` equals `sugard CMD --help`, in 80 columns; every option of CMD has a
    description, a --socket lists the socket order, and the exit codes include 2 and 130."""
    parser = subcommands()[command]
    for action in parser._actions:
        assert action.help, (command, action.option_strings or action.dest)
        if "--socket" in action.option_strings:
            for word in SOCKET_ORDER_WORDS:
                assert word in action.help
    shown = run(SUGARD, "help", command)
    assert (0, "") == (shown.returncode, shown.stderr)
    assert shown.stdout == run(SUGARD, command, "--help").stdout
    too_long = [line for line in shown.stdout.splitlines() if len(line) > 80]
    assert [] == too_long  # argparse wraps to $COLUMNS (run() sets 80) but not alternatives
    flat = in_one_line(shown.stdout)
    assert "Exit status: 0 " in flat
    assert "2 usage error" in flat
    assert "130 interrupted" in flat


def test_sugard_help_lists_the_subcommands_and_exit_codes() -> None:
    """`sugard help` and `sugard --help` print the same overview, exit codes included."""
    shown = run(SUGARD, "help")
    assert 0 == shown.returncode
    assert shown.stdout == run(SUGARD, "--help").stdout
    for command in subcommands():
        assert command in shown.stdout
    assert "130 interrupted" in in_one_line(shown.stdout)


def test_sugard_run_with_a_missing_config_suggests_init_with_the_same_path(
    tmp_path: Path,
) -> None:
    """`sugard run -c /missing` says how to create exactly that file: `sugard init -c` it."""
    missing = tmp_path / "my config.toml"
    shown = run(SUGARD, "run", "-c", str(missing))
    assert (1, "") == (shown.returncode, shown.stdout)
    assert f"{missing}: no such file; create one with `sugard init -c '{missing}'`\n" == (
        shown.stderr
    )
