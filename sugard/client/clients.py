"""`sugarctl clients NAME [--json]`: who sent what through sugard's proxy to instance NAME, one
row per client process (the last 15 minutes); loaded only when asked for."""

from __future__ import annotations

from sugard.client import SugardClient

TYPE_CHECKING = False  # typing costs an import; mypy treats this name as True
if TYPE_CHECKING:
    from typing import Any

__all__ = ["clients"]

COLUMNS = ("PID", "UID", "REQUESTS", "ERRORS", "BYTES", "QUEUED", "LAST SEEN", "LAST PATH")


def clients(client: SugardClient, name: str, as_json: bool) -> None:
    """Print the clients of `name`: a table (its command last, as long as it is), or the
    daemon's JSON as it came."""
    answer = client.clients(name)
    if as_json:
        import json

        print(json.dumps(answer, indent=2))
        return
    rows = answer.get("clients") or []
    if not rows:
        print(f"no client used {name} through the proxy in the last 15 minutes")
        return
    table = [(*COLUMNS, "COMMAND"), *(_row(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    for line in table:
        padded = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*padded, line[-1]]))


def _row(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(row.get("pid", "?")),
        str(row.get("uid", "?")),
        str(row.get("requests", 0)),
        str(row.get("errors", 0)),
        _size(int(row.get("bytes") or 0)),
        f"{float(row.get('queued_seconds') or 0):.1f}s",
        str(row.get("last_seen", "?")),
        str(row.get("last_path", "")),
        str(row.get("command", "?")),
    )


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"
