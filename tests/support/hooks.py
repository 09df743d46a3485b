"""`on_event` commands that record what they were told."""

from __future__ import annotations

from pathlib import Path


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def recorder(out: Path, gate: Path | None = None) -> list[str]:
    """A command that appends `EVENT INSTANCE EXPIRES_AT ERROR_KIND` to `out`, then (with a
    gate) waits until the gate file exists."""
    script = 'printf "%s %s %s %s\\n" "$SUGARD_EVENT" "$SUGARD_INSTANCE" '
    script += '"$SUGARD_EXPIRES_AT" "$SUGARD_ERROR_KIND" >> "$1"'
    if gate is not None:
        script += '; while [ ! -e "$2" ]; do sleep 0.02; done'
    return ["sh", "-c", script, "hook", str(out), str(gate or "")]
