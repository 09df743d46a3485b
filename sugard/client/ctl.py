"""sugarctl: the tiny client of sugard. Standard library only; never imports the daemon.

stdout carries only the result, errors are one line on stderr (a refused reload adds the
config's problems, one per line), and the exit code says what happened (see
sugard.client.help), so scripts can branch on it.

Scripts run sugarctl once per call, so its start-up is most of its cost. It therefore parses
its few arguments itself rather than with argparse (which imports `re`, about as costly here
as starting the interpreter), and imports json and datetime only for the outputs that need
them; help texts (sugard.client.help), the status table (sugard.client.status), completion scripts
(sugard.client.completion), the commands about the daemon itself (sugard.client.commands) and the
words for what went wrong (sugard.client.commands) only when asked for, and `api`
(sugard.client.api) only when it runs. See sugard.client for the transport.
"""

from __future__ import annotations

import os
import sys

from sugard import __version__
from sugard.client import BadRequest, SugardClient, SugardError
from sugard.wire import (
    EXIT_ATTENTION,
    EXIT_INTERRUPTED,
    EXIT_UNEXPECTED,
    MAX_MIN_TTL,
    MAX_WAIT,
    sudo_user_problem,
)

TYPE_CHECKING = False  # typing costs an import; mypy treats this name as True
if TYPE_CHECKING:
    from typing import Any

# command -> (required positionals, optional positionals, options it takes); the help of
# each is in sugard.client.help, in this order.
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], frozenset[str]]] = {
    "token": (
        ("NAME",),
        (),
        frozenset({"--min-ttl", "--wait", "--format", "--fingerprint", "--as"}),
    ),
    "header": (("NAME",), (), frozenset({"--min-ttl", "--wait", "--as"})),
    "exec": (("NAME",), (), frozenset({"--min-ttl", "--wait", "--proxy", "--as"})),
    "api": (
        ("NAME",),
        ("PATH",),
        frozenset({"-X", "-f", "-F", "-H", "-o", "-i", "--input", "--paginate", "--as"}),
    ),
    "status": ((), ("NAME",), frozenset({"--json", "--names", "--wait"})),
    "invalidate": (("NAME",), ("TOKEN",), frozenset({"--as"})),
    "refresh": (("NAME",), (), frozenset({"--retry-rejected", "--as"})),
    "revoke": (("NAME",), (), frozenset()),
    "proxy-url": (("NAME",), (), frozenset()),
    "clients": (("NAME",), (), frozenset({"--json"})),
    "reload": ((), (), frozenset()),
    "shutdown": ((), (), frozenset({"--wait"})),
    "env": ((), (), frozenset({"--shell"})),
    "ping": ((), (), frozenset()),
    "help": ((), ("COMMAND",), frozenset()),
    "completion": (("SHELL",), (), frozenset()),
}
VALUED = frozenset({"--socket", "--min-ttl", "--wait", "--format", "--shell", "--as"})
FLAGS = frozenset({"--json", "--names", "--fingerprint", "--retry-rejected", "--proxy"})
# `api` parses its own arguments (repeated and short options: sugard.client.api); these are
# its options that take a value, for shell completion.
API_VALUED = frozenset({"-X", "-f", "-F", "-H", "-o", "--input", "--as"})
# The values an option or positional may take: checked here, offered by shell completion.
CHOICES: dict[str, tuple[str, ...]] = {
    "--format": ("bare", "header", "json", "env"),
    "--shell": ("sh", "bash", "zsh", "fish"),
    "SHELL": ("bash", "zsh", "fish"),
    "COMMAND": tuple(COMMANDS),
}


class _Usage(BadRequest):
    """A usage error: exit status 2, with a pointer to the help."""

    def __init__(self, message: str, command: str = "") -> None:
        where = f"sugarctl help {command}" if command else "sugarctl --help"
        super().__init__(f"{message} (see: {where})")


class _Args:
    """What the command line asks for."""

    def __init__(self) -> None:
        self.command = ""
        self.positionals: list[str] = []
        self.options: dict[str, str] = {}
        self.argv: list[str] = []  # exec's CMD [ARGS...]
        self.help = self.version = False

    @property
    def name(self) -> str | None:
        return self.positionals[0] if self.positionals else None

    @property
    def as_user(self) -> str | None:
        """`--as USER`: a token of that user (Sugar's sudo) instead of the instance's own."""
        return self.options.get("--as")

    def seconds(self, option: str, high: float = MAX_WAIT) -> float | None:
        text = self.options.get(option)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value <= high:  # also refuses NaN
            raise _Usage(
                f"{option} must be a number of seconds from 0 to {high:g}, not {text!r}",
                self.command,
            )
        return value


def parse(argv: list[str]) -> _Args:
    """The command line as _Args; raises _Usage with a one-line message."""
    args = _Args()
    rest = iter(argv)
    only_positionals = False
    for arg in rest:
        if (
            args.command == "exec"
            and args.positionals
            and (only_positionals or arg == "--" or not arg.startswith("-"))
        ):
            # Everything from CMD on is CMD's, even what looks like sugarctl's options.
            args.argv = list(rest) if arg == "--" and not only_positionals else [arg, *rest]
            break
        if only_positionals or not arg.startswith("-") or arg == "-":
            if not args.command:
                if arg not in COMMANDS:
                    raise _Usage(f"unknown command {arg!r}; commands: {', '.join(COMMANDS)}")
                args.command = arg
                if arg == "api":
                    args.argv = list(rest)  # sugard.client.api reads them
                    break
            else:
                args.positionals.append(arg)
        elif arg == "--":
            only_positionals = True
        elif arg in ("-h", "--help"):
            args.help = True
        elif arg == "--version":
            args.version = True
        else:
            option, eq, value = arg.partition("=")
            if option in FLAGS:
                if eq:
                    raise _Usage(f"{option} takes no value", args.command)
                args.options[option] = ""
            elif option in VALUED:
                if not eq:
                    following = next(rest, None)
                    if following is None:
                        raise _Usage(f"{option} needs a value", args.command)
                    value = following
                args.options[option] = value
            else:
                raise _Usage(f"unknown option {option!r}", args.command)
    if args.help or args.version:
        return args
    if not args.command:
        raise _Usage(f"missing COMMAND; one of: {', '.join(COMMANDS)}")
    if args.command != "api":
        _check(args)
    return args


def _check(args: _Args) -> None:
    """What parse() cannot see word by word: counts, combinations and values."""
    command = args.command
    required, optional, takes = COMMANDS[command]
    for option in args.options:
        if option != "--socket" and option not in takes:
            raise _Usage(f"{command} does not take {option}", command)
    if len(args.positionals) < len(required):
        missing = " ".join(required[len(args.positionals) :])
        raise _Usage(f"{command} needs {missing}", command)
    if len(args.positionals) > len(required) + len(optional):
        extra = args.positionals[len(required) + len(optional)]
        raise _Usage(f"{command} got an extra argument {extra!r}", command)
    if command == "exec" and not args.argv:
        raise _Usage("exec needs a command: sugarctl exec NAME -- CMD [ARGS...]", command)
    given = [*args.options.items(), *zip(required + optional, args.positionals, strict=False)]
    for key, value in given:
        allowed = CHOICES.get(key)
        if allowed is not None and value not in allowed:
            raise _Usage(f"{key} must be one of {', '.join(allowed)}, not {value!r}", command)
    if "--fingerprint" in args.options and "--format" in args.options:
        raise _Usage("--fingerprint prints only the fingerprint: leave out --format", command)
    if "--proxy" in args.options and ("--min-ttl" in args.options or "--wait" in args.options):
        raise _Usage("--proxy hands CMD no token: leave out --min-ttl and --wait", command)
    if "--names" in args.options and ("--json" in args.options or args.positionals):
        raise _Usage("--names prints only the names: leave out --json and NAME", command)
    user = args.options.get("--as")
    if user is not None:
        problem = sudo_user_problem(user)
        if problem is not None:
            raise _Usage(f"--as: {problem}", command)
        if "--retry-rejected" in args.options:
            raise _Usage(
                "--retry-rejected is about the instance's own password: leave it out with --as",
                command,
            )
    args.seconds("--min-ttl", MAX_MIN_TTL)
    args.seconds("--wait")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except _Usage as exc:
        print(f"sugarctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    if args.help or args.command == "help":
        from sugard.client.help import command_help, general_help

        topic = args.command if args.help else (args.name or "")
        print(command_help(topic) if topic else general_help(tuple(COMMANDS)), end="")
        return 0
    if args.version:
        print(f"sugarctl {__version__}")
        return 0
    if args.command == "completion":
        from sugard.client.completion import script

        print(script(args.name or ""), end="")
        return 0
    if args.command == "api":
        from sugard.client.api import main as api

        return api(args.argv, args.options.get("--socket"))
    client = SugardClient(args.options.get("--socket"))
    try:
        return _run(args, client)
    except SugardError as exc:
        from sugard.client.commands import report

        return report(exc, args.command, args.options.get("--wait"))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return stdout_gone()
    finally:
        client.close()


def stdout_gone() -> int:
    """Whoever read our stdout went away (`sugarctl status | head -1`): not an error of ours,
    and Python must not complain about it again when it flushes at exit; the exit code."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_UNEXPECTED


def _run(args: _Args, client: SugardClient) -> int:
    command, name = args.command, args.name
    if command == "exec" and "--proxy" in args.options:
        from sugard.client.commands import proxy_environment

        return _exec(proxy_environment(client, name or ""), args.argv, client)
    if command in ("token", "header", "exec"):
        token = _token(client, args)
        if command == "exec":
            _check_token(token)
            return _exec(_token_env(token), args.argv, client)
        if "--fingerprint" in args.options:
            _check_token(token)
            print(_fingerprint(token["access_token"]))
        else:
            _print_token(
                token, args.options.get("--format", "bare") if command == "token" else "header"
            )
    elif command == "status":
        from sugard.client.status import status

        return status(client, args.name, args.options, args.seconds("--wait"))
    elif command == "invalidate":
        given = args.positionals[1] if len(args.positionals) > 1 else "-"
        reported = _token_from_stdin() if given == "-" else given
        _print_token(client.invalidate(name or "", reported, as_user=args.as_user), "bare")
    elif command == "refresh":
        retry = "--retry-rejected" in args.options
        _print_token(client.refresh(name or "", retry_rejected=retry, as_user=args.as_user), "bare")
    elif command == "revoke":
        _print_token(client.revoke(name or ""), "bare")
    elif command == "proxy-url":
        from sugard.client.commands import print_proxy_url

        print_proxy_url(client.proxy_urls(name or ""), client.socket_path)
    elif command == "clients":
        from sugard.client.clients import clients

        clients(client, name or "", "--json" in args.options)
    elif command == "reload":
        diff = client.reload()
        print(_reload_summary(diff))
        if diff.get("restart_needed"):
            print(
                f"sugarctl: {', '.join(diff['restart_needed'])} changed: takes effect when "
                "sugard restarts (systemctl --user restart sugard, or stop and start it)",
                file=sys.stderr,
            )
        # Applied, but these instances stay failed until a person acts (exit 6).
        for message in (diff.get("needs_attention") or {}).values():
            print(f"sugarctl: {message}", file=sys.stderr)
        return EXIT_ATTENTION if diff.get("needs_attention") else 0
    elif command == "shutdown":
        from sugard.client.commands import shutdown

        shutdown(client, args.seconds("--wait"))
    elif command == "env":
        from sugard.client.commands import env

        env(client, args.options.get("--shell"))
    elif command == "ping":
        health = client.health()
        count = health.get("instances", 0)
        plural = "" if count == 1 else "s"
        print(f"ok sugard {health.get('version', '?')} ({count} instance{plural})")
    return 0


def _token(client: SugardClient, args: _Args) -> dict[str, Any]:
    """The token the command line asks for; says on stderr when --min-ttl was not met."""
    min_ttl = args.seconds("--min-ttl", MAX_MIN_TTL) or 0.0
    token, lifetime = client.token_answer(
        args.name or "", min_ttl, args.seconds("--wait"), as_user=args.as_user
    )
    left = token.get("expires_in")
    if min_ttl and isinstance(left, int | float) and left < min_ttl:
        from sugard.client.commands import min_ttl_unmet

        print(f"sugarctl: {min_ttl_unmet(min_ttl, left, lifetime, args.name)}", file=sys.stderr)
    return token


def _fingerprint(token: str) -> str:
    """The name sugard's log gives a token: computed as sugard.secret.fingerprint does (the
    first 8 hex digits of its SHA-256), here, because sugarctl never imports the daemon."""
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()[:8]


def _token_from_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise _Usage("invalidate needs the refused token, as an argument or on stdin")
    reported = sys.stdin.readline().strip()
    if not reported:
        raise _Usage("invalidate read no token from stdin; pass the token Sugar refused")
    return reported


def _exec(variables: dict[str, str], argv: list[str], client: SugardClient) -> int:
    """Run CMD in place of sugarctl, with `variables` (SUGAR_URL and what goes with it)."""
    client.close()  # CMD must not inherit our connection to the daemon
    # A token in our own environment is not CMD's: it gets those of `variables`, or none.
    env = {k: v for k, v in os.environ.items() if k not in ("SUGAR_TOKEN", "SUGAR_DOWNLOAD_TOKEN")}
    env.update(variables)
    sys.stdout.flush()
    try:
        # exec, not a child process: CMD gets our pid, signals and stdio, and its exit
        # status is ours with nothing in between to relay it.
        os.execvpe(argv[0], argv, env)  # noqa: S606 - running CMD is the point
    except FileNotFoundError:
        print(f"sugarctl: {argv[0]}: command not found", file=sys.stderr)
        return 127
    except OSError as exc:
        print(f"sugarctl: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 126


def _token_env(token: dict[str, Any]) -> dict[str, str]:
    return {
        "SUGAR_URL": str(token.get("url") or ""),
        "SUGAR_TOKEN": token["access_token"],
        "SUGAR_DOWNLOAD_TOKEN": str(token.get("download_token") or ""),
    }


def _check_token(token: dict[str, Any]) -> None:
    # Never exit 0 with empty output, whatever the daemon sent.
    if not isinstance(token.get("access_token"), str) or not token["access_token"]:
        raise SugardError("sugard answered without an access token; see its log")


def _print_token(token: dict[str, Any], fmt: str) -> None:
    _check_token(token)
    if fmt == "bare":
        print(token["access_token"])
    elif fmt == "header":
        print(f"OAuth-Token: {token['access_token']}")
    elif fmt == "json":
        import json

        print(json.dumps(token))
    else:
        print("\n".join(f"export {k}={shell_quote(v)}" for k, v in _token_env(token).items()))


def shell_quote(value: str) -> str:
    """`value` as one word to sh, bash and zsh (the env line of sugard.client.commands too)."""
    return "'" + value.replace("'", "'\"'\"'") + "'"


def fish_quote(value: str) -> str:
    """`value` as one word to fish: in its single quotes, backslash escapes a backslash or a
    quote (sugard.client.commands and sugard.client.completion)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _reload_summary(diff: dict[str, Any]) -> str:
    parts = [
        f"{key}: {', '.join(diff[key])}" for key in ("added", "removed", "changed") if diff.get(key)
    ]
    unchanged = len(diff.get("unchanged", []))
    return "; ".join(parts or ["no changes"]) + f" ({unchanged} unchanged)"


if __name__ == "__main__":
    sys.exit(main())
