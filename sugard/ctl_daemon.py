"""sugarctl's commands about the daemon and its socket rather than a token: `env` (the shell
line that points at the socket), `proxy-url` (where its proxy answers) and `shutdown` (stop
it, then wait until its socket is gone).

Split from sugard.ctl, which imports this only for these three, so that the commands scripts
run on every call (token, header, exec) load none of it. `ping` and `reload` stay in
sugard.ctl: each is one call and a line of output.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from .client import SugardClient, SugardError
from .ctl import shell_quote
from .wire import EXIT_UNAVAILABLE

__all__ = ["SHUTDOWN_WAIT", "env", "print_proxy_url", "shutdown"]

SHUTDOWN_WAIT = 30.0  # seconds `shutdown` waits for the socket to go, without --wait


def env(client: SugardClient, shell: str | None) -> None:
    """`sugarctl env [--shell SHELL]`: the SUGARD_SOCKET line of the socket that answers."""
    client.health()  # the socket must answer: a line for a dead socket helps nobody
    print(_env_line(os.path.abspath(client.socket_path), shell or _login_shell()))


def _login_shell() -> str:
    return "fish" if os.path.basename(os.environ.get("SHELL", "")) == "fish" else "sh"


def _env_line(path: str, shell: str) -> str:
    if shell == "fish":
        return f"set -gx SUGARD_SOCKET {path if _plain(path) else _fish_quote(path)};"
    return f"SUGARD_SOCKET={path if _plain(path) else shell_quote(path)}; export SUGARD_SOCKET;"


def _plain(word: str) -> bool:
    """`word` means itself to every shell, unquoted."""
    return bool(word) and all(c.isalnum() or c in "/._-+,:@%" for c in word)


def _fish_quote(value: str) -> str:
    # In fish's single quotes, backslash escapes a backslash or a quote.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def print_proxy_url(urls: dict[str, Any], socket_path: str) -> None:
    """`sugarctl proxy-url NAME`: the loopback URL, or the one on the socket and how to use it."""
    if urls.get("listen_url"):
        print(urls["listen_url"])
        return
    print(urls["socket_url"])
    print(
        f"sugarctl: over the Unix socket, like: curl --unix-socket {socket_path} "
        f"{urls['socket_url']}/rest/v10/me",
        file=sys.stderr,
    )


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
