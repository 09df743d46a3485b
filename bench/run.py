"""sugard's benchmark suite: what the daemon costs and how it scales, next to baselines.

    .venv/bin/python -m bench                    # every section, full sizes (about 4 minutes)
    .venv/bin/python -m bench --quick            # tiny sizes, a few seconds (the smoke test's)
    .venv/bin/python -m bench --section memory --section reload

Every figure is measured in one run, next to its baseline: the real `sugard run` on a real
Unix socket, the fake SugarCRM (`sugard.testing`) on 127.0.0.1 in a thread of this process
(its counters give the upstream figures), and the load generator (`bench/load.py`) and the
baseline server (`bench/baseline_server.py`) as processes of their own. Prints one markdown
table, then notes. It measures and prints; it never fails because a machine is slow, only
when something is broken (a wrong answer, a daemon that does not start).

This module runs the sections and prints the table; the harness (processes, configs, the
table) is bench/harness.py, and each section is a module: throughput, upstream, refresh,
memory (4 and 5), client_cost, and bench_refresh_versions (7).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from bench import bench_refresh_versions
from bench.client_cost import client_cost
from bench.harness import QUICK, BenchError, Report, Sizes
from bench.memory import many_instances, memory_idle
from bench.refresh import refresh_invisibility
from bench.throughput import throughput
from bench.upstream import upstream
from sugard import __version__

SECTIONS = ("throughput", "upstream", "refresh", "memory", "reload", "client", "versions")
DEFAULT_SECTIONS = SECTIONS[:-1]  # versions takes minutes of its own: --section versions


def run(sections: list[str], sizes: Sizes) -> Report:
    report = Report()
    workdir = Path(tempfile.mkdtemp(prefix="sdb-"))
    steps: list[tuple[str, Callable[[], None]]] = [
        ("throughput", lambda: throughput(sizes, workdir, report)),
        ("upstream", lambda: upstream(sizes, workdir, report)),
        ("refresh", lambda: refresh_invisibility(sizes, workdir, report)),
        ("memory", lambda: memory_idle(sizes, workdir, report)),
        ("many", lambda: many_instances(sizes, workdir, report, set(sections))),
        ("client", lambda: client_cost(sizes, workdir, report)),
        ("versions", lambda: bench_refresh_versions.add_rows(report, quick=sizes == QUICK)),
    ]
    try:
        for name, step in steps:
            wanted = name in sections or (
                name == "many" and ("memory" in sections or "reload" in sections)
            )
            if wanted:
                print(f"bench: {name} ...", file=sys.stderr, flush=True)
                step()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def header(sizes: Sizes, quick: bool) -> str:
    return (
        f"sugard {__version__}, Python {platform.python_version()}, aiohttp "
        f"{version('aiohttp')}, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{'--quick sizes' if quick else 'full sizes'}, {time.strftime('%Y-%m-%d')}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=(__doc__ or "").split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, not minutes)")
    parser.add_argument(
        "--section",
        action="append",
        choices=SECTIONS,
        help="run only this section; repeatable (default: all)",
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    sections = args.section or list(DEFAULT_SECTIONS)
    try:
        report = run(sections, sizes)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(header(sizes, args.quick))
    print()
    print(report.markdown())
    print()
    for note in report.notes:
        print(f"- {note}")
    missed = [r for r in report.rows if r.met == "**no**"]
    print()
    print(
        "Targets not met: " + "; ".join(f"{r.section}: {r.measure}" for r in missed)
        if missed
        else "Every target is met."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
