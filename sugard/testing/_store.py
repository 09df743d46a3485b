"""Token bookkeeping of the fake SugarCRM: sessions, rotation, eviction and grace periods.

Kept apart from the HTTP layer so that the rules which make a token daemon's life hard read as
plain code. Time is always passed in (never read here) so that tests can move the fake's clock.
Not thread-safe on purpose: `FakeSugar` holds its one lock around every call.
"""

from __future__ import annotations

import enum
import itertools
import math
import uuid
from dataclasses import dataclass, replace

# Sugar keeps one refresh token per user and platform, except "mobile" which keeps two
# (a phone and a tablet). Every other platform, built-in or custom, keeps one.
_SESSIONS_KEPT = {"mobile": 2}


class AccessState(enum.Enum):
    """What an API call with a given access token runs into."""

    VALID = "valid"
    INVALID = "invalid"  # never issued, revoked, evicted, rotated away or logged out
    EXPIRED = "expired"


@dataclass(frozen=True)
class AccessToken:
    """One access token; `dies_at` is set when something other than its lifetime ends it."""

    user: str
    platform: str
    expires_at: float
    dies_at: float = math.inf

    def state(self, now: float) -> AccessState:
        """How Sugar would judge this token at `now`: death by eviction wins over expiry."""
        if now >= self.dies_at:
            return AccessState.INVALID
        if now >= self.expires_at:
            return AccessState.EXPIRED
        return AccessState.VALID


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


@dataclass(frozen=True)
class Session:
    """The three tokens handed out together by one login, refresh or sudo."""

    access_token: str
    refresh_token: str
    download_token: str
    refresh: RefreshToken


class TokenStore:
    """Every token the fake knows, with Sugar's one-session-per-user-and-platform rule."""

    def __init__(self) -> None:
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.downloads: dict[str, str] = {}  # download token -> user
        self.issued: list[str] = []
        self._serial = itertools.count()

    def open_session(
        self,
        *,
        user: str,
        platform: str,
        client_id: str,
        access_expires_at: float,
        refresh_expires_at: float,
        dies_at: float,
    ) -> Session:
        """Issue three new tokens; evicted sessions' access tokens die at `dies_at`."""
        access, refresh, download = (str(uuid.uuid4()) for _ in range(3))
        record = RefreshToken(
            user=user,
            platform=platform,
            client_id=client_id,
            expires_at=refresh_expires_at,
            access_token=access,
            download_token=download,
            serial=next(self._serial),
        )
        self.access[access] = AccessToken(user, platform, access_expires_at)
        self.refresh[refresh] = record
        self.downloads[download] = user
        self.issued.extend((access, refresh, download))
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
            self.drop_refresh(token, dies_at=dies_at)
        return Session(access, refresh, download, record)

    def drop_refresh(self, token: str, *, dies_at: float) -> RefreshToken | None:
        """Delete a refresh token at once; its access token dies at `dies_at`."""
        record = self.refresh.pop(token, None)
        if record is not None:
            self.kill_access(record.access_token, dies_at=dies_at)
            self.downloads.pop(record.download_token, None)
        return record

    def kill_access(self, token: str, *, dies_at: float) -> bool:
        """Make an access token die at `dies_at` (or earlier if it was already doomed)."""
        record = self.access.get(token)
        if record is None:
            return False
        self.access[token] = replace(record, dies_at=min(record.dies_at, dies_at))
        return True

    def evict(self, user: str, platform: str, *, dies_at: float) -> int:
        """Delete every refresh token of `user` on `platform`, as a login elsewhere does."""
        doomed = [t for t, r in self.refresh.items() if r.user == user and r.platform == platform]
        for token in doomed:
            self.drop_refresh(token, dies_at=dies_at)
        return len(doomed)

    def expire_all_access(self) -> None:
        """Make every access token report "expired" (not "invalid"), whatever the clock says."""
        for token, record in self.access.items():
            self.access[token] = replace(record, expires_at=-math.inf)

    def access_state(self, token: str, now: float) -> AccessState:
        """Judge an access token as an API call would."""
        record = self.access.get(token)
        return AccessState.INVALID if record is None else record.state(now)
