"""2. Upstream efficiency: how many logins and refreshes Sugar sees."""

from __future__ import annotations

import json
from pathlib import Path

from bench.bench_refresh_versions import PROFILES
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
    short_hash,
    statuses_ok,
    token_path,
    verdict,
    write_config,
)
from sugard.client import SugardClient
from sugard.testing import running_fake

# Sugar 12.0, where the old token outlives a refresh, for the sections that time refreshes
# (13.3+, where it does not: bench/bench_refresh_versions.py, section 7).
GRACE = PROFILES["12.0"]


def upstream(sizes: Sizes, workdir: Path, report: Report) -> None:
    cold_and_reports(sizes, workdir, report)
    steady(sizes, workdir, report)


def cold_and_reports(sizes: Sizes, workdir: Path, report: Report) -> None:
    n = sizes.cold_requests
    with running_fake(users={"u0": PASSWORD}) as fake:
        fake.delay = sizes.cold_login_delay
        config = write_config(workdir, fake.url, {NAME: "u0"}, name="cold.toml")
        with daemon(workdir, config, "cold") as d:
            d.wait_serving()
            with SugardClient(d.socket) as client:
                state = client.status(NAME)["state"]
            if state == "ready":
                raise BenchError("the instance was already logged in: not a cold start")
            burst = load(
                d.socket,
                path=token_path(wait=60),
                connections=n,
                count=n,
                tokens=True,
                samples=True,
            )
            calls = fake.calls
            served = burst["statuses"].get("200", 0)
            logins = calls["password"]
            # Cold for a request means sent before the login's answer left the fake.
            answered_at = min(r.time for r in fake.requests) + sizes.cold_login_delay
            cold = sum(1 for sent, *_ in burst["samples"] if sent < answered_at)
            report.add(
                "2",
                f"logins for {n:,} concurrent requests on a cold instance",
                num(logins),
                num(n),
                ratio(logins, n),
                "1",
                verdict(logins == 1),
            )
            report.add(
                "2",
                "... requests sent while the instance was logging in",
                num(cold),
                num(n),
                ratio(cold, n),
            )
            report.add(
                "2",
                "... requests answered 200, one token for all",
                num(served),
                num(n),
                ratio(served, n),
                f"{n:,}, 1 token",
                verdict(served == n and len(burst["tokens"]) == 1),
            )
            report.shared["cold_ms"] = burst["seconds"] * 1000
            fake.delay = 0.0

            # Reports of one dead token: one refresh, whoever reports it.
            k = sizes.reporters
            dead = d.token()
            fake.revoke(dead)  # dead indeed: sugard checks a report before it renews
            fake.reset_counters()
            body = json.dumps({"access_token": dead})
            reports = load(
                d.socket,
                method="POST",
                path=f"/v1/instances/{NAME}/invalidate",
                body=body,
                connections=k,
                count=k,
                tokens=True,
            )
            calls = fake.calls
            refreshes = calls["refresh_token"] + calls["password"]
            new_tokens = set(reports["tokens"])
            right = (
                reports["statuses"].get("200", 0) == k
                and len(new_tokens) == 1
                and short_hash(dead) not in new_tokens
            )
            report.add(
                "2",
                f"upstream calls for {k} scripts reporting one dead token",
                num(refreshes),
                num(k),
                ratio(refreshes, k),
                "1",
                verdict(refreshes == 1 and right),
            )
            report.add(
                "2",
                "... scripts answered 200 with one new token",
                num(reports["statuses"].get("200", 0) if right else 0),
                num(k),
                ratio(reports["statuses"].get("200", 0) if right else 0, k),
                f"{k}",
                verdict(right),
            )
    report.notes.append(
        f"2: the cold instance's login takes {sizes.cold_login_delay:g} s at the fake, so the "
        f"{n:,} requests (one connection each, opened first, then all sent at once, `wait=60`) "
        "meet it logging in (a row counts those sent before the login's answer); the last was "
        f"answered {report.shared['cold_ms']:,.0f} ms after they were sent. Baseline: "
        "scripts without sugard log in once each (and, Sugar keeping one session per user and "
        "platform, log each other out). A dead token reported by every script is renewed once; "
        "without sugard each script would refresh on its own."
    )


def steady(sizes: Sizes, workdir: Path, report: Report) -> None:
    life, rate, secs = sizes.steady_lifetime, sizes.steady_rate, sizes.steady_seconds
    with running_fake(users={"u0": PASSWORD}, access_lifetime=life, **GRACE) as fake:
        config = write_config(workdir, fake.url, {NAME: "u0"}, name="steady.toml")
        with daemon(workdir, config, "steady") as d:
            d.wait_serving()
            d.token()
            fake.reset_counters()
            run = load(
                d.socket, path=token_path(), connections=4, rate=rate, duration=secs, tokens=True
            )
            calls = fake.calls
    low, high = schedule(life, secs)
    refreshes, logins = calls["refresh_token"], calls["password"]
    ok = low <= refreshes <= high and logins == 0 and statuses_ok(run)
    report.add(
        "2",
        f"refreshes, {rate:g} req/s for {secs:g} s with {life:g} s tokens",
        num(refreshes),
        f"{low}-{high}",
        "-",
        "as scheduled, 0 logins",
        verdict(ok),
    )
    report.add(
        "2",
        "... requests answered 200 (logins during the run)",
        f"{run['statuses'].get('200', 0):,} ({logins})",
        num(run["requests"]),
        ratio(run["statuses"].get("200", 0), run["requests"]),
    )
    report.notes.append(
        f"2: with {life:g} s tokens the keeper refreshes when {min(300, life / 2):g}-"
        f"{min(300, life / 2) * 1.1:g} s are left (half the life, plus up to 10 % jitter), so "
        f"{secs:g} s need {low}-{high} refreshes: that range is the baseline. Without sugard, "
        f"scripts logging in per request would have made {run['requests']:,} logins."
    )


def schedule(lifetime: float, seconds: float) -> tuple[int, int]:
    """How many refreshes `seconds` of service need, by the keeper's rule (sugard/keeper/timing.py
    `refresh_time`: refresh `min(refresh_before, life/2)` before expiry, plus 0-10 %)."""
    lead = min(300.0, lifetime / 2)
    longest = lifetime - min(lead, 0.6 * lifetime)
    shortest = lifetime - min(lead * 1.1, 0.6 * lifetime)
    return int(seconds // longest), int(-(-seconds // shortest))
