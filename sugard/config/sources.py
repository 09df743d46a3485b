"""Where secrets come from (inline, a file, the environment, a command, a systemd credential),
and the one check that a file holding a secret is not readable by others.

The `Secret` type itself stays in `secret`: every layer holds secrets in it (the keeper, the Sugar
client, the fake), and none of them should load the module that runs commands and reads files.
"""

from __future__ import annotations

import shlex
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sugard.secret import Secret

__all__ = [
    "SECRET_COMMAND_TIMEOUT",
    "SECRET_KINDS",
    "SecretRef",
    "is_empty_inline",
    "read_secret",
    "readable_by_others",
    "resolve_path",
    "secret_file_problem",
]

SECRET_KINDS = ("", "_file", "_env", "_command", "_credential")  # key suffixes: password_file, ...
SECRET_COMMAND_TIMEOUT = 15.0


def readable_by_others(path: Path, mode: int) -> str:
    """Empty if only its owner can read the file at `path` with `mode`; else how to fix that.
    The one mode rule for every file that holds a secret (a secret file, a config with an
    inline secret)."""
    if not mode & 0o077:
        return ""
    return f"readable by others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"


@dataclass(frozen=True)
class SecretRef:
    """Where a secret comes from, and, once resolved, its value.

    `kind` is `inline`, `file`, `env`, `command` or `credential`; `ref` is the path, variable,
    command or credential name (empty for inline). `value` stays None until resolved.
    """

    kind: str
    ref: str | tuple[str, ...] = ""
    value: Secret | None = None

    def describe(self) -> str:
        """Where the secret comes from, for humans (never the secret itself)."""
        if self.kind == "inline":
            return "inline"
        ref = shlex.join(self.ref) if isinstance(self.ref, tuple) else self.ref
        return f"{self.kind}: {ref}"

    def reveal(self) -> str:
        if self.value is None:
            raise RuntimeError("secret was not resolved")
        return self.value.reveal()


def is_empty_inline(ref: SecretRef) -> bool:
    """An inline secret given as "" (the built-in client's empty secret, say)."""
    return ref.kind == "inline" and ref.value is not None and not ref.value


def read_secret(ref: SecretRef, env: Mapping[str, str], base_dir: Path) -> str:
    if ref.kind == "inline":
        return ref.reveal()
    if ref.kind == "env":
        assert isinstance(ref.ref, str)
        if ref.ref not in env:
            raise ValueError(f"environment variable {ref.ref} is not set")
        if not env[ref.ref]:
            raise ValueError(f"environment variable {ref.ref} is empty")
        return env[ref.ref]
    if ref.kind == "file":
        assert isinstance(ref.ref, str)
        return _read_secret_file(resolve_path(ref.ref, base_dir), check_mode=True)
    if ref.kind == "credential":
        assert isinstance(ref.ref, str)
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ValueError(
                "$CREDENTIALS_DIRECTORY is not set; use LoadCredential= in the systemd unit"
            )
        return _read_secret_file(Path(directory) / ref.ref, check_mode=False)
    if ref.kind == "command":
        return _run_secret_command(ref.ref, env)
    raise ValueError(f"unknown secret source {ref.kind}")


def secret_file_problem(value: str, base_dir: Path) -> str | None:
    """What is wrong with `value` as a password_file (relative to `base_dir`, the config's
    directory, as the daemon reads it), or None if the daemon could use it."""
    try:
        _read_secret_file(resolve_path(value, base_dir), check_mode=True)
    except ValueError as exc:
        return str(exc)
    return None


def resolve_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _read_secret_file(path: Path, *, check_mode: bool) -> str:
    try:
        st = path.stat()
        text = path.read_text("utf-8")
    except FileNotFoundError:
        if not check_mode:
            raise ValueError(
                f"credential {path.name} is not in $CREDENTIALS_DIRECTORY ({path.parent}); "
                "check LoadCredential= in the systemd unit"
            ) from None
        raise ValueError(
            f"file {path} does not exist; create it with the secret on one line "
            f"(chmod 600 {path}), or fix the path"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if check_mode and (loose := readable_by_others(path, st.st_mode)):
        raise ValueError(f"{path} is {loose}")
    secret = text.rstrip("\r\n")
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def _run_secret_command(command: str | tuple[str, ...], env: Mapping[str, str]) -> str:
    argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
    try:
        done = subprocess.run(
            argv,
            capture_output=True,  # stderr is captured and dropped: it may echo the secret
            stdin=subprocess.DEVNULL,
            timeout=SECRET_COMMAND_TIMEOUT,
            env=dict(env),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ValueError(f"command did not finish within {SECRET_COMMAND_TIMEOUT:g} s") from None
    except OSError as exc:
        raise ValueError(f"command cannot run: {exc.strerror}") from None
    if done.returncode != 0:
        why = {
            126: " (not executable)",
            127: " (command not found: check its name, and the daemon's PATH under systemd)",
        }.get(done.returncode, "")
        raise ValueError(f"command exited with status {done.returncode}{why}")
    secret = done.stdout.decode("utf-8", "replace").rstrip("\r\n")
    if not secret:
        raise ValueError("command printed nothing")
    return secret
