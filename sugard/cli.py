"""`sugard`: run the daemon, check and write its config, or try it all with the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import tomllib
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, Problem, load_config
from .paths import default_config_path, default_socket_path

log = logging.getLogger("sugard")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sugard",
        description="Keep one live SugarCRM session per instance and serve its token to local "
        "scripts over a Unix socket.",
    )
    parser.add_argument("--version", action="version", version=f"sugard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "-c",
            "--config",
            metavar="PATH",
            help="config file (default: $SUGARD_CONFIG, else $XDG_CONFIG_HOME/sugard/config.toml)",
        )

    p = sub.add_parser("run", help="run the daemon in the foreground")
    with_config(p)
    p.add_argument("--socket", metavar="PATH", help="socket to listen on")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    p = sub.add_parser(
        "check",
        help="validate the config, resolve every secret, check file modes",
        description="Validate the config, resolve every secret (never printing one) and check "
        "file modes. Each problem is printed as `file: table.key: message` with its fix. "
        "Exit status: 0 ok, 1 something to fix, 4 (--online) no daemon on the socket.",
    )
    with_config(p)
    p.add_argument(
        "--online",
        action="store_true",
        help="also reach the fleet's Redis, if [fleet] is set, and prove the key opens what is "
        "stored; and ask the RUNNING daemon for each instance's state. check never logs in to "
        "Sugar by itself: Sugar keeps one session per user and platform, so a login of its own "
        "would log the daemon out",
    )
    p.add_argument("--socket", metavar="PATH", help="the daemon's socket, for --online")
    p.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="S",
        help="with --online, how long to wait for instances still logging in (default: 10)",
    )

    p = sub.add_parser(
        "show-config",
        help="print the effective config, secrets redacted",
        description="Print the config as sugard uses it: [defaults] merged into each instance, "
        "defaults filled in, every secret shown as *** with where it comes from.",
    )
    with_config(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")

    p = sub.add_parser(
        "init",
        help="write a config (mode 0600), or --add an instance to one",
        description="Write a config: asks on a terminal, or takes everything from flags. The "
        "password goes to NAME.password (mode 0600) next to the config, never into it.",
    )
    with_config(p)
    from .init import add_init_arguments

    add_init_arguments(p)

    p = sub.add_parser("demo", help="run a fake SugarCRM and a daemon, and fetch a token")
    p.add_argument("--once", action="store_true", help="exit after the first token")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check":
            return _check(args)
        if args.command == "show-config":
            return _show_config(args)
        if args.command == "init":
            from .init import run_init

            return run_init(args, _config_path(args))
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(once=args.once)
    except KeyboardInterrupt:
        return 130
    return 2


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config).expanduser() if args.config else default_config_path()


def _load(args: argparse.Namespace, *, resolve: bool = True) -> Config | None:
    try:
        return load_config(_config_path(args), resolve=resolve)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _check(args: argparse.Namespace) -> int:
    from .config import audit_config, parse_config

    path = _config_path(args)
    problems: list[Problem] = []
    config: Config | None = None
    try:
        config = load_config(path)
    except ConfigError as exc:
        problems += exc.problems
        try:  # for the checks below, which need the file's shape but not its secrets
            config = parse_config(tomllib.loads(path.read_text("utf-8")), str(path))
        except (OSError, ValueError, ConfigError):
            config = None
    warnings: list[Problem] = []
    if config is not None:
        more, warnings = audit_config(config)
        problems += [p for p in more if p not in problems]
    for problem in problems + warnings:
        print(problem, file=sys.stderr)
    if config is not None and not problems:
        names = ", ".join(config.instances)
        print(f"{config.path}: ok ({len(config.instances)} instance(s): {names})")
    code = 1 if problems else 0
    if args.online and config is not None and config.fleet is not None and not problems:
        from .fleet import check_fleet_online  # Redis reached, the key proven on what is stored

        lines, fleet_problems = check_fleet_online(config)
        print("\n".join(lines))
        for problem in fleet_problems:
            print(problem, file=sys.stderr)
        code = code or (1 if fleet_problems else 0)
    if args.online and config is not None:
        online = _check_online(config, args.socket, args.wait)
        code = code or online
    return code


_SETTLING = ("starting", "logging_in")


def _check_online(config: Config, socket: str | None, wait: float) -> int:
    """Ask the running daemon how each instance is doing; never talk to Sugar from here."""
    from .client import SugardClient, SugardError

    path = socket_path_for(config, socket)
    deadline = time.monotonic() + wait
    try:
        with SugardClient(path, timeout=10) as client:
            while True:
                states = {s["name"]: s for s in client.status()}
                settling = [
                    n for n in config.instances if states.get(n, {}).get("state") in _SETTLING
                ]
                if not settling or time.monotonic() >= deadline:
                    break
                time.sleep(0.2)
    except SugardError as exc:
        print(f"sugard check: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(f"the running daemon on {path}:")
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
        if state in _SETTLING:
            message = f"still {state} after {wait:g} s{why}; see: sugarctl status"
        elif state == "failed":
            message = f"the daemon needs you to fix something (failed){why}"
        else:
            message = f"the daemon has no token now ({state}){why}"
        problems.append(Problem(config.path, where, message))
    others = sorted(set(states) - set(config.instances))
    if others:
        print(f"  also served, not in {config.path}: {', '.join(others)}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def _show_config(args: argparse.Namespace) -> int:
    from .config import effective_config

    config = _load(args, resolve=False)
    if config is None:
        return 1
    data = effective_config(config)
    data["daemon"].setdefault("socket", str(socket_path_for(config, None)))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        import tomli_w

        print(
            f"# {config.path} as sugard uses it: [defaults] merged into each instance;\n"
            "# secrets shown as *** with where they come from. Not a config to copy.\n"
        )
        print(tomli_w.dumps(data), end="")
    return 0


def socket_path_for(config: Config, explicit: str | None) -> Path:
    """`--socket` > `$SUGARD_SOCKET` > `[daemon].socket` > the runtime default."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("SUGARD_SOCKET"):
        return Path(os.environ["SUGARD_SOCKET"]).expanduser()
    if config.daemon.socket:
        return Path(config.daemon.socket).expanduser()
    return default_socket_path()


def _run(args: argparse.Namespace) -> int:
    from .daemon import Daemon, SocketError, adopt_socket
    from .systemd import Notifier, listen_fds, setup_logging

    # Read (and remove) systemd's variables first, so no child process ever sees them.
    notifier = Notifier.from_environ()
    try:
        passed = listen_fds()
    except ValueError as exc:
        print(f"sugard: socket activation: {exc}", file=sys.stderr)
        return 1
    config = _load(args)
    if config is None:
        notifier.status("cannot start: the config has errors (see the log, or run sugard check)")
        return 1
    setup_logging(args.log_level or config.daemon.log_level)
    socket_path = socket_path_for(config, args.socket)
    listen = None
    try:
        if passed:
            listen = adopt_socket(passed)
            inherited = listen.getsockname()
            if isinstance(inherited, str) and inherited:
                if Path(inherited) != socket_path:
                    log.info(
                        "listening on %s, passed in by systemd, not on %s", inherited, socket_path
                    )
                socket_path = Path(inherited)
        daemon = Daemon(
            config,
            socket_path,
            listen_socket=listen,
            notifier=notifier,
            apply_log_level=args.log_level is None,
        )
        asyncio.run(daemon.serve())
    except SocketError as exc:
        print(f"sugard: {exc}", file=sys.stderr)
        notifier.status(f"cannot start: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
