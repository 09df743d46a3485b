"""The fleet's rate limit against a real redis-server: the Lua script's slots (the sliding
log, on Redis' clock), hosts counted, the least rights documented in docs/fleet.md enough, and
Redis gone: a quick failure, said in STATUS, the host counting alone on its share; then two
real hosts sharing one limit at the fake's side."""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support.daemon import DaemonProcess, instance, write_config
from support.fleet import fleet_config
from support.load import busiest_second, flood, rate_at_sugar
from support.raw_http import exchange
from support.redis_server import RedisServer

from sugard.config import SecretRef
from sugard.fleet import FleetStore, StoreUnreachable
from sugard.fleet.ratelimit import FleetRate
from sugard.proxy.governor import Pace
from sugard.secret import Secret
from sugard.testing import FakeSugar

USER, SECRET = "sugard", "rate-secret-pw"
KEY = base64.b64encode(bytes(range(32))).decode()
SITE = "http://sugard/v1/instances/prod"


def rate_of(url: str, holder: str, **config: Any) -> tuple[FleetStore, FleetRate]:
    store = FleetStore.from_config(fleet_config(url, **config))
    return store, FleetRate(store, "id1", holder, "prod")


async def test_the_script_gives_count_slots_per_window_to_all_hosts_together(
    redis_server: RedisServer,
) -> None:
    """Two hosts on one log, as the least-rights user: 3 slots at once (spaced), the fourth a
    window after the first; both hosts counted; a slot beyond the patience is not taken."""
    redis_server.restrict(USER, SECRET)
    url = f"unix://{USER}@{redis_server.socket}"
    password = SecretRef("inline", "", Secret(SECRET))
    one, first = rate_of(url, "h1", redis_password=password)
    two, second = rate_of(url, "h2", redis_password=password)
    pace = Pace(3, 1.0, 3.0)
    try:
        delays = [await first.reserve(pace, 5), await second.reserve(pace, 5)]
        delays += [await first.reserve(pace, 5), await second.reserve(pace, 5)]
        assert delays[0] is not None and delays[0] < 0.05
        assert all(d is not None for d in delays)
        assert delays[1] == pytest.approx(pace.spacing, abs=0.05)
        assert delays[3] == pytest.approx(pace.window, abs=0.1)  # a window after the first
        assert None is await first.reserve(pace, 0.5)  # the next is over a second away
        assert (2, 2) == (first.hosts, second.hosts)
        assert {"shared": True, "hosts": 2} == second.status()
        assert 0.5 == second.share()
    finally:
        await one.close()
        await two.close()


async def test_redis_gone_fails_fast_and_says_so_until_it_answers_again(
    redis_server: RedisServer,
) -> None:
    """With Redis stopped a reservation fails within half a second, then at once (no round
    trip) while the host counts alone; STATUS says so; Redis back, it counts again."""
    store, rate = rate_of(redis_server.url, "h1", timeout=2.0)
    pace = Pace(5, 1.1, 5.0)
    try:
        assert await rate.reserve(pace, 5) is not None
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(StoreUnreachable):
            await rate.reserve(pace, 5)
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        with pytest.raises(StoreUnreachable):
            await rate.reserve(pace, 5)
        assert time.monotonic() - started < 0.05
        assert rate.status()["shared"] is False and "Redis" in rate.status()["fallback"]
    finally:
        redis_server.resume()
        await store.close()


class Hosts:
    """Real `sugard run` processes sharing one Redis and one fake, each with its socket."""

    def __init__(self, fake: FakeSugar, redis_url: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sd-rate-"))
        self.fake, self.redis_url = fake, redis_url
        self.hosts: list[DaemonProcess] = []

    def start(self, n: int, **settings: Any) -> list[DaemonProcess]:
        for _ in range(n):
            directory = self.root / f"h{len(self.hosts)}"
            directory.mkdir(mode=0o700)
            key_file = directory / "fleet.key"
            key_file.write_text(KEY + "\n")
            key_file.chmod(0o600)
            config = write_config(directory, {"prod": instance(self.fake, timeout=1.5, **settings)})
            with config.open("a") as out:
                out.write(
                    f'\n[fleet]\nredis_url = "{self.redis_url}"\nkey_file = "{key_file}"\n'
                    "lease = 6\ntimeout = 0.5\n"
                )
            self.hosts.append(DaemonProcess(config, directory / "s.sock"))
        for host in self.hosts:
            host.wait_ready()
            with host.client() as client:
                client.token("prod", wait=30)
        return self.hosts

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()


def flood_all(hosts: list[DaemonProcess], count: int) -> list[int]:
    """Each host gets `count` requests, 10 at a time, all hosts at once; the statuses."""
    statuses: list[int] = []

    def one(host: DaemonProcess) -> None:
        answers = asyncio.run(flood(SITE, "/rest/v10/me", count, 10, host.socket))
        statuses.extend(answer.status for answer in answers)

    threads = [threading.Thread(target=one, args=(host,)) for host in hosts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return statuses


@pytest.mark.slow
def test_two_fleet_hosts_share_one_limit_and_fall_back_to_their_share(
    fake: FakeSugar, redis_server: RedisServer
) -> None:
    """Two hosts, rate_limit 10 each (the fleet's): flooded together, the fake never sees more
    than 10 in a second, and gets at least 0.85 of 10; token requests take no slot in Redis,
    a proxied request one. Redis gone: STATUS says each counts
    alone on 1/2 of the limit, and together they still stay within 10."""
    hosts = Hosts(fake, redis_server.url)
    try:
        started = hosts.start(2, rate_limit=10)
        fake.reset_counters()
        assert [200] * 60 == flood_all(started, 30)
        arrivals = [a for a in fake.arrivals if a.path.endswith("/me")]
        assert 60 == len(arrivals)
        assert busiest_second(arrivals) <= 10
        assert rate_at_sugar(arrivals) >= 0.85 * 10

        # A token request, or a login sugard answers itself, takes no slot in Redis; a
        # proxied request takes one.
        with redis_server.admin() as admin:
            (hosts_key,) = list(admin.scan_iter(match="sugard:*:rate-hosts"))
            before = admin.hgetall(hosts_key)
            with started[0].client() as client:
                for _ in range(10):
                    client.token("prod")
            login = exchange(started[0].socket, "POST", "/v1/instances/prod/rest/v10/oauth2/token")
            assert 200 == login[0]
            assert before == admin.hgetall(hosts_key)
            assert 200 == exchange(started[0].socket, "GET", "/v1/instances/prod/rest/v10/me")[0]
            assert before != admin.hgetall(hosts_key)

        redis_server.stop()
        fake.reset_counters()
        assert [200] * 30 == flood_all(started, 15)
        assert busiest_second([a for a in fake.arrivals if a.path.endswith("/me")]) <= 10
        for host in started:
            with host.client() as client:
                rate = client.status("prod")["fleet"]["rate"]
            assert (False, 2) == (rate["shared"], rate["hosts"]), json.dumps(rate)
            assert "Redis" in rate["fallback"]
            assert "1/2 of the limit" in host.log_path.read_text()
    finally:
        hosts.stop()
