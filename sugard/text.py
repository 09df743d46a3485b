"""Text from elsewhere (Sugar's answers, a client's input, an error of Redis or the network)
made fit for one log, status or error line."""

from __future__ import annotations

__all__ = ["one_line", "quoted"]


def one_line(text: str | BaseException, limit: int | None = None) -> str:
    """`text` on one line, whitespace runs as one space; cut to `limit` characters with "...".
    An exception is its message, or its class name when it has none."""
    if isinstance(text, BaseException):
        text = str(text) or type(text).__name__
    line = " ".join(text.split())
    if limit is None or len(line) <= limit:
        return line
    return line[: limit - 3] + "..."


def quoted(value: str, limit: int = 80) -> str:
    """A client-supplied value for an error message: quoted, and cut after `limit` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")
