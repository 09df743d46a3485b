"""The session a keeper holds: its grant and what it learned of it, read and replaced here.

The grant being served, its refresh token (gone once burned or rejected), the token Sugar
refused, a capped session's end, and how the server treats the old token on a refresh
(learned once per session from its version, or by watching). The supervisor decides when each
changes; this object keeps them consistent (a new grant clears the refused token, a login
forgets what was learned) and answers the questions asked of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import renewal_timing as timing
from .config import GRACE_AUTO, InstanceConfig
from .keeper_reports import CountedCalls
from .secret import Secret
from .sugar import Grant, Probe

__all__ = ["HeldSession"]

log = logging.getLogger("sugard.keeper")  # the keeper's log lines, wherever they are made


class HeldSession:
    """One keeper's session state; its methods are the only ones that replace a grant."""

    def __init__(
        self, calls: CountedCalls, clock: Callable[[], float], rng: Callable[[], float]
    ) -> None:
        self._calls = calls  # the keeper's, counted: learning the version is a call to Sugar
        self._clock = clock
        self._rng = rng
        self.grant: Grant | None = None
        self.refresh_token: Secret | None = None  # None once burned or rejected
        self.dead_token: Secret | None = None  # refused by Sugar (a report, or a probe)
        self.sugar_version: str | None = None  # as ServerInfo published it, once per session
        self.observed_grace: float | None = None  # learned this session: version or watching
        self.quiet_until = 0.0  # no-grace servers: until then a handed-out token is in use
        self.ends_at: float | None = None  # a capped session's end (max lifetime)

    def install(self, grant: Grant, *, logged_in: bool) -> Grant | None:
        """Serve `grant` from now on; the grant it replaces."""
        old = self.grant
        self.grant = grant
        self.refresh_token = grant.refresh_token
        self.dead_token = None
        if logged_in:
            self.ends_at = None
            self.observed_grace = None  # a new session: learn the version again
        elif timing.session_capped(old, grant):
            # The refresh token inherited the old one's expiry: max_session_lifetime caps
            # this session, and refreshing earlier would not keep it past that end.
            self.ends_at = grant.refresh_expires_at
        return old

    def take_back_dead(self, grant: Grant) -> None:
        """A kept session whose token Sugar no longer takes: its refresh token may still work."""
        self.grant, self.refresh_token, self.dead_token = (
            grant,
            grant.refresh_token,
            grant.access_token,
        )

    def usable(self) -> bool:
        """Whether there is a grant whose token Sugar has not refused."""
        return self.grant is not None and self.grant.access_token != self.dead_token

    def servable(self) -> bool:
        grant = self.grant
        return grant is not None and timing.servable(grant, self._clock(), self.dead_token)

    def kept(self, ready: bool) -> Grant | None:
        """The session to hand to the next sugard (see `Keeper.session`)."""
        if not ready or self.refresh_token is None or not self.usable():
            return None
        return self.grant

    # Timing (the rules: sugard/renewal_timing.py)

    def refresh_time(self, grant: Grant, config: InstanceConfig) -> float:
        capped = self.ends_at is not None
        return timing.refresh_time(grant, config, capped=capped, draw=self._rng())

    def renewal_time(self, grant: Grant, config: InstanceConfig, refresh_at: float | None) -> float:
        grace, quiet = self.old_token_grace(config), self.quiet_until
        return timing.renewal_time(grant, refresh_at, grace=grace, quiet_until=quiet)

    def handed_out(self, grant: Grant, promised: float) -> None:
        self.quiet_until = max(self.quiet_until, timing.quiet_until(grant, self._clock(), promised))

    def why_login(self) -> str:
        """Why a password login is needed although sugard holds a refresh token."""
        grant = self.grant
        ends = grant.refresh_expires_at if grant is not None else None
        when = time.strftime("%H:%M:%S", time.localtime(ends)) if ends is not None else "?"
        if self.ends_at is not None:
            return f"session reached the site's max_session_lifetime at {when}"
        return f"refresh token expired at {when}"

    # What the server does to the old token on a refresh

    def old_token_grace(self, config: InstanceConfig) -> float:
        return timing.old_token_grace(config, self.observed_grace)

    def resume_version(self, config: InstanceConfig) -> None:
        """A kept session's version, as the sugard before this one learned it."""
        if self.sugar_version is not None and config.old_token_grace == GRACE_AUTO:
            self.observed_grace = timing.grace_for_version(self.sugar_version)

    async def learn_version(self, grant: Grant, config: InstanceConfig) -> None:
        """Once per session: read the server's version (a failure only leaves it unknown)."""
        if config.old_token_grace != GRACE_AUTO:
            return
        version = await self._calls.server_version(grant.access_token)
        self.sugar_version = version
        if version is not None:
            self.observed_grace = timing.grace_for_version(version)
            log.info(
                "%s: Sugar %s: a refresh %s",
                config.name,
                version,
                "kills the old token at once"
                if self.observed_grace == 0
                else f"leaves the old token up to {self.observed_grace:.0f} s",
            )

    async def watch_old_token(self, old: Grant, config: InstanceConfig) -> None:
        """Version unknown: see whether the token a refresh replaced still works (one ping,
        once per session). Either way, until then it behaves as if the token died."""
        if config.old_token_grace != GRACE_AUTO or self.observed_grace is not None:
            return
        verdict = await self._calls.probe(old.access_token)
        if verdict is not Probe.UNKNOWN:
            self.observed_grace = timing.SESSION_CHECK_INTERVAL if verdict is Probe.ALIVE else 0.0
            log.info(
                "%s: the token a refresh replaced %s",
                config.name,
                "still works: Sugar keeps old tokens a while"
                if verdict is Probe.ALIVE
                else "died at once",
            )
