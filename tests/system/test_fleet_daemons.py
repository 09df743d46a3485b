"""Fleet mode end to end: several real `sugard run` processes stand in for hosts, each with
its own socket and config, sharing one session per instance through a real redis-server, all
against the fake SugarCRM. What users rely on: one login for the whole fleet, one renewal per
dead token, failover with no login, and Redis trouble costing nothing while tokens last."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import ROOT
from support.daemon import (
    PASSWORD,
    USER,
    DaemonProcess,
    InFlight,
    instance,
    sugarctl,
    write_config,
)
from support.wait import wait_for

from sugard.client import SugardError, TokenUnavailable
from sugard.testing import FakeSugar, running_fake

pytestmark = pytest.mark.slow

KEY = base64.b64encode(bytes(range(32))).decode()
OTHER_KEY = base64.b64encode(bytes(range(7, 39))).decode()
LEASE = 6.0  # seconds: the config's floor is 2 x 1.5 + 2 x 0.5 + 1


class Fleet:
    """Hosts: one directory, config and `sugard run` each, all on one Redis and one fake."""

    def __init__(self, fake: FakeSugar, redis_url: str) -> None:
        self.fake = fake
        self.redis_url = redis_url
        self.root = Path(tempfile.mkdtemp(prefix="sd-fl-"))
        self.hosts: list[DaemonProcess] = []

    def start(
        self, n: int, *, key: str = KEY, extra: dict[str, Any] | None = None, wait: bool = True
    ) -> list[DaemonProcess]:
        started = [self._host(key, extra or {}) for _ in range(n)]
        if wait:
            for host in started:
                host.wait_ready()
        return started

    def _host(self, key: str, extra: dict[str, Any]) -> DaemonProcess:
        directory = self.root / f"h{len(self.hosts)}"
        directory.mkdir(mode=0o700)
        key_file = directory / "fleet.key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        instances = {"prod": instance(self.fake, timeout=1.5), **extra}
        config = write_config(directory, instances)
        with config.open("a") as out:
            out.write(
                f'\n[fleet]\nredis_url = "{self.redis_url}"\nkey_file = "{key_file}"\n'
                f"lease = {LEASE}\ntimeout = 0.5\n"
            )
        # Each daemon plays a host of its own: the twin lock must not join them.
        host = DaemonProcess(config, directory / "s.sock", {"SUGARD_HOST_SCOPE": str(directory)})
        self.hosts.append(host)
        return host

    def live(self) -> list[DaemonProcess]:
        return [h for h in self.hosts if h.proc.poll() is None]

    def status(self, host: DaemonProcess, name: str = "prod") -> dict[str, Any]:
        with host.client() as client:
            result: dict[str, Any] = client.status(name)
            return result

    def leader(self) -> DaemonProcess | None:
        leaders = [h for h in self.live() if self.role(h) == "leader"]
        assert len(leaders) <= 1, "two hosts say they lead"
        return leaders[0] if leaders else None

    def role(self, host: DaemonProcess) -> str | None:
        try:
            fleet = self.status(host)["fleet"]
        except (SugardError, OSError):
            return None  # stopped or paused
        return fleet["role"] if fleet else None

    def tokens(self, hosts: list[DaemonProcess] | None = None, wait: float = 30) -> set[str]:
        served = set()
        for host in hosts or self.live():
            with host.client() as client:
                served.add(client.token("prod", wait=wait)["access_token"])
        return served

    def close(self) -> None:
        for host in self.hosts:
            if host.proc.poll() is None:
                host.signal(signal.SIGCONT)
            host.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def short_tokens() -> Iterator[FakeSugar]:
    """The fake with 12 s access tokens: a scheduled refresh every few seconds."""
    with running_fake(users={USER: PASSWORD, "admin": "admin-pw"}, access_lifetime=12) as server:
        yield server


def fleet_of(fake: FakeSugar, redis_server: Any) -> Iterator[Fleet]:
    fleet = Fleet(fake, redis_server.url)
    try:
        yield fleet
    finally:
        fleet.close()
        assert_no_plain_tokens(fake, redis_server)


@pytest.fixture
def fleet(fake: FakeSugar, redis_server: Any) -> Iterator[Fleet]:
    yield from fleet_of(fake, redis_server)


@pytest.fixture
def fast_fleet(short_tokens: FakeSugar, redis_server: Any) -> Iterator[Fleet]:
    yield from fleet_of(short_tokens, redis_server)


def assert_no_plain_tokens(fake: FakeSugar, redis_server: Any) -> None:
    """After every scenario: no access, refresh or download token in any key or value."""
    if redis_server.proc.poll() is not None:
        return
    dump = redis_server.dump()
    issued = fake.issued
    assert issued, "the scenario issued no token to look for"
    for token in issued:
        assert token.encode() not in dump, "a token is in Redis in plain text"


def logins(fake: FakeSugar, username: str = USER) -> int:
    return sum(1 for r in fake.requests if r.grant_type == "password" and r.username == username)


def refreshes(fake: FakeSugar) -> list[Any]:
    return [r for r in fake.requests if r.grant_type == "refresh_token"]


def test_five_hosts_cold_start_log_in_once_and_serve_one_token(
    fleet: Fleet, fake: FakeSugar
) -> None:
    solo = {"solo": {**instance(fake, username="admin", password="admin-pw"), "fleet": False}}
    hosts = fleet.start(4, wait=False) + fleet.start(1, extra=solo, wait=False)
    for host in hosts:
        host.wait_ready()
    assert len(fleet.tokens()) == 1
    assert logins(fake) == 1
    # Followers answer from memory: five tokens each, still one login, still one token.
    assert len(fleet.tokens() | fleet.tokens()) == 1
    assert logins(fake) == 1
    wait_for(fleet.leader, what="a leader")
    roles = sorted(str(fleet.role(h)) for h in hosts)
    assert roles == ["follower"] * 4 + ["leader"]
    status = fleet.status(hosts[0])["fleet"]
    assert set(status) == {"role", "holder", "epoch"} and status["epoch"] >= 1
    # fleet = false: that instance keeps its own session, and says it is local.
    assert fleet.status(hosts[4], "solo")["fleet"] is None
    with hosts[4].client() as client:
        client.token("solo", wait=20)
    assert logins(fake, "admin") == 1
    shown = sugarctl(hosts[4].socket, "status")
    assert shown.returncode == 0, shown.stderr
    header, prod, solo_row = shown.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "ROLE"]
    assert prod.split()[2] == fleet.role(hosts[4]) and solo_row.split()[2] == "local"
    assert all(len(line) <= 80 for line in shown.stdout.splitlines())
    detail = sugarctl(hosts[4].socket, "status", "prod").stdout
    assert f"fleet         {fleet.role(hosts[4])}, epoch " in detail, detail


def test_leader_killed_another_host_continues_without_a_login(
    fast_fleet: Fleet, short_tokens: FakeSugar
) -> None:
    fake = short_tokens
    fast_fleet.start(3)
    before = fast_fleet.tokens()
    assert len(before) == 1
    leader = wait_for(fast_fleet.leader, what="a leader")
    killed_at = time.time()
    leader.signal(signal.SIGKILL)
    leader.proc.wait(10)
    new_leader = wait_for(fast_fleet.leader, timeout=3 * LEASE + 10, what="a new leader")
    assert new_leader is not leader
    # The next scheduled renewal comes from the new leader, from the stored refresh token.
    wait_for(lambda: fast_fleet.tokens().isdisjoint(before), what="a renewed token")
    assert len(fast_fleet.tokens()) == 1
    assert logins(fake) == 1
    after = [r for r in refreshes(fake) if r.time > killed_at]
    assert after, "no refresh after the kill"
    assert all(r.status == 200 for r in refreshes(fake)), [r.error for r in refreshes(fake)]
    assert_each_refresh_once(refreshes(fake))
    log = new_leader.log()
    assert "this host leads the fleet" in log


def assert_each_refresh_once(requests: list[Any]) -> None:
    """A scheduled refresh happens once: refreshes of a 12 s token come seconds apart, never
    two at once (two hosts renewing one epoch would be milliseconds apart)."""
    times = sorted(r.time for r in requests)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap > 2.0 for gap in gaps), gaps


def test_hundred_dead_token_reports_on_five_hosts_make_one_renewal(
    fleet: Fleet, fake: FakeSugar
) -> None:
    hosts = fleet.start(5)
    (token,) = fleet.tokens()
    wait_for(lambda: all(fleet.role(h) for h in hosts), what="every host seated")
    before = len(refreshes(fake))
    assert fake.revoke(token)
    answers: list[str] = []
    errors: list[BaseException] = []

    def report(host: DaemonProcess) -> None:
        try:
            with host.client() as client:
                try:
                    answer = client.invalidate("prod", token)
                except TokenUnavailable:
                    # The daemon answers a report within its default wait (10 s); a machine
                    # running two suites at once can be slower, and then a script does what
                    # the 503 says: asks again, here with a longer wait.
                    answer = client.token("prod", wait=60)
                answers.append(answer["access_token"])
        except Exception as exc:  # said by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=report, args=(hosts[i % 5],)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    assert len(answers) == 100 and len(set(answers)) == 1 and token not in answers
    assert len(refreshes(fake)) - before == 1
    assert logins(fake) == 1
    assert fleet.tokens() == set(answers)


def test_leader_paused_past_its_lease_never_refreshes_a_spent_token(
    fast_fleet: Fleet, short_tokens: FakeSugar
) -> None:
    fake = short_tokens
    fast_fleet.start(3)
    fast_fleet.tokens()
    leader = wait_for(fast_fleet.leader, what="a leader")
    leader.signal(signal.SIGSTOP)
    try:
        others = [h for h in fast_fleet.live() if h is not leader]
        wait_for(
            lambda: any(fast_fleet.role(h) == "leader" for h in others),
            timeout=3 * LEASE + 10,
            what="a new leader while the old one is paused",
        )
        renewed = len(refreshes(fake))
        wait_for(lambda: len(refreshes(fake)) > renewed, what="a refresh by the new leader")
    finally:
        leader.signal(signal.SIGCONT)
    resumed = len(refreshes(fake))
    wait_for(lambda: len(refreshes(fake)) >= resumed + 2, what="two refreshes after resuming")
    wait_for(lambda: len(fast_fleet.tokens()) == 1, what="every host on one token")
    assert [r.error for r in fake.requests if r.error] == []  # no invalid_grant: none reused
    assert logins(fake) <= 2
    assert_each_refresh_once(refreshes(fake))
    assert "fleet leader is" in leader.log()


def test_redis_paused_twenty_seconds_hosts_keep_serving(
    fleet: Fleet, fake: FakeSugar, redis_server: Any
) -> None:
    fleet.start(3)
    (token,) = fleet.tokens()
    redis_server.pause()
    try:
        paused_until = time.monotonic() + 20
        while time.monotonic() < paused_until:
            assert fleet.tokens(wait=5) == {token}
            time.sleep(0.5)
    finally:
        redis_server.resume()
    assert logins(fake) == 1
    assert fleet.tokens() == {token}
    assert any("fleet store" in h.log() or "Redis" in h.log() for h in fleet.hosts)


def test_redis_gone_past_the_token_answers_503_naming_the_fleet_store(
    fast_fleet: Fleet, short_tokens: FakeSugar, redis_server: Any
) -> None:
    hosts = fast_fleet.start(2)
    (token,) = fast_fleet.tokens()
    redis_server.stop()
    assert fast_fleet.tokens(wait=5) == {token}  # the held token, while it is valid

    def refused(host: DaemonProcess) -> dict[str, Any] | None:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--unix-socket",
                str(host.socket),
                "-w",
                "\n%{http_code}",
                "http://sugard/v1/instances/prod/token?wait=1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        body, _, code = out.rpartition("\n")
        return json.loads(body) | {"status": int(code)} if code != "200" else None

    for host in hosts:
        answer = wait_for(lambda h=host: refused(h), what="503 once the token ran out")
        assert answer["status"] == 503 and answer["error"] == "token_unavailable"
        assert "fleet store" in answer["message"], answer
    assert logins(short_tokens) == 1  # nobody logged in on their own
    assert all(r.status == 200 for r in short_tokens.requests)


def test_redis_restarted_empty_costs_no_more_than_one_login(
    fleet: Fleet, fake: FakeSugar, redis_server: Any
) -> None:
    hosts = fleet.start(3)
    (token,) = fleet.tokens()
    redis_server.restart_empty()
    wait_for(lambda: all("lost the session" in h.log() for h in hosts), what="loss noticed")
    wait_for(fleet.leader, what="a leader again")
    # A renewal asked on a follower: the leader renews from the refresh token it holds.
    follower = next(h for h in hosts if fleet.role(h) == "follower")
    answer = sugarctl(follower.socket, "refresh", "prod")
    assert answer.returncode == 0, answer.stderr
    wait_for(lambda: len(fleet.tokens()) == 1 and token not in fleet.tokens(), what="renewed")
    assert logins(fake) == 1
    # A host that starts now finds the session in the new Redis: still no login.
    (late,) = fleet.start(1)
    assert fleet.tokens([late]) == fleet.tokens(hosts[:1])
    assert logins(fake) == 1


def test_wrong_key_on_one_host_refuses_and_the_others_go_on(fleet: Fleet, fake: FakeSugar) -> None:
    good = fleet.start(2)
    (token,) = fleet.tokens(good)
    (bad,) = fleet.start(1, key=OTHER_KEY)
    answer = sugarctl(bad.socket, "token", "prod", "--wait", "20")
    assert answer.returncode != 0
    assert "fleet key" in answer.stderr, answer.stderr
    assert token not in answer.stdout
    status = fleet.status(bad)
    assert status["state"] == "failed" and "fleet key" in status["last_error"]["message"]
    assert fleet.tokens(good) == {token}
    assert logins(fake) == 1
    assert os.path.exists(bad.socket)


def test_bench_fleet_quick_shows_one_login_and_no_redis_per_request() -> None:
    """`python -m bench.bench_fleet --quick` runs, and its table says what fleet mode is for."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_fleet", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {
        cells[0]: cells[1:]
        for line in out.stdout.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    assert rows["logins"][0] == "1"
    assert int(rows["logins"][1]) > 1  # independent daemons evict each other
    assert rows["script-visible errors"][0] == "0"
    assert float(rows["Redis commands per token request"][0]) < 0.1
    assert rows["failover: logins"][0] == "0"


def test_a_reload_that_removes_the_instance_hands_the_lead_over(
    fleet: Fleet, fake: FakeSugar
) -> None:
    solo = {"solo": {**instance(fake, username="admin", password="admin-pw"), "fleet": False}}
    hosts = fleet.start(2, extra=solo)
    (token,) = fleet.tokens()
    leader = wait_for(fleet.leader, what="a leader")
    other = next(h for h in hosts if h is not leader)
    text = leader.config.read_text()
    start = text.index("[instances.prod]")
    end = text.index("[", start + 1)
    leader.config.write_text(text[:start] + text[end:])
    leader.signal(signal.SIGHUP)
    wait_for(lambda: fleet.role(other) == "leader", timeout=LEASE + 10, what="the lead handed over")
    assert fleet.tokens([other]) == {token}
    assert logins(fake) == 1


class Scripts:
    """Two scripts per host, each in a loop: take a token, use it at Sugar (here: ask the fake
    whether it would take it) and, on a refusal, report it and take the next. Counts per
    phase, and per host, the tokens served dead (refused on arrival) and the failed requests."""

    def __init__(self, fake: FakeSugar, hosts: list[DaemonProcess]) -> None:
        self.fake = fake
        self.hosts = hosts
        self.phase = "start"
        self.dead: dict[tuple[str, int], int] = {}
        self.failed: dict[tuple[str, int], int] = {}
        self.served: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True)
            for i in range(len(hosts))
            for _ in range(2)
        ]
        for thread in self._threads:
            thread.start()

    def _count(self, what: dict[tuple[str, int], int], host: int) -> None:
        key = (self.phase, host)
        what[key] = what.get(key, 0) + 1

    def _run(self, host: int) -> None:
        with self.hosts[host].client() as client:
            while not self._stop.is_set():
                try:
                    token = client.token("prod", wait=5)["access_token"]
                    self._count(self.served, host)
                    if not self.fake.valid(token):
                        self._count(self.dead, host)
                        client.invalidate("prod", token)
                except SugardError:
                    self._count(self.failed, host)
                time.sleep(0.05)

    def total(self, what: dict[tuple[str, int], int], phase: str) -> dict[int, int]:
        return {h: what.get((phase, h), 0) for h in range(len(self.hosts))}

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def test_redis_restarted_empty_while_the_leader_renewed_costs_no_login_and_no_dead_token(
    fleet: Fleet, fake: FakeSugar, redis_server: Any
) -> None:
    """The leader's refresh answers while Redis is down (its write fails), Redis comes back
    empty and a follower takes the lease: no password login, no host serves the token Sugar
    replaced once the store is back, and every host serves the live session within a round."""
    hosts = fleet.start(3)
    (first,) = fleet.tokens()
    leader = wait_for(fleet.leader, what="a leader")
    followers = [h for h in hosts if h is not leader]
    index = {id(h): i for i, h in enumerate(hosts)}
    scripts = Scripts(fake, hosts)
    try:
        # The leader's refresh is in flight at Sugar when Redis goes away: Sugar replaces the
        # session (the old token dies at once), and the leader cannot store what it got.
        fake.delay = 1.0
        arrived = fake.calls["token"]
        renewal = InFlight(leader.socket, "refresh", "prod")
        wait_for(lambda: fake.calls["token"] > arrived, what="the refresh at Sugar")
        scripts.phase = "outage"
        redis_server.stop()
        assert renewal.join().returncode == 0, renewal.result
        fake.delay = 0.0
        assert not fake.valid(first)
        for host in followers:
            wait_for(lambda h=host: "Redis unreachable" in h.log(), what="the outage seen")
        time.sleep(LEASE / 3)  # a round more of the outage: the hosts go on serving meanwhile
        # Redis comes back empty while the old leader is held up: a follower takes the lease.
        leader.signal(signal.SIGSTOP)
        try:
            redis_server.start()
            back = time.monotonic()
            scripts.phase = "back"
            wait_for(
                lambda: any(fleet.role(h) == "leader" for h in followers),
                what="a follower leading",
            )
        finally:
            leader.signal(signal.SIGCONT)
        resumed = time.monotonic()

        def converged() -> bool:
            try:
                served = fleet.tokens(wait=5)
            except TokenUnavailable:
                return False
            return len(served) == 1 and fake.valid(next(iter(served)))

        wait_for(converged, what="every host on one live token", interval=0.05)
        settled, since_resumed = time.monotonic() - back, time.monotonic() - resumed
        time.sleep(LEASE / 3)  # one more round, to see nothing changes after
        scripts.phase = "after"
        time.sleep(LEASE / 3)
    finally:
        scripts.stop()
    figures = {
        "logins": logins(fake),
        "dead served during the outage": scripts.total(scripts.dead, "outage"),
        "dead served once Redis was back": scripts.total(scripts.dead, "back"),
        "dead served after": scripts.total(scripts.dead, "after"),
        "failed during the outage": scripts.total(scripts.failed, "outage"),
        "failed once Redis was back": scripts.total(scripts.failed, "back"),
        "served": {p: sum(scripts.total(scripts.served, p).values()) for p in ("outage", "back")},
        "converged after Redis came back": round(settled, 2),
        "converged after the old leader resumed": round(since_resumed, 2),
        "leader": index[id(leader)],
    }
    print(figures)
    assert logins(fake) == 1, figures
    assert sum(scripts.total(scripts.dead, "back").values()) == 0, figures
    assert sum(scripts.total(scripts.dead, "after").values()) == 0, figures
    # The old leader stores its session at its next round (at once if it hears the new
    # leader ask), and every host adopts it at once (pub/sub) or at its next round.
    assert since_resumed < 2 * LEASE / 3, figures
    assert len(fleet.tokens()) == 1
