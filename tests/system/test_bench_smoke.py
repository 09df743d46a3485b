"""The benchmark suite at tiny sizes (`python -m bench --quick`), so that it cannot rot.

Timing figures are only checked to be numbers: a slow machine must not fail the build. The
upstream counts (one login for a cold burst, one refresh for many reports of one dead token,
one login for a reload with one instance changed) do not depend on timing, so they are pinned.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support import ROOT

pytestmark = pytest.mark.slow

NUMBER = re.compile(r"^-?[0-9][0-9,]*(\.[0-9]+)?( [A-Za-z/]+)?$")
RANGE = re.compile(r"^[0-9]+-[0-9]+$")
WITH_DETAIL = re.compile(r"^[0-9][0-9,]* \(.*\)$")  # "150 (0)": a count and what it holds


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )


def table(output: str) -> list[dict[str, str]]:
    """The markdown table's rows as dicts keyed by column."""
    keys = ("section", "measure", "sugard", "baseline", "ratio", "target", "met")
    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == len(keys) and cells[0].isdigit():
            rows.append(dict(zip(keys, cells, strict=True)))
    return rows


def row(rows: list[dict[str, str]], section: str, starts: str) -> dict[str, str]:
    found = [r for r in rows if r["section"] == section and r["measure"].startswith(starts)]
    assert 1 == len(found), f"rows of section {section} starting {starts!r}: {found}"
    return found[0]


def count(figure: str) -> int:
    """The leading integer of a figure such as `1,000` or `1 (1 login)`."""
    return int(figure.split()[0].replace(",", ""))


@pytest.fixture(scope="module")
def quick() -> Iterator[tuple[subprocess.CompletedProcess[str], list[dict[str, str]]]]:
    result = run_bench()
    yield result, table(result.stdout)


def test_quick_run_prints_a_row_for_every_section(quick) -> None:
    """`python -m bench --quick` exits 0 and its table covers sections 1 to 6."""
    result, rows = quick
    assert 0 == result.returncode, result.stderr
    assert ["1", "2", "3", "4", "5", "6"] == sorted({r["section"] for r in rows})
    assert 1 == result.stdout.count("| # | measure | sugard | baseline |")


def test_throughput_rows_cover_each_connection_count(quick) -> None:
    """Section 1 reports requests/s, p50, p99 and CPU per request at 1, 32 and 256 conns."""
    _, rows = quick
    for conns in (1, 32, 256):
        for what in ("requests/s", "p50 latency", "p99 latency", "server CPU per request"):
            row(rows, "1", f"{what}, {conns} conn")


def test_every_figure_is_a_number(quick) -> None:
    """sugard's figures are numbers; baselines and ratios are numbers, ranges or `-`."""
    _, rows = quick
    for r in rows:
        assert NUMBER.match(r["sugard"]) or WITH_DETAIL.match(r["sugard"]), r
        assert NUMBER.match(r["baseline"]) or RANGE.match(r["baseline"]) or "-" == r["baseline"], r
        assert NUMBER.match(r["ratio"]) or "-" == r["ratio"], r
        assert r["met"] in ("yes", "**no**", "-"), r


def test_a_cold_burst_makes_one_login(quick) -> None:
    """Concurrent requests on a cold instance: one login, every request answered."""
    _, rows = quick
    logins = row(rows, "2", "logins for")
    assert 1 == count(logins["sugard"])
    answered = row(rows, "2", "... requests answered 200, one token")
    assert count(answered["baseline"]) == count(answered["sugard"])


def test_reports_of_one_dead_token_make_one_refresh(quick) -> None:
    """Many scripts reporting the same dead token: one upstream call, one new token for all."""
    _, rows = quick
    assert 1 == count(row(rows, "2", "upstream calls for")["sugard"])
    given = row(rows, "2", "... scripts answered 200 with one new token")
    assert count(given["baseline"]) == count(given["sugard"])


def test_steady_load_makes_no_login(quick) -> None:
    """Paced load across several token lifetimes: every request answered, no login."""
    _, rows = quick
    served = row(rows, "2", "... requests answered 200 (logins during the run)")
    assert "(0)" == served["sugard"].split()[-1]
    assert count(served["baseline"]) == count(served["sugard"])


def test_reload_with_one_changed_instance_makes_one_login(quick) -> None:
    """A reload of many instances with one changed: one upstream call, a login."""
    _, rows = quick
    assert "1 (1 login)" == row(rows, "5", "... upstream calls")["sugard"]


def test_section_option_runs_only_that_section() -> None:
    """`--section reload` prints section 5's rows and no others."""
    result = run_bench("--section", "reload")
    assert 0 == result.returncode, result.stderr
    assert {"5"} == {r["section"] for r in table(result.stdout)}


def test_bench_client_still_runs_alone() -> None:
    """bench/bench_client.py, run as a script, prints its own table with sugarctl's row."""
    result = subprocess.run(
        [sys.executable, "bench/bench_client.py", "--runs", "2", "--calls", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=55,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    assert "| `sugarctl token bench` |" in result.stdout
    assert "In process: `SugardClient.token()` x 20" in result.stdout


def test_bench_governor_still_runs_and_keeps_the_limit() -> None:
    """`python -m bench.bench_governor --quick` prints every figure as a number; the busiest
    second it measured at Sugar is within the limit (a count, not a timing)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.bench_governor", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    figures = dict(
        line.strip().split(": ", 1)
        for line in result.stdout.splitlines()
        if ": " in line and not line.startswith("#")
    )
    assert {"rate at Sugar", "share of the limit", "added by the governor (ms)"} <= set(figures)
    for value in figures.values():
        float(value)
    assert 0 == int(figures["failed curls"])
    assert int(figures["busiest second"]) <= 20
