"""`sugard init`'s answers: from flags, and from the terminal when it asks (with the
prompts it uses).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sugard.config import (
    INSTANCE_DEFAULTS,
    INSTANCE_NAME,
    INSTANCE_SCHEMA,
    distinct_platform,
    secret_file_problem,
    session_identity,
)
from sugard.errors import DaemonError
from sugard.wire import INSTANCE_NAME_RULE

__all__ = ["PLATFORM_REMINDER", "Answers", "Cancelled", "InitError", "Prompter", "gather"]


class Cancelled(Exception):
    """The user ended the questions (end of input): nothing is to be written."""


class Prompter:
    """Asks on the terminal; every answer is checked at once and asked again if wrong."""

    def __init__(self) -> None:
        self.out = sys.stderr

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def ask(self, label: str, check: Callable[[str], str], default: str | None = None) -> str:
        shown = f"{label} [{default}]: " if default else f"{label}: "
        while True:
            self.out.write(shown)
            self.out.flush()
            line = sys.stdin.readline()
            if not line:
                raise Cancelled
            value = line.strip() or (default or "")
            try:
                return check(value)
            except ValueError as exc:
                self.say(f"  {exc}")

    def secret(self, label: str, *, allow_empty: bool = False) -> str:
        """Asked twice, unseen: a typo here would only show as a rejected login later."""
        while True:
            value = self._unseen(f"{label} (not shown): ")
            if not value and not allow_empty:
                self.say("  must not be empty")
            elif not value or self._unseen("Again, to be sure (not shown): ") == value:
                return value
            else:
                self.say("  the two differ; once more")

    def _unseen(self, prompt: str) -> str:
        try:
            return getpass.getpass(prompt, stream=self.out)
        except EOFError:
            raise Cancelled from None

    def confirm(self, question: str) -> bool:
        answer = self.ask(f"{question} [Y/n]", _yes_no, "y")
        return answer == "y"


def _yes_no(value: str) -> str:
    answer = value.strip().lower()[:1]
    if answer not in ("y", "n"):
        raise ValueError("answer y or n")
    return answer


PLATFORM_REMINDER = (
    "The platform must be registered in Sugar first: Admin > Configure API Platforms "
    "(Sugar keeps one session per user and platform)."
)


class InitError(DaemonError):
    """Bad input or a file in the way; the message says what to do. `exit_code` is the exit
    code (`code` the wire's, as for every DaemonError)."""

    code = "bad_request"

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = code


@dataclass
class Answers:
    """What goes into the new instance table, and the secrets to write next to the config."""

    name: str
    table: dict[str, Any] = field(default_factory=dict)
    platform: str = ""
    secret_files: dict[Path, str] = field(default_factory=dict, repr=False)


def _checker(key: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if key == "name":
            if not INSTANCE_NAME.fullmatch(value):
                raise ValueError(f"{value!r} is not a valid instance name: {INSTANCE_NAME_RULE}")
            return value
        result: str = INSTANCE_SCHEMA[key](value)
        return result

    return check


def _flag_value(args: argparse.Namespace, attr: str, flag: str, key: str) -> str | None:
    value = getattr(args, attr)
    if value is None:
        return None
    try:
        return _checker(key)(value)
    except ValueError as exc:
        raise InitError(f"{flag}: {exc}", code=2) from None


def _given_secret_file(value: str | None, flag: str, path: Path) -> str | None:
    """`value` as given, once the daemon could read it: checked before any question."""
    if value is None:
        return None
    problem = secret_file_problem(value, path.parent)
    if problem is not None:
        hint = ""
        if not Path(value).expanduser().is_absolute() and Path(value).exists():
            hint = (
                f"; a relative path is relative to the config's directory ({path.parent}), "
                f"as sugard reads it: give {Path(value).absolute()}"
            )
        raise InitError(f"{flag} {value}: {problem}{hint}", code=2)
    return value


def _taken(
    document: dict[str, Any], name: str, url: str, username: str, platform: str
) -> str | None:
    """The instance of `document` (other than `name`) that already holds the Sugar session
    of `username` at `url` on `platform`: one more would log it out, and be logged out."""
    defaults = document.get("defaults", {})
    new = session_identity(url, username, platform)
    for other, table in document.get("instances", {}).items():
        merged = {**defaults, **table} if isinstance(table, dict) else {}
        platform_there = merged.get("platform", INSTANCE_DEFAULTS["platform"])
        theirs = session_identity(merged.get("url"), merged.get("username"), platform_there)
        if other != name and theirs == new:
            return str(other)
    return None


def _session_clash(known: str, name: str, username: str, url: str, platform: str) -> str:
    return (
        f"instance {known} already logs in as {username} at {url} on platform {platform!r}, "
        f"and Sugar keeps one session per user and platform: {name} needs a platform of its "
        f"own, like {distinct_platform(name)}"
    )


def gather(
    args: argparse.Namespace, path: Path, inherited: dict[str, Any], document: dict[str, Any]
) -> Answers:
    """The new instance from flags; on a terminal, ask for what they leave out."""
    password_file = _given_secret_file(args.password_file, "--password-file", path)
    client_secret_file = _given_secret_file(args.client_secret_file, "--client-secret-file", path)
    name_flag = "--add" if args.add else "--instance"
    name = _flag_value(args, "add" if args.add else "instance", name_flag, "name")
    url = _flag_value(args, "url", "--url", "url")
    username = _flag_value(args, "username", "--username", "username")
    platform = _flag_value(args, "platform", "--platform", "platform")
    client_id = _flag_value(args, "client_id", "--client-id", "client_id")
    has_password = bool(
        args.password_stdin or args.password_file or args.password_env or args.password_command
    )
    missing = [
        flag
        for flag, value in ((name_flag, name), ("--url", url), ("--username", username))
        if not value
    ]
    if not has_password:
        missing.append(
            "the password (--password-stdin, --password-file, --password-env or --password-command)"
        )
    # Flags that say everything mean a script, even on a terminal: ask nothing then.
    prompter = Prompter() if missing and sys.stdin.isatty() else None
    if prompter is None and missing:
        raise InitError("needs " + ", ".join(missing) + " when stdin is not a terminal", code=2)
    if prompter is not None:
        prompter.say(f"Writing {path}; Ctrl-C to stop.")
        if not name:
            name = prompter.ask("Instance name", _checker("name"), "prod")
    assert name
    secret_path = path.parent / f"{name}.password"
    use_existing = False
    if has_password or not secret_path.exists() or args.force:
        pass
    elif prompter is None or not prompter.confirm(f"{secret_path} exists: use the password in it?"):
        # Said before the password is typed, not after.
        raise InitError(
            f"{secret_path} exists; use --force to overwrite it, or --password-file "
            f"{secret_path} to use it as is"
        )
    else:
        problem = secret_file_problem(str(secret_path), path.parent)
        if problem is not None:
            raise InitError(f"{secret_path}: {problem}")
        use_existing = True
    if prompter is not None:
        if not url:
            url = prompter.ask("Site URL (like https://crm.example.com)", _checker("url"))
        if not username:
            username = prompter.ask("Username", _checker("username"))
    assert url and username
    answers = Answers(name, {"url": url, "username": username})

    if password_file:
        answers.table["password_file"] = password_file
    elif use_existing:
        answers.table["password_file"] = str(secret_path)
    elif args.password_env:
        answers.table["password_env"] = args.password_env
    elif args.password_command:
        answers.table["password_command"] = args.password_command
    else:
        if sys.stdin.isatty():  # never echo a password, even one meant for --password-stdin
            password = (prompter or Prompter()).secret(f"Password for {username}")
        else:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise InitError("--password-stdin: stdin held no password", code=2)
        answers.secret_files[secret_path] = password
        answers.table["password_file"] = str(secret_path)

    default_platform = inherited["platform"]
    known = _taken(document, name, url, username, default_platform)
    if known is not None and not platform:
        clash = _session_clash(known, name, username, url, default_platform)
        if prompter is None:
            raise InitError(f"{clash}: add --platform", code=2)
        prompter.say(clash + ".")
        default_platform = distinct_platform(name)

    def own_platform(value: str) -> str:
        value = _checker("platform")(value)
        known = _taken(document, name, url, username, value)
        if known is not None:
            raise ValueError(_session_clash(known, name, username, url, value))
        return value

    if prompter is not None and not platform:
        prompter.say(PLATFORM_REMINDER)
        platform = prompter.ask("Platform", own_platform, default_platform)
    elif platform:
        try:
            own_platform(platform)
        except ValueError as exc:
            raise InitError(f"--platform: {exc}", code=2) from None
    if prompter is not None and not client_id:
        client_id = prompter.ask("OAuth2 client id", _checker("client_id"), inherited["client_id"])
    platform = platform or inherited["platform"]
    client_id = client_id or inherited["client_id"]
    answers.platform = platform
    if platform != inherited["platform"]:
        answers.table["platform"] = platform
    if client_id != inherited["client_id"]:
        answers.table["client_id"] = client_id

    if client_secret_file:
        answers.table["client_secret_file"] = client_secret_file
    elif args.client_secret_env:
        answers.table["client_secret_env"] = args.client_secret_env
    elif args.client_secret_command:
        answers.table["client_secret_command"] = args.client_secret_command
    elif prompter is not None and client_id != "sugar":
        # The built-in client "sugar" has an empty secret, and Sugar refuses a non-empty one.
        secret = prompter.secret(
            f"Client secret of {client_id}, empty if it has none", allow_empty=True
        )
        if secret:
            secret_file = path.parent / f"{name}.client_secret"
            answers.secret_files[secret_file] = secret
            answers.table["client_secret_file"] = str(secret_file)
    return answers
