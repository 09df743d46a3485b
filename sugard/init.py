"""`sugard init`: write a config with tomli-w, private from birth (0600 in a 0700 directory).

Interactive on a terminal, scriptable with flags. The password never goes into the config: it
gets a file of its own (`NAME.password`, 0600) next to it, or stays where the user keeps it
(`--password-file`, `--password-env`, `--password-command`).

Here: the config built and written. Apart: the flags (`init_args`), the answers gathered from
flags and questions (`init_answers`), the terminal (`init_prompt`), private files
(`private_files`).
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import sys
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from .config import INSTANCE_DEFAULTS
from .init_answers import PLATFORM_REMINDER, Answers, InitError, gather
from .init_args import add_init_arguments
from .init_prompt import Cancelled
from .paths import default_config_path
from .private_files import private_dir, replace_private, write_private

# PLATFORM_REMINDER, Answers and InitError are init_answers', kept importable from here.
__all__ = [
    "PLATFORM_REMINDER",
    "Answers",
    "InitError",
    "add_init_arguments",
    "run_init",
    "write_fleet_key",
    "write_private",
]

HEADER = (
    "# sugard configuration, written by `sugard init`.\n"
    "# Check it with `sugard check`; see every effective value with `sugard show-config`.\n\n"
)


def _backup(path: Path) -> Path:
    """Copy `path` to the first free `PATH.bak`, `PATH.bak.1`, ...: an older backup may be the
    only copy of the user's comments, so none is ever overwritten."""
    candidates = [path.with_name(path.name + ".bak")]
    candidates += [path.with_name(f"{path.name}.bak.{n}") for n in range(1, 1000)]
    data = path.read_bytes()
    for candidate in candidates:
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return candidate
    raise InitError(f"too many backups of {path}; remove old {path.name}.bak.* files")


def _read_existing(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InitError(
            f"{path} does not exist; create it with `sugard init` (without --add), "
            "or give the right file with -c"
        ) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InitError(f"cannot add to {path}: {exc}; fix it first (sugard check)") from None
    if not isinstance(document.get("instances", {}), dict) or not isinstance(
        document.get("defaults", {}), dict
    ):
        raise InitError(
            f"cannot add to {path}: [instances] or [defaults] is not a table; "
            "fix it first (sugard check)"
        )
    return document


def run_init(args: argparse.Namespace, path: Path) -> int:
    try:
        if getattr(args, "fleet_key", None):
            return write_fleet_key(Path(args.fleet_key).expanduser(), force=args.force)
        return _init(args, path)
    except InitError as exc:
        print(f"sugard init: {exc}", file=sys.stderr)
        return exc.exit_code


def _init(args: argparse.Namespace, path: Path) -> int:
    path = path.absolute()
    adding = args.add is not None
    if adding:
        document = _read_existing(path)
    elif path.exists() and not args.force:
        raise InitError(
            f"{path} exists; use --force to overwrite it, or --add NAME to add an instance to it"
        )
    else:
        document = {}
    defaults = document.get("defaults", {})
    inherited = {
        key: defaults.get(key, INSTANCE_DEFAULTS[key]) for key in ("platform", "client_id")
    }
    if adding and args.add in document.get("instances", {}) and not args.force:
        # Checked before asking anything, so nobody types a password for nothing.
        raise InitError(f"{path} already has instance {args.add!r}; use --force to replace it")

    try:
        answers = gather(args, path, inherited, document)
    except Cancelled:
        raise InitError("cancelled; nothing was written") from None
    instances = document.setdefault("instances", {})
    if answers.name in instances and not args.force:
        raise InitError(f"{path} already has instance {answers.name!r}; use --force to replace it")
    for secret_path in answers.secret_files:
        if secret_path.exists() and not args.force:
            raise InitError(
                f"{secret_path} exists; use --force to overwrite it, or --password-file "
                f"{secret_path} to use it as is"
            )
    if not adding:
        document = {"defaults": dict(inherited), "instances": {}}
        instances = document["instances"]
    instances[answers.name] = answers.table

    created: list[Path] = []
    try:
        private_dir(path.parent)
        for secret_path, secret in answers.secret_files.items():
            existed = secret_path.exists()
            write_private(secret_path, secret + "\n", force=args.force)
            if not existed:
                created.append(secret_path)
        backup = _backup(path) if path.exists() else None
        replace_private(path, HEADER + tomli_w.dumps(document))
    except OSError as exc:
        for done in created:
            done.unlink(missing_ok=True)
        raise InitError(f"cannot write {exc.filename or path}: {exc.strerror}") from None

    _report(path, answers, instances, backup, adding)
    return 0


def write_fleet_key(path: Path, *, force: bool) -> int:
    """A new shared key for [fleet]: 32 random bytes, base64 on one line, mode 0600."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    try:
        write_private(path, key + "\n", force=force)
    except FileExistsError:
        raise InitError(
            f"{path} exists; use --force to replace it (every host then needs the new key)"
        ) from None
    except OSError as exc:
        raise InitError(f"cannot write {exc.filename or path}: {exc.strerror}") from None
    print(
        f"wrote a new fleet key to {path} (mode 0600); copy it to every host of the fleet and "
        f"set in [fleet]: key_file = {str(path)!r}"
    )
    return 0


def _report(
    path: Path,
    answers: Answers,
    instances: dict[str, Any],
    backup: Path | None,
    adding: bool,
) -> None:
    verb = "added instance" if adding else "wrote instance"
    print(f"{verb} {answers.name} to {path} (mode 0600; instances: {', '.join(instances)})")
    for secret_path in answers.secret_files:
        print(f"wrote {secret_path} (mode 0600)")
    if backup is not None:
        print(
            f"kept the previous file as {backup}: comments are not carried over, copy back "
            "any you want to keep"
        )
    mode = path.parent.stat().st_mode & 0o777
    if mode & 0o077:
        print(
            f"note: {path.parent} is open to others (mode {mode:04o}); "
            f"consider: chmod 700 {path.parent}"
        )
    config_flag = "" if path == default_config_path().absolute() else f" -c {path}"
    print(
        "next:\n"
        f"  register the platform {answers.platform} in Sugar if it is not yet: "
        "Admin > Configure API Platforms\n"
        f"  sugard check{config_flag}\n"
        f"  sugard run{config_flag}    (or reload a running daemon: sugarctl reload)"
    )
