"""What the request governor does and costs: throughput at Sugar as a share of rate_limit
with 50 client processes, and the latency it adds to a request that does not have to wait.

    .venv/bin/python -m bench.bench_governor            # full sizes (about half a minute)
    .venv/bin/python -m bench.bench_governor --quick    # a few seconds

Upstream is the fake SugarCRM (`sugard.testing`) on 127.0.0.1 in a thread of this process,
whose arrival log is the measure (`fake.arrivals`: what Sugar received, when); the daemon is
the real `sugard run` (bench/harness.py). The clients are `curl` processes on the daemon's
socket, each with its own pid, so the governor's round robin has 50 processes to serve:

- throughput: 50 curls, each sending `requests` GETs of /rest/v10/ping back to back, with
  rate_limit 20; reported: the rate at Sugar from its first arrival to its last, as a share of
  the limit, and the most requests Sugar got in any one second;
- latency: one client, `sequential` requests one after another (aiohttp on the socket), with
  the governor off (rate_limit 0) and on with a limit no request reaches (1000/s, so nothing
  queues): the median and 99th percentile of each, and the difference of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.harness import NAME, PASSWORD, daemon
from sugard.testing import running_fake

CLIENTS = 50
LIMIT = 20.0


@dataclass(frozen=True)
class Sizes:
    requests: int = 6  # per curl process
    sequential: int = 2000


QUICK = Sizes(requests=2, sequential=200)


def config(workdir: Path, url: str, rate_limit: float) -> Path:
    secret = workdir / "password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    path = workdir / f"config-{rate_limit:g}.toml"
    path.write_text(
        f'[instances.{NAME}]\nurl = "{url}"\nusername = "bench"\n'
        f'password_file = "{secret}"\nrate_limit = {rate_limit}\n'
    )
    path.chmod(0o600)
    return path


def busiest_second(times: list[float]) -> int:
    times = sorted(times)
    return max((bisect.bisect_right(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def throughput(workdir: Path, sizes: Sizes) -> dict[str, float]:
    with running_fake(users={"bench": PASSWORD}) as fake:
        with daemon(workdir, config(workdir, fake.url, LIMIT), "governed") as sugard:
            sugard.wait_serving()
            sugard.token()
            fake.reset_counters()
            url = f"http://sugard/v1/instances/{NAME}/rest/v10/ping"
            curls = [
                subprocess.Popen(
                    ["curl", "-sS", "--unix-socket", str(sugard.socket), *[url] * sizes.requests],
                    stdout=subprocess.DEVNULL,
                )
                for _ in range(CLIENTS)
            ]
            failed = sum(proc.wait(300) != 0 for proc in curls)
        times = [a.at for a in fake.arrivals if a.path.endswith("/ping")]
    rate = (len(times) - 1) / (max(times) - min(times))
    return {
        "requests": len(times),
        "failed curls": failed,
        "rate at Sugar": rate,
        "share of the limit": rate / LIMIT,
        "busiest second": busiest_second(times),
    }


async def sequential(socket: Path, count: int) -> list[float]:
    """Seconds per request, one after another on one kept-alive connection."""
    url = f"http://sugard/v1/instances/{NAME}/rest/v10/ping"
    seconds = []
    connector = aiohttp.UnixConnector(path=str(socket), limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(count // 10):  # warm up the pools
            async with http.get(url) as answer:
                await answer.read()
        for _ in range(count):
            started = time.perf_counter()
            async with http.get(url) as answer:
                await answer.read()
            seconds.append(time.perf_counter() - started)
    return seconds


def latency(workdir: Path, sizes: Sizes) -> dict[str, float]:
    found: dict[str, float] = {}
    with running_fake(users={"bench": PASSWORD}) as fake:
        for label, limit in (("off", 0.0), ("on", 1000.0)):
            with daemon(workdir, config(workdir, fake.url, limit), f"lat-{label}") as sugard:
                sugard.wait_serving()
                sugard.token()
                seconds = asyncio.run(sequential(sugard.socket, sizes.sequential))
            found[f"median {label} (ms)"] = statistics.median(seconds) * 1000
            found[f"p99 {label} (ms)"] = statistics.quantiles(seconds, n=100)[98] * 1000
    found["added by the governor (ms)"] = found["median on (ms)"] - found["median off (ms)"]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    with tempfile.TemporaryDirectory(prefix="sd-bench-gov-") as directory:
        workdir = Path(directory)
        print(f"## throughput: {CLIENTS} curl processes, rate_limit {LIMIT:g}")
        for key, value in throughput(workdir, sizes).items():
            print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")
        print(f"## latency: {sizes.sequential} sequential requests, one client")
        for key, value in latency(workdir, sizes).items():
            print(f"{key:>28}: {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
