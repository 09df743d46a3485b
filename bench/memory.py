"""4. Memory (idle, and with many instances) and 5. reload with one instance changed:
the last two share one daemon."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.harness import (
    NAME,
    PASSWORD,
    BenchError,
    Daemon,
    Report,
    Sizes,
    daemon,
    load,
    num,
    ratio,
    rss_mib,
    server,
    verdict,
    write_config,
)
from sugard.client import SugardClient
from sugard.testing import FakeSugar, running_fake


def memory_idle(sizes: Sizes, workdir: Path, report: Report) -> None:
    with running_fake(users={"u0": PASSWORD}) as fake:
        config = write_config(workdir, fake.url, {NAME: "u0"}, name="idle.toml")
        with (
            daemon(workdir, config, "idle") as d,
            server(workdir, "baseline_server.py", "base") as (_sock, pid),
        ):
            d.wait_serving()
            d.token()
            time.sleep(sizes.settle)
            idle, base = rss_mib(d.pid), rss_mib(pid)
    floor = import_floor()
    report.shared["rss_idle"] = idle
    report.add(
        "4",
        "RSS, idle daemon, 1 instance",
        num(idle, "MiB", 1),
        num(base, "MiB", 1),
        ratio(idle, base),
        "<= 45 MiB",
        verdict(idle <= 45),
    )
    report.notes.append(
        f"4: RSS is VmRSS from /proc/PID/status after {sizes.settle:g} s idle. The baseline is "
        f"the stdlib asyncio server; `python -c 'import sugard.daemon'` alone is {floor:.1f} MiB "
        "(aiohttp, yarl, multidict, tenacity), so that much of sugard's figure is imports."
    )


def import_floor() -> float:
    code = (
        "import sugard.daemon\n"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') "
        "if l.startswith('VmRSS:')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout) / 1024


def many_instances(sizes: Sizes, workdir: Path, report: Report, sections: set[str]) -> None:
    """4 (1,000 instances: ramp-up and memory) and 5 (reload with one changed) share a daemon."""
    n, slots = sizes.instances, sizes.max_parallel_logins
    users = {f"u{i}": PASSWORD for i in range(n)} | {"spare": PASSWORD}
    names = {f"i{i}": f"u{i}" for i in range(n)}
    with running_fake(users=users) as fake:
        host_port = fake.url.removeprefix("http://")
        direct = load(
            host_port,
            host=host_port,
            method="POST",
            path="/rest/v10/oauth2/token",
            form=True,
            body=f"grant_type=password&client_id=sugar&client_secret=&username=u{{i}}"
            f"&password={PASSWORD}&platform=sugard",
            connections=slots,
            count=n,
        )
        if direct["statuses"] != {"200": n}:
            raise BenchError(f"direct logins answered {direct['statuses']}")
        fake.reset_counters()
        config = write_config(
            workdir, fake.url, names, daemon={"max_parallel_logins": slots}, name="many.toml"
        )
        with daemon(workdir, config, "many") as d:
            ready_s = wait_all_ready(d, fake, n)
            time.sleep(sizes.settle)
            rss = rss_mib(d.pid)
            if "memory" in sections:
                memory_many(sizes, report, n, slots, ready_s, direct["seconds"], rss)
            if "reload" in sections:
                reload_one(workdir, fake, d, report, names, slots, ready_s)


def wait_all_ready(d: Daemon, fake: FakeSugar, n: int, timeout: float = 300.0) -> float:
    """Seconds from starting the daemon until every instance is ready (the fake's successful
    logins say when to look; the daemon's status list confirms)."""
    deadline = time.monotonic() + timeout
    while True:
        d.check_alive()
        done = sum(1 for r in fake.requests if r.grant_type == "password" and r.status == 200)
        if done >= n:
            with SugardClient(d.socket) as client:
                states = [s["state"] for s in client.status()]
            if len(states) == n and all(s == "ready" for s in states):
                return time.perf_counter() - d.started
        if time.monotonic() > deadline:
            raise BenchError(f"{done} of {n} instances ready after {timeout:g} s")
        time.sleep(0.02)


def memory_many(
    sizes: Sizes, report: Report, n: int, slots: int, ready_s: float, direct_s: float, rss: float
) -> None:
    report.add(
        "4",
        f"start to all {n:,} instances ready (max_parallel_logins = {slots})",
        num(ready_s, "s", 2),
        num(direct_s, "s", 2),
        ratio(ready_s, direct_s),
    )
    idle = report.shared.get("rss_idle")
    report.add(
        "4",
        f"RSS, {n:,} instances logged in",
        num(rss, "MiB", 1),
        num(idle, "MiB", 1) if idle else "-",
        ratio(rss, idle) if idle else "-",
        "<= 60 MiB",
        verdict(rss <= 60),
    )
    if idle:
        report.notes.append(
            f"4: {n:,} instances cost {(rss - idle) * 1024 / max(n - 1, 1):.1f} KiB each over "
            f"the idle daemon. The ramp-up's baseline is {n:,} password logins sent straight "
            f"to the fake, {slots} at a time, by bench/load.py: the upstream's own cost."
        )


def reload_one(
    workdir: Path,
    fake: FakeSugar,
    d: Daemon,
    report: Report,
    names: dict[str, str],
    slots: int,
    restart_s: float,
) -> None:
    n = len(names)
    changed = f"i{n // 2}"
    write_config(
        workdir,
        fake.url,
        names | {changed: "spare"},
        daemon={"max_parallel_logins": slots},
        name="many.toml",
    )
    fake.reset_counters()
    started = time.perf_counter()
    with SugardClient(d.socket, timeout=120) as client:
        diff = client.reload()
    reload_s = time.perf_counter() - started
    if diff["changed"] != [changed] or len(diff["unchanged"]) != n - 1:
        raise BenchError(f"reload changed {diff['changed']}, not [{changed!r}]")
    d.token(changed)
    new_token_s = time.perf_counter() - started
    time.sleep(0.2)
    calls = fake.calls
    upstream = calls["token"] + calls["logout"]
    report.add(
        "5",
        f"reload, {n:,} instances, 1 changed: wall time (restart instead)",
        num(reload_s * 1000, "ms", 1),
        num(restart_s * 1000, "ms", 0),
        ratio(reload_s, restart_s),
    )
    report.add(
        "5",
        "... upstream calls (restart instead)",
        f"{upstream} ({calls['password']} login)",
        num(n),
        ratio(upstream, n),
        "1 login",
        verdict(upstream == 1 and calls["password"] == 1),
    )
    report.notes.append(
        f"5: `POST /v1/reload` (what `sugarctl reload` and SIGHUP do) after changing the "
        f"username of {changed}; wall time is until the daemon answered with the diff, and "
        f"{new_token_s * 1000:,.0f} ms until the changed instance's new token was served. "
        "Baseline: restarting sugard, which logs every instance in again."
    )
