"""A fake SugarCRM for tests: sugard's own, and those of anyone scripting against Sugar.

Shipped inside the package (not only in tests/) so users can pin their own scripts' behaviour
against the same misbehaving Sugar that sugard is tested with, on the Sugar version their site
runs (`SUGAR_VERSIONS`; what differs is in docs/sugarcrm.md). Needs only aiohttp.
"""

from sugard.testing._versions import LATEST_VERSION, SUGAR_VERSIONS
from sugard.testing._wire import FaultKind
from sugard.testing.fake import (
    ADMIN_USER,
    DEFAULT_PLATFORMS,
    DEFAULT_STATUS_EXEMPT,
    Arrival,
    FakeSugar,
    LicenseError,
    TokenRequest,
)
from sugard.testing.runner import running_fake

__all__ = [
    "ADMIN_USER",
    "DEFAULT_PLATFORMS",
    "DEFAULT_STATUS_EXEMPT",
    "LATEST_VERSION",
    "SUGAR_VERSIONS",
    "Arrival",
    "FakeSugar",
    "FaultKind",
    "LicenseError",
    "TokenRequest",
    "running_fake",
]
