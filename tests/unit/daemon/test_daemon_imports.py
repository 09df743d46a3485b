"""What `import sugard.daemon` costs: fleet mode's libraries only when [fleet] is on."""

from __future__ import annotations

import subprocess
import sys

FLEET_ONLY = ("redis", "cryptography", "sugard.fleet")


def loaded_after(statement: str) -> set[str]:
    """sys.modules after `statement` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", f"{statement}\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(result.stdout.split())


def test_importing_the_daemon_loads_no_fleet_library() -> None:
    """`import sugard.daemon` (every `sugard run`) loads neither redis nor cryptography."""
    loaded = loaded_after("import sugard.daemon")
    assert "sugard.daemon" in loaded
    assert [] == sorted(m for m in loaded if m.split(".")[0] in FLEET_ONLY or m in FLEET_ONLY)


def test_the_check_sees_fleet_mode_loaded() -> None:
    """The check above can fail: importing fleet mode does load them."""
    loaded = loaded_after("import sugard.daemon, sugard.fleet")
    assert {"redis", "cryptography", "sugard.fleet"} <= loaded
