"""1. Throughput and latency: sugard next to the baseline server, at the same load."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.harness import (
    NAME,
    PASSWORD,
    BenchError,
    Report,
    Sizes,
    daemon,
    load,
    num,
    ratio,
    server,
    statuses_ok,
    token_path,
    verdict,
    write_config,
)
from sugard.testing import running_fake


def throughput(sizes: Sizes, workdir: Path, report: Report) -> None:
    with running_fake(users={"u0": PASSWORD}) as fake:
        config = write_config(workdir, fake.url, {NAME: "u0"})
        with (
            daemon(workdir, config, "tp") as d,
            server(workdir, "baseline_server.py", "base") as base,
            server(workdir, "aiohttp_floor.py", "aio") as aio,
        ):
            d.wait_serving()
            d.token()
            shares: list[float] = []
            for conns in sizes.connections:
                servers = {"base": base, "sugard": (d.socket, d.pid)}
                if conns == REFERENCE_CONNECTIONS:
                    servers["aiohttp"] = aio
                rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in servers}
                # Interleaved rounds: a burst of load from elsewhere on the machine then hits
                # every server alike, and the median drops the round it spoiled.
                for _ in range(sizes.rounds):
                    for label, (sock, pid) in servers.items():
                        result = load(
                            sock,
                            path=token_path(),
                            connections=conns,
                            duration=sizes.seconds,
                            warmup=sizes.warmup,
                            pid=pid,
                        )
                        if not statuses_ok(result) or not result["requests"]:
                            raise BenchError(f"{label} answered {result['statuses']}")
                        shares.append(result["client_cpu_s"] / result["seconds"])
                        rounds[label].append(result)
                throughput_rows(report, conns, {k: medians(v) for k, v in rounds.items()})
    report.notes.append(
        f"1: GET {token_path()} in a closed loop on kept-alive connections; {sizes.rounds} "
        f"round(s) of {sizes.seconds:g} s per server after {sizes.warmup:g} s of warm-up, the "
        "servers taking turns; each figure is the median over the rounds. CPU per request is the "
        "server's user+system time from /proc/PID/stat over a run, divided by the requests "
        f"answered. The generator used {min(shares):.0%}-{max(shares):.0%} of a core: near "
        "100 % it, not the server, sets the pace (the baseline's requests/s are then a floor of "
        "what it could do), which is why CPU per request is the fairer comparison of two "
        "servers' costs. The bare aiohttp app (bench/aiohttp_floor.py: one route, the same "
        "fixed body, no middleware) is a reference, not sugard: what aiohttp alone costs."
    )


REFERENCE_CONNECTIONS = 32


def medians(results: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("rps", "p50_ms", "p99_ms")
    figures = {k: statistics.median(r[k] for r in results) for k in keys}
    figures["cpu_us"] = statistics.median(r["server_cpu_s"] / r["requests"] * 1e6 for r in results)
    return figures


def throughput_rows(report: Report, conns: int, figures: dict[str, dict[str, float]]) -> None:
    s, b = figures["sugard"], figures["base"]
    c = f"{conns} conn"
    target, met = "-", "-"
    if conns == REFERENCE_CONNECTIONS:
        target, met = ">= 0.50", verdict(s["rps"] >= 0.5 * b["rps"])
    report.add(
        "1",
        f"requests/s, {c}",
        num(s["rps"]),
        num(b["rps"]),
        ratio(s["rps"], b["rps"]),
        target,
        met,
    )
    for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
        report.add(
            "1",
            f"{label} latency, {c}",
            num(s[key], "ms", 3),
            num(b[key], "ms", 3),
            ratio(s[key], b[key]),
        )
    report.add(
        "1",
        f"server CPU per request, {c}",
        num(s["cpu_us"], "us", 1),
        num(b["cpu_us"], "us", 1),
        ratio(s["cpu_us"], b["cpu_us"]),
    )
    a = figures.get("aiohttp")
    if a is not None:
        report.add(
            "1",
            f"bare aiohttp app (reference, not sugard): requests/s, {c}",
            num(a["rps"]),
            num(b["rps"]),
            ratio(a["rps"], b["rps"]),
        )
        report.add(
            "1",
            f"bare aiohttp app (reference, not sugard): CPU per request, {c}",
            num(a["cpu_us"], "us", 1),
            num(b["cpu_us"], "us", 1),
            ratio(a["cpu_us"], b["cpu_us"]),
        )
