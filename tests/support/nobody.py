"""Running a program as another user, uid/gid 65534 (nobody), with `setpriv`."""

from __future__ import annotations

NOBODY = 65534


def as_nobody(*argv: str, groups: tuple[int, ...] = ()) -> list[str]:
    """argv run as uid/gid 65534, with exactly the given supplementary groups (none by default)."""
    group_args = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *group_args, *argv]


AS_NOBODY = as_nobody()  # the prefix: AS_NOBODY + argv
