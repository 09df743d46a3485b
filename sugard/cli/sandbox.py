"""What the systemd unit's sandbox does to the paths of a config: a secret file under a private
/tmp, or a socket in a read-only tree, works by hand and fails as a service. `sugard check` says
so before the service meets it.

The unit read is the one systemd would run (`~/.config/systemd/user/sugard.service` and its
drop-ins), else the unit sugard ships (`SHIPPED`, which a test keeps equal to
systemd/sugard.service). Only the settings that hide paths or make them read-only are read; a
unit file is simple enough (`Key=value` lines, later ones win, an empty value resets a list)
that no parser library is needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sugard.config import Config, Problem

__all__ = ["SHIPPED", "Sandbox", "installed_unit", "parse_unit", "sandbox_warnings"]

TRUE = ("yes", "true", "on", "1")
HOME_TREES = ("/home", "/root", "/run/user")
# ProtectSystem= level -> the trees it makes read-only ("strict": all but the API trees).
SYSTEM_TREES = {
    "yes": ("/usr", "/boot", "/efi"),
    "full": ("/usr", "/boot", "/efi", "/etc"),
    "strict": ("/",),
}
API_TREES = ("/dev", "/proc", "/sys")


@dataclass(frozen=True)
class Sandbox:
    """The path settings of a unit's [Service] section."""

    unit: str  # where they come from, for the messages
    private_tmp: bool = False
    protect_home: str = "no"  # no, yes, read-only, tmpfs
    protect_system: str = "no"  # no, yes, full, strict
    runtime_directory: tuple[str, ...] = ()
    read_write: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()
    inaccessible: tuple[str, ...] = ()


SHIPPED = Sandbox(
    unit="the shipped sugard.service",
    private_tmp=True,
    protect_home="read-only",
    protect_system="strict",
    runtime_directory=("sugard",),
)

_LISTS = {
    "RuntimeDirectory": "runtime_directory",
    "ReadWritePaths": "read_write",
    "ReadOnlyPaths": "read_only",
    "InaccessiblePaths": "inaccessible",
}


def parse_unit(texts: Iterable[str], unit: str) -> Sandbox:
    """The sandbox of a unit file followed by its drop-ins, in the order systemd reads them."""
    settings: dict[str, Any] = {}
    for text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            key, eq, value = line.partition("=")
            if section != "[Service]" or not eq:
                continue
            key, value = key.strip(), value.strip()
            if key == "PrivateTmp":
                settings["private_tmp"] = value.lower() in TRUE
            elif key in ("ProtectHome", "ProtectSystem"):
                level = "yes" if value.lower() in TRUE else value.lower()
                settings["protect_home" if key == "ProtectHome" else "protect_system"] = level
            elif key in _LISTS:
                paths = tuple(p.lstrip("-+") for p in value.split())
                name = _LISTS[key]
                settings[name] = (*settings.get(name, ()), *paths) if value else ()
    return Sandbox(unit=unit, **settings)


def installed_unit(environ: Mapping[str, str] | None = None) -> Sandbox:
    """The user's installed sugard.service with its drop-ins, else the shipped unit's."""
    env = os.environ if environ is None else environ
    base = Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user"
    unit = base / "sugard.service"
    if not unit.is_file():
        return SHIPPED
    files = [unit, *sorted((base / "sugard.service.d").glob("*.conf"))]
    return parse_unit((f.read_text("utf-8", "replace") for f in files), str(unit))


def sandbox_warnings(
    config: Config, sandbox: Sandbox | None, environ: Mapping[str, str] | None = None
) -> list[Problem]:
    """A warning for each configured path the unit's sandbox hides or makes read-only."""
    if sandbox is None:
        return []
    env = os.environ if environ is None else environ
    home = env.get("HOME") or str(Path.home())
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    base_dir = Path(config.path).parent

    def absolute(value: str) -> PurePosixPath:
        path = Path(value.replace("%h", home).replace("%t", runtime)).expanduser()
        return PurePosixPath(os.path.normpath(path if path.is_absolute() else base_dir / path))

    warnings: list[Problem] = []

    def check(key: str, value: str, *, write: bool) -> None:
        why = _why(sandbox, absolute(value), write, home, runtime, absolute)
        if why:
            warnings.append(Problem(config.path, key, f"warning: {why} ({sandbox.unit})"))

    if config.daemon.socket:
        check("daemon.socket", config.daemon.socket, write=True)
    for name, instance in config.instances.items():
        for secret in ("password", "client_secret"):
            ref = getattr(instance, secret)
            if ref.kind == "file" and isinstance(ref.ref, str):
                check(f"instances.{name}.{secret}_file", ref.ref, write=False)
        if instance.ca_file:
            check(f"instances.{name}.ca_file", instance.ca_file, write=False)
    return list(dict.fromkeys(warnings))


def _under(path: PurePosixPath, trees: Iterable[str | PurePosixPath]) -> bool:
    return any(path == PurePosixPath(t) or PurePosixPath(t) in path.parents for t in trees)


def _why(
    sandbox: Sandbox,
    path: PurePosixPath,
    write: bool,
    home: str,
    runtime: str,
    absolute: Callable[[str], PurePosixPath],
) -> str:
    """Why `path` does not work under `sandbox`, or ""; `write`: sugard creates it (a socket)."""
    if _under(path, (absolute(p) for p in sandbox.inaccessible)):
        return f"InaccessiblePaths= hides {path} from sugard under systemd"
    if sandbox.private_tmp and _under(path, ("/tmp", "/var/tmp")):
        return (
            f"PrivateTmp=yes gives sugard a /tmp of its own: under systemd it cannot see {path}; "
            "keep it under ~/.config/sugard (or use password_credential with LoadCredential=)"
            if not write
            else f"PrivateTmp=yes gives sugard a /tmp of its own: a socket at {path} would be "
            "in it, out of every client's reach; leave socket unset (%t/sugard/sugard.sock)"
        )
    runtime_dirs = [f"{runtime}/{d}" for d in sandbox.runtime_directory]
    hidden_home = sandbox.protect_home in ("yes", "tmpfs")
    if hidden_home and _under(path, (*HOME_TREES, home)) and not _under(path, runtime_dirs):
        return (
            f"ProtectHome={sandbox.protect_home} hides home directories: under systemd "
            f"sugard cannot see {path}; use password_credential with LoadCredential=, or "
            "ProtectHome=read-only"
        )
    if not write:
        return ""
    writable: list[str | PurePosixPath] = [*runtime_dirs, *API_TREES]
    writable += [absolute(p) for p in sandbox.read_write]
    if _under(path.parent, writable):
        return ""
    frozen = []
    if sandbox.protect_home == "read-only" and _under(path, (*HOME_TREES, home)):
        frozen.append("ProtectHome=read-only")
    if _under(path, SYSTEM_TREES.get(sandbox.protect_system, ())):
        frozen.append(f"ProtectSystem={sandbox.protect_system}")
    if _under(path, (absolute(p) for p in sandbox.read_only)):
        frozen.append("ReadOnlyPaths=")
    if not frozen:
        return ""
    return (
        f"{' and '.join(frozen)} make {path.parent} read-only for sugard under systemd, so "
        "it cannot create its socket there; leave socket unset (%t/sugard/sugard.sock, "
        "sugard.socket's), or add the directory to ReadWritePaths="
    )
