"""The daemon in-process on a virtual wall clock shared with the fake SugarCRM, so minutes of
token lifetime pass in a fraction of a second; and what reached the fake's token endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from sugard.config import load_config
from sugard.daemon import Daemon
from sugard.testing import FakeSugar
from support.daemon import PASSWORD, USER, instance, write_config
from support.wait import until

NAME = "crm"


def token_calls(fake: FakeSugar) -> dict[str, int]:
    """What reached Sugar's token endpoint (the version read and the probes are pinned apart)."""
    return {k: v for k, v in fake.calls.items() if k in ("token", "password", "refresh_token")}


async def get_json(
    http: aiohttp.ClientSession, path: str, method: str = "GET", **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.request(method, "http://sugard" + path, **kwargs) as response:
        return response.status, await response.json()


def unix_aiohttp_session(socket: Path, connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=str(socket), limit=connections),
        timeout=aiohttp.ClientTimeout(total=30),
    )


class VirtualClock:
    """Time for the fake and the daemon: runs `speed` times real time and can jump. Called, it
    is the true time (the fake's, and the daemon's steady clock); `wall` is the daemon's wall
    clock, which a `step` sets apart from it."""

    def __init__(self, speed: float = 1.0) -> None:
        self.speed = speed
        self._start = time.time()
        self._offset = 0.0
        self._stepped = 0.0

    def __call__(self) -> float:
        return self._start + (time.time() - self._start) * self.speed + self._offset

    def wall(self) -> float:
        """The daemon's wall clock: the true time, plus every step."""
        return self() + self._stepped

    def jump(self, seconds: float) -> None:
        """As after a suspend: the wall clock and the steady clock (which counts a suspend)
        move on, asyncio's monotonic clock did not."""
        self._offset += seconds

    def step(self, seconds: float) -> None:
        """As when the local clock is set (by hand, NTP): only the daemon's wall clock moves;
        Sugar's clock and the daemon's steady clock do not."""
        self._stepped += seconds

    async def sleep(self, virtual_seconds: float) -> None:
        await asyncio.sleep(virtual_seconds / self.speed)


@dataclass
class Rig:
    fake: FakeSugar
    daemon: Daemon
    clock: VirtualClock
    http: aiohttp.ClientSession

    @property
    def keeper(self) -> Any:
        return self.daemon.keepers[NAME]

    async def token(self, **query: float) -> tuple[int, dict[str, Any]]:
        params = {key: str(value) for key, value in query.items()}
        return await get_json(self.http, f"/v1/instances/{NAME}/token", params=params)


@contextlib.asynccontextmanager
async def rig(
    directory: Path,
    *,
    speed: float = 1.0,
    max_sleep: float = 0.02,
    rng: Callable[[], float] = lambda: 0.5,
    sugar: dict[str, Any] | None = None,
    watch: Any = None,
    **settings: Any,
) -> AsyncIterator[Rig]:
    clock = VirtualClock(speed)
    fake = FakeSugar(**{"users": {USER: PASSWORD}, **(sugar or {})}, clock=clock)
    if watch is not None:
        fake.app.middlewares.append(watch)  # sees every request the fake gets
    await fake.start()
    daemon: Daemon | None = None
    try:
        table = instance(fake, **settings)
        config = load_config(write_config(directory, {NAME: table}))
        daemon = Daemon(
            config,
            directory / "s.sock",
            clock=clock.wall,
            ticks=clock,
            max_sleep=max_sleep,
            rng=rng,
        )
        await daemon.start()
        async with unix_aiohttp_session(directory / "s.sock", 64) as http:
            yield Rig(fake, daemon, clock, http)
    finally:
        if daemon is not None:
            await daemon.stop()
        await fake.close()


async def first_token(r: Rig, version: str | None = None) -> dict[str, Any]:
    """The first token, once the keeper has read the server's version (after its login)."""
    code, body = await r.token()
    assert 200 == code, body
    if version is not None:
        await until(lambda: r.keeper.sugar_version == version + ".0")
    return body
