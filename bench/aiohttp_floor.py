"""The floor for an aiohttp server: one route, one fixed JSON answer, on a Unix socket.

`python bench/aiohttp_floor.py SOCKET` serves `GET /v1/instances/{name}/token` with the same
body as bench/baseline_server.py, through aiohttp's web app (router, request and response
objects, no middleware). Prints `ready` once listening; runs until SIGTERM. It shows how much
of sugard's cost per request is aiohttp's, and how much is sugard's own handler.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web
from baseline_server import BODY


async def token(request: web.Request) -> web.Response:
    return web.Response(
        body=BODY,
        content_type="application/json",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def serve(path: str) -> None:
    app = web.Application()
    app.router.add_get("/v1/instances/{name}/token", token)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, path, backlog=1024).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
