"""The test CA and the fake SugarCRM served over HTTPS with it (the openssl CLI makes both)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from sugard.testing import FakeSugar
from support.daemon import PASSWORD, USER


@contextmanager
def running_tls_fake(cert: Path, key: Path) -> Iterator[FakeSugar]:
    """The fake's aiohttp app served over HTTPS on 127.0.0.1, in a thread of its own."""
    fake = FakeSugar(users={USER: PASSWORD})
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    ready: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]]
    ready = concurrent.futures.Future()

    async def serve() -> None:
        runner = web.AppRunner(fake.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
        stop = asyncio.Event()
        ready.set_result((asyncio.get_running_loop(), stop, runner.addresses[0][1]))
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    loop, stop, port = ready.result(timeout=10)
    fake.url = f"https://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
