"""The README is the user's door: what it promises must stay true as the code moves."""

from __future__ import annotations

import re

from support import ROOT
from support.readme import README, shell_blocks

from sugard import client


def test_ci_runs_the_readme_test_command_unchanged() -> None:
    """The quick start's second command is exactly what CI runs."""
    test_command = shell_blocks(README)[1].strip()
    assert "pytest" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command == ci_lines[-1]


def test_every_local_link_in_the_readme_exists() -> None:
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README)
    assert links, "the README links its docs"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert [] == missing


def test_the_exit_code_table_matches_the_client() -> None:
    """Each error class's exit code is the one the README's table gives for its meaning."""
    table = dict(re.findall(r"^\| (\d) \| (.+?) \|$", README, re.MULTILINE))
    expected_words = {
        client.BadRequest: "usage",
        client.UnknownInstance: "unknown instance",
        client.DaemonUnreachable: "not reachable",
        client.TokenUnavailable: "no token now",
        client.NeedsAttention: "needs attention",
        client.PermissionDenied: "permission denied",
    }
    for error, words in expected_words.items():
        assert words in table[str(error.exit_code)], (error.__name__, table)
    assert "0" in table and "1" in table
