"""One daemon's fleet: the hub that runs every seat this host holds.

Join and leave, start and stop, one keep-alive loop per seat, and one pub/sub listener that
hands each message to its seat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterable
from typing import Any, Literal

from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from sugard.config import FleetConfig, InstanceConfig
from sugard.fleet.errors import FleetError, StoreUnreachable, WrongKey
from sugard.fleet.lease import Clock, Lease
from sugard.fleet.member import FleetMember
from sugard.fleet.sealing import FleetKey, identity_of
from sugard.fleet.store import FleetStore, RenewalRequest
from sugard.text import one_line

log = logging.getLogger("sugard.fleet")


def new_holder_id() -> str:
    """`host:pid:random`: the random part tells apart two processes with one pid (containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class Fleet:
    """The fleet as one daemon sees it: the Redis client, this host's holder id, its members,
    one loop per member keeping the lease, and one pub/sub listener for all of them."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        store: FleetStore | None = None,
        clock: Clock = time.monotonic,
        holder: str | None = None,
    ) -> None:
        self.config = config
        self.key = FleetKey.from_text(config.key.reveal())
        self.store = store or FleetStore.from_config(config)
        self.clock = clock
        self.holder = holder or new_holder_id()
        self.members: dict[str, FleetMember] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # identity -> the loop keeping its lease
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    def join(self, instance: InstanceConfig) -> FleetMember:
        """The seat of `instance`; two local instances with one identity share one seat."""
        identity = identity_of(instance, self.key)
        member = self.members.get(identity)
        if member is None:
            member = FleetMember(
                instance.name, identity, self, Lease(self.config.lease, self.clock)
            )
            self.members[identity] = member
            if self._listener is not None:  # joined after start: keep it, and listen for it too
                self._tasks[identity] = asyncio.create_task(
                    self._keep(member), name=f"fleet-{member.name}"
                )
                self._listener.cancel()
                self._listener = asyncio.create_task(self._listen(), name="fleet-listener")
        member.seats += 1
        return member

    async def start(self) -> None:
        """Start the keep-alive loops and the listener; neither waits for Redis to answer."""
        self._listener = asyncio.create_task(self._listen(), name="fleet-listener")
        for member in self.members.values():
            self._tasks[member.identity] = asyncio.create_task(
                self._keep(member), name=f"fleet-{member.name}"
            )

    async def leave(self, member: FleetMember) -> None:
        """A local instance no longer uses its seat (a reload removed it): once none does,
        stop keeping its lease and give it up, so another host leads it at once."""
        member.seats -= 1
        if member.seats > 0 or self.members.get(member.identity) is not member:
            return
        del self.members[member.identity]
        task = self._tasks.pop(member.identity, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._release(member)

    async def _release(self, member: FleetMember) -> None:
        if member.holder == self.holder:  # Redis may hold it past our own deadline
            member.lease.lost()
            member.holder = None
            try:
                await self.store.release(member.identity, self.holder)
            except StoreUnreachable as exc:
                log.warning("%s: could not release the fleet lease: %s", member.name, exc)

    async def stop(self) -> None:
        """Stop the loops and give up every lease held, so another host takes over at once."""
        tasks = [*self._tasks.values(), *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for member in self.members.values():
            await self._release(member)
        await self.store.close()

    async def _keep(self, member: FleetMember) -> None:
        while True:
            try:
                await member.tick()
                if member.problem:
                    log.info("%s: the fleet store answers again", member.name)
                member.problem, member.fault = None, None
            except FleetError as exc:
                if member.problem != str(exc):
                    log.error("%s: %s; serving the held token while it lasts", member.name, exc)
                member.problem, member.fault = str(exc), exc
                if isinstance(exc, StoreUnreachable):
                    member.unreachable()
            member.settled.set()
            await asyncio.sleep(self.config.lease / 3)

    def _channels(self) -> dict[str, tuple[FleetMember, str]]:
        return {
            self.store.key(m.identity, what): (m, what)
            for m in self.members.values()
            for what in ("epoch", "requests")
        }

    async def _listen(self) -> None:
        backoff = ExponentialWithJitterBackoff(cap=max(1.0, self.config.lease / 3), base=0.1)
        failures = 0
        while True:
            channels = self._channels()
            if not channels:
                await asyncio.Event().wait()  # until a join restarts the listener
            pubsub = self.store.redis.pubsub()
            try:
                await self.store.call("subscribing", pubsub.subscribe(*channels))
                failures = 0
                self.subscribed.set()
                # Announcements made while we were not listening are lost: read them now.
                await self._catch_up(self.members.values())
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        await self._dispatch(channels, message)
            except (StoreUnreachable, RedisError, OSError) as exc:
                self.subscribed.clear()
                failures += 1
                log.debug("fleet listener: %s; again in a moment", one_line(exc, 200))
                await asyncio.sleep(backoff.compute(failures))
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]

    async def _dispatch(
        self, channels: dict[str, tuple[FleetMember, str]], message: dict[str, Any]
    ) -> None:
        channel = message["channel"]
        target = channels.get(channel.decode() if isinstance(channel, bytes) else channel)
        if target is None:
            return
        member, what = target
        try:
            if what == "epoch":
                if member.heard_epoch(int(message["data"])):
                    await self._reread_all([member])
            else:
                data = json.loads(message["data"])
                kind: Literal["dead", "refresh"] = (
                    "refresh" if data.get("kind") == "refresh" else "dead"
                )
                token = data.get("token")
                member.heard_request(
                    RenewalRequest(kind, int(data["epoch"]), token, str(data.get("from", "")))
                )
                if member.unstored is not None:  # a new leader asks before it calls Sugar
                    await self._catch_up([member])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: ignored a malformed fleet message on %s", member.name, what)

    async def _reread_all(self, members: Iterable[FleetMember]) -> None:
        for member in members:
            try:
                await member.reread()
            except WrongKey as exc:
                log.error("%s: %s", member.name, exc)

    async def _catch_up(self, members: Iterable[FleetMember]) -> None:
        """Read each record again, and store a session no write took (`store_unstored`)."""
        for member in members:
            try:
                await member.reread()
                await member.store_unstored()
            except WrongKey as exc:
                log.error("%s: %s", member.name, exc)
