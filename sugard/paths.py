"""Where sugard's config and socket live. Standard library only: `sugarctl` imports it too."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["SOCKET_PATH_MAX", "default_config_path", "default_socket_path"]

# sun_path is 108 bytes on Linux, including the terminating NUL.
SOCKET_PATH_MAX = 107


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$SUGARD_CONFIG`, else `$XDG_CONFIG_HOME/sugard/config.toml`, else `~/.config/...`."""
    env = os.environ if environ is None else environ
    if env.get("SUGARD_CONFIG"):
        return Path(env["SUGARD_CONFIG"]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sugard" / "config.toml"


def default_socket_path(environ: Mapping[str, str] | None = None) -> Path:
    """`$XDG_RUNTIME_DIR/sugard/sugard.sock`, else `/tmp/sugard-$UID/sugard.sock`.

    `--socket`, `$SUGARD_SOCKET` and `[daemon].socket` come before this; callers
    apply them, since only they know which of those they have.
    """
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "sugard" / "sugard.sock"
    return Path(f"/tmp/sugard-{os.getuid()}") / "sugard.sock"
