"""A fake SugarCRM: Sugar's OAuth2 behaviour on 127.0.0.1, with switches to make it misbehave.

Why a stateful fake rather than mocks: what a token daemon must survive (total rotation, one
session per user and platform, old tokens that live until the next session check or die at once,
the maintenance trap that burns the refresh token, lockouts, unregistered platforms) happens
across several HTTP requests, so the tests need a real server that keeps state the way Sugar
does. It plays one Sugar version at a time (`sugar_version`, see _versions.py), optionally in IdM
mode (SugarCloud with SugarIdentity). Status codes, error labels, texts, key order and the
per-version differences follow docs/sugarcrm.md.

Thread-safety: the handlers run on the server's event loop, while tests flip switches and read
counters from any thread (see `running_fake`). One lock guards every piece of mutable state, and
no handler awaits while holding it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import secrets
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Self, get_args, overload

from aiohttp import hdrs, web

from sugard.testing import _modules as modules
from sugard.testing import _wire as wire
from sugard.testing._files import FileStore
from sugard.testing._records import JsonRecord, RecordStore
from sugard.testing._store import (
    AccessState,
    AccessToken,
    Session,
    TokenStore,
    uuid_token,
    whole_second,
)
from sugard.testing._versions import LATEST_VERSION, VersionProfile, profile
from sugard.testing._wire import (
    API_VERSION,
    ETAG_CACHE_CONTROL,
    FAULT_KINDS,
    SESSION_CACHE_HEADERS,
    SESSION_COOKIE,
    TOKEN_CACHE_HEADERS,
    ApiError,
    Args,
    FaultKind,
    PresentedToken,
    delete_cookie,
    delete_download_cookie,
    fault_response,
    json_response,
    presented_token,
    read_args,
    set_download_cookie,
)

LicenseError = Literal["seats", "expired"]

DEFAULT_PLATFORMS: Final = frozenset({"base", "mobile", "portal", "sugard"})
# The routes that carry Sugar's `ignoreSystemStatusError` flag: they keep answering during
# maintenance or a license lock, which is why a working /me proves a token, not a usable site.
DEFAULT_STATUS_EXEMPT: Final = frozenset({"me", "ping", "logout", "metadata"})
ADMIN_USER: Final = "admin"

_PLATFORM_RE: Final = re.compile(r"[a-z0-9_-]{1,127}")
# What a request's platform must look like even where the registry check is off.
_PLATFORM_FORMAT: Final = re.compile(r"[a-z0-9_-]{1,127}", re.IGNORECASE)
_VERSION_RE: Final = re.compile(r"v10|v11(?:_\d+)?")
# A first path segment that names an API version, supported or not (else the version may come
# in the Accept header, and the segment is the start of the route).
_VERSION_SHAPE: Final = re.compile(r"v\d+(?:_\d+)?")
# What passes the OAuth2 library's grant_type filter; anything else is a malformed request.
_GRANT_TYPE_RE: Final = re.compile(
    r"authorization_code|token|password|client_credentials|refresh_token|http://.*|urn:.*"
)
_SERVER_TIME: Final = "%Y-%m-%dT%H:%M:%S%z"


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint as tests see it: never a password or a secret in it."""

    time: float  # the fake's clock when the request arrived
    grant_type: str | None
    username: str | None
    platform: str | None  # as sent: None means the client left it out (Sugar then uses "base")
    client_id: str | None  # from the body, the query string or HTTP Basic
    status: int  # 0: the connection was reset, or the request abandoned, before any answer
    error: str | None  # Sugar's error label, None on success and on injected faults
    fault: FaultKind | None = None  # set when `fail_next` produced this answer


@dataclass(frozen=True)
class Arrival:
    """One request as it reached the site, whatever its route: when (`time.monotonic()`, the
    real clock, never the fake's `clock`: rates are measured by it), its method and raw path
    (no query: it may carry a password)."""

    at: float
    method: str
    path: str


@dataclass(frozen=True)
class _Fault:
    kind: FaultKind
    retry_after: str | None


@dataclass(frozen=True)
class _Granted:
    """What a password or refresh grant found valid, before any token is created."""

    user: str
    refresh_expires_at: float
    used_up: str | None = None  # the refresh token this refresh consumes
    chain: int | None = None  # the login this refresh descends from


# What SugarIdentity grants a password login through Sugar: never null, unlike Sugar's own.
_IDM_SCOPE: Final = "offline https://apis.sugarcrm.com/auth/crm profile email address phone"


class _RecordsReader:
    """`FakeSugar.records`: the `records=` seed when the class builds its __init__, else the
    reader `fake.records("Accounts")`. A descriptor, because the issue asks for both names."""

    @overload
    def __get__(self, fake: None, owner: type | None = None) -> None: ...
    @overload
    def __get__(
        self, fake: FakeSugar, owner: type | None = None
    ) -> Callable[[str], list[JsonRecord]]: ...
    def __get__(self, fake: FakeSugar | None, owner: type | None = None) -> Any:
        return None if fake is None else fake._read_records


@dataclass(eq=False)
class FakeSugar:
    """One fake Sugar site: users, OAuth2 clients, registered platforms and every token issued."""

    users: dict[str, str] = field(
        default_factory=lambda: {ADMIN_USER: "admin-password"}, repr=False
    )
    clients: dict[str, str] = field(default_factory=lambda: {"sugar": ""}, repr=False)
    platforms: set[str] = field(default_factory=lambda: set(DEFAULT_PLATFORMS))
    sugar_version: str = LATEST_VERSION  # one of _versions.SUGAR_VERSIONS; set at construction
    access_lifetime: float = 3600
    refresh_lifetime: float = 1209600
    # How often, at most, a session is re-checked, so how long a rotated or evicted access
    # token may live on. None: the version's (120 s up to 13.0.x, 0 from 13.3). IdM mode uses
    # revocation_cache instead.
    eviction_grace: float | None = None
    max_session_lifetime: float | None = None
    idm_mode: bool = False
    # IdM mode: how long Sugar trusts the identity server's last word on an access token.
    revocation_cache: float = 10.0
    accept_any_platform: bool = False  # the site turned the platform registry check off
    # Users with admin rights: they may sudo, and /me says "type": "admin".
    admins: set[str] = field(default_factory=lambda: {ADMIN_USER})
    # Answer GET /ServerInfo as ServerInfoApi once did. Off: 404 no_method, as Sugar 12.0 and
    # 13.3 do (seen); no supported version is known to serve it.
    server_info_route: bool = False
    # The site serves /sugar_version.json at its root; off: a web server's 404 page there.
    sugar_version_json: bool = True
    lockout_after: int | None = None
    # Seed records per module, read back with records(module) (see _RecordsReader).
    records: InitVar[dict[str, list[dict[str, Any]]] | None] = _RecordsReader()
    # Runtime switches, also settable between requests from any thread.
    maintenance: bool = False
    license_error: LicenseError | None = None
    client_outdated: bool = False
    idm_nonrecoverable: bool = False  # IdM mode: every token check fails for good
    delay: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)  # seconds per route, see _modules
    status_exempt: frozenset[str] = DEFAULT_STATUS_EXEMPT
    clock: Callable[[], float] = field(default=time.time, repr=False)
    url: str = field(default="", init=False)
    app: web.Application = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _profile: VersionProfile = field(init=False, repr=False)
    _store: TokenStore = field(init=False, repr=False)
    _faults: deque[_Fault] = field(default_factory=deque, init=False, repr=False)
    _calls: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _sudos: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _requests: list[TokenRequest] = field(default_factory=list, init=False, repr=False)
    _arrivals: list[Arrival] = field(default_factory=list, init=False, repr=False)
    _failures: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _secrets: dict[str, None] = field(default_factory=dict, init=False, repr=False)
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)
    _data: RecordStore = field(init=False, repr=False)
    _files: FileStore = field(default_factory=FileStore, init=False, repr=False)

    def __post_init__(self, records: dict[str, list[dict[str, Any]]] | None) -> None:
        # Own copies, so that set_password() and friends never edit the caller's objects.
        self.users = dict(self.users)
        self.clients = dict(self.clients)
        self.platforms = set(self.platforms)
        self.admins = set(self.admins)
        self.latency = dict(self.latency)
        for name in self.platforms:
            if not _PLATFORM_RE.fullmatch(name):
                raise ValueError(f"platform {name!r} does not match ^[a-z0-9_-]{{1,127}}$")
        if self.access_lifetime <= 0 or self.refresh_lifetime <= 0:
            raise ValueError("token lifetimes must be positive")
        if self.max_session_lifetime is not None and self.max_session_lifetime <= 0:
            raise ValueError("max_session_lifetime must be positive or None")
        if self.eviction_grace is not None and self.eviction_grace < 0:
            raise ValueError("eviction_grace must not be negative or None")
        if self.revocation_cache < 0:
            raise ValueError("revocation_cache must not be negative")
        self._profile = profile(self.sugar_version)
        self._store = TokenStore(mint=_idm_token if self.idm_mode else uuid_token)
        if self.lockout_after is not None and self.lockout_after < 1:
            raise ValueError("lockout_after must be at least 1 or None")
        if self.license_error not in (None, *get_args(LicenseError)):
            raise ValueError("license_error must be None, 'seats' or 'expired'")
        unknown = set(self.latency) - modules.ROUTES
        if unknown:
            raise ValueError(f"latency for unknown routes {sorted(unknown)}")
        self._data = RecordStore(clock=lambda: self.clock())
        self._data.seed(records or {})
        self.app = web.Application(middlewares=[self._arrive])
        self.app.on_cleanup.append(self._close_files)
        self.app.router.add_route("GET", "/sugar_version.json", self._sugar_version_file)
        self.app.router.add_route("*", "/rest/{version}", self._dispatch)
        self.app.router.add_route("*", "/rest/{version}/{tail:.*}", self._dispatch)

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on host:port (0 picks a free port); returns and sets `url`."""
        if self._runner is not None:
            raise RuntimeError("this FakeSugar is already running")
        # No access log: query strings may carry passwords. A short shutdown timeout, because
        # a handler sleeping on `delay` for a client that gave up must not hold up close().
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    async def close(self) -> None:
        """Stop listening and drop open connections; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self.url = ""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------- switches for tests

    def fail_next(self, n: int, kind: FaultKind, *, retry_after: float | str | None = None) -> None:
        """Make the next `n` token-endpoint requests fail with `kind`, before any other check.

        `retry_after` adds a `Retry-After` header to the HTML faults (429, 503, html502).
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if n < 0:
            raise ValueError("n must not be negative")
        header = None if retry_after is None else _header_seconds(retry_after)
        with self._lock:
            self._faults.extend(_Fault(kind, header) for _ in range(n))

    def clear_faults(self) -> None:
        """Drop the faults queued by fail_next that have not struck yet (the outage is over)."""
        with self._lock:
            self._faults.clear()

    def evict(self, username: str, platform: str) -> int:
        """Act as a login of the same user and platform elsewhere; returns sessions evicted.

        Their access tokens die at their session's next check, as after a real eviction.
        """
        with self._lock:
            return self._store.evict(username, platform, self.clock())

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer "has expired" from now on."""
        with self._lock:
            self._store.expire_all_access()

    def revoke(self, access_token: str) -> bool:
        """Kill one access token (its refresh token survives); False if unknown.

        At once, as Sugar's IP check or session cleanup does; in IdM mode a revocation at the
        identity server, which Sugar notices only when its cached answer runs out.
        """
        with self._lock:
            return self._store.kill_access(access_token, self.clock(), at_once=not self.idm_mode)

    def unlock(self, username: str) -> None:
        """Clear a lockout and its failed-login count, as an administrator would."""
        with self._lock:
            self._failures.pop(username, None)

    def set_password(self, username: str, new: str) -> None:
        """Change (or create) a user's password; existing sessions live on, as in Sugar."""
        with self._lock:
            self.users[username] = new

    def add_platform(self, platform: str) -> None:
        """Register a custom platform (Admin > Configure API Platforms)."""
        if not _PLATFORM_RE.fullmatch(platform):
            raise ValueError(f"platform {platform!r} does not match ^[a-z0-9_-]{{1,127}}$")
        with self._lock:
            self.platforms.add(platform)

    def remove_platform(self, platform: str) -> None:
        """Unregister a platform: its tokens then get 422 on every call."""
        with self._lock:
            self.platforms.discard(platform)

    # ----------------------------------------------------------------- what tests read

    @property
    def calls(self) -> Counter[str]:
        """A snapshot of the request counts per route ("token", "password", "me", ...)."""
        with self._lock:
            return Counter(self._calls)

    @property
    def sudo_calls(self) -> Counter[str]:
        """A snapshot of the sudo requests per target user name, refused ones included."""
        with self._lock:
            return Counter(self._sudos)

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of every token-endpoint request since the last reset_counters()."""
        with self._lock:
            return list(self._requests)

    @property
    def issued(self) -> list[str]:
        """Every access, refresh and download token ever issued, to scan logs for leaks."""
        with self._lock:
            return list(self._store.issued)

    @property
    def arrivals(self) -> list[Arrival]:
        """A snapshot of every request that reached the site since the last reset_counters(),
        in order of arrival."""
        with self._lock:
            return list(self._arrivals)

    def received_secrets(self) -> list[str]:
        """Every password, client secret and refresh token ever received, to scan logs for leaks."""
        with self._lock:
            return list(self._secrets)

    def valid(self, access_token: str) -> bool:
        """Whether an API call with this token would pass now (by `clock`); runs no check."""
        with self._lock:
            state = self._store.access_state(access_token, self.clock(), self._recheck())
            return state is AccessState.VALID

    def _read_records(self, module: str) -> list[JsonRecord]:
        """Every record of `module` as the API shows it, in creation order."""
        with self._lock:
            return self._data.records(module)

    async def _close_files(self, _app: web.Application) -> None:
        """Remove the uploaded files with their directory when the app shuts down."""
        with self._lock:
            self._files.close()

    def reset_counters(self) -> None:
        """Forget `calls`, `sudo_calls`, `requests` and `arrivals`; `issued` and the secrets
        stay."""
        with self._lock:
            self._calls.clear()
            self._sudos.clear()
            self._requests.clear()
            self._arrivals.clear()

    # ----------------------------------------------------------------- routing

    @web.middleware
    async def _arrive(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        with self._lock:
            self._arrivals.append(
                Arrival(time.monotonic(), request.method, request.rel_url.raw_path)
            )
        return await handler(request)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        first = request.match_info["version"]
        return await self._serve(request, first, request.match_info.get("tail", ""), None)

    async def _serve(
        self, request: web.Request, first: str, tail: str, bulk: web.Request | None
    ) -> web.StreamResponse:
        """Route one request (or one bulk sub-request: `bulk` is then the parent's template)."""
        method = request.method
        try:
            version, path = _api_version(request, first, tail)
            request[API_VERSION] = version
            if method == "POST" and path == "oauth2/token":
                return await self._token(request, faults=bulk is None)
            if method == "POST" and path == "oauth2/logout":
                return await self._logout(request)
            parts = path.split("/")
            if method == "POST" and len(parts) == 3 and parts[:2] == ["oauth2", "sudo"]:
                return await self._sudo(request, parts[2])
            if method == "GET" and path == "me":
                return await self._me(request)
            if method == "GET" and path == "ping":
                return await self._ping(request)
            if path == "ServerInfo":
                return await self._server_info(request, version, path)
            if method == "POST" and path == "bulk":
                return await self._bulk(request, bulk)
            if bulk is not None and _is_file_route(parts):
                # A file answer streams straight to the connection: not inside a bulk list.
                raise ApiError(404, "no_method", f"{wire.MSG_NO_ROUTE}{version}/{path}")
            # Records, filters, metadata and files: the ordinary routes maintenance blocks.
            answer = await modules.handle(self, request, path)
            if answer is not None:
                return answer
        except ApiError as err:
            return err.response()
        return ApiError(
            404, "no_method", f"Could not find a route for {method} /{path}."
        ).response()

    async def _sugar_version_file(self, request: web.Request) -> web.Response:
        """`/sugar_version.json` at the site root, a static file (when the site serves it)."""
        with self._lock:
            self._calls["sugar_version"] += 1
            served = self.sugar_version_json
            version = modules.full_version(self.sugar_version)
        if not served:
            return web.Response(
                status=404, text=_NOT_FOUND_PAGE, content_type="text/html", charset="iso-8859-1"
            )
        body = {"sugar_version": version, "sugar_flavor": "ENT"}
        return web.Response(body=json.dumps(body).encode(), content_type="application/json")

    # ----------------------------------------------------------------- token endpoint

    async def _token(self, request: web.Request, *, faults: bool = True) -> web.StreamResponse:
        """The token endpoint; `faults` False inside a bulk call, which no proxy can break."""
        unreadable: ApiError | None = None
        try:
            args = await read_args(request)
        except ApiError as err:
            args, unreadable = Args({}, None), err
        with self._lock:
            arrived = self.clock()
            self._calls["token"] += 1
            fault = self._faults.popleft() if faults and self._faults else None
            self._remember_secrets(args)
        status, label = 0, None
        try:
            if self.delay > 0:
                await asyncio.sleep(self.delay)
            if fault is not None:
                response = fault_response(request, fault.kind, fault.retry_after)
                status = 0 if fault.kind == "reset" else response.status
                return response
            try:
                if unreadable is not None:
                    raise unreadable
                with self._lock:
                    response = self._grant(args)
            except ApiError as err:
                response, label = err.response(), err.label
            status = response.status
            return response
        finally:
            # Also reached when the client gave up during `delay`: recorded with status 0.
            record = TokenRequest(
                time=arrived,
                grant_type=args.get("grant_type"),
                username=args.get("username"),
                platform=args.get("platform"),
                client_id=args.basic[0] if args.basic else args.get("client_id"),
                status=status,
                error=label,
                fault=fault.kind if fault else None,
            )
            with self._lock:
                self._requests.append(record)

    def _grant(self, args: Args) -> web.Response:
        """The token endpoint proper, in the order Sugar checks things. Runs under the lock."""
        grant_type = args.get("grant_type")
        if grant_type in ("password", "refresh_token"):
            self._calls[grant_type] += 1
        if self.client_outdated:
            raise ApiError(433, "client_outdated", wire.MSG_CLIENT_OUTDATED)
        platform = args.get("platform") or "base"
        self._check_platform(platform)
        if grant_type is None or not _GRANT_TYPE_RE.fullmatch(grant_type):
            raise ApiError(400, "invalid_request", wire.MSG_BAD_GRANT_TYPE)
        client_id = self._check_client(args)
        now = self.clock()
        if grant_type == "password":
            granted = self._password_grant(args, now)
        elif grant_type == "refresh_token":
            granted = self._refresh_grant(args, client_id, now)
        elif grant_type == "token":
            # The OAuth2 library's text stands where the label should be.
            raise ApiError(501, wire.MSG_IMPLICIT_GRANT, None)
        elif grant_type.startswith(("urn:", "http://")):
            raise ApiError(400, "invalid_grant", None)
        else:
            # Sugar's storage implements neither grant, and the library sends no description.
            raise ApiError(400, "unsupported_grant_type", None)
        if args.get("scope"):
            raise ApiError(400, "invalid_scope", None)
        if granted.used_up is not None:
            self._store.drop_refresh(granted.used_up, now)
        refreshed = granted.used_up is not None
        session = self._open(
            granted.user,
            platform,
            client_id,
            now,
            granted.refresh_expires_at,
            chain=granted.chain,
            download_is_access=self.idm_mode and refreshed,
        )
        # Only now is the site's status checked: during maintenance or a license lock the new
        # session exists, the old refresh token and the user's other sessions there are gone,
        # and nothing is handed out (the maintenance trap).
        self._check_status_at_login()
        return self._token_response(session, platform, now, refreshed=refreshed)

    def _check_client(self, args: Args) -> str:
        # HTTP Basic wins over a client_id in the body, where PHP fills PHP_AUTH_USER.
        if args.basic is not None:
            client_id, secret = args.basic
        else:
            client_id, secret = args.get("client_id") or "", args.get("client_secret") or ""
        if not client_id:
            raise ApiError(400, "invalid_client", wire.MSG_NO_CLIENT_ID)
        expected = self.clients.get(client_id)
        if expected is None or not _same(expected, secret):
            raise ApiError(400, "invalid_client", wire.MSG_BAD_CLIENT)
        return client_id

    def _password_grant(self, args: Args, now: float) -> _Granted:
        username, password = args.get("username"), args.get("password")
        if username is None or password is None:
            raise ApiError(400, "invalid_request", wire.MSG_NO_USER_PASS)
        # The lock is checked before the password, so even the right password fails.
        if self.lockout_after is not None and self._failures[username] >= self.lockout_after:
            raise ApiError(401, "need_login", wire.MSG_LOCKED)
        stored = self.users.get(username)
        if stored is None or not _same(stored, password):
            if stored is not None:
                self._failures[username] += 1
            raise ApiError(401, "need_login", wire.MSG_BAD_LOGIN)
        self._failures.pop(username, None)
        return _Granted(username, now + self._session_lifetime())

    def _refresh_grant(self, args: Args, client_id: str, now: float) -> _Granted:
        token = args.get("refresh_token")
        if token is None:
            raise ApiError(400, "invalid_request", wire.MSG_NO_REFRESH)
        # IdM mode answers every failed refresh with invalid_request (a Sugar quirk).
        label = "invalid_request" if self.idm_mode else "invalid_grant"
        record = self._store.refresh.get(token)
        if record is None and self.idm_mode and token in self._store.spent:
            # The identity server's refresh tokens are single-use: a reuse ends the whole chain.
            self._store.kill_chain(self._store.spent[token], now)
        if record is None or record.client_id != client_id:
            raise ApiError(400, label, wire.MSG_BAD_REFRESH)
        if whole_second(now) > whole_second(record.expires_at):
            ended, at = whole_second(record.expires_at), whole_second(now)
            raise ApiError(400, label, f"{wire.MSG_EXPIRED_REFRESH}{ended:.0f} vs {at:.0f}")
        if self.max_session_lifetime is not None:
            expires_at = record.expires_at
        else:
            expires_at = now + self.refresh_lifetime
        return _Granted(record.user, expires_at, used_up=token, chain=record.chain)

    def _session_lifetime(self) -> float:
        if self.max_session_lifetime is None:
            return self.refresh_lifetime
        return min(self.refresh_lifetime, self.max_session_lifetime)

    def _open(
        self,
        user: str,
        platform: str,
        client_id: str,
        now: float,
        refresh_expires_at: float,
        *,
        chain: int | None = None,
        download_is_access: bool = False,
        sudoer: str | None = None,
    ) -> Session:
        return self._store.open_session(
            user=user,
            platform=platform,
            client_id=client_id,
            now=now,
            access_expires_at=now + self.access_lifetime,
            refresh_expires_at=refresh_expires_at,
            # Sugar's session check first runs a full interval after the login; the identity
            # server's cache is empty until the token's first use.
            first_check=-math.inf if self.idm_mode else now,
            chain=chain,
            # SugarIdentity keeps no one-session-per-platform rule.
            evict_others=not self.idm_mode,
            download_is_access=download_is_access,
            sudoer=sudoer,
        )

    def _token_response(
        self, session: Session, platform: str, now: float, *, refreshed: bool = False
    ) -> web.Response:
        # Sugar counts in whole seconds, so this is always an integer.
        remaining = int(whole_second(session.refresh.expires_at) - whole_second(now))
        body: dict[str, object] = {
            "access_token": session.access_token,
            "expires_in": _wire_seconds(self.access_lifetime),
            "token_type": "bearer",
            "scope": _IDM_SCOPE if self.idm_mode else None,
            "refresh_token": session.refresh_token,
            "refresh_expires_in": remaining,
            "download_token": session.download_token,
        }
        if self.idm_mode and refreshed:
            # A Sugar bug in IdM mode: an absolute epoch time instead of a duration, and the
            # download token (the access token itself there) comes before it.
            del body["refresh_expires_in"]
            body["refresh_expires_in"] = int(whole_second(session.refresh.expires_at))
        response = json_response(body, cache=TOKEN_CACHE_HEADERS)
        set_download_cookie(response, platform, session.download_token, remaining, now)
        return response

    # ----------------------------------------------------------------- other routes

    async def _me(self, request: web.Request) -> web.Response:
        _, record = await self._caller(request, "me")
        with self._lock:
            admin = record.user in self.admins
        user = {
            "id": _user_id(record.user),
            "user_name": record.user,
            "type": "admin" if admin else "user",
        }
        return json_response({"current_user": user}, cache=SESSION_CACHE_HEADERS)

    async def _ping(self, request: web.Request) -> web.Response:
        await self._caller(request, "ping")
        response = json_response("pong", cache={hdrs.CACHE_CONTROL: ETAG_CACHE_CONTROL})
        assert isinstance(response.body, bytes)
        response.headers[hdrs.ETAG] = hashlib.md5(response.body, usedforsecurity=False).hexdigest()
        return response

    async def _server_info(self, request: web.Request, version: str, path: str) -> web.Response:
        """What ServerInfoApi once answered, where `server_info_route` asks for it; else the
        404 that Sugar 12.0 and 13.3 give, as no route there accepts the path."""
        with self._lock:
            self._calls["serverinfo"] += 1
            served = self.server_info_route
        if not served or request.method != "GET":
            raise ApiError(404, "no_method", f"{wire.MSG_NO_ROUTE}{version}/{path}")
        presented = await presented_token(request)
        with self._lock:
            self._authenticate(presented, request, "serverinfo")
        now = self.clock()
        return json_response(
            {
                "flavor": "ENT",
                "version": modules.full_version(self.sugar_version),
                "build": self._profile.build,
                "marketing_version": self._profile.marketing_version,
                "gmt_time": datetime.fromtimestamp(now, UTC).strftime(_SERVER_TIME),
                "server_time": datetime.fromtimestamp(now).astimezone().strftime(_SERVER_TIME),
            }
        )

    async def _logout(self, request: web.Request) -> web.Response:
        args = await read_args(request)
        presented = await presented_token(request)
        with self._lock:
            self._calls["logout"] += 1
            self._remember_secrets(args)
            token, record = self._authenticate(presented, request, "logout")
            now = self.clock()
            own_refresh = self._store.refresh_of(token)
            self._store.kill_access(token, now, at_once=True)
            sent = args.get("refresh_token")
            if sent is not None:
                # Sugar deletes the refresh token sent, without checking whose it is.
                self._store.drop_refresh(sent, now)
            elif self._profile.logout_drops_refresh and own_refresh is not None:
                # 12.0+: a logout without refresh_token ends the session it was made with.
                self._store.drop_refresh(own_refresh, now)
        response = json_response({"success": True}, cache=SESSION_CACHE_HEADERS)
        # The request's platform, else the one of the session the token belongs to.
        delete_download_cookie(response, args.get("platform") or record.platform)
        delete_cookie(response, SESSION_COOKIE)
        return response

    async def _sudo(self, request: web.Request, user_name: str) -> web.Response:
        """A token for another user, for admins: four keys, no refresh or download token."""
        args = await read_args(request)
        presented = await presented_token(request)
        with self._lock:
            self._calls["sudo"] += 1
            self._sudos[user_name] += 1
            self._remember_secrets(args)
            _, caller = self._authenticate(presented, request, "sudo")
            # No sudo from a sudo session, even when the user sudoed to is an admin too.
            if caller.sudoer is not None or caller.user not in self.admins:
                raise ApiError(403, "not_authorized", wire.MSG_NOT_AUTHORIZED)
            if user_name not in self.users:
                raise ApiError(404, "not_found", f"Could not find a user named {user_name}.")
            platform = args.get("platform") or "base"
            self._check_platform(platform)
            now = self.clock()
            client_id = args.get("client_id") or "sugar"
            # A login's session, so the user's other sessions on that platform are evicted
            # by the version's rules; only the access token is handed out.
            session = self._open(
                user_name,
                platform,
                client_id,
                now,
                now + self._session_lifetime(),
                sudoer=caller.user,
            )
        body = {
            "access_token": session.access_token,
            "expires_in": _wire_seconds(self.access_lifetime),
            "token_type": "bearer",
            "scope": None,
        }
        return json_response(body, cache=SESSION_CACHE_HEADERS)

    async def _bulk(self, request: web.Request, template: web.Request | None) -> web.Response:
        """`POST /bulk`: each sub-request in order, through the same routing, with the parent
        request's authentication; a list of `{"contents", "headers", "status"}`."""
        if template is None:
            # Cloned before the body is read: aiohttp refuses to clone a read request.
            template = request.clone()
        raw = await request.read()
        with self._lock:
            self._calls["bulk"] += 1
        subs = _bulk_requests(raw)
        auth = {
            name: value
            for name in ("OAuth-Token", hdrs.AUTHORIZATION)
            if (value := request.headers.get(name))
        }
        results: list[dict[str, Any]] = []
        cookies: list[str] = []
        for sub in subs:
            with self._lock:
                self._calls["bulk_requests"] += 1
            answer = await self._sub_request(template, sub, auth)
            headers = {
                name: value
                for name, value in answer.headers.items()
                if name.lower() not in ("set-cookie", "content-length")
            }
            # The sub-requests run inside the parent's PHP process: their cookies are its own.
            cookies.extend(answer.headers.getall(hdrs.SET_COOKIE, []))
            results.append(
                {"contents": _decoded(answer), "headers": headers, "status": answer.status}
            )
        response = json_response(results)
        for cookie in cookies:
            response.headers.add(hdrs.SET_COOKIE, cookie)
        return response

    async def _sub_request(
        self, template: web.Request, sub: _SubRequest, auth: dict[str, str]
    ) -> web.Response:
        # Case-blind names, later sources winning: the parent's headers (less its body's),
        # the sub-request's own, then the parent's authentication, whatever the sub says.
        merged: dict[str, tuple[str, str]] = {}
        body_headers = {"content-type", "content-length", "transfer-encoding"}
        for name, value in template.headers.items():
            if name.lower() not in body_headers:
                merged[name.lower()] = (name, value)
        for source in (sub.headers, auth):
            merged.update((name.lower(), (name, value)) for name, value in source.items())
        if sub.body and "content-type" not in merged:
            merged["content-type"] = (hdrs.CONTENT_TYPE, "application/json")
        merged["content-length"] = (hdrs.CONTENT_LENGTH, str(len(sub.body)))
        headers = list(merged.values())
        try:
            clone = template.clone(method=sub.method, rel_url=sub.url, headers=headers)
        except ValueError:
            return ApiError(
                404, "no_method", f"{wire.MSG_NO_ROUTE}{sub.url.lstrip('/')}"
            ).response()
        clone._read_bytes = sub.body  # its body, as if it had come on the wire
        segments = clone.path.split("/", 3)
        if len(segments) < 3 or segments[:2] != ["", "rest"]:
            return ApiError(
                404, "no_method", f"{wire.MSG_NO_ROUTE}{sub.url.lstrip('/')}"
            ).response()
        tail = segments[3] if len(segments) > 3 else ""
        answer = await self._serve(clone, segments[2], tail, template)
        assert isinstance(answer, web.Response)  # file routes, the streamed ones, are refused
        return answer

    # ----------------------------------------------------------------- shared checks

    async def _caller(self, request: web.Request, route: str) -> tuple[str, AccessToken]:
        """Count one call to `route` and authenticate it: (its access token, that token)."""
        presented = await presented_token(request)
        with self._lock:
            self._calls[route] += 1
            return self._authenticate(presented, request, route)

    def _authenticate(
        self, presented: PresentedToken, request: web.Request, route: str
    ) -> tuple[str, AccessToken]:
        """Sugar's checks on an API call, in its order. Runs under the lock."""
        token = presented.token
        record = self._store.access.get(token) if token else None
        if presented.via_bearer and not self._reads_bearer(record):
            token = None
        if not token:
            raise ApiError(401, "need_login", wire.MSG_NO_TOKEN)
        if self.idm_mode and self.idm_nonrecoverable:
            raise _in_session(
                ApiError(401, "idm_nonrecoverable_error", wire.MSG_IDM_NONRECOVERABLE)
            )
        now, recheck = self.clock(), self._recheck()
        state = AccessState.INVALID if record is None else record.state(now, recheck)
        if record is None or state is AccessState.INVALID:
            raise _in_session(ApiError(401, "invalid_grant", wire.MSG_INVALID_ACCESS))
        if state is AccessState.EXPIRED:
            # Sugar wipes the session that said so: from now on the token is just "invalid".
            self._store.kill_access(token, now, at_once=True)
            raise _in_session(ApiError(401, "invalid_grant", wire.MSG_EXPIRED_ACCESS))
        if record.check_due(now, recheck):
            self._store.checked(token, now)
        self._check_platform(record.platform)
        if route not in self.status_exempt:
            site = str(request.url.origin())
            if self.maintenance:
                raise ApiError(503, "maintenance", wire.MSG_MAINTENANCE, url=site)
            if self.license_error == "expired":
                raise ApiError(503, "admin_only", wire.MSG_LICENSE_EXPIRED, url=site)
        return token, record

    def _reads_bearer(self, record: AccessToken | None) -> bool:
        """9.0+ reads `Authorization: Bearer`; 8.0 only for IdM tokens of the opi platform."""
        if self._profile.reads_bearer:
            return True
        return self.idm_mode and record is not None and record.platform == "opi"

    def _recheck(self) -> float:
        """How long an access token whose session is gone may still pass an API call."""
        if self.idm_mode:
            return self.revocation_cache
        if self.eviction_grace is not None:
            return self.eviction_grace
        return self._profile.session_check_interval

    def _check_platform(self, platform: str) -> None:
        if not _PLATFORM_FORMAT.fullmatch(platform):
            raise ApiError(422, "invalid_parameter", wire.MSG_BAD_PLATFORM)
        if not self.accept_any_platform and platform not in self.platforms:
            raise ApiError(422, "invalid_parameter", wire.MSG_BAD_PLATFORM)

    def _check_status_at_login(self) -> None:
        if self.maintenance:
            raise ApiError(401, "need_login", wire.MSG_MAINTENANCE_LOGIN)
        if self.license_error == "expired":
            raise ApiError(401, "need_login", wire.MSG_LICENSE_EXPIRED)
        if self.license_error == "seats":
            seats = self._profile
            raise ApiError(seats.seats_status, seats.seats_label, wire.MSG_LICENSE_SEATS)

    def _remember_secrets(self, args: Args) -> None:
        for key in ("password", "client_secret", "refresh_token"):
            value = args.get(key)
            if value is not None:
                self._secrets[value] = None
        if args.basic is not None and args.basic[1]:
            self._secrets[args.basic[1]] = None


@dataclass(frozen=True)
class _SubRequest:
    """One entry of a bulk call's `requests` list."""

    url: str  # "/rest/v10/..." (Sugar's lists say "/v10/...")
    method: str
    body: bytes
    headers: dict[str, str]


def _bulk_requests(raw: bytes) -> list[_SubRequest]:
    """The sub-requests of a bulk body; 422 invalid_parameter when they cannot be read."""
    try:
        parsed: object = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise ApiError(422, "invalid_parameter", wire.MSG_BAD_JSON) from None
    requests = parsed.get("requests") if isinstance(parsed, dict) else None
    if not isinstance(requests, list) or not requests:
        raise ApiError(422, "missing_parameter", "Missing parameter: requests")
    subs = []
    for entry in requests:
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url:
            raise ApiError(422, "invalid_parameter", wire.MSG_BAD_JSON)
        assert isinstance(entry, dict)
        data = entry.get("data")
        if data is None:
            body = b""
        elif isinstance(data, str):
            body = data.encode()
        else:
            body = json.dumps(data).encode()
        given = entry.get("headers")
        headers = {str(k): str(v) for k, v in given.items()} if isinstance(given, dict) else {}
        if not url.startswith("/rest/"):
            url = "/rest/" + url.lstrip("/")
        subs.append(_SubRequest(url, str(entry.get("method") or "GET").upper(), body, headers))
    return subs


def _decoded(answer: web.Response) -> object:
    """A sub-request's body as the bulk list carries it: JSON decoded, else the text."""
    raw = answer.body if isinstance(answer.body, bytes) else b""
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _api_version(request: web.Request, first: str, tail: str) -> tuple[str, str]:
    """(API version, route) of a request: the version from the path, else from the Accept
    header (`/rest/me` with `version=10` is `/rest/v10/me`); 301 when neither names one."""
    if _VERSION_RE.fullmatch(first):
        return first, tail.strip("/")
    if not _VERSION_SHAPE.fullmatch(first):
        accepted = wire.accept_version(request.headers.get(hdrs.ACCEPT, ""))
        if accepted is not None and _VERSION_RE.fullmatch(accepted):
            return accepted, f"{first}/{tail}".strip("/")
        if accepted is not None:
            first = accepted
    raise ApiError(301, "incorrect_version", f"Unsupported API version: {first}.")


def _is_file_route(parts: list[str]) -> bool:
    """`{Module}/{id}/file/{field}`: the routes whose answers stream."""
    return len(parts) == 4 and parts[2] == "file"


def _in_session(error: ApiError) -> ApiError:
    """Mark a refusal given after PHP opened the session of a presented token."""
    error.session_opened = True
    return error


_NOT_FOUND_PAGE: Final = (
    '<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head>\n'
    "<title>404 Not Found</title>\n</head><body>\n<h1>Not Found</h1>\n"
    "<p>The requested URL was not found on this server.</p>\n</body></html>\n"
)


def _same(expected: str, given: str) -> bool:
    """Constant-time comparison, as any credential check should be, even a fake one."""
    return hmac.compare_digest(expected.encode(), given.encode())


def _idm_token() -> str:
    """An opaque token as SugarIdentity mints it: two base64url parts, not a UUID."""
    return f"{secrets.token_urlsafe(32)}.{secrets.token_urlsafe(32)}"


def _user_id(user_name: str) -> str:
    """A stable Sugar-looking user id, so /me answers the same id for the same user."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"sugard-fake-user:{user_name}"))


def _wire_seconds(seconds: float) -> int | float:
    """Seconds as Sugar prints them (integers), keeping fractions that tests ask for."""
    rounded = round(float(seconds), 3)
    return int(rounded) if rounded.is_integer() else rounded


def _header_seconds(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(_wire_seconds(value))
