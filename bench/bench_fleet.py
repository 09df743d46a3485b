"""Fleet mode against independent daemons: five hosts sharing one session through Redis, and
five sugard on their own, both logging in as one user on one platform.

    .venv/bin/python -m bench.bench_fleet                 # 5 minutes of 10 s tokens
    .venv/bin/python -m bench.bench_fleet --quick         # 20 s, for the smoke test

Both setups run at the same time, each against its own fake SugarCRM (same user, platform and
10 s tokens), with scripts on every host that take a token, call Sugar with it, and on a 401
report it and retry once. Then, on the fleet: the leader is killed (`kill -9`) and the time to
the next renewal served is taken; Redis' INFO commandstats counts the commands per renewal
and per token request; and token requests are timed on a follower and on a local daemon.
Needs Debian's `redis-server` (started here on a unix socket, no disk).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis

from bench import harness
from bench.bench_refresh_versions import call_sugar
from sugard.client import SugardClient
from sugard.testing import FakeSugar, running_fake

HOSTS = 5
LIFETIME = 10.0  # Sugar's access token lifetime in this benchmark
LEASE = 9.0  # the config's floor for timeout = 3 and [fleet] timeout = 0.5 is 8


@dataclass
class Tally:
    calls: int = 0
    refused: int = 0  # a 401 from Sugar, retried with the token sugard gave back
    errors: int = 0  # what a script could not get past: no token, or a 401 after the retry


class Redis:
    """A redis-server of our own on a unix socket, with no disk (the tests have one too, in
    tests/redis_server.py; the benchmark does not import from tests/)."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "redis.sock"
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", "0", "--unixsocket", str(self.socket)),
                *("--unixsocketperm", "700", "--save", "", "--appendonly", "no"),
                *("--dir", str(directory), "--logfile", str(directory / "redis.log")),
            ],
        )
        deadline = time.monotonic() + 15
        while not self._answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise harness.BenchError("redis-server did not start")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except (redis.ConnectionError, FileNotFoundError):
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def commands(self) -> int:
        """Commands Redis ran so far, less our own INFO calls."""
        stats = self.client().info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info",))

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def host_config(directory: Path, url: str, redis: Redis | None, key: str) -> Path:
    config = harness.write_config(directory, url, {harness.NAME: "u0"})
    with config.open("a") as out:
        out.write("timeout = 3\n")  # the last table is the instance's
        if redis is not None:
            key_file = directory / "fleet.key"
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
            out.write(
                f'\n[fleet]\nredis_url = "unix://{redis.socket}"\nkey_file = "{key_file}"\n'
                f"lease = {LEASE:g}\ntimeout = 0.5\n"
            )
    return config


def start_hosts(root: Path, tag: str, url: str, redis: Redis | None) -> list[harness.Daemon]:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    hosts = []
    for i in range(HOSTS):
        directory = root / f"{tag}{i}"
        directory.mkdir(mode=0o700)
        config = host_config(directory, url, redis, key)
        hosts.append(harness.Daemon(directory, config, "d", own_host=True))
    for host in hosts:
        host.wait_serving()
    return hosts


async def script(socket: Path, url: str, end: float, tally: Tally) -> None:
    token_url = f"http://sugard/v1/instances/{harness.NAME}/token?wait=30"
    report_url = f"http://sugard/v1/instances/{harness.NAME}/invalidate"
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as daemon,
        aiohttp.ClientSession() as sugar,
    ):
        while time.monotonic() < end:
            tally.calls += 1
            async with daemon.get(token_url) as answer:
                body = await answer.json()
            if answer.status != 200:
                tally.errors += 1
                await asyncio.sleep(1)
                continue
            token = body["access_token"]
            if await call_sugar(sugar, url, token) == 401:
                tally.refused += 1
                async with daemon.post(report_url, json={"access_token": token}) as answer:
                    body = await answer.json()
                if (
                    answer.status != 200
                    or await call_sugar(sugar, url, body["access_token"]) == 401
                ):
                    tally.errors += 1
            await asyncio.sleep(0.25)


async def drive(
    setups: dict[str, tuple[list[harness.Daemon], str]], seconds: float
) -> dict[str, Tally]:
    end = time.monotonic() + seconds
    tallies = {name: Tally() for name in setups}
    await asyncio.gather(
        *(
            script(host.socket, url, end, tallies[name])
            for name, (hosts, url) in setups.items()
            for host in hosts
            for _ in range(2)
        )
    )
    return tallies


def grants(fake: FakeSugar) -> dict[str, int]:
    requests = fake.requests
    return {
        "logins": sum(1 for r in requests if r.grant_type == "password" and r.status == 200),
        "refreshes": sum(
            1 for r in requests if r.grant_type == "refresh_token" and r.status == 200
        ),
        # A refresh token another host's login deleted: that host's session was evicted.
        "evictions": sum(1 for r in requests if r.error == "invalid_grant"),
    }


def role(host: harness.Daemon) -> str | None:
    try:
        with SugardClient(host.socket, timeout=5) as client:
            fleet = client.status(harness.NAME)["fleet"]
    except Exception:  # a killed host: no role
        return None
    return fleet["role"] if fleet else None


def failover(hosts: list[harness.Daemon], fake: FakeSugar) -> dict[str, float]:
    """Kill the leader; seconds to a new leader and to the next renewal served."""
    leader = next(h for h in hosts if role(h) == "leader")
    before = leader.token()
    killed = time.monotonic()
    logins = grants(fake)["logins"]
    os.kill(leader.pid, signal.SIGKILL)
    leader.proc.wait(10)
    others = [h for h in hosts if h is not leader]
    took_over = renewed = None
    while renewed is None or took_over is None:
        if time.monotonic() - killed > 60:
            raise harness.BenchError("no failover within 60 s")
        if took_over is None and any(role(h) == "leader" for h in others):
            took_over = time.monotonic() - killed
        if renewed is None and others[0].token() != before:
            renewed = time.monotonic() - killed
        time.sleep(0.05)
    return {
        "new_leader": took_over,
        "renewed": renewed,
        "logins": grants(fake)["logins"] - logins,
    }


def latency_us(host: harness.Daemon, n: int) -> tuple[float, float]:
    with SugardClient(host.socket, timeout=10) as client:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            client.token(harness.NAME)
            times.append((time.perf_counter() - started) * 1e6)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def redis_costs(
    redis: Redis, hosts: list[harness.Daemon], fake: FakeSugar, n: int
) -> dict[str, float]:
    """Commands per token request (a burst on a follower, less the background rounds of the
    same span) and per renewal (forced renewals, less the background)."""
    follower = next(h for h in hosts if role(h) == "follower")
    span = 3.0
    quiet_start = redis.commands()
    time.sleep(span)
    background = (redis.commands() - quiet_start) / span
    start, began = redis.commands(), time.monotonic()
    with SugardClient(follower.socket, timeout=10) as client:
        for _ in range(n):
            client.token(harness.NAME)
    burst = redis.commands() - start - background * (time.monotonic() - began)
    renewals, start, began = 5, redis.commands(), time.monotonic()
    for _ in range(renewals):
        with SugardClient(follower.socket, timeout=30) as client:
            client.refresh(harness.NAME)
    spent = redis.commands() - start - background * (time.monotonic() - began)
    return {
        "per_request": max(0.0, burst) / n,
        "per_renewal": max(0.0, spent) / renewals,
        "background_per_s": background,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_fleet", description=(__doc__ or "").split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="20 s instead of 5 minutes")
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print(
            "bench: redis-server is not installed (apt-get install redis-server)", file=sys.stderr
        )
        return 1
    seconds = 20.0 if args.quick else args.minutes * 60
    root = Path(tempfile.mkdtemp(prefix="sdf-"))
    users = {"u0": harness.PASSWORD}
    hosts: list[harness.Daemon] = []
    try:
        with (
            running_fake(users=users, access_lifetime=LIFETIME) as fleet_fake,
            running_fake(users=users, access_lifetime=LIFETIME) as local_fake,
        ):
            store = Redis(root)
            try:
                fleet = start_hosts(root, "f", fleet_fake.url, store)
                local = start_hosts(root, "l", local_fake.url, None)
                hosts = fleet + local
                print(f"bench: {seconds:g} s of {LIFETIME:g} s tokens ...", file=sys.stderr)
                tallies = asyncio.run(
                    drive(
                        {"fleet": (fleet, fleet_fake.url), "local": (local, local_fake.url)},
                        seconds,
                    )
                )
                counts = {"fleet": grants(fleet_fake), "local": grants(local_fake)}
                n = 300 if args.quick else 2000
                follower = next(h for h in fleet if role(h) == "follower")
                latency = {"fleet": latency_us(follower, n), "local": latency_us(local[0], n)}
                costs = redis_costs(store, fleet, fleet_fake, n)
                print("bench: failover ...", file=sys.stderr)
                over = failover(fleet, fleet_fake)
            finally:
                for host in hosts:
                    host.stop()
                store.stop()
    except harness.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{HOSTS} hosts, {seconds:g} s of {LIFETIME:g} s tokens, lease {LEASE:g} s")
    print()
    print("| measure | fleet (5 hosts, one Redis) | 5 independent sugard |")
    print("|---|---:|---:|")
    for what in ("logins", "refreshes", "evictions"):
        print(f"| {what} | {counts['fleet'][what]} | {counts['local'][what]} |")
    for what, label in (
        ("calls", "script rounds"),
        ("refused", "401s retried"),
        ("errors", "script-visible errors"),
    ):
        print(
            f"| {label} | {getattr(tallies['fleet'], what)} | {getattr(tallies['local'], what)} |"
        )
    print(
        f"| token request latency, median / p99 (µs) | {latency['fleet'][0]:.0f} / "
        f"{latency['fleet'][1]:.0f} (follower) | {latency['local'][0]:.0f} / "
        f"{latency['local'][1]:.0f} |"
    )
    print(f"| Redis commands per token request | {costs['per_request']:.3f} | - |")
    print(f"| Redis commands per renewal | {costs['per_renewal']:.1f} | - |")
    print(
        f"| Redis commands per second, background (5 hosts) | {costs['background_per_s']:.1f} | - |"
    )
    print(f"| failover: kill -9 to a new leader (s) | {over['new_leader']:.1f} | - |")
    print(f"| failover: kill -9 to the next renewal served (s) | {over['renewed']:.1f} | - |")
    print(f"| failover: logins | {over['logins']} | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
