"""`sugard check`: every problem of a config in one pass; `--online`, what the running daemon
makes of it; `--login`, one test login per instance, only where no daemon holds its session.

A password login on a user's platform ends the session the daemon holds there (Sugar keeps one
session per user and platform), and one with a wrong password may count towards a lockout. So
check never logs in where a daemon holds the session, nor where the daemon's last login was
rejected (`sugarctl refresh` re-reads the password and sends it once only if it changed).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .client import DaemonUnreachable, SugardClient, SugardError
from .config import (
    Config,
    InstanceConfig,
    Problem,
    SecretRef,
    audit_config,
    read_config,
    session_identity,
)
from .sandbox import Sandbox, sandbox_warnings

__all__ = ["run_check"]

SETTLING = ("starting", "logging_in")


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
        from .fleet import check_fleet_online  # Redis reached, the key proven on what is stored

        lines, fleet_problems = check_fleet_online(config)
        print("\n".join(lines))
        for problem in fleet_problems:
            print(problem, file=sys.stderr)
        code = code or (1 if fleet_problems else 0)
    if online or login:
        code = _online(config, socket_for(config), wait, login) or code
    return code


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
    from .sugar import SugarClient, SugarError, new_http_session

    async with new_http_session() as http:
        client = SugarClient(instance, http)
        try:
            grant = await client.login()
        except SugarError as exc:
            return exc.message
        await client.logout(grant)
    return None
