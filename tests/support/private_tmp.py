"""A command run in a mount namespace of its own whose /tmp is empty: the fixed fallback
`/tmp/sugard-UID` can then be created, squatted or listened on without touching the host's
/tmp or another test's. Needs root (the suite runs as root; `setpriv` drops to other uids)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path


def in_private_tmp(script: str, keep: Sequence[Path] = ()) -> list[str]:
    """argv running the shell `script` with a fresh, empty /tmp (mode 1777); each directory of
    `keep` (the test's own under /tmp) is carried over at the same path."""
    setup = ["set -e", "mount -t tmpfs none /mnt"]
    for i, path in enumerate(keep):
        setup += [f"mkdir /mnt/{i}", f"mount --bind {shlex.quote(str(path))} /mnt/{i}"]
    setup.append("mount -t tmpfs -o mode=1777 none /tmp")
    for i, path in enumerate(keep):
        quoted = shlex.quote(str(path))
        setup += [f"mkdir -p {quoted}", f"mount --move /mnt/{i} {quoted}"]
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "\n".join([*setup, script]),
    ]
