"""One HTTP/1.1 request written byte for byte (no client library re-encodes its path), to the
daemon's Unix socket or to a proxy listener, and the answer read back."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any


def exchange(
    where: Path | str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, body as JSON or bytes) of `method path`, sent as written, to the Unix
    socket `where` (a Path) or a listener's base URL `where` ("http://127.0.0.1:PORT")."""
    if isinstance(where, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(where))
        host = "sugard"
    else:
        host = where.removeprefix("http://")
        address, _, port = host.rpartition(":")
        sock = socket.create_connection((address, int(port)), timeout=timeout)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    with sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        raw = answer.read()
        shown = {name.lower(): value for name, value in answer.getheaders()}
    try:
        return answer.status, shown, json.loads(raw)
    except ValueError:
        return answer.status, shown, raw
