"""Where sugard's config and socket live, as Paths for the daemon's side. The rules are
sugard.wire's (one implementation, shared with `sugarctl`); this only wraps them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from . import wire
from .wire import SOCKET_PATH_MAX

__all__ = ["SOCKET_PATH_MAX", "default_config_path", "default_socket_path", "socket_path"]


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$SUGARD_CONFIG`, else `$XDG_CONFIG_HOME/sugard/config.toml`, else `~/.config/...`."""
    return Path(wire.default_config_path(environ))


def default_socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_RUNTIME_DIR/sugard/sugard.sock`, else `/tmp/sugard-$UID/sugard.sock`.

    `--socket`, `$SUGARD_SOCKET` and `[daemon].socket` come before this: see socket_path().
    """
    return Path(wire.default_socket_path(environ))


def socket_path(explicit: str | None, configured: str | None) -> Path:
    """`--socket` > `$SUGARD_SOCKET` > `[daemon].socket` (`configured`) > the default."""
    return Path(wire.socket_path(explicit, lambda: configured))
