"""`sugard`: run the daemon, check and write its config, or try it all with the demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .config import Config, ConfigError, load_config
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
            "-c", "--config", metavar="PATH",
            help="config file (default: $SUGARD_CONFIG, else "
            "$XDG_CONFIG_HOME/sugard/config.toml)",
        )

    p = sub.add_parser("run", help="run the daemon in the foreground")
    with_config(p)
    p.add_argument("--socket", metavar="PATH", help="socket to listen on")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    p = sub.add_parser("check", help="validate the config and resolve every secret")
    with_config(p)

    p = sub.add_parser("show-config", help="print the effective config, secrets redacted")
    with_config(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")

    p = sub.add_parser("init", help="write a starter config (mode 0600)")
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
    config = _load(args)
    if config is None:
        return 1
    names = ", ".join(config.instances)
    print(f"{config.path}: ok ({len(config.instances)} instance(s): {names})")
    return 0


def _show_config(args: argparse.Namespace) -> int:
    from .config import effective_config

    config = _load(args, resolve=False)
    if config is None:
        return 1
    data = effective_config(config)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        import tomli_w

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
    from .daemon import Daemon, SocketError
    from .logs import setup_logging

    config = _load(args)
    if config is None:
        return 1
    setup_logging(args.log_level or config.daemon.log_level)
    daemon = Daemon(config, socket_path_for(config, args.socket))
    try:
        asyncio.run(daemon.serve())
    except SocketError as exc:
        print(f"sugard: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
