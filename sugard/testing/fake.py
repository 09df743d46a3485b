"""A fake SugarCRM: Sugar's OAuth2 behaviour on 127.0.0.1, with switches to make it misbehave.

Why a stateful fake rather than mocks: what a token daemon must survive (total rotation, one
session per user and platform, eviction with or without a grace period, the maintenance trap that
burns the refresh token, lockouts, unregistered platforms) happens across several HTTP requests,
so the tests need a real server that keeps state the way Sugar does. Status codes, error labels,
texts and key order follow docs/sugarcrm-oauth2.md.

Thread-safety: the handlers run on the server's event loop, while tests flip switches and read
counters from any thread (see `running_fake`). One lock guards every piece of mutable state, and
no handler awaits while holding it.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Literal, Self, get_args

from aiohttp import web

from sugard.testing import _wire as wire
from sugard.testing._store import AccessState, AccessToken, Session, TokenStore
from sugard.testing._wire import (
    FAULT_KINDS,
    ApiError,
    Args,
    FaultKind,
    fault_response,
    json_response,
    read_args,
)

LicenseError = Literal["seats", "expired"]

DEFAULT_PLATFORMS: Final = frozenset({"base", "mobile", "portal", "sugard"})
# The routes that carry Sugar's `ignoreSystemStatusError` flag: they keep answering during
# maintenance or a license lock, which is why a working /me proves a token, not a usable site.
DEFAULT_STATUS_EXEMPT: Final = frozenset({"me", "ping", "logout"})
ADMIN_USER: Final = "admin"

_PLATFORM_RE: Final = re.compile(r"[a-z0-9_-]{1,127}")
_VERSION_RE: Final = re.compile(r"v10|v11(?:_\d+)?")
_MODULE_RE: Final = re.compile(r"[A-Z][A-Za-z0-9_]*")
# What passes the OAuth2 library's grant_type filter; anything else is a malformed request.
_GRANT_TYPE_RE: Final = re.compile(
    r"authorization_code|token|password|client_credentials|refresh_token|http://.*|urn:.*"
)


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
class _Fault:
    kind: FaultKind
    retry_after: str | None


@dataclass(eq=False)
class FakeSugar:
    """One fake Sugar site: users, OAuth2 clients, registered platforms and every token issued."""

    users: dict[str, str] = field(
        default_factory=lambda: {ADMIN_USER: "admin-password"}, repr=False
    )
    clients: dict[str, str] = field(default_factory=lambda: {"sugar": ""}, repr=False)
    platforms: set[str] = field(default_factory=lambda: set(DEFAULT_PLATFORMS))
    access_lifetime: float = 3600
    refresh_lifetime: float = 1209600
    eviction_grace: float = 0.0  # 0: Sugar 13.x; 120: Sugar 8.0 to 12.x
    max_session_lifetime: float | None = None
    idm_mode: bool = False
    lockout_after: int | None = None
    # Runtime switches, also settable between requests from any thread.
    maintenance: bool = False
    license_error: LicenseError | None = None
    client_outdated: bool = False
    delay: float = 0.0
    status_exempt: frozenset[str] = DEFAULT_STATUS_EXEMPT
    sugar_version: str = "26.1"  # what ServerInfo publishes; the daemon reads it after a login
    clock: Callable[[], float] = field(default=time.time, repr=False)
    url: str = field(default="", init=False)
    app: web.Application = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _store: TokenStore = field(default_factory=TokenStore, init=False, repr=False)
    _faults: deque[_Fault] = field(default_factory=deque, init=False, repr=False)
    _calls: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _requests: list[TokenRequest] = field(default_factory=list, init=False, repr=False)
    _failures: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _secrets: dict[str, None] = field(default_factory=dict, init=False, repr=False)
    _runner: web.AppRunner | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Own copies, so that set_password() and friends never edit the caller's objects.
        self.users = dict(self.users)
        self.clients = dict(self.clients)
        self.platforms = set(self.platforms)
        for name in self.platforms:
            if not _PLATFORM_RE.fullmatch(name):
                raise ValueError(f"platform {name!r} does not match ^[a-z0-9_-]{{1,127}}$")
        if self.access_lifetime <= 0 or self.refresh_lifetime <= 0:
            raise ValueError("token lifetimes must be positive")
        if self.max_session_lifetime is not None and self.max_session_lifetime <= 0:
            raise ValueError("max_session_lifetime must be positive or None")
        if self.eviction_grace < 0:
            raise ValueError("eviction_grace must not be negative")
        if self.lockout_after is not None and self.lockout_after < 1:
            raise ValueError("lockout_after must be at least 1 or None")
        if self.license_error not in (None, *get_args(LicenseError)):
            raise ValueError("license_error must be None, 'seats' or 'expired'")
        self.app = web.Application()
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
        """Act as a login of the same user and platform elsewhere; returns sessions evicted."""
        with self._lock:
            return self._store.evict(username, platform, dies_at=self._grace_deadline())

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far answer "has expired" from now on."""
        with self._lock:
            self._store.expire_all_access()

    def revoke(self, access_token: str) -> bool:
        """Kill one access token at once (its refresh token survives); False if unknown."""
        with self._lock:
            return self._store.kill_access(access_token, dies_at=-math.inf)

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
    def requests(self) -> list[TokenRequest]:
        """A snapshot of every token-endpoint request since the last reset_counters()."""
        with self._lock:
            return list(self._requests)

    @property
    def issued(self) -> list[str]:
        """Every access, refresh and download token ever issued, to scan logs for leaks."""
        with self._lock:
            return list(self._store.issued)

    def received_secrets(self) -> list[str]:
        """Every password, client secret and refresh token ever received, to scan logs for leaks."""
        with self._lock:
            return list(self._secrets)

    def valid(self, access_token: str) -> bool:
        """Whether Sugar still knows this access token and it has not expired (by `clock`)."""
        with self._lock:
            return self._store.access_state(access_token, self.clock()) is AccessState.VALID

    def reset_counters(self) -> None:
        """Forget `calls` and `requests`; `issued` and the secrets stay, for leak scans."""
        with self._lock:
            self._calls.clear()
            self._requests.clear()

    # ----------------------------------------------------------------- routing

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        if not _VERSION_RE.fullmatch(version):
            return ApiError(
                301, "incorrect_version", f"Unsupported API version: {version}."
            ).response()
        path = request.match_info.get("tail", "").strip("/")
        method = request.method
        try:
            if method == "POST" and path == "oauth2/token":
                return await self._token(request)
            if method == "POST" and path == "oauth2/logout":
                return await self._logout(request)
            parts = path.split("/")
            if method == "POST" and len(parts) == 3 and parts[:2] == ["oauth2", "sudo"]:
                return await self._sudo(request, parts[2])
            if method == "GET" and path == "me":
                return self._me(request)
            if method == "GET" and path == "ping":
                with self._lock:
                    self._calls["ping"] += 1
                    self._authenticate(request, "ping")
                return json_response("pong")
            if method == "GET" and path == "ServerInfo":
                with self._lock:
                    self._calls["serverinfo"] += 1
                    self._authenticate(request, "serverinfo")
                return json_response(
                    {"flavor": "ENT", "version": self.sugar_version + ".0", "build": "1"}
                )
            if method == "GET" and _MODULE_RE.fullmatch(path):
                # Stands for every ordinary API route: the ones that maintenance does block.
                with self._lock:
                    self._calls["api"] += 1
                    self._authenticate(request, "api")
                return json_response({"next_offset": -1, "records": []})
        except ApiError as err:
            return err.response()
        return ApiError(
            404, "no_method", f"Could not find a route for {method} /{path}."
        ).response()

    # ----------------------------------------------------------------- token endpoint

    async def _token(self, request: web.Request) -> web.StreamResponse:
        args = await read_args(request)
        with self._lock:
            arrived = self.clock()
            self._calls["token"] += 1
            fault = self._faults.popleft() if self._faults else None
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
                client_id=args.get("client_id") or (args.basic[0] if args.basic else None),
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
        if grant_type == "password":
            session, refresh_expires_in = self._password_grant(args, platform, client_id)
        elif grant_type == "refresh_token":
            session, refresh_expires_in = self._refresh_grant(args, platform, client_id)
        elif grant_type == "token":
            raise ApiError(400, "invalid_request", wire.MSG_BAD_GRANT_TYPE)
        else:
            # Sugar's storage implements neither grant, and the library sends no description.
            raise ApiError(400, "unsupported_grant_type", None)
        return self._token_response(session, platform, refresh_expires_in)

    def _check_client(self, args: Args) -> str:
        in_args = args.get("client_id")
        if args.basic is not None and in_args is not None:
            raise ApiError(400, "invalid_client", wire.MSG_TWO_CLIENT_METHODS)
        if args.basic is not None:
            client_id, secret = args.basic
        else:
            client_id, secret = in_args or "", args.get("client_secret") or ""
        if not client_id:
            raise ApiError(400, "invalid_client", wire.MSG_NO_CLIENT_ID)
        expected = self.clients.get(client_id)
        if expected is None or not _same(expected, secret):
            raise ApiError(400, "invalid_client", wire.MSG_BAD_CLIENT)
        return client_id

    def _password_grant(self, args: Args, platform: str, client_id: str) -> tuple[Session, float]:
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
        self._check_status_at_login()
        self._failures.pop(username, None)
        now = self.clock()
        lifetime = self.refresh_lifetime
        if self.max_session_lifetime is not None:
            lifetime = min(lifetime, self.max_session_lifetime)
        session = self._open(username, platform, client_id, now, now + lifetime)
        return session, lifetime

    def _refresh_grant(self, args: Args, platform: str, client_id: str) -> tuple[Session, float]:
        token = args.get("refresh_token")
        if token is None:
            raise ApiError(400, "invalid_request", wire.MSG_NO_REFRESH)
        # IdM mode answers every failed refresh with invalid_request (a Sugar quirk).
        label = "invalid_request" if self.idm_mode else "invalid_grant"
        record = self._store.refresh.get(token)
        if record is None or record.client_id != client_id:
            raise ApiError(400, label, wire.MSG_BAD_REFRESH)
        now = self.clock()
        if record.expires_at < now:
            ended = datetime.fromtimestamp(record.expires_at, UTC).isoformat(timespec="seconds")
            raise ApiError(400, label, f"{wire.MSG_EXPIRED_REFRESH}{ended}")
        # Rotation happens before the site status is checked: during maintenance or a license
        # lock the old tokens are gone and no new ones are handed out (the maintenance trap).
        self._store.drop_refresh(token, dies_at=self._grace_deadline())
        self._check_status_at_login()
        if self.max_session_lifetime is not None:
            expires_at = record.expires_at
        else:
            expires_at = now + self.refresh_lifetime
        session = self._open(record.user, platform, client_id, now, expires_at)
        # A Sugar bug in IdM mode: an absolute epoch time instead of a duration.
        return session, math.floor(expires_at) if self.idm_mode else expires_at - now

    def _open(
        self, user: str, platform: str, client_id: str, now: float, refresh_expires_at: float
    ) -> Session:
        return self._store.open_session(
            user=user,
            platform=platform,
            client_id=client_id,
            access_expires_at=now + self.access_lifetime,
            refresh_expires_at=refresh_expires_at,
            dies_at=self._grace_deadline(),
        )

    def _token_response(
        self, session: Session, platform: str, refresh_expires_in: float
    ) -> web.Response:
        body = {
            "access_token": session.access_token,
            "expires_in": _wire_seconds(self.access_lifetime),
            "token_type": "bearer",
            "scope": None,
            "refresh_token": session.refresh_token,
            "refresh_expires_in": _wire_seconds(refresh_expires_in),
            "download_token": session.download_token,
        }
        response = json_response(body)
        response.set_cookie(
            f"download_token_{platform}", session.download_token, path="/", httponly=True
        )
        return response

    # ----------------------------------------------------------------- other routes

    def _me(self, request: web.Request) -> web.Response:
        with self._lock:
            self._calls["me"] += 1
            token = self._authenticate(request, "me")
        user = {
            "id": _user_id(token.user),
            "user_name": token.user,
            "type": "admin" if token.user == ADMIN_USER else "user",
        }
        return json_response({"current_user": user})

    async def _logout(self, request: web.Request) -> web.Response:
        args = await read_args(request)
        with self._lock:
            self._calls["logout"] += 1
            self._remember_secrets(args)
            token = self._authenticate(request, "logout")
            self._store.kill_access(request.headers["OAuth-Token"], dies_at=-math.inf)
            refresh = args.get("refresh_token")
            if refresh is not None:
                # Sugar deletes the refresh token sent, without checking whose it is.
                self._store.drop_refresh(refresh, dies_at=math.inf)
        response = json_response({"success": True})
        response.del_cookie(f"download_token_{token.platform}", path="/")
        return response

    async def _sudo(self, request: web.Request, user_name: str) -> web.Response:
        args = await read_args(request)
        with self._lock:
            self._calls["sudo"] += 1
            self._remember_secrets(args)
            caller = self._authenticate(request, "sudo")
            if caller.user != ADMIN_USER:
                raise ApiError(403, "not_authorized", wire.MSG_NOT_AUTHORIZED)
            if user_name not in self.users:
                raise ApiError(404, "not_found", f"Could not find a user named {user_name}.")
            platform = args.get("platform") or "base"
            self._check_platform(platform)
            now = self.clock()
            lifetime = self.refresh_lifetime
            if self.max_session_lifetime is not None:
                lifetime = min(lifetime, self.max_session_lifetime)
            client_id = args.get("client_id") or "sugar"
            session = self._open(user_name, platform, client_id, now, now + lifetime)
            return self._token_response(session, platform, lifetime)

    # ----------------------------------------------------------------- shared checks

    def _authenticate(self, request: web.Request, route: str) -> AccessToken:
        """Sugar's checks on an API call, in its order. Runs under the lock."""
        # Only OAuth-Token counts: Sugar ignores `Authorization: Bearer` on older versions.
        token = request.headers.get("OAuth-Token")
        if not token:
            raise ApiError(401, "need_login", wire.MSG_NO_TOKEN)
        record = self._store.access.get(token)
        state = AccessState.INVALID if record is None else record.state(self.clock())
        if record is None or state is AccessState.INVALID:
            raise ApiError(401, "invalid_grant", wire.MSG_INVALID_ACCESS)
        if state is AccessState.EXPIRED:
            raise ApiError(401, "invalid_grant", wire.MSG_EXPIRED_ACCESS)
        self._check_platform(record.platform)
        if route not in self.status_exempt:
            site = str(request.url.origin())
            if self.maintenance:
                raise ApiError(503, "maintenance", wire.MSG_MAINTENANCE, url=site)
            if self.license_error == "expired":
                raise ApiError(503, "admin_only", wire.MSG_LICENSE_EXPIRED, url=site)
        return record

    def _check_platform(self, platform: str) -> None:
        if platform not in self.platforms:
            raise ApiError(422, "invalid_parameter", wire.MSG_BAD_PLATFORM)

    def _check_status_at_login(self) -> None:
        if self.maintenance:
            raise ApiError(401, "need_login", wire.MSG_MAINTENANCE)
        if self.license_error == "expired":
            raise ApiError(401, "need_login", wire.MSG_LICENSE_EXPIRED)
        if self.license_error == "seats":
            raise ApiError(403, "license_seats_needed", wire.MSG_LICENSE_SEATS)

    def _grace_deadline(self) -> float:
        """When tokens pushed out now really die: at once (13.x) or after the grace period."""
        return self.clock() + self.eviction_grace if self.eviction_grace > 0 else -math.inf

    def _remember_secrets(self, args: Args) -> None:
        for key in ("password", "client_secret", "refresh_token"):
            value = args.get(key)
            if value is not None:
                self._secrets[value] = None
        if args.basic is not None and args.basic[1]:
            self._secrets[args.basic[1]] = None


def _same(expected: str, given: str) -> bool:
    """Constant-time comparison, as any credential check should be, even a fake one."""
    return hmac.compare_digest(expected.encode(), given.encode())


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
