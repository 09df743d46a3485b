"""Load for the governor's tests and bench: many requests through the proxy at once, and what
the fake SugarCRM's side saw of them (the most requests in any one-second window)."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from sugard.testing import Arrival


def busiest_second(arrivals: Sequence[Arrival]) -> int:
    """The most requests that arrived within any closed one-second window."""
    times = sorted(arrival.at for arrival in arrivals)
    return max(
        (bisect.bisect_right(times, start + 1.0) - i for i, start in enumerate(times)), default=0
    )


def rate_at_sugar(arrivals: Sequence[Arrival]) -> float:
    """Requests per second the site received, from its first arrival to its last."""
    times = sorted(arrival.at for arrival in arrivals)
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


@dataclass(frozen=True)
class Answer:
    status: int
    seconds: float
    retry_after: str | None
    body: bytes


async def flood(
    base: str,
    path: str,
    count: int,
    concurrency: int,
    socket: Path | None = None,
) -> list[Answer]:
    """`count` GETs of `path` from this process, `concurrency` at a time, over the Unix socket
    `socket` (with `base` like http://sugard/v1/instances/prod) or TCP (`base` the listener's)."""
    connector: aiohttp.BaseConnector = (
        aiohttp.UnixConnector(path=str(socket), limit=concurrency)
        if socket is not None
        else aiohttp.TCPConnector(limit=concurrency)
    )
    answers: list[Answer] = []
    left = iter(range(count))

    async def worker(http: aiohttp.ClientSession) -> None:
        for _ in left:
            started = time.monotonic()
            async with http.get(base + path) as response:
                body = await response.read()
            answers.append(
                Answer(
                    response.status,
                    time.monotonic() - started,
                    response.headers.get("Retry-After"),
                    body,
                )
            )

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    return answers
