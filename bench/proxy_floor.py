"""The floor of an aiohttp proxy: the least a forwarder built on aiohttp's server and client
can do per request (one GET forwarded with a fixed token, the body read and answered whole),
as a process of its own. `python bench/proxy_floor.py UPSTREAM TOKEN PORT`; bench_proxy.py
measures it next to sugard's proxy, so what sugard adds on top of aiohttp shows apart from
what aiohttp itself costs."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session")


def main() -> None:
    upstream, token, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

    async def forward(request: web.Request) -> web.Response:
        async with request.app[SESSION].get(
            upstream + request.path_qs, headers={"OAuth-Token": token}
        ) as answer:
            body = await answer.read()
            return web.Response(body=body, status=answer.status, content_type="application/json")

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16))
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_get("/{tail:.*}", forward)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
