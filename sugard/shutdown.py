"""How the daemon's servers stop (as uvicorn's do): stop accepting, let requests in flight
finish within `[daemon].shutdown_grace`, and when a second stop signal ends the wait, cancel
what is left and say how many. Split from `daemon` so its `stop()` reads as its steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from .config import Config

__all__ = ["NO_WAIT", "drain", "grace"]

log = logging.getLogger("sugard.daemon")

NO_WAIT = 0.001  # aiohttp reads a shutdown timeout of 0 as "no limit"


def grace(config: Config) -> float:
    """`shutdown_grace` for aiohttp, which reads 0 as "wait forever", not "do not wait"."""
    return max(config.daemon.shutdown_grace, NO_WAIT)


async def drain(
    runner: web.AppRunner | None,
    close_listeners: Callable[[], Awaitable[None]],
    forced: asyncio.Event,
    shutdown_grace: float,
) -> None:
    """Close the proxy's listeners, then the socket's `runner`, each letting its requests in
    flight finish within the grace period; `forced` set ends the wait and cancels what is
    left."""
    graceful = asyncio.ensure_future(_close(runner, close_listeners, shutdown_grace))
    cut_short = asyncio.ensure_future(forced.wait())
    await asyncio.wait((graceful, cut_short), return_when=asyncio.FIRST_COMPLETED)
    cut_short.cancel()
    if graceful.done():
        graceful.result()
        return
    graceful.cancel()
    await asyncio.gather(graceful, return_exceptions=True)
    if runner is None or runner.server is None:
        return
    for site in list(runner.sites):
        await site.stop()
    left = len(runner.server.connections)
    # Public aiohttp: a shutdown with (almost) no wait cancels each handler and closes its
    # connection; the cleanup after it then finds nothing to wait for.
    await runner.server.shutdown(NO_WAIT)
    log.warning("cancelled %d connection(s) still open", left)
    await runner.cleanup()


async def _close(
    runner: web.AppRunner | None,
    close_listeners: Callable[[], Awaitable[None]],
    shutdown_grace: float,
) -> None:
    await close_listeners()
    if runner is None:
        return
    server = runner.server
    open_connections = len(server.connections) if server is not None else 0
    if open_connections:
        log.info(
            "waiting up to %g s for %d open connection(s) to finish",
            shutdown_grace,
            open_connections,
        )
    await runner.cleanup()
