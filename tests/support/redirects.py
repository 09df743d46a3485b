"""Servers that redirect: one on 127.0.0.1 answering every request with a redirect to another
server (a second port, named `localhost` so that it is another host to a client), which
records what reached it."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Recorded:
    """What reached a server: (method, path, headers, body) per request."""

    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    def carried(self, secret: str) -> bool:
        """Whether any request that reached it held `secret`, in a header or the body."""
        return any(
            secret in repr(headers) or secret.encode() in body
            for _, _, headers, body in self.requests
        )


def _handler(
    recorded: Recorded, status: int, location: str | None, headers: dict[str, str]
) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            recorded.requests.append((self.command, self.path, dict(self.headers), body))
            if "/Moved" in self.path:  # a path of this site that moved within it
                self.send_response(301)
                self.send_header("Location", self.path.replace("/Moved", "/Here"))
            else:
                self.send_response(status)
            if location is not None:
                self.send_header("Location", location + self.path)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def serving(
    status: int = 200, location: str | None = None, headers: dict[str, str] | None = None
) -> Iterator[tuple[str, Recorded]]:
    """A server on 127.0.0.1 answering `status` with `headers` (and `Location: location +
    path` if given), and a path holding /Moved with a relative redirect to the same path with
    /Here; yields (its root URL, what reached it)."""
    recorded = Recorded()
    handler = _handler(recorded, status, location, headers or {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorded
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def redirecting(status: int = 307) -> Iterator[tuple[str, str, Recorded, Recorded]]:
    """A redirecting server and the other host it sends everything to; yields (its URL, the
    other's URL as http://localhost:PORT, what reached it, what reached the other)."""
    with serving() as (elsewhere, theirs):
        other = elsewhere.replace("127.0.0.1", "localhost")
        with serving(status, other) as (url, ours):
            yield url, other, ours, theirs
