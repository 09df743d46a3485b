"""sugarctl: the tiny client of sugard. Standard library only; never imports the daemon.

stdout carries only the result, errors are one line on stderr (a refused reload adds the
config's problems, one per line), and the exit code says what happened (see HELP), so
scripts can branch on it.

Scripts run sugarctl once per call, so its start-up is most of its cost. It therefore parses
its few arguments itself rather than with argparse (which imports `re`, about as costly here
as starting the interpreter), and imports json and datetime only for the outputs that need
them. See sugard.client for the transport.
"""

from __future__ import annotations

import os
import sys

from . import __version__
from .client import BadRequest, NeedsAttention, SugardClient, SugardError, TokenUnavailable

TYPE_CHECKING = False  # typing costs an import; mypy treats this name as True
if TYPE_CHECKING:
    from typing import Any

HELP = """\
usage: sugarctl [--socket PATH] COMMAND [ARGS]

Get SugarCRM tokens from the sugard daemon.

commands:
  token NAME [--min-ttl S] [--wait S] [--format bare|header|json|env]
                 print the access token of instance NAME (bare by default); json: the
                 whole TOKEN object; env: export lines for SUGAR_URL, SUGAR_TOKEN,
                 SUGAR_DOWNLOAD_TOKEN
  header NAME [--min-ttl S] [--wait S]
                 print 'OAuth-Token: <token>'
  exec NAME [--min-ttl S] [--wait S] -- CMD [ARGS...]
                 run CMD with SUGAR_URL, SUGAR_TOKEN and SUGAR_DOWNLOAD_TOKEN set;
                 CMD's exit status becomes sugarctl's
  status [NAME] [--json]
                 state, expires in, last refresh and last error of each instance
  invalidate NAME [TOKEN]
                 report TOKEN (default, or -: read from stdin) as refused by Sugar (a 401);
                 print the token to use now
  refresh NAME   make sugard renew the session now; print the new token
  proxy-url NAME print the Sugar site URL to give an SDK: the instance's listen address,
                 else the socket form (how to reach it over the socket goes to stderr)
  reload         make sugard re-read its config; print what changed, or (exit 6) each
                 problem of the new config on a line of its own (the old config keeps running)
  ping           print 'ok' and the daemon's version

options:
  --socket PATH  the daemon's socket; else $SUGARD_SOCKET, else [daemon].socket of the
                 config ($SUGARD_CONFIG, else $XDG_CONFIG_HOME/sugard/config.toml), else
                 $XDG_RUNTIME_DIR/sugard/sugard.sock, else /tmp/sugard-$UID/sugard.sock
  --min-ttl S    the token must stay valid at least S more seconds (else sugard renews it)
  --wait S       wait at most S seconds for a token while sugard logs in (default 10,
                 at most 300)
  -h, --help     print this help;  --version  print sugarctl's version

exit codes:
  0    ok
  1    unexpected answer from the daemon (its log says more)
  2    usage error (the message says which argument)
  3    unknown instance (the message lists the configured ones)
  4    daemon not reachable (start it: systemctl --user start sugard, or sugard run)
  5    token not available now (Sugar down, or still logging in past --wait), or sugard
       is at its connection limit: retry later
  6    instance needs attention (Sugar rejected the credentials, client or platform, or a
       reload found errors in the config): fix the config, then sugarctl reload
  7    permission denied by the daemon, or no access to its socket
  exec: CMD's exit status; 126 if CMD cannot be run, 127 if it is not found

When Sugar answers 401 to a token, report it (sugarctl invalidate NAME TOKEN) and retry once
with the token printed. Never log in, refresh or log out from a script: that ends the shared
session for every other script.
"""

# command -> (required positionals, optional positionals, options it takes)
_COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], frozenset[str]]] = {
    "token": (("NAME",), (), frozenset({"--min-ttl", "--wait", "--format"})),
    "header": (("NAME",), (), frozenset({"--min-ttl", "--wait"})),
    "exec": (("NAME",), (), frozenset({"--min-ttl", "--wait"})),
    "status": ((), ("NAME",), frozenset({"--json"})),
    "invalidate": (("NAME",), ("TOKEN",), frozenset()),
    "refresh": (("NAME",), (), frozenset()),
    "proxy-url": (("NAME",), (), frozenset()),
    "reload": ((), (), frozenset()),
    "ping": ((), (), frozenset()),
}
_VALUED = frozenset({"--socket", "--min-ttl", "--wait", "--format"})
_FLAGS = frozenset({"--json"})
_FORMATS = ("bare", "header", "json", "env")


class _Usage(BadRequest):
    """A usage error: exit status 2, with a pointer to --help."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} (see: sugarctl --help)")


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

    def seconds(self, option: str) -> float | None:
        text = self.options.get(option)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not 0 <= value < float("inf"):
            raise _Usage(f"{option} must be a number of seconds, 0 or more, not {text!r}")
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
                if arg not in _COMMANDS:
                    raise _Usage(f"unknown command {arg!r}; commands: {', '.join(_COMMANDS)}")
                args.command = arg
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
            if option in _FLAGS:
                if eq:
                    raise _Usage(f"{option} takes no value")
                args.options[option] = ""
            elif option in _VALUED:
                if not eq:
                    following = next(rest, None)
                    if following is None:
                        raise _Usage(f"{option} needs a value")
                    value = following
                args.options[option] = value
            else:
                raise _Usage(f"unknown option {option!r}")
    if args.help or args.version:
        return args
    if not args.command:
        raise _Usage(f"missing COMMAND; one of: {', '.join(_COMMANDS)}")
    required, optional, takes = _COMMANDS[args.command]
    for option in args.options:
        if option != "--socket" and option not in takes:
            raise _Usage(f"{args.command} does not take {option}")
    if len(args.positionals) < len(required):
        missing = " ".join(required[len(args.positionals) :])
        raise _Usage(f"{args.command} needs {missing}")
    if len(args.positionals) > len(required) + len(optional):
        extra = args.positionals[len(required) + len(optional)]
        raise _Usage(f"{args.command} got an extra argument {extra!r}")
    if args.command == "exec" and not args.argv:
        raise _Usage("exec needs a command: sugarctl exec NAME -- CMD [ARGS...]")
    fmt = args.options.get("--format", "bare")
    if fmt not in _FORMATS:
        raise _Usage(f"--format must be one of {', '.join(_FORMATS)}, not {fmt!r}")
    args.seconds("--min-ttl")
    args.seconds("--wait")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
    except _Usage as exc:
        print(f"sugarctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    if args.help:
        print(HELP, end="")
        return 0
    if args.version:
        print(f"sugarctl {__version__}")
        return 0
    client = SugardClient(args.options.get("--socket"))
    try:
        return _run(args, client)
    except SugardError as exc:
        print(f"sugarctl: {_one_line(exc)}", file=sys.stderr)
        if isinstance(exc, NeedsAttention):
            # A refused reload: every problem on a line of its own, as `sugard check` prints
            # them, so a long list stays readable and each line can be grepped.
            for problem in exc.errors:
                print(problem, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our stdout went away (`sugarctl status | head -1`): not an error of
        # ours, and Python must not complain about it again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        client.close()


def _one_line(exc: SugardError) -> str:
    message = exc.message
    # `busy` says "try again in a moment" itself.
    busy = exc.body.get("error") == "busy"
    if isinstance(exc, TokenUnavailable) and exc.retry_after and not busy:
        message += f" (try again in {exc.retry_after:g} s)"
    if isinstance(exc, NeedsAttention) and exc.errors:
        message += ":"  # the problems follow, one per line
    return message


def _run(args: _Args, client: SugardClient) -> int:
    command, name = args.command, args.name
    min_ttl, wait = args.seconds("--min-ttl") or 0.0, args.seconds("--wait")
    if command == "token":
        _print_token(client.token(name or "", min_ttl, wait), args.options.get("--format", "bare"))
    elif command == "header":
        _print_token(client.token(name or "", min_ttl, wait), "header")
    elif command == "exec":
        return _exec(client.token(name or "", min_ttl, wait), args.argv, client)
    elif command == "status":
        data = client.status(name)
        if "--json" in args.options:
            import json

            print(json.dumps(data, indent=2))
        else:
            print(_table([data] if name else data))
    elif command == "invalidate":
        given = args.positionals[1] if len(args.positionals) > 1 else "-"
        reported = _token_from_stdin() if given == "-" else given
        _print_token(client.invalidate(name or "", reported), "bare")
    elif command == "refresh":
        _print_token(client.refresh(name or ""), "bare")
    elif command == "proxy-url":
        _print_proxy_url(client.proxy_urls(name or ""), client.socket_path)
    elif command == "reload":
        print(_reload_summary(client.reload()))
    elif command == "ping":
        health = client.health()
        count = health.get("instances", 0)
        plural = "" if count == 1 else "s"
        print(f"ok sugard {health.get('version', '?')} ({count} instance{plural})")
    return 0


def _print_proxy_url(urls: dict[str, Any], socket_path: str) -> None:
    if urls.get("listen_url"):
        print(urls["listen_url"])
        return
    print(urls["socket_url"])
    print(
        f"sugarctl: over the Unix socket, like: curl --unix-socket {socket_path} "
        f"{urls['socket_url']}/rest/v10/me",
        file=sys.stderr,
    )


def _token_from_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise _Usage("invalidate needs the refused token, as an argument or on stdin")
    reported = sys.stdin.readline().strip()
    if not reported:
        raise _Usage("invalidate read no token from stdin; pass the token Sugar refused")
    return reported


def _exec(token: dict[str, Any], argv: list[str], client: SugardClient) -> int:
    _check_token(token)
    client.close()  # CMD must not inherit our connection to the daemon
    env = {**os.environ, **_token_env(token)}
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
        print("\n".join(f"export {k}={_shell_quote(v)}" for k, v in _token_env(token).items()))


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _reload_summary(diff: dict[str, list[str]]) -> str:
    parts = [
        f"{key}: {', '.join(diff[key])}" for key in ("added", "removed", "changed") if diff.get(key)
    ]
    unchanged = len(diff.get("unchanged", []))
    return "; ".join(parts or ["no changes"]) + f" ({unchanged} unchanged)"


# The status table (`sugard demo` prints it too)


def _table(rows: list[dict[str, Any]]) -> str:
    import time

    now = time.time()
    header = ("NAME", "STATE", "EXPIRES IN", "LAST REFRESH", "LAST ERROR")
    lines = [header]
    for row in rows:
        error = row.get("last_error") or {}
        expires = _epoch(row.get("expires_at"))
        refreshed = _epoch(row.get("last_refresh"))
        if expires is None:
            expires_in = "-"
        else:
            expires_in = _duration(expires - now) if expires > now else "expired"
        last_error = f"{error.get('kind', '')}: {error.get('message', '')}" if error else "-"
        lines.append(
            (
                str(row.get("name", "?")),
                str(row.get("state", "?")),
                expires_in,
                "never" if refreshed is None else _duration(now - refreshed) + " ago",
                " ".join(last_error.split()),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in lines
    )


def _epoch(stamp: str | None) -> float | None:
    """An RFC 3339 UTC time from the daemon, as epoch seconds."""
    if not stamp:
        return None
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


if __name__ == "__main__":
    sys.exit(main())
