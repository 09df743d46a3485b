"""`sugard check`: every problem of a config in one pass; `--online`, what the running daemon
makes of it; `--login`, one test login per instance, only where no daemon holds its session.
And `sugard show-config`, the config as sugard uses it.

A password login on a user's platform ends the session the daemon holds there (Sugar keeps one
session per user and platform), and one with a wrong password may count towards a lockout. So
check never logs in where a daemon holds the session, nor where the daemon's last login was
rejected (`sugarctl refresh` re-reads the password and sends it once only if it changed).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import ssl
import stat
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sugard.cli.sandbox import Sandbox, sandbox_warnings
from sugard.client import DaemonUnreachable, SugardClient, SugardError
from sugard.config import (
    Config,
    ConfigError,
    InstanceConfig,
    Problem,
    SecretRef,
    load_config,
    read_config,
    session_identity,
)
from sugard.config.show import effective_config
from sugard.config.sources import is_empty_inline
from sugard.sugar.outbound import UnusableCaFile, tls_context
from sugard.wire import SETTLING

__all__ = ["audit_config", "check_command", "load_reported", "run_check", "show_config"]


def run_check(
    path: Path,
    socket_for: Callable[[Config], Path],
    *,
    unit: Sandbox | None,
    online: bool,
    login: bool,
    wait: float,
) -> int:
    """Print every problem (stderr) and the verdict (stdout); the exit status of `sugard check`.
    `unit`: the systemd sandbox to hold the paths against (None: not run under systemd)."""
    config, problems = read_config(path)
    warnings: list[Problem] = []
    if config is not None:
        more, warnings = audit_config(config)
        problems += [p for p in more if p not in problems]
        warnings += sandbox_warnings(config, unit)
    for problem in problems + warnings:
        print(problem, file=sys.stderr)
    if config is None:
        return 1
    if not problems:
        names = ", ".join(config.instances)
        print(f"{config.path}: ok ({len(config.instances)} instance(s): {names})")
    code = 1 if problems else 0
    if login and problems:
        print("sugard check: no test login until the problems above are fixed", file=sys.stderr)
        login = False
    if online and config.fleet is not None and not problems:
        from sugard.fleet import (
            check_fleet_online,  # Redis reached, the key proven on what is stored
        )

        lines, fleet_problems = check_fleet_online(config)
        print("\n".join(lines))
        for problem in fleet_problems:
            print(problem, file=sys.stderr)
        code = code or (1 if fleet_problems else 0)
    if online or login:
        code = _online(config, socket_for(config), wait, login) or code
    return code


def check_command(
    path: Path,
    socket_for: Callable[[Config], Path],
    unit: str | None,
    online: bool,
    login: bool,
    wait: float,
) -> int:
    """`sugard check` with its options as given: `unit` is --unit (a file, `none`, or None
    for the installed unit)."""
    from sugard.cli.sandbox import installed_unit, parse_unit

    if unit == "none":
        sandbox = None
    elif unit:
        try:
            sandbox = parse_unit([Path(unit).read_text("utf-8", "replace")], unit)
        except OSError as exc:
            print(f"sugard check: --unit {unit}: {exc.strerror}", file=sys.stderr)
            return 2
    else:
        sandbox = installed_unit()
    return run_check(path, socket_for, unit=sandbox, online=online, login=login, wait=wait)


def load_reported(path: Path, explicit: bool, *, resolve: bool = True) -> Config | None:
    """The config at `path` for a command that uses it (run, show-config), or None after
    printing every problem. `explicit`: the path was given with -c."""
    if explicit and not path.exists():
        # The same -c for init, or it would write the default path instead.
        print(
            f"{path}: no such file; create one with `sugard init -c {shlex.quote(str(path))}`",
            file=sys.stderr,
        )
        return None
    try:
        return load_config(path, resolve=resolve)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def show_config(
    path: Path, explicit: bool, socket_for: Callable[[Config], Path], *, as_json: bool
) -> int:
    """`sugard show-config`: the config as sugard uses it, secrets as `***`."""
    config = load_reported(path, explicit, resolve=False)
    if config is None:
        return 1
    data = effective_config(config)
    data["daemon"].setdefault("socket", str(socket_for(config)))
    from sugard.sugar.outbound import route_for

    for name, instance in config.instances.items():
        # The way out as sugard would take it from here (this shell's HTTPS_PROXY, ...).
        data["instances"][name]["proxy"] = route_for(instance).describe()
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        import tomli_w

        print(
            f"# {config.path} as sugard uses it: [defaults] merged into each instance;\n"
            "# secrets shown as *** with where they come from. Not a config to copy.\n"
        )
        print(tomli_w.dumps(data), end="")
    return 0


def _online(config: Config, socket: Path, wait: float, login: bool) -> int:
    try:
        states = _daemon_states(config, socket, wait)
    except DaemonUnreachable as exc:
        if not login:
            print(f"sugard check: {exc.message}", file=sys.stderr)
            return exc.exit_code
        print(f"no daemon answers on {socket}: each instance is tested with a login of its own")
        states = None
    except SugardError as exc:
        print(f"sugard check: {exc.message}", file=sys.stderr)
        return exc.exit_code
    problems = [] if states is None else _compare(config, socket, states, wait)
    warnings: list[Problem] = []
    if login:
        _test_logins(config, states or {}, problems, warnings)
    for problem in problems + warnings:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _daemon_states(config: Config, socket: Path, wait: float) -> dict[str, dict[str, Any]]:
    """Each instance's STATUS from the daemon, once none of ours is still logging in."""
    deadline = time.monotonic() + wait
    with SugardClient(socket, timeout=10) as client:
        while True:
            states = {s["name"]: s for s in client.status()}
            settling = [n for n in config.instances if states.get(n, {}).get("state") in SETTLING]
            if not settling or time.monotonic() >= deadline:
                return states
            time.sleep(0.2)


def _compare(
    config: Config, socket: Path, states: Mapping[str, dict[str, Any]], wait: float
) -> list[Problem]:
    print(f"the running daemon on {socket}:")
    problems: list[Problem] = []
    for name, instance in config.instances.items():
        where = f"instances.{name}"
        status = states.get(name)
        if status is None:
            message = "the daemon does not serve it; load this config with: sugarctl reload"
            problems.append(Problem(config.path, where, message))
            continue
        differs = [
            f"{key} {status[key]!r}"
            for key in ("url", "username", "platform")
            if status.get(key) != getattr(instance, key)
        ]
        if differs:
            message = (
                f"the daemon uses {', '.join(differs)}: it runs another config, "
                "or this one is not loaded yet (sugarctl reload)"
            )
            problems.append(Problem(config.path, where, message))
        state = status.get("state")
        error = status.get("last_error") or {}
        why = f": {error['message']}" if error.get("message") else ""
        if state in ("ready", "refreshing"):
            print(f"  {name}: {state} (token expires {status.get('expires_at')})")
            continue
        if state in SETTLING:
            message = f"still {state} after {wait:g} s{why}; see: sugarctl status"
        elif state == "failed":
            message = f"the daemon needs you to fix something (failed){why}"
        else:
            message = f"the daemon has no token now ({state}){why}"
        problems.append(Problem(config.path, where, message))
    others = sorted(set(states) - set(config.instances))
    if others:
        print(f"  also served, not in {config.path}: {', '.join(others)}")
    return problems


def _holder(
    instance: InstanceConfig, states: Mapping[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """The daemon's instance (by whatever name) on the Sugar session of `instance`."""
    ours = session_identity(instance.url, instance.username, instance.platform)
    for status in states.values():
        theirs = (status.get(key) for key in ("url", "username", "platform"))
        if ours is not None and ours == session_identity(*theirs):
            return status
    return None


def _test_logins(
    config: Config,
    states: Mapping[str, dict[str, Any]],
    problems: list[Problem],
    warnings: list[Problem],
) -> None:
    for name, instance in config.instances.items():
        key = f"instances.{name}.password" + _suffix(instance.password)
        holder = _holder(instance, states)
        if holder is not None and holder.get("state") == "failed":
            warnings.append(
                Problem(
                    config.path,
                    key,
                    f"warning: not tested: the daemon's instance {holder['name']} failed on "
                    f"this session; `sugarctl refresh {holder['name']}` reads the password "
                    "again and tries it once if it changed (a rejected one is not sent again)",
                )
            )
        elif holder is not None:
            warnings.append(
                Problem(
                    config.path,
                    key,
                    f"warning: not tested: the daemon's instance {holder['name']} holds the "
                    f"session of {instance.username} on platform {instance.platform!r}, and a "
                    "test login would log it out; the daemon uses this password at its next "
                    "password login",
                )
            )
        else:
            failure = asyncio.run(_login_and_out(instance))
            if failure is None:
                print(
                    f"  {name}: logged in as {instance.username} on {instance.platform!r} and "
                    "out again: the password works"
                )
            else:
                problems.append(Problem(config.path, key, f"test login: {failure}"))


def _suffix(ref: SecretRef) -> str:
    return "" if ref.kind == "inline" else f"_{ref.kind}"


async def _login_and_out(instance: InstanceConfig) -> str | None:
    """One password login, then a logout that ends the new session at once; why it failed,
    or None."""
    from sugard.sugar import SugarClient, new_http_session
    from sugard.sugar.errors import UpstreamError

    async with new_http_session() as http:
        client = SugarClient(instance, http)
        try:
            grant = await client.login()
        except UpstreamError as exc:
            return exc.message
        await client.logout(grant)
    return None


BUILTIN_PLATFORMS = ("base", "mobile", "portal")


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def audit_config(config: Config) -> tuple[list[Problem], list[Problem]]:
    """What `sugard check` reports beyond what `load_config` refuses: (problems, warnings).

    The daemon starts despite these, so that a stricter check never breaks a running setup;
    `sugard check` makes them visible so they get fixed. Secrets are looked at, never shown.
    """
    problems: list[Problem] = []
    warnings: list[Problem] = []
    path = Path(config.path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0
    if mode & 0o022:
        problems.append(
            Problem(
                config.path,
                "",
                f"is writable by others (mode {mode:04o}): whoever can edit it can make sugard "
                f"run a password_command or send the password elsewhere; run: chmod 600 {path}",
            )
        )
    for name, instance in config.instances.items():
        where = f"instances.{name}"
        if instance.ca_file:
            message = _ca_file_problem(instance.ca_file)
            if message:
                problems.append(Problem(config.path, f"{where}.ca_file", message))
        secret = instance.client_secret
        if instance.client_id == "sugar" and secret.value and not is_empty_inline(secret):
            suffix = "" if secret.kind == "inline" else f"_{secret.kind}"
            problems.append(
                Problem(
                    config.path,
                    f"{where}.client_secret{suffix}",
                    "the built-in client 'sugar' has an empty secret and Sugar refuses any "
                    "other; remove the client secret, or set client_id to your own OAuth key",
                )
            )
        if instance.platform in BUILTIN_PLATFORMS:
            warnings.append(
                Problem(
                    config.path,
                    f"{where}.platform",
                    f"warning: {instance.platform!r} is one of Sugar's own platforms: each login "
                    f"of sugard logs {instance.username} out of it everywhere else (one session "
                    "per user and platform); register a platform for sugard, like sugard",
                )
            )
        if instance.sudo and instance.platform == "base":
            warnings.append(
                Problem(
                    config.path,
                    f"{where}.sudo",
                    "warning: sudo sessions use the instance's platform 'base': each token of "
                    "another user logs that user out of Sugar's web UI; give the instance a "
                    "platform of its own, like sugard",
                )
            )
        host = instance.url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if instance.url.startswith("http://") and host not in LOOPBACK_HOSTS:
            warnings.append(
                Problem(
                    config.path,
                    f"{where}.url",
                    "warning: http:// sends the password unencrypted; use https://",
                )
            )
        if not instance.verify_tls:
            warnings.append(
                Problem(
                    config.path,
                    f"{where}.verify_tls",
                    "warning: TLS verification is off, so anyone on the way can pose as the "
                    "site and read the password; set ca_file for a private CA instead",
                )
            )
    return problems, warnings


def _ca_file_problem(ca_file: str) -> str:
    """What is wrong with `ca_file`, judged by building the context as the daemon does."""
    try:
        tls_context(True, ca_file)
    except UnusableCaFile as exc:
        cause = exc.__cause__
        if isinstance(cause, FileNotFoundError):
            return (
                f"file {ca_file} does not exist; give the PEM file of the CA that signed the "
                "site's certificate"
            )
        if isinstance(cause, ssl.SSLError):
            return f"{ca_file} holds no usable PEM certificate; give the CA certificate in PEM form"
        strerror = cause.strerror if isinstance(cause, OSError) else str(exc)
        return f"cannot read {ca_file}: {strerror}"
    return ""
