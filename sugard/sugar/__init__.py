"""SugarCRM's OAuth2 token endpoint over aiohttp: login, refresh, and two cheap calls (the token
probe, the server's version). The daemon never logs out by itself: that would end the session
every script shares (docs/sugarcrm.md); `logout` serves `sugard check --login`, which ends the
throwaway session it opened to test a password, and `sugarctl revoke`, a person ending a
session whose token leaked.

Everything Sugar (or the network, or a proxy in front of Sugar) can answer is translated here,
once, into a `Grant` or one of the errors of `sugard.sugar.errors`, whose
docstring draws their tree; nothing above this module sees aiohttp.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import json
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from sugard.config import InstanceConfig
from sugard.secret import Secret
from sugard.sugar.errors import (
    BadResponse,
    RejectedError,
    Timeout,
    Unreachable,
    proxy_refused,
    redirected,
    refusal,
)
from sugard.sugar.outbound import Route, UnusableCaFile, route_for, tls_context
from sugard.sugar.sudo import sudo_body, sudo_grant, sudo_path, sudo_refusal

__all__ = [
    "NO_TLS",
    "Grant",
    "Probe",
    "ServerInfo",
    "SugarClient",
    "connection_failure",
    "new_http_session",
    "speaks_no_tls",
    "unreadable_answer",
]

TOKEN_PATH = "/rest/v10/oauth2/token"  # noqa: S105 (a URL path, not a password)
PING_PATH = "/rest/v10/ping"
# Where the version is (docs/sugarcrm.md): 12.0 and 13.3 have no /ServerInfo route (404
# no_method), so it is read from the metadata's server_info section: with the token first, then
# the login page's public metadata, then the static file some sites serve at their root.
METADATA_VERSION_PATH = "/rest/v10/metadata?type_filter=server_info"
PUBLIC_METADATA_PATH = "/rest/v10/metadata/public?type_filter=server_info"
VERSION_FILE_PATH = "/sugar_version.json"
LOGOUT_PATH = "/rest/v10/oauth2/logout"
# The token request's fields that hold secrets (redacted from any text Sugar sends back).
SECRET_FIELDS = ("password", "client_secret", "refresh_token")
# A refresh_expires_in above this is an absolute epoch time (a bug of Sugar's IdM mode),
# not a duration: no site keeps refresh tokens for ten years.
EPOCH_THRESHOLD = 10 * 365 * 86400
VERSION_TEXT = re.compile(r"\d+\.\d+")


@dataclass(frozen=True)
class Grant:
    """A token set from Sugar; times are wall-clock epoch seconds."""

    access_token: Secret
    refresh_token: Secret
    download_token: Secret
    token_type: str
    issued_at: float
    expires_at: float
    refresh_expires_at: float | None

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.issued_at


class Probe(enum.Enum):
    """What a cheap authenticated call with a token says about that token."""

    ALIVE = "alive"
    DEAD = "dead"  # Sugar answered 401: evicted, rotated away, logged out or expired
    UNKNOWN = "unknown"  # no verdict: network trouble, a proxy's page, maintenance


@dataclass(frozen=True)
class ServerInfo:
    """What the version read told: the version (None: none found), and what each call it made
    answered, the first one with the token (its verdict on the token), in order. `answered`:
    the site answered at all (else asking again later may find the version)."""

    version: str | None
    calls: tuple[Probe, ...]
    answered: bool

    @property
    def verdict(self) -> Probe:
        """What the call made with the token says about the token."""
        return self.calls[0]


def _verdict(status: int | None) -> Probe:
    if status == 200:
        return Probe.ALIVE
    return Probe.DEAD if status == 401 else Probe.UNKNOWN


def new_http_session() -> aiohttp.ClientSession:
    """The one HTTP session of the daemon. Sugar's cookies are never kept (dummy jar)."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=8),
        headers={"User-Agent": "sugard"},
    )


NO_TLS = (
    "the site does not speak TLS on that port (a plain-HTTP port? then the url is http://, "
    "or the port is the site's TLS one)"
)


def speaks_no_tls(exc: BaseException) -> bool:
    """A TLS handshake answered with something that is not TLS (plain HTTP, most likely):
    OpenSSL calls it WRONG_VERSION_NUMBER, which helps nobody."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    return isinstance(cause, ssl.SSLError) and cause.reason == "WRONG_VERSION_NUMBER"


def _ssl_for(instance: InstanceConfig) -> ssl.SSLContext | bool:
    """Verified TLS (the system's CAs, or `ca_file`'s); raises RejectedError for a bad ca_file."""
    try:
        return tls_context(instance.verify_tls, instance.ca_file)
    except UnusableCaFile as exc:
        why = str(exc)
        raise RejectedError(
            f"ca_file {instance.ca_file} {why}; give the PEM file of the CA that signed "
            f"{instance.url}'s certificate, then run `sugarctl reload`"
        ) from None


class SugarClient:
    """Talks to one instance's token endpoint. Always sends the configured client and platform:
    a refresh without `platform` would land the session on `base` and log the human out."""

    def __init__(
        self,
        instance: InstanceConfig,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.instance = instance  # also chooses the route
        self._session = session
        self._clock = clock
        self._pacer: Callable[[], Awaitable[None]] | None = None
        # A bad ca_file fails this instance (every attempt says why), not the whole daemon.
        self._tls_problem: RejectedError | None = None
        self._ssl: ssl.SSLContext | bool = True
        try:
            self._ssl = _ssl_for(instance)
        except RejectedError as exc:
            self._tls_problem = exc

    def take_config(self, instance: InstanceConfig) -> None:
        """Call Sugar with these settings from now on (a reload, a re-read secret)."""
        self.instance = instance

    def pace_with(self, pacer: Callable[[], Awaitable[None]] | None) -> None:
        """Wait on `pacer` before each call to Sugar: the instance's request governor, which
        counts sugard's own calls towards its rate_limit and lets them go first."""
        self._pacer = pacer

    async def _paced(self) -> None:
        if self._pacer is not None:
            await self._pacer()

    @property
    def instance(self) -> InstanceConfig:
        return self._instance

    @instance.setter
    def instance(self, instance: InstanceConfig) -> None:
        # A reload may change the proxy and keep the session: the route follows the config.
        self._instance = instance
        self.route: Route = route_for(instance)

    @property
    def tls(self) -> ssl.SSLContext | bool:
        """What this instance's requests pass as `ssl=`: the proxy forwards with the same."""
        return self._ssl

    async def login(self) -> Grant:
        """Password grant."""
        i = self.instance
        return await self._token_request(
            {
                "grant_type": "password",
                "username": i.username,
                "password": i.password.reveal(),
            },
            grant="password",
        )

    async def refresh(self, refresh_token: Secret) -> Grant:
        """Refresh grant; Sugar rotates every token and deletes the old refresh token."""
        return await self._token_request(
            {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()},
            grant="refresh_token",
        )

    async def sudo(self, admin_token: Secret, user: str) -> Grant:
        """A token of `user`, from Sugar's sudo with the admin session's `admin_token`, on the
        instance's own platform and client (sugard.sugar.sudo says what each answer becomes)."""
        i = self.instance
        if self._tls_problem is not None:
            raise RejectedError(self._tls_problem.message)
        if self.route.problem is not None:
            raise RejectedError(self.route.problem)
        sent_at = self._clock()
        url = i.url + sudo_path(user)
        headers = {"Accept": "application/json", "OAuth-Token": admin_token.reveal()}
        try:
            async with self._session.post(
                url,
                json=sudo_body(i),
                timeout=aiohttp.ClientTimeout(total=i.timeout),
                ssl=self._ssl,
                allow_redirects=False,
                **self.route.request_options(url, headers),
            ) as response:
                status, raw = response.status, await response.read()
                retry_after = _parse_retry_after(response.headers.get("Retry-After"), self._clock())
        except TimeoutError as exc:
            raise Timeout(f"no answer from {i.url} to a sudo within {i.timeout:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise Unreachable(f"cannot reach {i.url}: {_describe_network_error(exc)}") from exc
        data = _json_object(raw)
        if status == 200:
            grant = sudo_grant(data, sent_at) if data is not None else None
            if grant is None:
                raise BadResponse(f"{i.url} answered a sudo with 200 but no token", status=status)
            return grant
        raise sudo_refusal(i, user, status, data, retry_after)

    async def refresh_user(self, refresh_token: Secret) -> Grant:
        """A refresh of a sudo session (where Sugar gave it a refresh token): Sugar itself,
        never a fleet's decision, which is about the instance's own session."""
        return await SugarClient.refresh(self, refresh_token)

    async def probe(self, access_token: Secret) -> Probe:
        """`GET /rest/v10/ping` with the token: does Sugar still take it? Any 401 means no
        (evicted, rotated, logged out); anything but 200 or 401 is no verdict."""
        status, _ = await self._authenticated_get(PING_PATH, access_token)
        return _verdict(status)

    async def server_info(self, access_token: Secret) -> ServerInfo:
        """The version Sugar publishes ("13.3.0"), or None if no call answered one: the caller
        treats an unknown version as the newest (docs/sugarcrm.md). One call when the metadata
        answers it (every version from 7 on); the public metadata and `sugar_version.json` only
        when it did not, and none of them when the token was refused or nobody answered."""
        status, data = await self._authenticated_get(METADATA_VERSION_PATH, access_token)
        calls, answered = [_verdict(status)], status is not None
        version = _metadata_version(status, data)
        if version is None and answered and status != 401:
            for path, read in (
                (PUBLIC_METADATA_PATH, _metadata_version),
                (VERSION_FILE_PATH, _file_version),
            ):
                status, data = await self._authenticated_get(path, None)
                calls.append(Probe.ALIVE if status == 200 else Probe.UNKNOWN)
                answered = answered or status is not None
                version = read(status, data)
                if version is not None or status is None:
                    break
        return ServerInfo(version, tuple(calls), answered)

    async def logout(self, grant: Grant) -> bool | None:
        """End the session of `grant` upstream, its refresh token with it: `sugard check
        --login`'s own test login, and a session a person revokes (`sugarctl revoke`). True:
        Sugar ended it; False: Sugar refused (the access token was dead already); None: no
        answer. Never raises: the caller decides what each means."""
        if self._tls_problem is not None:
            return None
        try:
            await self._paced()
            url = self.instance.url + LOGOUT_PATH
            async with self._session.post(
                url,
                json={"refresh_token": grant.refresh_token.reveal()},
                timeout=aiohttp.ClientTimeout(total=self.instance.timeout),
                ssl=self._ssl,
                allow_redirects=False,  # the tokens it carries go to this site alone
                **self.route.request_options(url, {"OAuth-Token": grant.access_token.reveal()}),
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
        if status == 200:
            return True
        return False if 400 <= status < 500 else None

    async def _authenticated_get(
        self, path: str, access_token: Secret | None
    ) -> tuple[int | None, dict[str, Any] | None]:
        """One GET with the token (None: without one); (None, None) when there was no answer."""
        if self._tls_problem is not None:
            return None, None
        await self._paced()
        try:
            url = self.instance.url + path
            headers = {"Accept": "application/json"}
            if access_token is not None:
                headers["OAuth-Token"] = access_token.reveal()
            async with self._session.get(
                url,
                timeout=aiohttp.ClientTimeout(total=self.instance.timeout),
                ssl=self._ssl,
                allow_redirects=False,
                **self.route.request_options(url, headers),
            ) as response:
                return response.status, _json_object(await response.read())
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None, None

    async def _token_request(self, fields: dict[str, str], *, grant: str) -> Grant:
        i = self.instance
        if self._tls_problem is not None:
            raise RejectedError(self._tls_problem.message)
        route = self.route
        if route.problem is not None:
            raise RejectedError(route.problem)
        body = {
            **fields,
            "client_id": i.client_id,
            "client_secret": i.client_secret.reveal(),
            "platform": i.platform,
        }
        await self._paced()
        # Expiry counts from when we asked, not when the answer came: never overestimate it.
        sent_at = self._clock()
        url = i.url + TOKEN_PATH
        via = f" through proxy {route.proxy}" if route.proxy else ""
        try:
            async with self._session.post(
                url,
                json=body,
                timeout=aiohttp.ClientTimeout(total=i.timeout),
                ssl=self._ssl,
                allow_redirects=False,
                **route.request_options(
                    url, {"Accept": "application/json", "Cache-Control": "no-cache"}
                ),
            ) as response:
                status = response.status
                raw = await response.read()
                location = response.headers.get("Location")
                retry_after = _parse_retry_after(response.headers.get("Retry-After"), self._clock())
        except aiohttp.ClientConnectorCertificateError as exc:
            raise RejectedError(
                f"TLS certificate of {i.url} not trusted ({exc.certificate_error}); "
                "set ca_file to your CA bundle"
            ) from exc
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused the CONNECT
            raise proxy_refused(i, route, exc.status) from exc
        except aiohttp.ClientResponseError as exc:  # Sugar answered, in what we cannot read
            raise BadResponse(unreadable_answer(i.url, exc)) from exc
        except aiohttp.ClientProxyConnectionError as exc:
            raise Unreachable(
                f"cannot reach proxy {route.proxy} (for {i.url}): {_describe_network_error(exc)}"
            ) from exc
        except TimeoutError as exc:
            raise Timeout(f"no answer from {i.url}{via} within {i.timeout:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise Unreachable(f"cannot reach {i.url}{via}: {_describe_network_error(exc)}") from exc
        if status == 407 and route.proxy:  # a plain-HTTP request the proxy did not forward
            raise proxy_refused(i, route, status)
        if 300 <= status < 400:  # never followed: the credentials would go wherever it points
            raise redirected(i, grant, status, location)
        # Whatever secret this request carried may come back quoted in Sugar's error text.
        sent_secrets = tuple(body[key] for key in SECRET_FIELDS if key in body)
        return _interpret(i, grant, status, raw, retry_after, sent_at, sent_secrets)


def _interpret(
    i: InstanceConfig,
    grant: str,
    status: int,
    raw: bytes,
    retry_after: float | None,
    sent_at: float,
    sent_secrets: tuple[str, ...],
) -> Grant:
    data = _json_object(raw)
    if status == 200:
        parsed = _parse_grant(data, sent_at) if data is not None else None
        if parsed is None:
            raise BadResponse(
                f"{i.url} answered 200 without a token (not SugarCRM's JSON; a proxy page?)",
                status=status,
            )
        return parsed

    raise refusal(i, grant, status, data, retry_after, sent_secrets, TOKEN_PATH)


def _metadata_version(status: int | None, data: dict[str, Any] | None) -> str | None:
    """`server_info.version` of a metadata answer."""
    info = data.get("server_info") if status == 200 and data is not None else None
    return _version_text(info.get("version") if isinstance(info, dict) else None)


def _file_version(status: int | None, data: dict[str, Any] | None) -> str | None:
    """`sugar_version` of the site's `sugar_version.json`."""
    return _version_text(data.get("sugar_version") if status == 200 and data is not None else None)


def _version_text(value: object) -> str | None:
    return value if isinstance(value, str) and VERSION_TEXT.match(value) else None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _parse_grant(data: dict[str, Any], sent_at: float) -> Grant | None:
    access, refresh = data.get("access_token"), data.get("refresh_token")
    expires_in = data.get("expires_in")
    if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
        return None
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        return None
    download = data.get("download_token")
    token_type = data.get("token_type")
    return Grant(
        access_token=Secret(access),
        refresh_token=Secret(refresh),
        download_token=Secret(download if isinstance(download, str) else ""),
        token_type=token_type if isinstance(token_type, str) else "bearer",
        issued_at=sent_at,
        expires_at=sent_at + float(expires_in),
        refresh_expires_at=_refresh_expiry(data.get("refresh_expires_in"), sent_at),
    )


def _refresh_expiry(value: object, sent_at: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    if value > EPOCH_THRESHOLD:
        return float(value)  # IdM bug: an absolute epoch time, not a duration
    return sent_at + float(value)


def _parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from `now` (the client's clock) that a Retry-After header asks us to wait."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def unreadable_answer(url: str, exc: aiohttp.ClientResponseError) -> str:
    """What to say of an answer aiohttp could not parse (never its text, which quotes the
    bytes it choked on)."""
    what = "a header line over 8 KiB" if "Got more than" in exc.message else "malformed HTTP"
    return f"{url} answered, but with {what}, which sugard cannot read"


def connection_failure(exc: BaseException) -> str | None:
    """What `exc` says went wrong with a connection to a site, in words (a handshake with no
    TLS, a server that closed it, or the connector's reason); None for another error."""
    if speaks_no_tls(exc):
        return NO_TLS
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.strerror or "connection failed"
    return None


def _describe_network_error(exc: BaseException) -> str:
    said = connection_failure(exc)
    if said is not None:
        return said
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionResetError):
        return "connection reset"
    return type(exc).__name__
