"""A real HTTP forward proxy on 127.0.0.1, written here: absolute-URI forwarding for http
sites, CONNECT tunnels for https ones, Basic Proxy-Authorization."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PROXY_VARIABLES = [
    name
    for base in ("http", "https", "no", "all")
    for name in (f"{base}_proxy", f"{base.upper()}_PROXY")
]


@dataclass
class ForwardProxy:
    """An HTTP forward proxy: plain requests in absolute-URI form are forwarded, CONNECT opens
    a tunnel; with `credentials`, anything without the right Proxy-Authorization gets 407."""

    credentials: tuple[str, str] | None = None
    url: str = ""
    connects: list[str] = field(default_factory=list)  # CONNECT targets, host:port
    requests: list[str] = field(default_factory=list)  # "METHOD absolute-URI" forwarded
    refused: int = 0  # 407s answered

    @property
    def logins(self) -> list[str]:
        """The token-endpoint requests among those forwarded (ServerInfo and probes follow)."""
        return [r for r in self.requests if r.startswith("POST ") and "/oauth2/token" in r]

    def expected_authorization(self) -> str | None:
        if self.credentials is None:
            return None
        user, password = self.credentials
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            method, target, version = request_line.split(" ", 2)
            headers = [tuple(p.strip() for p in line.split(":", 1)) for line in lines if line]
            given = next((v for k, v in headers if k.lower() == "proxy-authorization"), None)
            if given != self.expected_authorization():
                self.refused += 1
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\n'
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                return
            if method == "CONNECT":
                self.connects.append(target)
                host, port = target.rsplit(":", 1)
                up_reader, upstream = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
                return
            self.requests.append(f"{method} {target}")
            url = urlsplit(target)
            up_reader, upstream = await asyncio.open_connection(url.hostname, url.port or 80)
            hop_by_hop = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
            kept = "".join(f"{k}: {v}\r\n" for k, v in headers if k.lower() not in hop_by_hop)
            path = url.path + (f"?{url.query}" if url.query else "")
            upstream.write(f"{method} {path} {version}\r\n{kept}Connection: close\r\n\r\n".encode())
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            upstream.write(await reader.readexactly(length))
            await _pipe(up_reader, writer)  # one request per connection: the answer, then EOF
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextmanager
def running_proxy(credentials: tuple[str, str] | None = None) -> Iterator[ForwardProxy]:
    """The proxy on 127.0.0.1, port chosen by the kernel, in a thread with its own loop."""
    proxy = ForwardProxy(credentials)
    ready: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Event, int]]
    ready = concurrent.futures.Future()

    async def serve() -> None:
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        stop = asyncio.Event()
        ready.set_result((asyncio.get_running_loop(), stop, server.sockets[0].getsockname()[1]))
        async with server:
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    loop, stop, port = ready.result(timeout=10)
    proxy.url = f"http://127.0.0.1:{port}"
    try:
        yield proxy
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)
