"""3. Refresh invisibility: what a refresh costs the requests around it."""

from __future__ import annotations

import math
from pathlib import Path

from bench.bench_refresh_versions import PROFILES
from bench.harness import (
    NAME,
    PASSWORD,
    Report,
    Sizes,
    daemon,
    load,
    num,
    ratio,
    statuses_ok,
    token_path,
    verdict,
    write_config,
)
from sugard.testing import running_fake

# Sugar 12.0, where the old token outlives a refresh, for the sections that time refreshes
# (13.3+, where it does not: bench/bench_refresh_versions.py, section 7).
GRACE = PROFILES["12.0"]


def refresh_invisibility(sizes: Sizes, workdir: Path, report: Report) -> None:
    delay, life = sizes.refresh_delay, sizes.refresh_lifetime
    with running_fake(users={"u0": PASSWORD}, access_lifetime=life, **GRACE) as fake:
        config = write_config(workdir, fake.url, {NAME: "u0"}, name="refresh.toml")
        with daemon(workdir, config, "refresh") as d:
            d.wait_serving()
            d.token()
            fake.delay = delay
            fake.reset_counters()
            run = load(
                d.socket,
                path=token_path(),
                connections=8,
                rate=sizes.refresh_rate,
                duration=sizes.refresh_seconds,
                samples=True,
                tokens=True,
            )
            windows = [
                (r.time, r.time + delay + 0.05)
                for r in fake.requests
                if r.grant_type == "refresh_token"
            ]
    inside: list[float] = []
    outside: list[float] = []
    for sent, latency_ms, _status, _token in run["samples"]:
        (inside if any(a - 0.01 <= sent <= b for a, b in windows) else outside).append(latency_ms)
    inside.sort()
    outside.sort()
    p99_in, p99_out = percentile(inside, 0.99), percentile(outside, 0.99)
    worst = inside[-1] if inside else 0.0
    report.add(
        "3",
        f"p99 latency during refreshes ({len(windows)} refreshes, fake answers "
        f"in {delay * 1000:.0f} ms)",
        num(p99_in, "ms", 2),
        num(p99_out, "ms", 2),
        ratio(p99_in, p99_out),
        "<= 5 ms",
        verdict(p99_in <= 5.0 and bool(inside)),
    )
    report.add(
        "3",
        f"... worst request during refreshes ({len(inside):,} requests), vs the refresh itself",
        num(worst, "ms", 2),
        num(delay * 1000, "ms", 0),
        ratio(worst, delay * 1000),
        f"< {delay * 1000:.0f} ms, all 200",
        verdict(worst < delay * 1000 and statuses_ok(run)),
    )
    report.notes.append(
        f"3: {sizes.refresh_rate:g} req/s paced over 8 connections for "
        f"{sizes.refresh_seconds:g} s, {life:g} s tokens, the fake answering each refresh in "
        f"{delay * 1000:.0f} ms; latency is from when a request was due. 'During refreshes' is "
        "every request sent while a refresh was at the fake; the baseline is the same run's "
        "other requests. A request that waited for the refresh would take at least "
        f"{delay * 1000:.0f} ms."
    )


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted `values` (0 for an empty list)."""
    if not values:
        return 0.0
    return values[max(0, min(len(values) - 1, math.ceil(share * len(values)) - 1))]
