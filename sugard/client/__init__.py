"""Python client of the sugard socket. Standard library only, and nearly free to import.

    from sugard.client import SugardClient

    with SugardClient() as sugard:
        token = sugard.token("prod")["access_token"]

Errors mirror `sugarctl`'s exit codes:

    SugardError               base; `.exit_code` (1: an answer sugarctl does not know),
    |                         `.message` (one line), `.body` (the daemon's JSON error, if any)
    +-- BadRequest            2  the request itself was wrong (a bad wait, an empty name), or
    |                            asked a daemon systemd runs to shut down (`under_systemd`)
    +-- UnknownInstance       3  no such instance in the daemon's config
    +-- DaemonUnreachable     4  no daemon on the socket, or it did not answer in time
    +-- TokenUnavailable      5  no token now (Sugar down, still logging in), or the daemon is
    |                            at its connection limit (`busy`); `.retry_after`
    +-- NeedsAttention        6  Sugar refused credentials, client or platform, or a reload
    |                            found errors in the config (`.errors`): fix the config
    +-- PermissionDenied      7  the daemon does not serve this user, or the socket is not ours

The bytes on the socket (HTTP/1.1 and JSON, from C modules only, and why) are
`sugard.client.transport`'s.
"""

from __future__ import annotations

import os
import sys
from _thread import allocate_lock

from sugard.client.transport import Closed as _Closed
from sugard.client.transport import Connection as _Connection
from sugard.client.transport import json_loads as _json_loads
from sugard.client.transport import json_object as _json_object
from sugard.wire import (
    DEFAULT_WAIT,
    ERRORS,
    EXIT_ATTENTION,
    EXIT_DENIED,
    EXIT_UNAVAILABLE,
    EXIT_UNEXPECTED,
    EXIT_UNKNOWN,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    MAX_MIN_TTL,
    MAX_WAIT,
    SOCKET_PATH_MAX,
    TOKEN_LIFETIME_HEADER,
    default_config_path,
    default_socket_path,
    default_socket_paths,
    socket_path,
    sudo_user_problem,
)

__all__ = [
    "DEFAULT_WAIT",
    "BadRequest",
    "DaemonUnreachable",
    "NeedsAttention",
    "PermissionDenied",
    "SugardClient",
    "SugardError",
    "TokenUnavailable",
    "UnknownInstance",
    "default_config_path",
    "default_socket_path",
    "resolve_socket",
]

TYPE_CHECKING = False  # typing costs an import; mypy treats this name as True
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

# The daemon's bounds, so that a request it would refuse is refused here, in words the
# caller used; the header it adds when a token cannot have min_ttl left.
LIFETIME_HEADER = TOKEN_LIFETIME_HEADER.lower().encode()
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class SugardError(Exception):
    """Base of every error the client raises; `message` is one line for a human."""

    exit_code = EXIT_UNEXPECTED

    def __init__(self, message: str, body: Mapping[str, Any] | None = None) -> None:
        message = " ".join(message.split())  # one line, whatever the daemon sent
        super().__init__(message)
        self.message = message
        self.body: dict[str, Any] = dict(body or {})


class BadRequest(SugardError):
    exit_code = EXIT_USAGE


class UnknownInstance(SugardError):
    exit_code = EXIT_UNKNOWN


class DaemonUnreachable(SugardError):
    exit_code = EXIT_UNREACHABLE


class TokenUnavailable(SugardError):
    exit_code = EXIT_UNAVAILABLE

    @property
    def retry_after(self) -> float | None:
        """Seconds after which asking again may succeed, as the daemon estimates it."""
        value = self.body.get("retry_after")
        return float(value) if isinstance(value, int | float) else None


class NeedsAttention(SugardError):
    exit_code = EXIT_ATTENTION

    @property
    def errors(self) -> list[str]:
        """The problems a refused reload found in the config, one line each."""
        value = self.body.get("errors")
        return [" ".join(str(e).split()) for e in value] if isinstance(value, list) else []


class PermissionDenied(SugardError):
    exit_code = EXIT_DENIED


# Each of the daemon's error codes raises the class of its exit code (sugard.wire.ERRORS).
_BY_EXIT: dict[int, type[SugardError]] = {
    cls.exit_code: cls
    for cls in (BadRequest, UnknownInstance, TokenUnavailable, NeedsAttention, PermissionDenied)
}
_ERRORS: dict[str, type[SugardError]] = {
    code: _BY_EXIT.get(exit_code, SugardError) for code, (_, exit_code) in ERRORS.items()
}


# Where the daemon is


def resolve_socket(explicit: str | os.PathLike[str] | None = None) -> str:
    """`explicit` > `$SUGARD_SOCKET` > `[daemon].socket` of the config > the default path:
    the order `sugard run` uses (sugard.wire.socket_path), so both ends agree."""
    return socket_path(explicit, lambda: _config_socket(default_config_path()))


def _socket_candidates(explicit: str | os.PathLike[str] | None) -> tuple[tuple[str, ...], bool]:
    """The sockets to try in order, and whether they are default paths. A path someone named
    (`--socket`, `$SUGARD_SOCKET`, `[daemon].socket`) is the only one tried; with none named,
    each default path is tried in turn (sugard.wire.default_socket_paths)."""
    configured: list[str | None] = []

    def from_config() -> str | None:
        configured.append(_config_socket(default_config_path()))
        return configured[0]

    first = socket_path(explicit, from_config)
    if explicit or os.environ.get("SUGARD_SOCKET") or (configured and configured[0]):
        return (first,), False
    return default_socket_paths(), True


def _config_socket(config_path: str) -> str | None:
    """`[daemon].socket` of the config, if it names one. An unreadable or broken config is the
    daemon's to report (`sugard check`); here it only means "not set"."""
    try:
        with open(config_path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if b"socket" not in raw:  # most configs: no TOML parser to import and run
        return None
    import tomllib

    try:
        daemon = tomllib.loads(raw.decode()).get("daemon", {})
    except (ValueError, UnicodeDecodeError):
        return None
    path = daemon.get("socket") if isinstance(daemon, dict) else None
    return path if isinstance(path, str) and path else None


class SugardClient:
    """A client of one daemon, safe to share between threads.

    It keeps its connection open between calls. A thread that finds it in use opens one of
    its own rather than wait, so a long `token(wait=...)` in one thread never holds up the
    others; up to MAX_IDLE such connections are kept for reuse, so N threads settle on N
    connections. `timeout` bounds how long the daemon may take to answer beyond the wait a
    request asks for; past it the call raises DaemonUnreachable.
    """

    MAX_IDLE = 8

    def __init__(self, socket: str | os.PathLike[str] | None = None, timeout: float = 30.0):
        # At a default path, only a daemon of our own uid (or root's) is trusted: another
        # user can create /tmp/sugard-UID first and answer there (sugard.client._trusted).
        self._candidates, self._only_ours = _socket_candidates(socket)
        self.socket_path = self._candidates[0]  # then the one that answered
        self.timeout = timeout
        self.connections_opened = 0  # for tests and benchmarks: are connections reused?
        self._idle: list[_Connection] = []  # last in, first out: the warmest one first
        self._lock = allocate_lock()

    def __repr__(self) -> str:
        return f"SugardClient({self.socket_path!r})"

    def close(self) -> None:
        """Close the kept connections; the client stays usable (it connects again)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> SugardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The API

    def health(self) -> dict[str, Any]:
        """`{"status": "ok", "version": ..., "instances": N}`."""
        return self._call("GET", "/v1/health")  # type: ignore[no-any-return]

    def token(
        self,
        name: str,
        min_ttl: float = 0,
        wait: float | None = None,
        *,
        as_user: str | None = None,
    ) -> dict[str, Any]:
        """The TOKEN object (`access_token`, `url`, `expires_at`, `expires_in`,
        `download_token`...), valid for at least `min_ttl` more seconds if a token of this
        instance can be (else the freshest there is: see `token_answer`). Waits up to `wait`
        seconds (the daemon's default: 10) while the daemon logs in or refreshes. `as_user`:
        a token of that user instead (Sugar's sudo; the instance's `sudo` must list them)."""
        return self.token_answer(name, min_ttl, wait, as_user=as_user)[0]

    def token_answer(
        self,
        name: str,
        min_ttl: float = 0,
        wait: float | None = None,
        *,
        as_user: str | None = None,
    ) -> tuple[dict[str, Any], float | None]:
        """`token()`, and the lifetime Sugar gives this instance's tokens when the token has
        less than `min_ttl` left (a min_ttl that cannot be met); None when it has enough."""
        query = []
        if min_ttl:
            query.append(f"min_ttl={_seconds('min_ttl', min_ttl, MAX_MIN_TTL)}")
        if wait is not None:
            query.append(f"wait={_seconds('wait', wait, MAX_WAIT)}")
        if as_user is not None:
            query.append(_as_query(as_user))
        target = _instance(name, "token") + ("?" + "&".join(query) if query else "")
        data, headers = self._answer("GET", target, wait=wait)
        lifetime = headers.get(LIFETIME_HEADER)
        try:
            return data, float(lifetime) if lifetime is not None else None
        except ValueError:
            return data, None

    def status(self, name: str | None = None) -> Any:
        """The STATUS object of one instance, or the list of every instance's."""
        if name is None:
            return self._call("GET", "/v1/instances")["instances"]
        return self._call("GET", _instance(name))

    def invalidate(
        self, name: str, access_token: str, *, as_user: str | None = None
    ) -> dict[str, Any]:
        """Report that Sugar refused `access_token` (a 401); returns the TOKEN to use now.

        The daemon renews the session only if the reported token is its current one, and
        only once however many scripts report it; an older token gets the current one.
        `as_user`: the token was one of that user (`token(..., as_user=)`)."""
        if not access_token:
            raise BadRequest("invalidate needs the access token that Sugar refused")
        body = _json_object({"access_token": access_token})
        target = _instance(name, "invalidate") + (f"?{_as_query(as_user)}" if as_user else "")
        return self._call("POST", target, body)  # type: ignore[no-any-return]

    def refresh(
        self, name: str, retry_rejected: bool = False, *, as_user: str | None = None
    ) -> dict[str, Any]:
        """Make the daemon renew the session now; returns the new TOKEN.

        After Sugar rejected the password (or client secret), the daemon refuses
        (NeedsAttention) unless the secret changed since; `retry_rejected=True` sends it
        once more anyway, for after an administrator unlocked the account. Sugar may count
        that as one more failed login.

        `as_user`: a new token of that user instead (Sugar's sudo), asked of Sugar again even
        after Sugar refused it (once the user exists, or sugard's user is an admin)."""
        body = b'{"retry_rejected": true}' if retry_rejected else None
        target = _instance(name, "refresh") + (f"?{_as_query(as_user)}" if as_user else "")
        return self._call("POST", target, body)  # type: ignore[no-any-return]

    def revoke(self, name: str) -> dict[str, Any]:
        """End the session of `name` at Sugar, so that every token it handed out dies, and log
        in anew; returns the new TOKEN. For a token that leaked. The daemon's owner and root
        only (PermissionDenied); a password Sugar rejected is not sent again (NeedsAttention).
        """
        return self._call("POST", _instance(name, "revoke"))  # type: ignore[no-any-return]

    def proxy_urls(self, name: str) -> dict[str, Any]:
        """Where a Sugar client reaches instance `name` through sugard's proxy:
        `{"instance", "socket_url", "listen_url" (None without a listener), "api_version"
        (the REST version a path without one gets: the instance's api_version)}`."""
        return self._call("GET", _instance(name, "proxy"))  # type: ignore[no-any-return]

    def clients(self, name: str) -> dict[str, Any]:
        """Who used instance `name` through the proxy in the last 15 minutes: `{"instance",
        "clients": [{"uid", "pid", "command", "first_seen", "last_seen", "requests",
        "errors", "bytes", "queued_seconds", "last_path"}]}`, most recent first."""
        return self._call("GET", _instance(name, "clients"))  # type: ignore[no-any-return]

    def reload(self) -> dict[str, Any]:
        """Make the daemon re-read its config: `{"added", "removed", "changed", "unchanged"}`,
        and `"needs_attention"` (instance -> message) for instances it leaves failed.
        A config with errors raises NeedsAttention (`.errors`); the old config keeps running."""
        return self._call("POST", "/v1/reload")  # type: ignore[no-any-return]

    def shutdown(self) -> dict[str, Any]:
        """Make the daemon stop as SIGTERM does (it finishes the requests in flight):
        `{"status": "stopping", "pid": N}`. The daemon's owner and root only; a daemon that
        systemd runs refuses (BadRequest, `under_systemd`): use `systemctl --user stop`."""
        return self._call("POST", "/v1/shutdown")  # type: ignore[no-any-return]

    # Transport

    def _call(
        self, method: str, target: str, body: bytes | None = None, wait: float | None = None
    ) -> Any:
        return self._answer(method, target, body, wait)[0]

    def _answer(
        self, method: str, target: str, body: bytes | None = None, wait: float | None = None
    ) -> tuple[Any, dict[bytes, bytes]]:
        """The JSON of a successful answer, and its headers; an error answer raises."""
        timeout = self.timeout + (DEFAULT_WAIT if wait is None else wait)
        status, raw, headers = self._exchange(method, target, body, timeout)
        try:
            data = _json_loads(raw)
        except ValueError:
            raise SugardError(
                f"sugard on {self.socket_path} sent an answer that is not JSON (HTTP {status})"
            ) from None
        if status < 400:
            return data, headers
        if not isinstance(data, dict):
            data = {}
        message = data.get("message") or f"sugard answered HTTP {status}"
        raise _ERRORS.get(data.get("error", ""), SugardError)(str(message), data)

    def _exchange(
        self, method: str, target: str, body: bytes | None, timeout: float
    ) -> tuple[int, bytes, dict[bytes, bytes]]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            # The daemon may have closed the kept connection meanwhile (idle timeout,
            # restart); that shows before the request reaches it, so then, and only then,
            # the request is sent again on a new connection.
            try:
                status, raw, headers, keep = conn.exchange(method, target, body, timeout)
            except (_Closed, BrokenPipeError, ConnectionResetError):
                conn.close()
            except BaseException as exc:
                conn.close()
                raise self._translate(exc) from None
            else:
                self._keep(conn, keep)
                return status, raw, headers
        conn = self._connect()
        try:
            status, raw, headers, keep = conn.exchange(method, target, body, timeout)
        except BaseException as exc:
            conn.close()
            raise self._translate(exc) from None
        self._keep(conn, keep)
        return status, raw, headers

    def _keep(self, conn: _Connection, keep: bool) -> None:
        """Keep `conn` for the next call if it can be reused and the pool has room."""
        if keep:
            with self._lock:
                if len(self._idle) < self.MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()

    def _connect(self) -> _Connection:
        missing: list[str] = []
        for path in self._candidates:
            size = len(os.fsencode(path))
            if size > SOCKET_PATH_MAX:
                raise BadRequest(
                    f"socket path {path} is {size} bytes; Unix sockets allow at most "
                    f"{SOCKET_PATH_MAX}: use a shorter --socket"
                )
            if self._only_ours:
                _trusted(path, _owner_of_folder(path), "its folder belongs to")
            try:
                conn = _Connection(path, self.timeout)
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
                missing.append(f"{path} ({exc.strerror})")
                continue
            except PermissionError:
                raise PermissionDenied(
                    f"no permission to connect to {path}: its directory or socket belongs to "
                    "another user; run as that user, or use your own sugard"
                ) from None
            except BaseException as exc:
                raise self._translate(exc) from None
            if self._only_ours:
                try:
                    _trusted(path, _peer_uid(conn), "the process answering there runs as")
                except BaseException:
                    conn.close()
                    raise
            self.socket_path = path
            self.connections_opened += 1
            return conn
        raise DaemonUnreachable(
            f"sugard is not running on {' nor on '.join(missing)}; start it with "
            "`systemctl --user start sugard` or `sugard run`, or point --socket or "
            "$SUGARD_SOCKET at the socket it listens on"
        )

    def _translate(self, exc: BaseException) -> BaseException:
        """Transport failures as SugardError; anything else (KeyboardInterrupt) unchanged."""
        if isinstance(exc, TimeoutError):
            return DaemonUnreachable(
                f"sugard on {self.socket_path} did not answer in time; see its log "
                "(journalctl --user -u sugard)"
            )
        if isinstance(exc, _Closed | OSError):
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "closed"
            return DaemonUnreachable(
                f"sugard on {self.socket_path} dropped the connection without an answer "
                f"({why}); see its log (journalctl --user -u sugard)"
            )
        if isinstance(exc, ValueError):
            return SugardError(f"sugard on {self.socket_path} sent a malformed HTTP answer")
        return exc


def _owner_of_folder(path: str) -> int | None:
    """The uid owning the folder of `path`; None if there is no such folder (nobody there)."""
    try:
        return os.stat(os.path.dirname(path) or ".").st_uid
    except OSError:
        return None


def _peer_uid(conn: _Connection) -> int:
    """The uid of the process that listens on the other end (SO_PEERCRED: pid, uid, gid)."""
    from _socket import SO_PEERCRED, SOL_SOCKET

    creds = conn.sock.getsockopt(SOL_SOCKET, SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder)


def _trusted(path: str, uid: int | None, whose: str) -> None:
    """Refuse a default socket that another user controls: they would receive the tokens
    this user reports and hand out tokens (and a URL) of theirs. Root may, as it may anyway."""
    me = os.getuid()
    if uid is None or uid in (me, 0):
        return
    raise PermissionDenied(
        f"refusing {path}: {whose} uid {uid}, not you (uid {me}) nor root, so it is not your "
        "sugard and another user may be posing as it; name your daemon's socket with --socket "
        "or $SUGARD_SOCKET, and tell whoever runs this machine"
    )


def _instance(name: str, action: str = "") -> str:
    if not name:
        raise BadRequest("the instance name is empty")
    return f"/v1/instances/{_quoted(name)}" + (f"/{action}" if action else "")


def proxy_path(name: str, as_user: str | None = None) -> str:
    """The socket path the proxy serves instance `name` under: Sugar's site root for a
    client of the socket, its token sugard's own, or with `as_user` that user's
    (`.../as/USER`, Sugar's sudo). What `sugarctl api --as` sends its requests under."""
    base = _instance(name)
    return base + (f"/as/{_quoted(_checked_user(as_user))}" if as_user is not None else "")


def _checked_user(user: str) -> str:
    problem = sudo_user_problem(user)
    if problem is not None:
        raise BadRequest(problem)
    return user


def _as_query(user: str) -> str:
    return f"as={_quoted(_checked_user(user))}"


def _quoted(text: str) -> str:
    # Percent-encoded by hand: urllib.parse would cost an import of `re`.
    return "".join(c if c in _UNRESERVED else f"%{b:02X}" for c in text for b in c.encode())


def _seconds(what: str, value: float, high: float) -> str:
    if not 0 <= value <= high:  # also refuses NaN
        raise BadRequest(f"{what} must be between 0 and {high:g} seconds, not {value!r}")
    return f"{value:g}"
