"""Files only their owner may read: written 0600 in a 0700 directory, never loosened afterwards.

For the config and the secrets next to it (`sugard init`, `sugard demo`).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["private_dir", "replace_private", "write_private"]


def write_private(path: Path, text: str, *, force: bool) -> None:
    """Write `text` to `path`, mode 0600, its directory 0700; never loosened afterwards."""
    private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(fd, 0o600)
        handle.write(text)


def private_dir(directory: Path) -> None:
    """Make `directory` 0700 if it is missing; one that exists is left as the user made it."""
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered through the umask


def replace_private(path: Path, text: str) -> None:
    """Replace `path` all at once: a reader (a reloading daemon) sees the old file or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_private(tmp, text, force=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
