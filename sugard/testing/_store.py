"""Token bookkeeping of the fake SugarCRM: sessions, rotation, eviction and session checks.

Kept apart from the HTTP layer so that the rules which make a token daemon's life hard (told in
docs/sugarcrm.md) read as plain code. Time is always passed in (never read here) so that tests
can move the fake's clock.
Not thread-safe on purpose: `FakeSugar` holds its one lock around every call.
"""

from __future__ import annotations

import enum
import itertools
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

# Sugar keeps one refresh token per user and platform, except "mobile" which keeps two
# (a phone and a tablet). Every other platform, built-in or custom, keeps one.
_SESSIONS_KEPT = {"mobile": 2}


class AccessState(enum.Enum):
    """What an API call with a given access token runs into."""

    VALID = "valid"
    INVALID = "invalid"  # never issued, revoked, evicted, rotated away or logged out
    EXPIRED = "expired"


def whole_second(t: float) -> float:
    """Sugar keeps times as whole seconds (PHP's time()); infinities stay as they are."""
    return math.floor(t) if math.isfinite(t) else t


@dataclass(frozen=True)
class AccessToken:
    """One access token and when the server last confirmed that its session still exists.

    A token whose session is gone (`gone_at`) still works until the next check, which runs at
    most every `recheck` seconds: Sugar's own session check up to 13.0.x, the identity server's
    cache in IdM mode. A token killed at once has both times at minus infinity.
    """

    user: str
    platform: str
    expires_at: float
    checked_at: float
    gone_at: float = math.inf
    sudoer: str | None = None  # the admin whose sudo made this token; no sudo from it

    def state(self, now: float, recheck: float) -> AccessState:
        """How Sugar would judge this token at `now`: a failed check wins over expiry."""
        if now >= self.gone_at and now >= self.checked_at + recheck:
            return AccessState.INVALID
        # Accepted to the end of its last whole second, as PHP's `time() > expires` allows.
        if whole_second(now) > whole_second(self.expires_at):
            return AccessState.EXPIRED
        return AccessState.VALID

    def check_due(self, now: float, recheck: float) -> bool:
        """Whether an API call at `now` runs the session check (and so restarts its clock)."""
        return now >= self.checked_at + recheck


@dataclass(frozen=True)
class RefreshToken:
    """One refresh token and the session it belongs to."""

    user: str
    platform: str
    client_id: str
    expires_at: float
    access_token: str
    download_token: str
    serial: int  # issue order, to tell which sessions are the newest on a platform
    chain: int  # the login it descends from through refreshes (IdM kills whole chains)


@dataclass(frozen=True)
class Session:
    """The three tokens handed out together by one login, refresh or sudo."""

    access_token: str
    refresh_token: str
    download_token: str
    refresh: RefreshToken


def uuid_token() -> str:
    """A token as Sugar's own OAuth2 server mints it."""
    return str(uuid.uuid4())


class TokenStore:
    """Every token the fake knows, with Sugar's one-session-per-user-and-platform rule."""

    def __init__(self, mint: Callable[[], str] = uuid_token) -> None:
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.spent: dict[str, int] = {}  # used refresh token -> its chain
        self.downloads: dict[str, str] = {}  # download token -> user
        self.issued: list[str] = []
        self._mint = mint
        self._serial = itertools.count()

    def open_session(
        self,
        *,
        user: str,
        platform: str,
        client_id: str,
        now: float,
        access_expires_at: float,
        refresh_expires_at: float,
        first_check: float,
        chain: int | None = None,
        evict_others: bool = True,
        download_is_access: bool = False,
        sudoer: str | None = None,
    ) -> Session:
        """Issue new tokens; unless told otherwise, evict the user's older sessions there."""
        access, refresh = self._mint(), self._mint()
        download = access if download_is_access else self._mint()
        serial = next(self._serial)
        record = RefreshToken(
            user=user,
            platform=platform,
            client_id=client_id,
            expires_at=refresh_expires_at,
            access_token=access,
            download_token=download,
            serial=serial,
            chain=serial if chain is None else chain,
        )
        self.access[access] = AccessToken(
            user, platform, access_expires_at, first_check, sudoer=sudoer
        )
        self.refresh[refresh] = record
        self.downloads[download] = user
        self.issued.extend(dict.fromkeys((access, refresh, download)))
        if evict_others:
            kept = _SESSIONS_KEPT.get(platform, 1)
            others = sorted(
                (
                    (r.serial, token)
                    for token, r in self.refresh.items()
                    if r.user == user and r.platform == platform and token != refresh
                ),
                reverse=True,
            )
            for _, token in others[kept - 1 :]:
                self.drop_refresh(token, now)
        return Session(access, refresh, download, record)

    def drop_refresh(self, token: str, now: float, *, at_once: bool = False) -> RefreshToken | None:
        """Delete a refresh token; its access token dies at its next check (or at once)."""
        record = self.refresh.pop(token, None)
        if record is not None:
            self.spent[token] = record.chain
            self.kill_access(record.access_token, now, at_once=at_once)
            self.downloads.pop(record.download_token, None)
        return record

    def kill_access(self, token: str, now: float, *, at_once: bool = False) -> bool:
        """End an access token's session: it dies at its next check, or at once."""
        record = self.access.get(token)
        if record is None:
            return False
        if at_once:
            record = replace(record, gone_at=-math.inf, checked_at=-math.inf)
        else:
            record = replace(record, gone_at=min(record.gone_at, now))
        self.access[token] = record
        return True

    def refresh_of(self, access_token: str) -> str | None:
        """The refresh token of the session an access token belongs to, if it still exists."""
        return next((t for t, r in self.refresh.items() if r.access_token == access_token), None)

    def checked(self, token: str, now: float) -> None:
        """Record that a session check confirmed this token at `now`."""
        record = self.access.get(token)
        if record is not None:
            self.access[token] = replace(record, checked_at=now)

    def evict(self, user: str, platform: str, now: float) -> int:
        """Delete every refresh token of `user` on `platform`, as a login elsewhere does."""
        doomed = [t for t, r in self.refresh.items() if r.user == user and r.platform == platform]
        for token in doomed:
            self.drop_refresh(token, now)
        return len(doomed)

    def kill_chain(self, chain: int, now: float) -> int:
        """End every live session descending from one login (an IdM refresh token reused)."""
        doomed = [t for t, r in self.refresh.items() if r.chain == chain]
        for token in doomed:
            self.drop_refresh(token, now)
        return len(doomed)

    def expire_all_access(self) -> None:
        """Make every access token report "expired" (not "invalid"), whatever the clock says."""
        for token, record in self.access.items():
            self.access[token] = replace(record, expires_at=-math.inf)

    def access_state(self, token: str, now: float, recheck: float) -> AccessState:
        """Judge an access token as an API call would, without running a check."""
        record = self.access.get(token)
        return AccessState.INVALID if record is None else record.state(now, recheck)
