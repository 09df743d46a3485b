"""Text from elsewhere (Sugar's answers, status lines) made fit for one log or status line."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(text: str, limit: int | None = None) -> str:
    """`text` on one line, whitespace runs as one space; cut to `limit` characters with "..."."""
    line = " ".join(text.split())
    if limit is None or len(line) <= limit:
        return line
    return line[: limit - 3] + "..."
