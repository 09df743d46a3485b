"""`/metrics` over TCP on `[daemon] metrics_listen`, for a Prometheus scraper: it carries no
secret and no username, so any address will do. The same text as `/v1/metrics` on the socket.

Split from `daemon` so the daemon's start reads as its steps, not as an aiohttp site's setup.
"""

from __future__ import annotations

import logging
import os

from aiohttp import web

from .api import KEY_METRICS, RenderMetrics, metrics_text
from .config import split_host_port
from .errors import SocketError

__all__ = ["serve_metrics"]

log = logging.getLogger("sugard.daemon")


async def serve_metrics(listen: str | None, render: RenderMetrics) -> web.AppRunner | None:
    """The runner serving `/metrics` on `listen` (None: none asked for); SocketError, with
    nothing left open, if the address cannot be had."""
    if listen is None:
        return None
    host, port = split_host_port(listen)
    app = web.Application()
    app[KEY_METRICS] = render
    app.router.add_get("/metrics", metrics_text)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host or None, port).start()
    except OSError as exc:
        await runner.cleanup()
        # asyncio's text repeats the address; the errno's says it all.
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise SocketError(
            f"cannot serve metrics on {listen}: {why}; choose another [daemon] metrics_listen"
        ) from None
    for address in runner.addresses:
        shown = f"[{address[0]}]" if ":" in address[0] else address[0]
        log.info("metrics on http://%s:%d/metrics", shown, address[1])
    return runner
