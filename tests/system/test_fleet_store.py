"""Fleet mode's pieces against a real redis-server: the sealed record, compare-and-set, the
lease and its local deadline, pub/sub, forwarding, and Redis failing (paused, gone, emptied)."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from support import ROOT
from support.fleet import (
    ACCESS,
    DOWNLOAD,
    KEY,
    OTHER_KEY,
    REFRESH,
    USERNAME,
    fleet_config,
    record,
    sugar_instance,
)
from support.redis_server import RedisServer
from support.wait import until

from sugard.fleet import (
    Fleet,
    FleetKey,
    FleetMember,
    NotLeader,
    Stale,
    StoreUnreachable,
    Written,
    WrongKey,
    identity_of,
    seal,
    unseal,
)
from sugard.secret import Secret


class FakeClock:
    """Virtual monotonic time for the lease: tests move it, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


NewFleet = Callable[..., Fleet]


@pytest.fixture
async def new_fleet(redis_server: RedisServer) -> AsyncIterator[NewFleet]:
    """Fleets (one per simulated host) on the test's Redis; all stopped at the end."""
    made: list[Fleet] = []

    def make(clock: Callable[[], float] | None = None, **config: Any) -> Fleet:
        extra = {"clock": clock} if clock else {}
        made.append(Fleet(fleet_config(redis_server.url, **config), **extra))
        return made[-1]

    yield make
    for fleet in made:
        await fleet.stop()


async def leader_of(new_fleet: NewFleet, **config: Any) -> tuple[Fleet, FleetMember]:
    fleet = new_fleet(**config)
    member = fleet.join(sugar_instance())
    await member.tick()
    assert "leader" == member.role
    return fleet, member


# --- the sealed record, no Redis needed -----------------------------------------------------------


def test_a_sealed_record_opens_with_its_key_identity_and_epoch() -> None:
    """Round trip: every token and expiry comes back, and the epoch is the one sealed for."""
    key = FleetKey.from_text(KEY)
    original = record()
    blob = seal(key, "id1", 7, original)
    opened = unseal(key, "id1", 7, blob)
    assert ACCESS + "-0" == opened.access_token.reveal()
    assert REFRESH + "-0" == opened.refresh_token.reveal()
    assert opened.download_token is not None
    assert DOWNLOAD + "-0" == opened.download_token.reveal()
    assert original.expires_at == opened.expires_at
    assert 7 == opened.epoch
    assert ACCESS.encode() not in blob and REFRESH.encode() not in blob
    assert seal(key, "id1", 7, original) != blob  # a fresh random nonce every time


def test_a_wrong_key_is_refused_clearly_without_showing_any_secret() -> None:
    """Another host's key: WrongKey, whose one-line message says to copy the key, and names
    neither the key nor a token."""
    blob = seal(FleetKey.from_text(KEY), "id1", 1, record())
    with pytest.raises(WrongKey) as caught:
        unseal(FleetKey.from_text(OTHER_KEY), "id1", 1, blob)
    message = str(caught.value)
    assert "same key" in message and "\n" not in message
    for secret in (KEY, OTHER_KEY, ACCESS, REFRESH):
        assert secret not in message
    assert "***" == repr(FleetKey.from_text(KEY)).removeprefix("FleetKey(").removesuffix(")")


def test_a_record_moved_to_another_instance_or_epoch_does_not_open() -> None:
    """The identity and epoch are the associated data: a copy under another name, or an old
    record put back under a newer epoch, is refused."""
    key = FleetKey.from_text(KEY)
    blob = seal(key, "id1", 3, record())
    with pytest.raises(WrongKey):
        unseal(key, "id2", 3, blob)
    with pytest.raises(WrongKey):
        unseal(key, "id1", 4, blob)


def test_the_identity_is_the_session_not_the_local_name_and_hides_the_username() -> None:
    """Same url, username, platform and client_id under two local names: one identity; any of
    them different: another; the username is nowhere in it; another key names it otherwise."""
    key = FleetKey.from_text(KEY)
    prod = identity_of(sugar_instance("prod"), key)
    assert prod == identity_of(sugar_instance("crm-eu"), key)
    assert prod != identity_of(sugar_instance(platform="other"), key)
    assert prod != identity_of(sugar_instance(username="bob"), key)
    assert prod != identity_of(sugar_instance(client_id="mine"), key)
    assert prod != identity_of(sugar_instance(url="https://crm2.example.com"), key)
    assert prod != identity_of(sugar_instance(), FleetKey.from_text(OTHER_KEY))
    assert "alice" not in prod


def test_the_lease_deadline_counts_from_the_send_and_ends_before_the_lease() -> None:
    """Virtual time: the deadline starts when the renew was sent, not answered, and a call of
    `duration` is allowed only if it ends before the lease can lapse."""
    from sugard.fleet import Lease

    clock = FakeClock()
    lease = Lease(30.0, clock)
    assert not lease.held() and not lease.may_run(0)
    sent = clock.now
    clock.now += 5  # the answer took 5 s to come back
    lease.granted(sent)
    assert lease.deadline <= sent + 30
    assert lease.may_run(20)
    assert not lease.may_run(25)  # would end after the lease Redis started at the send
    clock.now = sent + 30
    assert not lease.held() and 0 == lease.remaining()


# --- the store: compare-and-set, and nothing secret in Redis ------------------------------------


async def test_nothing_secret_is_in_redis(redis_server: RedisServer, new_fleet: NewFleet) -> None:
    """After a stored session and a forwarded report, every key and value in Redis is
    scanned: no access, refresh or download token, no username, no key."""
    _, member = await leader_of(new_fleet)
    assert isinstance(await member.publish(record()), Written)
    follower = new_fleet().join(sugar_instance("eu"))
    await follower.reread()
    await follower.ask_leader("dead", Secret(ACCESS + "-0").fingerprint, wait=0)
    dump = redis_server.dump()
    assert dump, "the store is empty: the test would prove nothing"
    for secret in (ACCESS, REFRESH, DOWNLOAD, USERNAME, KEY):
        assert secret.encode() not in dump
        assert secret not in repr(member) + repr(follower)
    assert base64.b64decode(KEY) not in dump


async def test_a_stale_writer_is_refused_and_the_store_untouched(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """Compare-and-set on the epoch: a writer that read epoch 1 when 2 is stored gets Stale,
    and the stored record is still epoch 2's."""
    _, member = await leader_of(new_fleet)
    assert Written(1) == await member.publish(record(1))
    assert Written(2) == await member.publish(record(2))
    before = redis_server.dump()
    member.stored_epoch = 1  # as if it missed the second write
    assert Stale(2) == await member.publish(record(3))
    assert before == redis_server.dump()
    assert REFRESH + "-2" == (await member.reread() or record()).refresh_token.reveal()


async def test_a_writer_without_the_lease_is_refused(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """The write is fenced by the lease: a follower, even with the right epoch, writes
    nothing, and learns it is not the leader."""
    fleet, leader = await leader_of(new_fleet)
    await leader.publish(record(1))
    other = new_fleet()
    follower = other.join(sugar_instance())
    await follower.tick()
    assert "follower" == follower.role
    assert fleet.holder == follower.holder
    assert NotLeader(1) == await follower.publish(record(9))
    assert REFRESH + "-1" == (await follower.reread() or record()).refresh_token.reveal()


# --- leader election ---------------------------------------------------------------------------


async def test_two_contenders_make_one_leader(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """Five hosts tick at once, round after round: exactly one leads, the same one, and every
    host names it as the holder."""
    fleets = [new_fleet() for _ in range(5)]
    members = [f.join(sugar_instance(f"n{i}")) for i, f in enumerate(fleets)]
    for _ in range(5):
        await asyncio.gather(*(m.tick() for m in members))
        leaders = [m for m in members if m.role == "leader"]
        assert 1 == len(leaders)
        assert {leaders[0].fleet.holder} == {m.holder for m in members}


async def test_a_leader_that_stops_renewing_stops_calling_sugar_in_virtual_time(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """Without a renewal the leader's own clock ends its right to call Sugar at the lease,
    with no Redis round trip: may_call_sugar turns false, and the role with it."""
    clock = FakeClock()
    fleet = new_fleet(clock)
    member = fleet.join(sugar_instance())
    await member.tick()
    assert member.may_call_sugar(10.0)
    clock.now += 30 - 10 - 1.0  # 10 s of Sugar call and 1 s of Redis no longer fit
    assert not member.may_call_sugar(10.0)
    assert "leader" == member.role
    clock.now += 11
    assert "follower" == member.role


@pytest.mark.slow
async def test_the_lease_lapses_in_redis_and_another_host_takes_over(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """Redis' own expiry (a 2 s lease, real time): a holder that stops renewing loses the
    lease, and the next host to tick becomes leader and reads the stored session."""
    _, holder = await leader_of(new_fleet, lease=2.0, timeout=0.5)
    await holder.publish(record(1))
    new = new_fleet(lease=2.0, timeout=0.5)
    taker = new.join(sugar_instance())

    async def tick_until_leader() -> None:
        while taker.role != "leader":
            await taker.tick()
            await asyncio.sleep(0.05)

    await asyncio.wait_for(tick_until_leader(), 20)
    assert new.holder == taker.holder
    assert taker.current is not None and 1 == taker.epoch
    assert isinstance(await holder.publish(record(2)), NotLeader)


@pytest.mark.slow
async def test_may_call_sugar_turns_false_before_the_lease_lapses_in_redis(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """Real clocks: a holder that does not renew sees may_call_sugar(1 s) turn false while
    Redis still holds its lease for longer than that second."""
    fleet, member = await leader_of(new_fleet, lease=4.0, timeout=0.5)
    await until(lambda: not member.may_call_sugar(1.0), timeout=10)
    with redis_server.admin() as admin:
        left_ms = admin.pttl(fleet.store.key(member.identity, "lease"))
    assert left_ms > 1000 * 0.5, f"Redis kept the lease only {left_ms} ms more"


HOLDER = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[3])
from sugard.fleet import Fleet
from support.fleet import fleet_config, record, sugar_instance

async def main():
    fleet = Fleet(fleet_config(sys.argv[1], lease=float(sys.argv[2]), timeout=0.5))
    member = fleet.join(sugar_instance())
    await member.tick()
    print(member.role, flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    print(member.may_call_sugar(1.0), flush=True)
    print(type(await member.publish(record(5))).__name__, flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
async def test_a_sigstopped_holder_resumes_without_the_right_to_call_sugar(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """A real holder process is SIGSTOP-ed past its lease, another host takes over; on
    SIGCONT its first check says it may not call Sugar, and its write is refused."""
    here = str(ROOT / "tests")
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_server.url, "2.0", here],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        assert "leader\n" == await asyncio.to_thread(child.stdout.readline)
        child.send_signal(19)  # SIGSTOP
        taker = new_fleet(lease=2.0, timeout=0.5).join(sugar_instance())

        async def tick_until_leader() -> None:
            while taker.role != "leader":
                await taker.tick()
                await asyncio.sleep(0.05)

        await asyncio.wait_for(tick_until_leader(), 20)
        child.send_signal(18)  # SIGCONT
        child.stdin.write("go\n")
        child.stdin.flush()
        answers = [await asyncio.to_thread(child.stdout.readline) for _ in range(2)]
        assert ["False\n", "NotLeader\n"] == answers
        assert 0 == child.wait(15)


# --- followers ---------------------------------------------------------------------------------


async def test_followers_hear_a_new_epoch_at_once_through_pubsub(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """With a 30 s lease the safety-net re-read comes every 10 s; a follower still holds the
    new session within seconds, so it heard the announcement. It serves it from memory."""
    leader_fleet, leader = await leader_of(new_fleet)
    follower_fleet = new_fleet()
    follower = follower_fleet.join(sugar_instance("eu"))
    await follower_fleet.start()
    await asyncio.wait_for(follower_fleet.subscribed.wait(), 10)
    await until(lambda: follower.holder == leader_fleet.holder, what="first tick")
    written = await leader.publish(record(1))
    assert Written(1) == written
    await until(lambda: follower.epoch == 1, "the announcement", timeout=5)
    assert follower.current is not None
    assert ACCESS + "-1" == follower.current.access_token.reveal()
    assert {"role": "follower", "holder": leader_fleet.holder, "epoch": 1} == follower.status()


async def test_an_instance_joined_after_start_is_kept_and_heard(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """A reload adds an instance to a running fleet: it gets its lease loop and its channels."""
    _, leader = await leader_of(new_fleet)
    late_fleet = new_fleet()
    await late_fleet.start()
    late = late_fleet.join(sugar_instance("late"))
    await until(lambda: late.holder is not None, what="the late member's first round")
    await asyncio.wait_for(late_fleet.subscribed.wait(), 10)
    assert Written(1) == await leader.publish(record(1))
    await until(lambda: late.epoch == 1, "the announcement", timeout=5)


async def test_a_hundred_reports_on_five_hosts_make_one_renewal_request(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """100 dead-token reports spread over 4 followers reach the leader as one request; when
    it stores the renewed session, every waiting report gets the new token."""
    leader_fleet = new_fleet(lease=6.0)
    leader = leader_fleet.join(sugar_instance())
    await leader.tick()
    await leader.publish(record(1))
    await leader_fleet.start()
    followers = [new_fleet(lease=6.0) for _ in range(4)]
    members = [f.join(sugar_instance(f"h{i}")) for i, f in enumerate(followers)]
    for fleet in [leader_fleet, *followers]:
        if fleet is not leader_fleet:
            await fleet.start()
        await asyncio.wait_for(fleet.subscribed.wait(), 10)
    await until(lambda: all(m.epoch == 1 for m in members), what="followers hold epoch 1")
    dead = Secret(ACCESS + "-1").fingerprint
    reports = [
        asyncio.create_task(members[i % 4].ask_leader("dead", dead, wait=20)) for i in range(100)
    ]
    request = await asyncio.wait_for(leader.requests.get(), 10)
    assert (1, "dead", dead) == (request.epoch, request.kind, request.token)
    assert isinstance(await leader.publish(record(2)), Written)
    answers = await asyncio.gather(*reports)
    assert {ACCESS + "-2"} == {a.access_token.reveal() for a in answers if a is not None}
    assert 100 == sum(a is not None for a in answers)
    assert leader.requests.empty()


# --- Redis failing -----------------------------------------------------------------------------


async def test_redis_restarted_empty_costs_one_login_for_the_fleet(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """Redis loses its data: each host signals the loss once, and of three hosts acting as
    the keeper will (only a leader logs in, and only after re-reading the store) one logs in."""
    fleets = [new_fleet() for _ in range(3)]
    members = [f.join(sugar_instance(f"n{i}")) for i, f in enumerate(fleets)]
    await asyncio.gather(*(m.tick() for m in members))
    leader = next(m for m in members if m.role == "leader")
    await leader.publish(record(1))
    await asyncio.gather(*(m.reread() for m in members))
    redis_server.restart_empty()
    for _ in range(3):
        await asyncio.gather(*(m.reread() for m in members))
    assert [1, 1, 1] == [m.losses for m in members]  # once each, however often it reads
    assert all(m.session_lost and m.current is not None for m in members)
    logins = 0

    async def keep(member: FleetMember) -> None:
        nonlocal logins
        await member.tick()
        if member.role == "leader" and member.session_lost and await member.reread() is None:
            logins += 1
            await member.publish(record(2))

    for _ in range(4):
        await asyncio.gather(*(keep(m) for m in members))
    assert 1 == logins
    assert [1, 1, 1] == [m.losses for m in members]
    assert all(m.epoch == 2 and not m.session_lost for m in members)
    assert all(ACCESS + "-2" == (m.current or record()).access_token.reveal() for m in members)


async def test_a_session_renewed_as_redis_went_away_is_stored_by_its_host_without_the_lease(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """The leader's write fails (Redis gone), Redis comes back empty and another host takes
    the lease: the old leader's next round stores its session all the same, above every epoch
    held, and the new leader adopts it; the hosts that held the replaced token are told to hold
    it back meanwhile, once."""
    _, old = await leader_of(new_fleet)
    assert Written(1) == await old.publish(record(1))
    new_fleet_ = new_fleet()
    follower = new_fleet_.join(sugar_instance("eu"))
    await follower.tick()
    suspected: list[tuple[str, bool]] = []
    follower.on_suspect.append(lambda token, hold: suspected.append((token.reveal(), hold)))
    redis_server.stop()
    with pytest.raises(StoreUnreachable):
        await old.publish(record(2))
    old.keep_unstored(record(2))
    redis_server.start()
    old.lease.lost()  # it was held up: the lease lapsed, and the follower's round comes first
    await follower.tick()
    assert "leader" == follower.role and follower.session_lost
    assert [(ACCESS + "-1", True)] == suspected
    await old.tick()
    assert "follower" == old.role and old.unstored is None and not old.session_lost
    assert 2 == old.stored_epoch
    await follower.reread()
    assert follower.current is not None and 2 == follower.epoch
    assert ACCESS + "-2" == follower.current.access_token.reveal()
    assert [(ACCESS + "-1", True)] == suspected  # told once, at the loss


async def test_a_session_no_write_took_is_never_stored_over_a_newer_one(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """The store moved on from the epoch the session was renewed from: the offer is Stale,
    the store is untouched, and the host takes the stored record instead."""
    fleet, leader = await leader_of(new_fleet)
    assert Written(1) == await leader.publish(record(1))
    leader.keep_unstored(record(2))  # renewed from epoch 1, not stored
    newer = seal(fleet.key, leader.identity, 2, record(3))
    assert Written(2) == await fleet.store.write(leader.identity, fleet.holder, 1, 2, newer)
    before = redis_server.dump()
    assert Stale(2) == await leader.store_unstored()
    assert before == redis_server.dump()
    assert leader.unstored is None and 2 == leader.epoch
    assert ACCESS + "-3" == (leader.current or record()).access_token.reveal()


async def test_a_new_leader_after_a_loss_asks_and_waits_for_the_unstored_session(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """A new leader that finds the store emptied asks the other hosts before it calls Sugar,
    within a round of the loss: the host holding a session no write took hears it and stores
    it at once (not at its next round, 10 s away), and the new leader holds it."""
    old_fleet, old = await leader_of(new_fleet)
    assert Written(1) == await old.publish(record(1))
    new_leader_fleet = new_fleet()
    new_leader = new_leader_fleet.join(sugar_instance("eu"))
    await new_leader.tick()
    redis_server.restart_empty()
    old.lease.lost()
    await new_leader.tick()
    assert "leader" == new_leader.role and new_leader.session_lost
    for fleet in (old_fleet, new_leader_fleet):
        await fleet.start()
        await asyncio.wait_for(fleet.subscribed.wait(), 10)
    await until(lambda: old.session_lost, what="the old leader's first round")
    started = time.monotonic()
    await new_leader.gather(wait=0)  # past the window after the loss: nothing to wait for
    assert time.monotonic() - started < 1 and new_leader.session_lost
    old.keep_unstored(record(2))
    started = time.monotonic()
    await new_leader.gather(wait=20)
    assert time.monotonic() - started < 5
    assert ACCESS + "-2" == (new_leader.current or record()).access_token.reveal()
    assert not new_leader.session_lost and old.unstored is None
    started = time.monotonic()
    await new_leader.gather(wait=20)  # nothing is lost now: no wait
    assert time.monotonic() - started < 1


async def test_a_follower_checks_its_token_each_round_the_store_is_away(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """While Redis is unreachable a follower is told each round to check the token it holds
    (the leader may have renewed as Redis went away), without holding it back; the leader,
    whose lease has not run out, is not told."""
    fleet = new_fleet(lease=6.0, timeout=0.5)
    leader = fleet.join(sugar_instance())
    await leader.tick()
    await leader.publish(record(1))
    other = new_fleet(lease=6.0, timeout=0.5)
    follower = other.join(sugar_instance("eu"))
    await follower.tick()
    told: list[tuple[str, bool, str]] = []
    for member in (leader, follower):
        member.on_suspect.append(lambda t, hold, m=member.name: told.append((t.reveal(), hold, m)))
    redis_server.stop()
    await fleet.start()
    await other.start()
    await until(lambda: len(told) >= 2, what="two rounds while Redis is away", timeout=10)
    assert "leader" == leader.role
    assert {(ACCESS + "-1", False, "eu")} == set(told)


async def test_redis_paused_or_gone_is_a_typed_error_and_the_token_still_served(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """Redis SIGSTOP-ed: the next command fails as StoreUnreachable within its timeout, and the
    record held in memory is still there; the same once Redis is gone altogether."""
    _, member = await leader_of(new_fleet, timeout=0.5)
    await member.publish(record(1))
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnreachable) as caught:
            await member.tick()
        assert time.monotonic() - started < 5
        assert "within 0.5 s" in str(caught.value)
        assert member.current is not None and 1 == member.epoch
    finally:
        redis_server.resume()
    redis_server.stop()
    with pytest.raises(StoreUnreachable, match="unreachable"):
        await member.reread()
    assert ACCESS + "-1" == member.current.access_token.reveal()


@pytest.mark.slow
async def test_a_host_with_the_wrong_key_refuses_and_the_others_go_on(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """One host has another key: it refuses to join (WrongKey, saying what to copy), never
    takes a lease (so never calls Sugar), and the leader's next write goes through."""
    _, leader = await leader_of(new_fleet, lease=3.0, timeout=0.5)
    await leader.publish(record(1))
    stray_fleet = new_fleet(key=OTHER_KEY, lease=3.0, timeout=0.5)
    stray = stray_fleet.join(sugar_instance())
    with pytest.raises(WrongKey, match="copy their key file"):
        await stray.tick()
    await stray_fleet.start()
    await until(lambda: stray.problem is not None, what="the stray host's problem")
    lease_key = leader.store.key(leader.identity, "lease")
    with redis_server.admin() as admin:
        await until(lambda: not admin.exists(lease_key), "the lease to lapse in Redis", timeout=20)
        with pytest.raises(WrongKey):
            await stray.tick()  # the lease is free, and still not taken
        assert not admin.exists(lease_key)
    assert "follower" == stray.role and stray.current is None
    await leader.tick()
    assert "leader" == leader.role
    assert isinstance(await leader.publish(record(2)), Written)


def test_redis_server_is_here() -> None:
    """The fleet tests need a real redis-server; say so plainly if it is missing."""
    from support.redis_server import REDIS_SERVER

    assert REDIS_SERVER, "install redis-server (apt-get install redis-server)"
    assert os.access(REDIS_SERVER, os.X_OK)


async def test_a_follower_serves_tokens_with_no_redis_command(
    redis_server: RedisServer, new_fleet: NewFleet
) -> None:
    """The goal of 0 Redis commands per token request: 1000 reads of the held record on a
    follower leave Redis' command counters untouched; a stored renewal is one EVALSHA."""
    _, leader = await leader_of(new_fleet)
    follower = new_fleet().join(sugar_instance("eu"))
    await follower.tick()
    await leader.publish(record(1))
    await leader.publish(record(2))  # the write script is loaded now
    await follower.reread()
    with redis_server.admin() as admin:
        admin.config_resetstat()
        for _ in range(1000):
            assert follower.current is not None
            assert ACCESS + "-2" == follower.current.access_token.reveal()
        assert {"cmdstat_config|resetstat"} == set(admin.info("commandstats"))
        admin.config_resetstat()
        await leader.publish(record(3))
        calls = {k: v["calls"] for k, v in admin.info("commandstats").items()}
    assert 1 == calls.pop("cmdstat_evalsha")
    assert {"hget", "get", "hset", "publish"} <= {k.removeprefix("cmdstat_") for k in calls}
