"""What the process does to itself before it reads a secret, as ssh-agent does: no core file
(it would hold passwords and tokens on disk), and not dumpable (no other process of the same
uid may ptrace it or read its memory, and /proc/PID/ belongs to root)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

__all__ = ["keep_memory_private"]

log = logging.getLogger("sugard")

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def keep_memory_private() -> None:
    """RLIMIT_CORE to 0 (soft and hard, so no child raises it) and PR_SET_DUMPABLE to 0; a
    failure is logged, never fatal: the daemon still serves where the kernel will not."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as exc:
        log.warning("cannot turn core dumps off: %s", exc)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    except (OSError, AttributeError) as exc:
        log.warning("cannot make the process undumpable: %s", exc)
