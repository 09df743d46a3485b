"""Python client of the sugard socket. Standard library only, so scripts pay nothing to import it.

    from sugard.client import SugardClient
    token = SugardClient().token("prod")["access_token"]

Errors mirror `sugarctl`'s exit codes:

    SugardError               base; `.exit_code`
    +-- DaemonUnreachable     4  no daemon on the socket
    +-- UnknownInstance       3  no such instance in the config
    +-- TokenUnavailable      5  no token now (upstream down, still logging in); `.retry_after`
    +-- NeedsAttention        6  Sugar refused credentials, client or platform: fix the config
    +-- PermissionDenied      7  the daemon does not serve this user
    +-- BadRequest            2  the request itself was wrong
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from .paths import default_socket_path

__all__ = [
    "BadRequest",
    "DaemonUnreachable",
    "NeedsAttention",
    "PermissionDenied",
    "SugardClient",
    "SugardError",
    "TokenUnavailable",
    "UnknownInstance",
    "resolve_socket",
]


class SugardError(Exception):
    exit_code = 1

    def __init__(self, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.body = body or {}


class BadRequest(SugardError):
    exit_code = 2


class UnknownInstance(SugardError):
    exit_code = 3


class DaemonUnreachable(SugardError):
    exit_code = 4


class TokenUnavailable(SugardError):
    exit_code = 5

    @property
    def retry_after(self) -> float | None:
        value = self.body.get("retry_after")
        return float(value) if isinstance(value, int | float) else None


class NeedsAttention(SugardError):
    exit_code = 6


class PermissionDenied(SugardError):
    exit_code = 7


ERRORS: dict[str, type[SugardError]] = {
    "unknown_instance": UnknownInstance,
    "token_unavailable": TokenUnavailable,
    "upstream_rejected": NeedsAttention,
    "forbidden": PermissionDenied,
    "bad_request": BadRequest,
    "invalid_config": NeedsAttention,
}


def _config_socket(config_path: Path) -> str | None:
    """`[daemon].socket` from the config, if there is one (tomllib only when needed)."""
    try:
        raw = config_path.read_bytes()
    except OSError:
        return None
    import tomllib

    try:
        socket_path = tomllib.loads(raw.decode()).get("daemon", {}).get("socket")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return os.path.expanduser(socket_path) if isinstance(socket_path, str) else None


def resolve_socket(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`explicit` > `$SUGARD_SOCKET` > `[daemon].socket` > the default socket path."""
    if explicit:
        return Path(explicit)
    if os.environ.get("SUGARD_SOCKET"):
        return Path(os.environ["SUGARD_SOCKET"])
    from .paths import default_config_path

    configured = _config_socket(default_config_path())
    return Path(configured) if configured else default_socket_path()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("sugard", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(os.fspath(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class SugardClient:
    """One kept-alive connection to the daemon; a lock makes it safe to share between threads."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float = 330.0):
        self.socket_path = resolve_socket(socket)
        self._timeout = timeout
        self._conn: _UnixConnection | None = None
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> SugardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The API

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/v1/health")

    def token(self, name: str, min_ttl: float = 0, wait: float | None = None) -> dict[str, Any]:
        """The TOKEN object: access_token, expires_at, expires_in, download_token, url..."""
        query: dict[str, str] = {}
        if min_ttl:
            query["min_ttl"] = f"{min_ttl:g}"
        if wait is not None:
            query["wait"] = f"{wait:g}"
        suffix = "?" + urlencode(query) if query else ""
        return self._request("GET", f"/v1/instances/{quote(name, safe='')}/token{suffix}")

    def status(self, name: str | None = None) -> Any:
        if name is None:
            return self._request("GET", "/v1/instances")["instances"]
        return self._request("GET", f"/v1/instances/{quote(name, safe='')}")

    def invalidate(self, name: str, access_token: str) -> dict[str, Any]:
        """Report that Sugar refused `access_token`; returns the token to use now."""
        return self._request(
            "POST",
            f"/v1/instances/{quote(name, safe='')}/invalidate",
            {"access_token": access_token},
        )

    def refresh(self, name: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/instances/{quote(name, safe='')}/refresh")

    def reload(self) -> dict[str, Any]:
        return self._request("POST", "/v1/reload")

    # Transport

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        with self._lock:
            for attempt in (1, 2):
                conn = self._conn or _UnixConnection(self.socket_path, self._timeout)
                self._conn = conn
                try:
                    conn.request(method, path, body=payload, headers=headers)
                    response = conn.getresponse()
                    status, raw = response.status, response.read()
                    break
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    conn.close()
                    self._conn = None
                    raise DaemonUnreachable(self._unreachable(exc)) from None
                except PermissionError:
                    conn.close()
                    self._conn = None
                    raise PermissionDenied(
                        f"no permission to use the socket {self.socket_path}"
                    ) from None
                except (http.client.HTTPException, OSError) as exc:
                    # A kept-alive connection the daemon closed: reconnect once.
                    conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise DaemonUnreachable(self._unreachable(exc)) from None
        try:
            data = json.loads(raw)
        except ValueError:
            raise SugardError(f"the daemon sent a non-JSON answer (HTTP {status})") from None
        if status >= 400:
            code = data.get("error", "") if isinstance(data, dict) else ""
            message = data.get("message", f"HTTP {status}") if isinstance(data, dict) else ""
            raise ERRORS.get(code, SugardError)(message, data if isinstance(data, dict) else None)
        return data

    def _unreachable(self, exc: BaseException) -> str:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        return (
            f"sugard is not running on {self.socket_path} ({why}); start it with "
            "`systemctl --user start sugard` or `sugard run`, or set --socket / $SUGARD_SOCKET"
        )
