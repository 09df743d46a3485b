"""`sugard init`: its flags, building the starter config, and writing private files
(0600 in a 0700 folder, never over an existing one without --force).
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

from sugard.cli.answers import Answers, Cancelled, InitError, gather
from sugard.config import INSTANCE_DEFAULTS
from sugard.wire import default_config_path

__all__ = [
    "add_init_arguments",
    "private_dir",
    "replace_private",
    "run_init",
    "write_fleet_key",
    "write_private",
]


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


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--instance", metavar="NAME", help="instance name for a new config, like prod"
    )
    which.add_argument(
        "--add",
        metavar="NAME",
        help="add instance NAME to an existing config, keeping the others "
        "(the old file is kept as a .bak copy, since its comments are not carried over)",
    )
    p.add_argument("--url", help="site root, like https://crm.example.com")
    p.add_argument("--username", help="the Sugar user sugard logs in as")
    password = p.add_mutually_exclusive_group()
    password.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin and store it in NAME.password "
        "(mode 0600) next to the config",
    )
    password.add_argument(
        "--password-file",
        metavar="F",
        help="use the password in file F as is (written as given; a relative F is relative "
        "to the config's directory, as sugard reads it)",
    )
    password.add_argument("--password-env", metavar="VAR", help="take the password from $VAR")
    password.add_argument(
        "--password-command", metavar="CMD", help="run CMD (with sh -c) to get the password"
    )
    p.add_argument(
        "--platform",
        help="API platform (default: sugard); register it in Sugar first: Admin > Configure "
        "API Platforms (Sugar keeps one session per user and platform)",
    )
    p.add_argument("--client-id", help="OAuth2 client id (default: sugar, the built-in one)")
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--client-secret-file", metavar="F", help="file holding the client secret (as F above)"
    )
    secret.add_argument("--client-secret-env", metavar="VAR", help="variable holding it")
    secret.add_argument("--client-secret-command", metavar="CMD", help="command printing it")
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing config or password file, or replace an instance with --add "
        "(the old config is kept as a .bak copy)",
    )
    p.add_argument(
        "--fleet-key",
        metavar="FILE",
        help="only write a new random fleet key to FILE (mode 0600) and exit; copy it to every "
        "host of the fleet and name it in [fleet] key_file",
    )


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
    config_flag = "" if path == Path(default_config_path()).absolute() else f" -c {path}"
    print(
        "next:\n"
        f"  register the platform {answers.platform} in Sugar if it is not yet: "
        "Admin > Configure API Platforms\n"
        f"  sugard check{config_flag}\n"
        f"  sugard run{config_flag}    (or reload a running daemon: sugarctl reload)"
    )
