"""HTTP/1.1 and JSON on the daemon's Unix socket, for sugard.client: C modules only.

Why the low-level modules: `sugarctl` runs once per call in scripts, and on a small machine
`import socket`, `import json` and `import argparse` each cost about as much as starting the
bare interpreter (they pull in `re` and `enum`), while `_socket`, `_json` and `_thread` cost
nothing. So the transport speaks the small part of HTTP/1.1 the daemon uses (Content-Length
or chunked bodies, keep-alive) on a `_socket`, and JSON goes through `_json`'s scanner, the C
code behind `json.loads` (with a fallback to `json` where `_json` is missing).
"""

from __future__ import annotations

from _socket import AF_UNIX, SOCK_STREAM
from _socket import socket as _unix_socket

TYPE_CHECKING = False  # typing costs an import; mypy treats this name as True
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

__all__ = ["Closed", "Connection", "json_loads", "json_object", "reusable"]

_MAX_LINE = 65536
_MAX_BODY = 64 * 1024 * 1024


# JSON through _json's C scanner


class _JsonContext:
    """The attributes `_json.make_scanner` reads from a `json.JSONDecoder`."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


_scan: Callable[[str, int], tuple[Any, int]] | None
_quote_json: Callable[[str], str]
try:
    from _json import encode_basestring_ascii as _quote_json
    from _json import make_scanner

    _scan = make_scanner(_JsonContext())  # type: ignore[arg-type]
except ImportError:  # not CPython: the json module does the work
    _scan = None


def json_loads(raw: bytes) -> Any:
    if _scan is None:
        import json

        return json.loads(raw)
    text = raw.decode("utf-8").strip()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text):
        raise ValueError("not JSON: data after the value")
    return value


def json_object(fields: dict[str, str]) -> bytes:
    """A flat JSON object of strings (the only kind of request body the daemon takes)."""
    if _scan is None:
        import json

        return json.dumps(fields).encode()
    items = ", ".join(f"{_quote_json(k)}: {_quote_json(v)}" for k, v in fields.items())
    return ("{" + items + "}").encode()


# HTTP/1.1 on the Unix socket


def reusable(status_line: bytes, headers: dict[bytes, bytes]) -> bool:
    """Whether a connection can carry another request once this answer's body is read: not
    when the body ends where the connection does, nor when the daemon said it closes."""
    framed = b"chunked" in headers.get(b"transfer-encoding", b"").lower() or (
        b"content-length" in headers
    )
    closes = headers.get(b"connection", b"").lower() == b"close"
    return framed and status_line.startswith(b"HTTP/1.1") and not closes


class Closed(Exception):
    """The daemon closed the connection before any byte of an answer."""


class Connection:
    """One HTTP/1.1 connection to the daemon's Unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = _unix_socket(AF_UNIX, SOCK_STREAM)
        self._buf = bytearray()
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __del__(self) -> None:
        # The kept connection is the client's business, not its caller's: a client dropped
        # without close() (`SugardClient().token("prod")`) must not warn about it.
        self.sock.close()

    def exchange(
        self, method: str, target: str, body: bytes | None, timeout: float
    ) -> tuple[int, bytes, dict[bytes, bytes], bool]:
        """Send one request; return (status, body, headers with lower-case names, whether the
        connection can be used again)."""
        head = f"{method} {target} HTTP/1.1\r\nHost: sugard\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        elif method != "GET":
            head += "Content-Length: 0\r\n"
        self.sock.settimeout(timeout)
        try:  # noqa: SIM105 - contextlib would cost an import
            self.sock.sendall(head.encode() + b"\r\n" + (body or b""))
        except (BrokenPipeError, ConnectionResetError):
            # The daemon may have answered and closed before reading: it does so for a
            # refused uid and when it is at its connection limit. Read that answer.
            pass
        status, line, pairs = self.read_head()
        headers = {name.lower(): value for name, value in pairs}
        data = bytearray()
        for chunk in self.body_chunks(headers):
            data += chunk
            if len(data) > _MAX_BODY:
                raise ValueError("body too large")
        return status, bytes(data), headers, reusable(line, headers)

    def send(self, data: bytes) -> None:
        """Send `data`, all of it (a request's head, or a piece of its body)."""
        self.sock.sendall(data)

    def read_head(self) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """An answer's status, its status line, and its headers as sent (name, value)."""
        line = self._readline()
        if not line:
            raise Closed
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError("not an HTTP status line")
        headers: list[tuple[bytes, bytes]] = []
        while (line_ := self._readline()) not in (b"\r\n", b"\n"):
            if not line_.endswith(b"\n"):
                raise ValueError("headers cut short")
            name, _, value = line_.partition(b":")
            headers.append((name.strip(), value.strip()))
        return int(parts[1]), line.rstrip(b"\r\n"), headers

    def body_chunks(self, headers: dict[bytes, bytes]) -> Iterator[bytes]:
        """The body of the answer whose head was read (`headers`: lower-case names), a piece
        at a time as it arrives, however large: a caller that keeps none holds no more than a
        piece in memory."""
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            while size := int(self._readline().split(b";")[0], 16):
                yield from self._exactly(size)
                if self._readline() not in (b"\r\n", b"\n"):
                    raise ValueError("bad chunk end")
            while self._readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
        elif b"content-length" in headers:
            yield from self._exactly(int(headers[b"content-length"]))
        else:
            while self._buf or self._fill():
                data = bytes(self._buf)
                self._buf.clear()
                yield data

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self._buf += data
        return bool(data)

    def _readline(self) -> bytes:
        """One line with its end; what is left at the end of the stream; b"" at the end."""
        start = 0
        while (end := self._buf.find(b"\n", start)) < 0:
            if len(self._buf) > _MAX_LINE:
                raise ValueError("line too long")
            start = len(self._buf)
            if not self._fill():
                end = len(self._buf) - 1
                break
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    def _exactly(self, size: int) -> Iterator[bytes]:
        if size < 0:
            raise ValueError("bad body size")
        while size:
            if not self._buf and not self._fill():
                raise ValueError("body cut short")
            piece = bytes(self._buf[:size])
            del self._buf[: len(piece)]
            size -= len(piece)
            yield piece
