"""What sugarctl does beyond fetching a token (env, proxy-url, exec --proxy, shutdown), and the
one line it prints on stderr when a command fails; loaded only when needed.
"""

from __future__ import annotations

import os
import sys
import time

from sugard.client import (
    BadRequest,
    NeedsAttention,
    SugardClient,
    SugardError,
    TokenUnavailable,
)
from sugard.client.ctl import fish_quote, shell_quote
from sugard.wire import EXIT_UNAVAILABLE

TYPE_CHECKING = False  # typing costs an import; mypy treats this name as True
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "SHUTDOWN_WAIT",
    "env",
    "min_ttl_unmet",
    "print_proxy_url",
    "proxy_environment",
    "report",
    "shutdown",
]


def report(exc: SugardError, command: str, wait: str | None) -> int:
    """Say `exc` on stderr for `command` (run with `--wait wait`); return the exit code."""
    print(f"sugarctl: {_one_line(exc, command, wait)}", file=sys.stderr)
    # A refused config: every problem on a line of its own, as `sugard check` prints them,
    # so a long list stays readable and each line can be grepped; not again the one the
    # message already says.
    for problem in _more_problems(exc):
        print(problem, file=sys.stderr)
    return exc.exit_code


def _more_problems(exc: SugardError) -> list[str]:
    if not isinstance(exc, NeedsAttention):
        return []
    return [problem for problem in exc.errors if problem not in exc.message]


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
    if _more_problems(exc):
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


SHUTDOWN_WAIT = 30.0  # seconds `shutdown` waits for the socket to go, without --wait


def env(client: SugardClient, shell: str | None) -> None:
    """`sugarctl env [--shell SHELL]`: the SUGARD_SOCKET line of the socket that answers."""
    client.health()  # the socket must answer: a line for a dead socket helps nobody
    print(_env_line(os.path.abspath(client.socket_path), shell or _login_shell()))


def _login_shell() -> str:
    return "fish" if os.path.basename(os.environ.get("SHELL", "")) == "fish" else "sh"


def _env_line(path: str, shell: str) -> str:
    if shell == "fish":
        return f"set -gx SUGARD_SOCKET {path if _plain(path) else fish_quote(path)};"
    return f"SUGARD_SOCKET={path if _plain(path) else shell_quote(path)}; export SUGARD_SOCKET;"


def _plain(word: str) -> bool:
    """`word` means itself to every shell, unquoted."""
    return bool(word) and all(c.isalnum() or c in "/._-+,:@%" for c in word)


def print_proxy_url(urls: dict[str, Any], socket_path: str) -> None:
    """`sugarctl proxy-url NAME`: the loopback URL, or the one on the socket and how to use it."""
    if urls.get("listen_url"):
        print(urls["listen_url"])
        print(
            "sugarctl: give clients a placeholder password (like any-password), never the real "
            "one: sugard answers their login itself",
            file=sys.stderr,
        )
        return
    print(urls["socket_url"])
    print(
        f"sugarctl: over the Unix socket, like: curl --unix-socket {socket_path} "
        f"{urls['socket_url']}/rest/v10/me",
        file=sys.stderr,
    )


def proxy_environment(client: SugardClient, name: str) -> dict[str, str]:
    """`exec NAME --proxy`: SUGAR_URL is the instance's loopback listener, and no token is
    given: every call CMD makes goes through sugard, which renews as needed."""
    listen = client.proxy_urls(name).get("listen_url")
    if not isinstance(listen, str) or not listen:
        raise BadRequest(
            f"exec --proxy needs a loopback listener for {name!r}: set listen = "
            f'"127.0.0.1:PORT" in [instances.{name}], then sugarctl reload'
        )
    return {"SUGAR_URL": listen}


class _StillStopping(SugardError):
    exit_code = EXIT_UNAVAILABLE


def shutdown(client: SugardClient, wait: float | None) -> None:
    """Ask the daemon to stop, then wait until its socket is gone (it removes it last), at
    most `wait` seconds (SHUTDOWN_WAIT when --wait is not given)."""
    wait = SHUTDOWN_WAIT if wait is None else wait
    answer = client.shutdown()
    pid = answer.get("pid", "?")
    client.close()  # an open connection of ours would hold up its graceful stop
    path = client.socket_path
    deadline = time.monotonic() + wait
    while os.path.lexists(path):
        if time.monotonic() >= deadline:
            raise _StillStopping(
                f"sugard (pid {pid}) is still stopping after --wait {wait:g} s: requests in "
                "flight may take up to its [daemon].shutdown_grace; it goes by itself"
            )
        time.sleep(0.05)
    print(f"sugard (pid {pid}) on {path} stopped")
