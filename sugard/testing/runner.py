"""Run a FakeSugar on its own event loop in a daemon thread, for synchronous code.

Why: synchronous tests, `sugarctl` tests and users' own scripts (requests, urllib) need a Sugar
to talk to without owning an event loop. The server lives on a private loop in a thread; the
FakeSugar's switches and counters are lock-protected, so the calling thread may use them freely.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sugard.testing.fake import FakeSugar

_START_TIMEOUT = 10.0


@contextmanager
def running_fake(
    fake: FakeSugar | None = None,
    /,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    **kwargs: Any,
) -> Iterator[FakeSugar]:
    """Start a FakeSugar (given, or built from `kwargs`) in a thread; yield it with `url` set."""
    if fake is None:
        fake = FakeSugar(**kwargs)
    elif kwargs:
        raise TypeError("pass either a FakeSugar or its keyword arguments, not both")
    server = fake
    ready: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event]]
    ready = concurrent.futures.Future()

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            await server.start(host, port)
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result((asyncio.get_running_loop(), stop))
        try:
            await stop.wait()
        finally:
            await server.close()

    # asyncio.run() owns the loop, so shutdown (async generators, executor) happens in one place.
    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="fake-sugar", daemon=True)
    thread.start()
    try:
        loop, stop = ready.result(timeout=_START_TIMEOUT)
    except BaseException:
        thread.join(timeout=_START_TIMEOUT)
        raise
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=_START_TIMEOUT)
