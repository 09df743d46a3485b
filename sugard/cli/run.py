"""`sugard run`: take what systemd hands over (the notify socket, passed sockets), load the
config, set up logging, then serve until stopped."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from sugard.cli.check import load_reported
from sugard.config import Config, ConfigError, DaemonConfig, load_config, read_config

log = logging.getLogger("sugard")

__all__ = ["run_daemon"]


def run_daemon(
    path: Path, explicit: bool, socket_for: Callable[[Config], Path], log_level: str | None
) -> int:
    """The exit status of `sugard run`. `explicit`: the config was named with -c; `log_level`:
    --log-level, which a reload then leaves alone."""
    from sugard.daemon import Daemon
    from sugard.daemon.hardening import keep_memory_private
    from sugard.daemon.sockets import adopt_socket
    from sugard.daemon.systemd import Notifier, passed_fds, setup_logging, started_by_systemd
    from sugard.errors import SocketError

    keep_memory_private()  # before any secret is read: no core file, no ptrace by our uid
    # Read (and remove) systemd's variables first, so no child process ever sees them.
    notifier = Notifier.from_environ()
    try:
        fds = passed_fds()  # the listening socket, and sessions kept over a restart
        passed = fds.sockets
    except ValueError as exc:
        print(f"sugard: socket activation: {exc}", file=sys.stderr)
        return 1
    refused: list[str] | None = None
    if notifier.enabled or passed or started_by_systemd():
        # Exiting would only make systemd start sugard again and again (or at each
        # connection), while every client hangs without a word: stay up and say why.
        config, refused = _config_or_stand_in(path)
    else:
        loaded = load_reported(path, explicit)
        if loaded is None:
            notifier.status(
                "cannot start: the config has errors (see the log, or run sugard check)"
            )
            return 1
        config = loaded
    setup_logging(log_level or config.daemon.log_level)
    socket_path = socket_for(config)
    listen = None
    try:
        if passed:
            listen = adopt_socket(passed)
            inherited = listen.getsockname()
            if isinstance(inherited, str) and inherited:
                if Path(inherited) != socket_path:
                    log.info(
                        "listening on %s, passed in by systemd, not on %s", inherited, socket_path
                    )
                socket_path = Path(inherited)
        daemon = Daemon(
            config,
            socket_path,
            listen_socket=listen,
            notifier=notifier,
            apply_log_level=log_level is None,
            stored=fds.stored,
            refused=refused,
        )
        return asyncio.run(daemon.serve())
    except SocketError as exc:
        print(f"sugard: {exc}", file=sys.stderr)
        notifier.status(f"cannot start: {exc}")
        return 1


def _config_or_stand_in(path: Path) -> tuple[Config, list[str] | None]:
    """The config at `path`; or, if it has problems, a stand-in with no instance and the
    problems. The stand-in keeps the [daemon] settings that could be read (where to listen,
    who may ask) but no metrics listener: nothing is served but the problems."""
    try:
        return load_config(path), None
    except ConfigError as exc:
        problems = [str(p) for p in exc.problems]
    partial, _ = read_config(path, resolve=False)
    daemon = partial.daemon if partial is not None else DaemonConfig()
    stand_in = Config(str(path.expanduser()), replace(daemon, metrics_listen=None), {})
    return stand_in, problems
