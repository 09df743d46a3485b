"""A proxied request whose body stalls is answered 408 in Sugar's envelope once the body
timeout passes (10 s in the daemon; short here), and its connection closed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiohttp import web
from support.daemon import write_config

from sugard.config import load_config
from sugard.proxy import forward


async def test_a_body_stalling_after_10_of_100_bytes_gets_408(tmp_path: Path) -> None:
    """10 of 100 announced bytes, then nothing: 408 bad_request after the body timeout, the
    connection closed, nothing sent on to Sugar (whose address here has no server)."""
    config = load_config(
        write_config(
            tmp_path, {"prod": {"url": "http://127.0.0.1:9", "username": "u", "password": "p"}}
        )
    )
    keeper: Any = SimpleNamespace(name="prod", config=config.instances["prod"])
    registry: Any = SimpleNamespace(keepers={"prod": keeper}, allowed=lambda *_: True)
    forwarder = forward.Forwarder(registry, body_timeout=0.3)
    assert 10.0 == forward.Forwarder(registry).body_timeout  # docs/security.md's promise

    async def proxied(request: web.Request) -> web.StreamResponse:
        return await forwarder.handle(request, "prod", 1)

    app = web.Application()
    app.router.add_route("*", "/rest/{path:.*}", proxied)
    runner = web.AppRunner(app, lingering_time=0.5)  # the listener lingers briefly too
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /rest/v10/Accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"name": "'
        )
        started = time.monotonic()
        raw = await asyncio.wait_for(reader.read(), 30)  # to EOF: the connection is closed
        waited = time.monotonic() - started
        writer.close()
    finally:
        await forwarder.close()
        await runner.cleanup()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), raw
    assert {"error": "bad_request", "error_message": "request body not received within 0.3 s"} == (
        json.loads(body)
    )
    assert waited >= 0.3
