"""`sugard`: run the daemon, check and write its config, or try it all with the demo.

Only the parser and the calls: each command's work is in its module (`run`, `check`,
`init`, `demo`), loaded when that command runs."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from sugard import __version__, wire
from sugard.config import Config
from sugard.wire import SOCKET_ORDER

EXIT_USAGE = "2 usage error (the message names the argument); 130 interrupted (Ctrl-C)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sugard",
        description="Keep one live SugarCRM session per instance and serve its token to local "
        "scripts over a Unix socket.",
        epilog="`sugard help COMMAND` (or `sugard COMMAND --help`) describes a command and its "
        f"options. Exit status: 0 ok; 1 failed (the message says why); {EXIT_USAGE}.",
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

    p = sub.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Run the daemon in the foreground (no forking: systemd, or you, supervise "
        "it). Logs go to stderr. SIGTERM, SIGINT and `sugarctl shutdown` stop it (requests in "
        "flight finish first; a second signal exits at once); SIGHUP and `sugarctl reload` "
        "reload the config.",
        epilog="Exit status: 0 stopped; 1 the config has errors (`sugard check` lists them), "
        f"the socket cannot be set up, or a second signal cut the stop short; {EXIT_USAGE}.",
    )
    with_config(p)
    p.add_argument(
        "--socket", metavar="PATH", help=f"socket to listen on: --socket, else {SOCKET_ORDER}"
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log level (default: [daemon].log_level of the config, else info; with this "
        "option, a reload does not change it)",
    )

    p = sub.add_parser(
        "check",
        help="validate the config, resolve every secret, check file modes",
        description="Validate the config, resolve every secret (never printing one) and check "
        "file modes. Each problem is printed as `file: table.key: message` with its fix.",
        epilog="Exit status: 0 ok; 1 something to fix; 4 (--online) no daemon on the socket; "
        f"7 (--online) no access to it; {EXIT_USAGE}.",
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
    p.add_argument(
        "--login",
        action="store_true",
        help="test each secret with one password login (then a logout), but only for "
        "instances whose session no daemon on the socket holds: a login on that user and "
        "platform would log the daemon out. A wrong password may count as a failed login",
    )
    p.add_argument(
        "--unit",
        metavar="FILE",
        help="warn about paths the sandbox of this systemd unit hides or makes read-only "
        "(default: ~/.config/systemd/user/sugard.service with its drop-ins if installed, "
        "else the unit sugard ships; none: sugard does not run under systemd)",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help=f"the daemon's socket, for --online: --socket, else {SOCKET_ORDER}",
    )
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
        epilog=f"Exit status: 0 ok; 1 the config has errors; {EXIT_USAGE}.",
    )
    with_config(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of TOML")

    p = sub.add_parser(
        "init",
        # By hand: argparse does not wrap a group of alternatives, which made a line of 103.
        usage="sugard init [-h] [-c PATH] [--instance NAME | --add NAME] [--url URL]\n"
        "                   [--username USERNAME]\n"
        "                   [--password-stdin | --password-file F | --password-env VAR |\n"
        "                    --password-command CMD]\n"
        "                   [--platform PLATFORM] [--client-id CLIENT_ID]\n"
        "                   [--client-secret-file F | --client-secret-env VAR |\n"
        "                    --client-secret-command CMD]\n"
        "                   [--force] [--fleet-key FILE]",
        help="write a config (mode 0600), or --add an instance to one",
        description="Write a config: asks on a terminal, or takes everything from flags. The "
        "password goes to NAME.password (mode 0600) next to the config, never into it.",
        epilog="Exit status: 0 written; 1 nothing written (a file in the way, cancelled, or "
        f"cannot write: the message says which); {EXIT_USAGE}, nothing written.",
    )
    with_config(p)
    from sugard.cli.init import add_init_arguments

    add_init_arguments(p)

    p = sub.add_parser(
        "demo",
        help="run a fake SugarCRM and a daemon, and fetch a token",
        description="Start the bundled fake SugarCRM on 127.0.0.1 and a daemon on a temporary "
        "socket, fetch a token through the client, and print the status and commands to try.",
        epilog=f"Exit status: 0 ok; 1 the demo failed; {EXIT_USAGE}.",
    )
    p.add_argument(
        "--once", action="store_true", help="exit after the first token (default: run until Ctrl-C)"
    )

    # Its options are python -m sugard.testing's, parsed there: see main().
    sub.add_parser(
        "fake",
        help="run the bundled fake SugarCRM (as python -m sugard.testing)",
        add_help=False,
    )

    p = sub.add_parser(
        "help",
        help="describe a command",
        description="Print the help of COMMAND, or of sugard.",
        epilog=f"Exit status: 0 ok; {EXIT_USAGE}.",
    )
    p.add_argument(
        "topic",
        nargs="?",
        metavar="COMMAND",
        choices=sorted(sub.choices),
        help="the command to describe (default: sugard itself)",
    )
    return parser


FAKE = "sugard fake"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fake"] or argv[:2] == ["help", "fake"]:
        # The fake's own parser (python -m sugard.testing's), so both take the same options;
        # a pipx install has no `python -m sugard.testing` of the user's, but has this.
        from sugard.testing.__main__ import main as run_fake

        try:
            return run_fake(argv[1:] if argv[0] == "fake" else ["--help"], prog=FAKE)
        except SystemExit as exc:  # argparse's way to end after --help or a usage error
            return exc.code if isinstance(exc.code, int) else 0
        except KeyboardInterrupt:
            return 130
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "help":
        try:
            parser.parse_args([args.topic, "--help"] if args.topic else ["--help"])
        except SystemExit as exc:  # argparse's way to end after printing the help
            return exc.code if isinstance(exc.code, int) else 0
    path = Path(args.config).expanduser() if getattr(args, "config", None) else None
    config_path = path or Path(wire.default_config_path())
    try:
        if args.command == "run":
            from sugard.cli.run import run_daemon

            socket_for = partial(socket_path_for, explicit=args.socket)
            return run_daemon(config_path, path is not None, socket_for, args.log_level)
        if args.command == "check":
            from sugard.cli.check import check_command

            socket_for = partial(socket_path_for, explicit=args.socket)
            return check_command(
                config_path, socket_for, args.unit, args.online, args.login, args.wait
            )
        if args.command == "show-config":
            from sugard.cli.check import show_config

            socket_for = partial(socket_path_for, explicit=None)
            return show_config(config_path, path is not None, socket_for, as_json=args.json)
        if args.command == "init":
            from sugard.cli.init import run_init

            return run_init(args, config_path)
        if args.command == "demo":
            from sugard.cli.demo import run_demo

            return run_demo(once=args.once)
    except KeyboardInterrupt:
        return 130
    return 2


def socket_path_for(config: Config, explicit: str | None) -> Path:
    """`--socket` > `$SUGARD_SOCKET` > `[daemon].socket` > the runtime default."""
    return Path(wire.socket_path(explicit, lambda: config.daemon.socket))


if __name__ == "__main__":
    sys.exit(main())
