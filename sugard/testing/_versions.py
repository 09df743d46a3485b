"""What changes from one Sugar version to the next, as the fake SugarCRM plays it.

One frozen profile per supported version, so that a test names the Sugar it runs against
(`FakeSugar(sugar_version="12.0")`) instead of flipping a handful of unrelated switches, and the
differences read as one table. Facts and their sources: docs/sugarcrm.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class VersionProfile:
    """The behaviours that tell one Sugar version from another."""

    version: str  # "13.3": what `sugar_version` accepts; metadata's server_info says "13.3.0"
    # How often, at most, an API call re-checks that its session still exists. A rotated or
    # evicted access token keeps working until that next check: 120 s up to 13.0.x, 0 from 13.3.
    session_check_interval: float
    logout_drops_refresh: bool  # 12.0+: a logout without refresh_token ends the whole session
    reads_bearer: bool  # 9.0+: `Authorization: Bearer` counts when no OAuth-Token is sent
    seats_status: int  # license seats exceeded at login: 403 from 9.0, 401 on 8.0
    seats_label: str
    build: str
    marketing_version: str


def _profile(version: str, *, grace: bool, logout_drops: bool, modern_auth: bool) -> VersionProfile:
    return VersionProfile(
        version=version,
        session_check_interval=120.0 if grace else 0.0,
        logout_drops_refresh=logout_drops,
        reads_bearer=modern_auth,
        seats_status=403 if modern_auth else 401,
        seats_label="license_seats_needed" if modern_auth else "need_login",
        build="1",
        marketing_version=f"Fake Sugar {version}",
    )


PROFILES: Final = {
    p.version: p
    for p in (
        _profile("8.0", grace=True, logout_drops=False, modern_auth=False),
        _profile("12.0", grace=True, logout_drops=True, modern_auth=True),
        _profile("13.0", grace=True, logout_drops=True, modern_auth=True),
        _profile("13.3", grace=False, logout_drops=True, modern_auth=True),
        _profile("14.0", grace=False, logout_drops=True, modern_auth=True),
        _profile("25.1", grace=False, logout_drops=True, modern_auth=True),
        _profile("26.1", grace=False, logout_drops=True, modern_auth=True),
    )
}
SUGAR_VERSIONS: Final = tuple(PROFILES)
LATEST_VERSION: Final = SUGAR_VERSIONS[-1]


def profile(version: str) -> VersionProfile:
    """The profile of one supported version; a one-line error names the supported ones."""
    try:
        return PROFILES[version]
    except KeyError:
        raise ValueError(
            f"unsupported sugar_version {version!r}; expected one of {', '.join(SUGAR_VERSIONS)}"
        ) from None
