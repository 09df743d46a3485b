"""The Redis setup docs/fleet.md describes, proven on a real redis-server: an ACL user with the
least rights does everything fleet mode does; a wrong password or a missing right is a clear
StoreRefused; TLS with a private CA (made by the openssl CLI, as in test_tls.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fleet import KEY, fleet_config, record, sugar_instance
from support.redis_server import SUGARD_RIGHTS, RedisServer, free_port
from support.wait import until

from sugard.config import SecretRef
from sugard.fleet import Fleet, StoreRefused, StoreUnreachable, Written
from sugard.secret import Secret

USER, SECRET = "sugard", "redis-user-pw-9c1"


def as_user(server: RedisServer, password: str = SECRET, **overrides: Any) -> Fleet:
    url = f"unix://{USER}@{server.socket}"
    config = fleet_config(url, redis_password=SecretRef("inline", "", Secret(password)))
    return Fleet(config.__class__(**{**vars(config), **overrides}))


async def test_the_least_rights_user_does_all_that_fleet_mode_does(
    redis_server: RedisServer,
) -> None:
    """With only SUGARD_RIGHTS (docs/fleet.md), on its own keys and channels: key check,
    lease, compare-and-set write, pub/sub, forwarding, release."""
    redis_server.restrict(USER, SECRET)
    leader_fleet, follower_fleet = as_user(redis_server), as_user(redis_server)
    leader = leader_fleet.join(sugar_instance())
    follower = follower_fleet.join(sugar_instance("eu"))
    try:
        await leader.tick()
        assert "leader" == leader.role
        await leader_fleet.start()
        await follower_fleet.start()
        for fleet in (leader_fleet, follower_fleet):
            await until(fleet.subscribed.is_set, what="subscribed")
        assert Written(1) == await leader.publish(record(1))
        await until(lambda: follower.epoch == 1, what="the announcement")
        assert None is await follower.ask_leader("refresh", None, wait=0)
        request = await eventually_get(leader)
        assert ("refresh", 1) == (request.kind, request.epoch)
    finally:
        await follower_fleet.stop()
        await leader_fleet.stop()
    with redis_server.admin() as admin:
        assert not admin.exists(leader_fleet.store.key(leader.identity, "lease"))  # released


async def eventually_get(member: Any) -> Any:
    import asyncio

    return await asyncio.wait_for(member.requests.get(), 10)


async def test_a_wrong_redis_password_is_refused_clearly(redis_server: RedisServer) -> None:
    """The wrong password: StoreRefused naming what to check, never the password."""
    redis_server.restrict(USER, SECRET)
    fleet = as_user(redis_server, password="not-the-password")
    member = fleet.join(sugar_instance())
    try:
        with pytest.raises(StoreRefused) as caught:
            await member.tick()
        assert "redis_password" in str(caught.value)
        assert "not-the-password" not in str(caught.value)
    finally:
        await fleet.stop()


async def test_a_missing_right_is_refused_clearly(redis_server: RedisServer) -> None:
    """A user without EVALSHA can take the lease but not store a session: StoreRefused, and
    nothing stored."""
    redis_server.restrict(USER, SECRET, SUGARD_RIGHTS.replace(" +evalsha", ""))
    fleet = as_user(redis_server)
    member = fleet.join(sugar_instance())
    try:
        await member.tick()
        with pytest.raises(StoreRefused, match="storing a session"):
            await member.publish(record(1))
    finally:
        await fleet.stop()
    with redis_server.admin() as admin:
        assert not admin.exists(fleet.store.key(member.identity, "session"))


@pytest.fixture
def tls_redis(certs: dict[str, Path]) -> Iterator[tuple[RedisServer, int]]:
    """redis-server with a TLS port on 127.0.0.1, its certificate signed by the test CA."""
    directory = Path(tempfile.mkdtemp(prefix="sd-redis-"))
    port = free_port()
    try:
        server = RedisServer(
            directory,
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(certs["cert"]),
            "--tls-key-file",
            str(certs["key"]),
            "--tls-ca-cert-file",
            str(certs["ca"]),
            "--tls-auth-clients",
            "no",
        )
    except RuntimeError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"redis-server here cannot serve TLS, so rediss:// is not tested: {exc}")
    yield server, port
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


async def test_rediss_with_a_private_ca(
    tls_redis: tuple[RedisServer, int],
    certs: dict[str, Path],
) -> None:
    """rediss:// with ca_file: lease and write work; without the CA the certificate is
    refused (StoreUnreachable); verify_tls = false connects anyway."""
    server, port = tls_redis
    url = f"rediss://127.0.0.1:{port}"
    trusted = Fleet(fleet_config(url, ca_file=str(certs["ca"])))
    untrusted = Fleet(fleet_config(url))
    unverified = Fleet(fleet_config(url, verify_tls=False))
    try:
        member = trusted.join(sugar_instance())
        await member.tick()
        assert Written(1) == await member.publish(record(1))
        with pytest.raises(StoreUnreachable, match="certificate"):
            await untrusted.join(sugar_instance()).reread()
        found = await unverified.join(sugar_instance()).reread()
        assert found is not None and 1 == found.epoch
    finally:
        for fleet in (trusted, untrusted, unverified):
            await fleet.stop()
    assert KEY.encode() not in server.dump()
