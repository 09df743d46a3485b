"""The floor for a Python server: asyncio on a Unix socket, one fixed JSON answer, keep-alive.

`python bench/baseline_server.py SOCKET` answers every request that arrives on SOCKET with
the same 200 and a JSON body shaped like sugard's token answer, and nothing else: no routing,
no header parsing beyond the end of the head, no peer check. Prints `ready` once listening;
runs until SIGTERM. Standard library only, so its memory is the interpreter's and asyncio's.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

BODY = json.dumps(
    {
        "instance": "bench",
        "url": "http://127.0.0.1:8080",
        "access_token": "00000000-0000-4000-8000-000000000000",
        "token_type": "bearer",
        "expires_at": "2030-01-01T00:00:00Z",
        "expires_in": 3599,
        "download_token": "00000000-0000-4000-8000-000000000001",
    }
).encode()
ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\nCache-Control: no-store\r\n\r\n" + BODY
)


class Fixed(asyncio.Protocol):
    """Answers each request head (bodies are not expected) with ANSWER."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        answers = buf.count(b"\r\n\r\n")
        if answers:
            self.transport.write(ANSWER * answers)
            buf = buf[buf.rindex(b"\r\n\r\n") + 4 :]
        self.buf = buf


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await loop.create_unix_server(Fixed, path, backlog=1024)
    print("ready", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
