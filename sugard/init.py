"""`sugard init`: write a starter config with tomli-w, private from birth (0600 in a 0700 dir)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import tomli_w

from .config import INSTANCE_NAME, PLATFORM_NAME

__all__ = ["add_init_arguments", "run_init", "write_private"]


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--instance", metavar="NAME", help="instance name, like prod")
    p.add_argument("--url", help="site root, like https://crm.example.com")
    p.add_argument("--username")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--password-file", metavar="F", help="file holding the password")
    source.add_argument("--password-env", metavar="VAR", help="variable holding the password")
    source.add_argument("--password-command", metavar="CMD", help="command printing the password")
    p.add_argument("--platform", default="sugard",
                   help="API platform; must be registered in Sugar (Admin > Configure API "
                   "Platforms)")
    p.add_argument("--client-id", default="sugar")
    p.add_argument("--force", action="store_true", help="overwrite an existing config")


def write_private(path: Path, text: str, *, force: bool) -> None:
    """Write `text` to `path`, mode 0600, its directory 0700; never loosened afterwards."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(fd, 0o600)
        handle.write(text)


def run_init(args: argparse.Namespace, path: Path) -> int:
    if path.exists() and not args.force:
        print(f"sugard: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    missing = [flag for flag in ("instance", "url", "username") if not getattr(args, flag)]
    if missing:
        print(
            "sugard: init needs " + ", ".join(f"--{m}" for m in missing),
            file=sys.stderr,
        )
        return 2
    if not INSTANCE_NAME.match(args.instance):
        print(f"sugard: bad instance name {args.instance!r}", file=sys.stderr)
        return 2
    if not PLATFORM_NAME.match(args.platform):
        print(f"sugard: bad platform {args.platform!r}: use a-z, 0-9, '_' and '-'", file=sys.stderr)
        return 2
    instance: dict[str, Any] = {"url": args.url.rstrip("/"), "username": args.username}
    if args.password_file:
        instance["password_file"] = str(Path(args.password_file).expanduser().resolve())
    elif args.password_env:
        instance["password_env"] = args.password_env
    elif args.password_command:
        instance["password_command"] = args.password_command
    else:
        print("sugard: init needs --password-file, --password-env or --password-command",
              file=sys.stderr)
        return 2
    document = {
        "daemon": {"log_level": "info", "max_parallel_logins": 4},
        "defaults": {"client_id": args.client_id, "platform": args.platform},
        "instances": {args.instance: instance},
    }
    try:
        write_private(path, tomli_w.dumps(document), force=args.force)
    except FileExistsError:
        print(f"sugard: {path} exists; use --force to overwrite it", file=sys.stderr)
        return 1
    print(f"wrote {path}; check it with: sugard check -c {path}")
    return 0
