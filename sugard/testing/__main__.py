"""`python -m sugard.testing`: a fake SugarCRM for trying sugard, or any script, by hand.

Prints exactly one line, the base URL, so a parent process can read it and wait for nothing
else; never prints a password. Runs until SIGINT or SIGTERM, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sugard.testing._versions import LATEST_VERSION, SUGAR_VERSIONS
from sugard.testing.fake import ADMIN_USER, DEFAULT_PLATFORMS, FakeSugar

# Sugar always accepts its built-in platforms; --platform adds custom ones next to them.
_BUILTIN_PLATFORMS = frozenset({"base", "mobile", "portal"})


def _pair(text: str) -> tuple[str, str]:
    name, sep, secret = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME:SECRET")
    return name, secret


def build_parser(prog: str = "python -m sugard.testing") -> argparse.ArgumentParser:
    """The command line; kept separate so tests and --help agree. `prog`: how it was run
    (`sugard fake` runs the same)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a fake SugarCRM (OAuth2, sudo, bulk, /me, /ping, records, filters, "
        "metadata, files, /sugar_version.json) until interrupted. What each Sugar version "
        "does differently: docs/sugarcrm.md; how to test a script against it: docs/testing.md.",
        epilog="Exit status: 0 stopped (SIGINT or SIGTERM); 1 cannot listen on the address; "
        "2 usage error (the message names the argument), or a --seed or user list it cannot "
        "use; 130 interrupted before it serves.",
    )
    parser.add_argument(
        "--sugar-version",
        choices=SUGAR_VERSIONS,
        default=LATEST_VERSION,
        metavar="V",
        help=f"the Sugar version to behave as: {', '.join(SUGAR_VERSIONS)} "
        f"(default {LATEST_VERSION})",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    parser.add_argument(
        "--user",
        action="append",
        type=_pair,
        metavar="NAME:PASSWORD",
        help="a user; repeatable (default: admin:admin-password)",
    )
    parser.add_argument(
        "--admin",
        action="append",
        metavar="NAME",
        help="a user with admin rights (may sudo); repeatable (default: admin)",
    )
    parser.add_argument(
        "--client",
        action="append",
        type=_pair,
        metavar="ID:SECRET",
        help="an OAuth2 client besides the built-in 'sugar' with an empty secret; repeatable",
    )
    parser.add_argument(
        "--platform",
        action="append",
        metavar="P",
        help="a custom platform to register besides base, mobile and portal; repeatable "
        f"(default: {', '.join(sorted(DEFAULT_PLATFORMS - _BUILTIN_PLATFORMS))})",
    )
    parser.add_argument("--access-lifetime", type=float, default=3600, metavar="S")
    parser.add_argument("--refresh-lifetime", type=float, default=1209600, metavar="S")
    parser.add_argument(
        "--eviction-grace",
        type=float,
        default=None,
        metavar="S",
        help="re-check sessions at most every S seconds, so rotated or evicted access tokens "
        "live on until then (default: the version's, 120 up to 13.0, 0 from 13.3)",
    )
    parser.add_argument("--max-session-lifetime", type=float, default=None, metavar="S")
    parser.add_argument("--lockout-after", type=int, default=None, metavar="N")
    parser.add_argument(
        "--idm",
        "--idm-mode",
        dest="idm_mode",
        action="store_true",
        help="IdM mode: SugarCloud with SugarIdentity (opaque single-use tokens, no eviction)",
    )
    parser.add_argument(
        "--accept-any-platform",
        action="store_true",
        help="accept unregistered platforms, as a site with the registry check off",
    )
    parser.add_argument(
        "--server-info-route",
        action="store_true",
        help="answer GET /rest/{v}/ServerInfo, which Sugar 12.0 and 13.3 do not (404 there)",
    )
    parser.add_argument(
        "--no-sugar-version-json",
        dest="sugar_version_json",
        action="store_false",
        help="do not serve /sugar_version.json at the site root (404), as some sites do not",
    )
    parser.add_argument(
        "--seed",
        type=Path,
        metavar="FILE",
        help='records to start with: a JSON object such as {"Accounts": [{"name": "Acme"}]}',
    )
    return parser


# The options handed to FakeSugar unchanged, under the same names.
PASSED_AS_GIVEN = (
    "sugar_version",
    "accept_any_platform",
    "server_info_route",
    "sugar_version_json",
    "access_lifetime",
    "refresh_lifetime",
    "eviction_grace",
    "max_session_lifetime",
    "idm_mode",
    "lockout_after",
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m sugard.testing") -> int:
    """Parse arguments, serve until SIGINT/SIGTERM; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    platforms = set(DEFAULT_PLATFORMS)
    if args.platform:
        platforms = set(_BUILTIN_PLATFORMS) | set(args.platform)
    try:
        records = _load_seed(args.seed) if args.seed else None
        fake = FakeSugar(
            users=dict(args.user) if args.user else {"admin": "admin-password"},
            clients={"sugar": ""} | dict(args.client or []),
            platforms=platforms,
            admins=set(args.admin) if args.admin else {ADMIN_USER},
            records=records,
            **{name: getattr(args, name) for name in PASSED_AS_GIVEN},
        )
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(fake, args.host, args.port))
    except OSError as exc:
        print(f"{prog}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _load_seed(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read --seed {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"--seed {path} is not valid JSON: {exc}") from None


async def _serve(fake: FakeSugar, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await fake.start(host, port)
    try:
        print(fake.url, flush=True)
        await stop.wait()
    finally:
        await fake.close()


if __name__ == "__main__":
    sys.exit(main())
