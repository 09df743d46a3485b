"""What sugarctl says on stderr when it could not do what was asked: a failed command's one
line, in the words of its flags (how long it waited, when to try again) and followed by a
refused reload's problems one per line; and a token that does not meet --min-ttl.

Split from sugard.ctl, which imports this only when a command fails or --min-ttl is not met,
so that a `sugarctl token` that works loads none of it.
"""

from __future__ import annotations

import sys

from .client import NeedsAttention, SugardError, TokenUnavailable

__all__ = ["min_ttl_unmet", "report"]


def report(exc: SugardError, command: str, wait: str | None) -> int:
    """Say `exc` on stderr for `command` (run with `--wait wait`); return the exit code."""
    print(f"sugarctl: {_one_line(exc, command, wait)}", file=sys.stderr)
    if isinstance(exc, NeedsAttention):
        # A refused reload: every problem on a line of its own, as `sugard check` prints
        # them, so a long list stays readable and each line can be grepped.
        for problem in exc.errors:
            print(problem, file=sys.stderr)
    return exc.exit_code


def _one_line(exc: SugardError, command: str, wait: str | None) -> str:
    message = exc.message
    # `busy` says "try again in a moment" itself.
    busy = exc.body.get("error") == "busy"
    if isinstance(exc, TokenUnavailable) and not busy:
        hints = []
        if command in ("token", "header", "exec") and exc.body:
            hints.append(f"waited --wait {wait} s" if wait else "waited 10 s, --wait's default")
        if exc.retry_after:
            hints.append(f"try again in {exc.retry_after:g} s")
        message += f" ({'; '.join(hints)})" if hints else ""
    if isinstance(exc, NeedsAttention) and exc.errors:
        message += ":"  # the problems follow, one per line
    return message


def min_ttl_unmet(min_ttl: float, left: float, lifetime: float | None, name: str | None) -> str:
    """Why the token printed is valid only `left` s more, when `--min-ttl min_ttl` asked more."""
    said = f"--min-ttl {min_ttl:g} not met: this token of {name!r} is valid {left:g} s more"
    if lifetime is None:
        return said
    if min_ttl > lifetime:
        return (
            f"--min-ttl {min_ttl:g} is more than a token of {name!r} can have: Sugar makes them "
            f"last {lifetime:g} s; this one is valid {left:g} s more"
        )
    return (
        f"{said} (Sugar makes its tokens last {lifetime:g} s; sugard renews them early for "
        "--min-ttl up to 90% of that)"
    )
