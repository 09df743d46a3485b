"""What a refresh costs the scripts, per Sugar version: the 401s they see, the upstream calls.

    .venv/bin/python -m bench.bench_refresh_versions               # 12.0 and 13.3, 30 s each
    .venv/bin/python -m bench.bench_refresh_versions --quick
    .venv/bin/python -m bench.bench_refresh_versions --sugard /other/venv/bin/sugard

Up to Sugar 13.0 the token a refresh replaces keeps working for a while; from 13.3 it dies the
moment the refresh answers (docs/sugarcrm.md), so every script still holding it gets a 401.
This runs the real `sugard run` against the fake SugarCRM in each version's profile, with short
tokens (a refresh every few seconds) and a slow token endpoint, and scripts that follow the 401
rule: take a token, call Sugar with it, and on a 401 report it (`invalidate`) and retry once
with the token sugard gives back. Two kinds of script: one token per call, and batches that
keep one token for several calls. `--sugard` runs another build (the "before" figures of
docs/lifecycle.md came from main's with this file unchanged).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import harness
from sugard.testing import FakeSugar, running_fake

# Each version as the fake plays it (its own profile: how long a replaced token lives on).
PROFILES: dict[str, dict[str, Any]] = {
    "12.0": {"sugar_version": "12.0"},
    "13.3": {"sugar_version": "13.3"},
}


@dataclass(frozen=True)
class Workload:
    name: str
    scripts: int
    calls_per_token: int
    pause: float  # between two calls with one token
    gap: tuple[float, float]  # idle time between two batches, drawn uniformly


WORKLOADS = (
    Workload("one token per call", scripts=8, calls_per_token=1, pause=0.0, gap=(0.01, 0.03)),
    Workload("batches of 10 calls", scripts=4, calls_per_token=10, pause=0.02, gap=(0.2, 1.2)),
)


@dataclass
class Tally:
    calls: int = 0
    refused: int = 0  # a 401 from Sugar to a script
    refused_again: int = 0  # a 401 to the retry with the token sugard gave back


async def script(
    daemon: aiohttp.ClientSession,
    sugar: aiohttp.ClientSession,
    url: str,
    work: Workload,
    end: float,
    tally: Tally,
) -> None:
    rng = random.Random()  # noqa: S311 (spacing of a benchmark's requests, not secrets)
    token_url = f"http://sugard/v1/instances/{harness.NAME}/token?wait=30"
    report_url = f"http://sugard/v1/instances/{harness.NAME}/invalidate"
    while time.monotonic() < end:
        async with daemon.get(token_url) as answer:
            token = (await answer.json())["access_token"]
        for _ in range(work.calls_per_token):
            tally.calls += 1
            if await call_sugar(sugar, url, token) == 401:
                tally.refused += 1
                async with daemon.post(report_url, json={"access_token": token}) as answer:
                    token = (await answer.json())["access_token"]
                if await call_sugar(sugar, url, token) == 401:
                    tally.refused_again += 1
            await asyncio.sleep(work.pause)
        await asyncio.sleep(rng.uniform(*work.gap))


async def call_sugar(sugar: aiohttp.ClientSession, url: str, token: str) -> int:
    async with sugar.get(url + "/rest/v10/Accounts", headers={"OAuth-Token": token}) as answer:
        await answer.read()
        return answer.status


async def drive(socket: Path, url: str, work: Workload, seconds: float) -> Tally:
    tally = Tally()
    end = time.monotonic() + seconds
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as daemon,
        aiohttp.ClientSession() as sugar,
    ):
        await asyncio.gather(
            *(script(daemon, sugar, url, work, end, tally) for _ in range(work.scripts))
        )
    return tally


def measure(
    workdir: Path, version: str, work: Workload, seconds: float, lifetime: float, delay: float
) -> dict[str, Any]:
    users = {"u0": harness.PASSWORD}
    with running_fake(users=users, access_lifetime=lifetime, **PROFILES[version]) as fake:
        config = harness.write_config(workdir, fake.url, {harness.NAME: "u0"}, name="versions.toml")
        with harness.daemon(workdir, config, f"v{version}") as d:
            d.wait_serving()
            d.token()
            settle(fake)
            fake.reset_counters()
            fake.delay = delay
            tally = asyncio.run(drive(d.socket, fake.url, work, seconds))
            calls = fake.calls
    refreshes = calls["refresh_token"]
    # Grants, not token-endpoint arrivals: a refresh still in flight when the run ends is in
    # neither count.
    upstream = refreshes + calls["password"] + calls["serverinfo"] + calls["ping"]
    return {
        "version": version,
        "workload": work.name,
        "refreshes": refreshes,
        "logins": calls["password"],
        "upstream": upstream,
        "script_calls": tally.calls,
        "refused": tally.refused,
        "refused_again": tally.refused_again,
    }


def settle(fake: FakeSugar, timeout: float = 10.0) -> None:
    """Let the daemon finish what follows its login (reading the version), so it is not counted."""
    deadline = time.monotonic() + timeout
    while fake.calls["token"] > fake.calls["serverinfo"] and time.monotonic() < deadline:
        time.sleep(0.02)


def per_refresh(count: int, refreshes: int) -> str:
    return f"{count / refreshes:.2f}" if refreshes else "-"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| Sugar | scripts | refreshes | 401s to scripts | 401s per refresh | 401s after the "
        "retry | upstream calls per refresh | logins |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['version']} | {r['workload']} | {r['refreshes']} | {r['refused']} "
            f"| {per_refresh(r['refused'], r['refreshes'])} | {r['refused_again']} "
            f"| {per_refresh(r['upstream'], r['refreshes'])} | {r['logins']} |"
        )
    return "\n".join(lines)


def add_rows(report: harness.Report, *, quick: bool) -> None:
    """Section 7 of `python -m bench --section versions`: the same runs, as rows of its table."""
    seconds = 3.0 if quick else 30.0
    workdir = Path(tempfile.mkdtemp(prefix="sdv-"))
    try:
        for version in PROFILES:
            for work in WORKLOADS:
                lifetime = 2.0 if quick else 6.0
                r = measure(workdir, version, work, seconds, lifetime=lifetime, delay=0.2)
                report.add(
                    "7",
                    f"401s per refresh to scripts, Sugar {version}, {work.name} "
                    f"({r['refreshes']} refreshes)",
                    per_refresh(r["refused"], r["refreshes"]),
                    "-",
                )
                report.add(
                    "7",
                    f"... upstream calls per refresh, Sugar {version}, {work.name}",
                    per_refresh(r["upstream"], r["refreshes"]),
                    "-",
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_refresh_versions",
        description=(__doc__ or "").split("\n", 1)[0],
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds per run")
    parser.add_argument("--seconds", type=float, default=30.0, help="per version and workload")
    parser.add_argument("--lifetime", type=float, default=6.0, help="Sugar's token lifetime (s)")
    parser.add_argument("--delay", type=float, default=0.2, help="Sugar's answer time (s)")
    parser.add_argument("--sugard", type=Path, help="the sugard program to run (default: ours)")
    args = parser.parse_args(argv)
    if args.sugard is not None:
        harness.SUGARD = args.sugard  # the "before" figures: another build, the same workload
    seconds = 3.0 if args.quick else args.seconds
    lifetime = 2.0 if args.quick else args.lifetime
    workdir = Path(tempfile.mkdtemp(prefix="sdv-"))
    results = []
    try:
        for version in PROFILES:
            for work in WORKLOADS:
                print(f"bench: Sugar {version}, {work.name} ...", file=sys.stderr, flush=True)
                results.append(measure(workdir, version, work, seconds, lifetime, args.delay))
    except harness.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"{lifetime:g} s tokens, Sugar answering token requests in "
        f"{args.delay * 1000:.0f} ms, {seconds:g} s per run, sugard: {harness.SUGARD}"
    )
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
