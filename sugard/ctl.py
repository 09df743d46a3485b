"""sugarctl: the tiny client of sugard. Standard library only; never imports the daemon.

stdout carries only the result, errors are one line on stderr, and the exit code says
what happened (see EPILOG), so scripts can branch on it.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import sys
import time
from typing import Any

from . import __version__
from .client import SugardClient, SugardError

EPILOG = """\
exit codes:
  0  ok
  2  usage error
  3  unknown instance
  4  daemon not reachable (start it: systemctl --user start sugard)
  5  token not available now (upstream down, or still logging in past --wait)
  6  instance needs attention (Sugar rejected credentials, client or platform)
  7  permission denied by the daemon

socket: --socket, else $SUGARD_SOCKET, else [daemon].socket of the config,
else $XDG_RUNTIME_DIR/sugard/sugard.sock, else /tmp/sugard-$UID/sugard.sock
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sugarctl",
        description="Get SugarCRM tokens from the sugard daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", help="the daemon's socket")
    parser.add_argument("--version", action="version", version=f"sugarctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("token", help="print the access token of an instance")
    p.add_argument("name")
    p.add_argument("--min-ttl", type=float, default=0, metavar="S",
                   help="the token must stay valid at least S seconds (else refresh first)")
    p.add_argument("--wait", type=float, default=None, metavar="S",
                   help="wait at most S seconds for a token (default 10)")
    p.add_argument("--format", choices=("bare", "header", "json", "env"), default="bare")

    p = sub.add_parser("header", help="print 'OAuth-Token: <token>'")
    p.add_argument("name")

    p = sub.add_parser("exec", help="run a command with SUGAR_URL, SUGAR_TOKEN and "
                       "SUGAR_DOWNLOAD_TOKEN set")
    p.add_argument("name")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")

    p = sub.add_parser("status", help="state of every instance (or one)")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("invalidate", help="report a token Sugar refused; print the one to use")
    p.add_argument("name")
    p.add_argument("token", nargs="?", help="the refused token (default: read from stdin)")

    p = sub.add_parser("refresh", help="force a refresh; print the new token")
    p.add_argument("name")

    sub.add_parser("reload", help="make the daemon re-read its config")
    sub.add_parser("ping", help="check that the daemon answers")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    client = SugardClient(args.socket)
    try:
        return _run(args, client, parser)
    except SugardError as exc:
        print(f"sugarctl: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


def _run(args: argparse.Namespace, client: SugardClient, parser: argparse.ArgumentParser) -> int:
    command = args.command
    if command == "token":
        _print_token(client.token(args.name, args.min_ttl, args.wait), args.format)
    elif command == "header":
        _print_token(client.token(args.name), "header")
    elif command == "exec":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if not argv:
            parser.error("exec needs a command: sugarctl exec NAME -- CMD ARGS...")
        token = client.token(args.name)
        client.close()
        env = dict(os.environ, **_token_env(token))
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            print(f"sugarctl: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
            return 127
    elif command == "status":
        data = client.status(args.name)
        rows = [data] if args.name else data
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            print(_table(rows))
    elif command == "invalidate":
        reported = args.token if args.token else sys.stdin.readline().strip()
        if not reported:
            parser.error("invalidate needs the refused token, as an argument or on stdin")
        _print_token(client.invalidate(args.name, reported), "bare")
    elif command == "refresh":
        _print_token(client.refresh(args.name), "bare")
    elif command == "reload":
        _print_reload(client)
    elif command == "ping":
        health = client.health()
        print(f"ok sugard {health.get('version', '?')} ({health.get('instances', 0)} instances)")
    return 0


def _token_env(token: dict[str, Any]) -> dict[str, str]:
    return {
        "SUGAR_URL": token["url"],
        "SUGAR_TOKEN": token["access_token"],
        "SUGAR_DOWNLOAD_TOKEN": token.get("download_token") or "",
    }


def _print_token(token: dict[str, Any], fmt: str) -> None:
    if fmt == "bare":
        print(token["access_token"])
    elif fmt == "header":
        print(f"OAuth-Token: {token['access_token']}")
    elif fmt == "json":
        print(json.dumps(token))
    elif fmt == "env":
        for key, value in _token_env(token).items():
            print(f"export {key}={_shell_quote(value)}")


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def _print_reload(client: SugardClient) -> None:
    diff = client.reload()
    parts = [f"{k}: {', '.join(v)}" for k, v in diff.items() if v and k != "unchanged"]
    print("; ".join(parts) if parts else f"no changes ({len(diff.get('unchanged', []))} unchanged)")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _seconds_from_now(stamp: str | None) -> float | None:
    if not stamp:
        return None
    then = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))
    return then - time.time()


def _expires_in(stamp: str | None) -> str:
    left = _seconds_from_now(stamp)
    if left is None:
        return "-"
    return _duration(left) if left > 0 else "expired"


def _ago(stamp: str | None) -> str:
    left = _seconds_from_now(stamp)
    return "never" if left is None else _duration(max(0.0, -left)) + " ago"


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("NAME", "STATE", "EXPIRES IN", "LAST REFRESH", "LAST ERROR")
    lines = [header]
    for row in rows:
        error = row.get("last_error") or {}
        lines.append(
            (
                row["name"],
                row["state"],
                _expires_in(row.get("expires_at")),
                _ago(row.get("last_refresh")),
                f"{error.get('kind', '')}: {error.get('message', '')}" if error else "-",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)) + "  " + line[-1]
        for line in lines
    )


if __name__ == "__main__":
    sys.exit(main())
