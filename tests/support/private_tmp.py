"""A command run in a mount namespace of its own whose /tmp is empty: the fixed fallback
`/tmp/sugard-UID` can then be created, squatted or listened on without touching the host's
/tmp or another test's. Needs root (the suite runs as root; `setpriv` drops to other uids)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

# The checkout and its venv may themselves live under /tmp (a CI clone): they are carried over.
CHECKOUT = Path(__file__).resolve().parents[2]
TMP = Path("/tmp")


def in_private_tmp(script: str, keep: Sequence[Path] = ()) -> list[str]:
    """argv running the shell `script` with a fresh, empty /tmp (mode 1777); each directory of
    `keep` (the test's own under /tmp), and the checkout and the venv if they are under /tmp,
    are carried over at the same path."""
    wanted = {*keep, CHECKOUT, Path(sys.prefix).resolve()}
    under_tmp = [path for path in wanted if path.is_relative_to(TMP) and path != TMP]
    # A directory inside another carried one comes with it.
    keep = sorted(
        path
        for path in under_tmp
        if not any(path != other and path.is_relative_to(other) for other in under_tmp)
    )
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
