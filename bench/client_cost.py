"""6. sugarctl start-up (bench/bench_client.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.harness import (
    Report,
    Sizes,
    num,
    ratio,
    verdict,
)


def client_cost(sizes: Sizes, workdir: Path, report: Report) -> None:
    from bench import bench_client

    if not shutil.which("curl"):
        report.notes.append("6: skipped: curl is not installed")
        return
    figures = bench_client.measure(runs=sizes.client_runs, calls=sizes.client_calls)
    bare, ctl, curl = figures.median_bare, figures.median_sugarctl, figures.median_curl
    report.add(
        "6",
        "`sugarctl token` start to exit, median (bare `python -I -S`)",
        num(ctl * 1000, "ms", 1),
        num(bare * 1000, "ms", 1),
        ratio(ctl, bare),
        f"<= {bench_client.TARGET} x",
        verdict(ctl / bare <= bench_client.TARGET),
    )
    site = figures.median(1)
    for label, seconds in (
        ("... `python -c pass`: the start-up with `site` every console script pays", site),
        ("... `curl --unix-socket` for the same token", curl),
    ):
        report.add(
            "6",
            label,
            num(seconds * 1000, "ms", 1),
            num(bare * 1000, "ms", 1),
            ratio(seconds, bare),
        )
    report.add(
        "6",
        "`SugardClient.token()` in process, one kept connection",
        num(figures.calls_per_second, "calls/s"),
        "-",
    )
    report.notes.append(
        f"6: bench/bench_client.py ({sizes.client_runs} runs of each command, interleaved; run "
        "it alone for its detailed table). Its target, sugarctl within 2.5 x the bare "
        f"interpreter, is judged on this environment's install: here `site` alone is "
        f"{site / bare:.2f} x the bare interpreter, and sugarctl's own share after `site` is "
        f"{(ctl - site) * 1000:.1f} ms. An editable install (`pip install -e`) loads setuptools' "
        "import finder in every console script; a regular `pip install .` does not."
    )
