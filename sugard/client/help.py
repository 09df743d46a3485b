"""The help texts of `sugarctl`: `sugarctl help [COMMAND]`, `--help`, `COMMAND --help`.

Kept out of sugard.client.ctl, which imports this only to print help: scripts run `sugarctl token`
thousands of times, and every line they never read would be loaded each time.
tests/unit/cli/test_help.py checks that every command and every option of sugarctl's parser
(sugard.client.ctl.COMMANDS) is described here.
"""

from __future__ import annotations

import textwrap

from sugard.wire import (
    EXIT_ATTENTION,
    EXIT_DENIED,
    EXIT_INTERRUPTED,
    EXIT_SUGAR,
    EXIT_UNAVAILABLE,
    EXIT_UNEXPECTED,
    EXIT_UNKNOWN,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    SOCKET_ORDER,
)

__all__ = [
    "EXIT_CODES",
    "command_help",
    "described_options",
    "general_help",
    "long_option",
    "option_summary",
    "summary",
]

WIDTH = 79
EXIT_CODES = {
    0: "ok",
    EXIT_UNEXPECTED: "unexpected answer from the daemon (its log says more)",
    EXIT_USAGE: "usage error (the message says which argument); shutdown: systemd runs this sugard",
    EXIT_UNKNOWN: "unknown instance (the message lists the configured ones)",
    EXIT_UNREACHABLE: "daemon not reachable (start it: systemctl --user start sugard, or "
    "sugard run)",
    EXIT_UNAVAILABLE: "token not available now (Sugar down, or still logging in past --wait), "
    "or sugard is at its connection limit: retry later",
    EXIT_ATTENTION: "instance needs attention (Sugar rejected the credentials, client or "
    "platform, or a reload found errors in the config): fix the config, then sugarctl reload",
    EXIT_DENIED: "permission denied by the daemon, or no access to its socket",
    EXIT_SUGAR: "api: Sugar answered an HTTP status of 400 or more (its body on stdout, the "
    "status and Sugar's error on stderr)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

_MIN_TTL = (
    "--min-ttl S",
    "the token must stay valid at least S more seconds: sugard renews it first if needed "
    "(up to 90% of the lifetime Sugar gives tokens; asking more is said on stderr)",
)
_WAIT = (
    "--wait S",
    "wait at most S seconds for a token while sugard logs in (default 10, at most 300; "
    "0: answer at once)",
)
_AS = (
    "--as USER",
    "a token of Sugar user USER instead, by Sugar's sudo with the instance's admin session: "
    "the instance's `sudo` list must name USER (else exit 7, with no call to Sugar); Sugar "
    "refusing it (not an admin, no such user) exits 6, and it is not asked again until the "
    "config changes or `sugarctl refresh NAME --as USER`",
)
_SOCKET = ("--socket PATH", f"the daemon's socket (may come anywhere); without it {SOCKET_ORDER}")
_HELP = ("-h, --help", "print this help")

# command: (usage, summary, what it does, options, exit codes beyond 0 and 130)
_COMMANDS: dict[str, tuple[str, str, str, list[tuple[str, str]], str]] = {
    "token": (
        "token NAME [--as USER] [--min-ttl S] [--wait S] [--format bare|header|json|env] "
        "[--fingerprint]",
        "print the access token of instance NAME",
        "Print the access token of instance NAME, and nothing else.",
        [
            _AS,
            _MIN_TTL,
            _WAIT,
            (
                "--format F",
                "bare: the token (the default); header: 'OAuth-Token: <token>'; json: the "
                "whole TOKEN object; env: export lines for SUGAR_URL, SUGAR_TOKEN and "
                "SUGAR_DOWNLOAD_TOKEN, for eval",
            ),
            (
                "--fingerprint",
                "print the token's fingerprint instead (8 hex digits: the name sugard's log "
                "and `sugarctl status NAME` give it), to match a log line to a token",
            ),
        ],
        "2, 3, 4, 5, 6, 7",
    ),
    "header": (
        "header NAME [--as USER] [--min-ttl S] [--wait S]",
        "print 'OAuth-Token: <token>'",
        "Print 'OAuth-Token: <token>', for curl -H \"$(sugarctl header NAME)\".",
        [_AS, _MIN_TTL, _WAIT],
        "2, 3, 4, 5, 6, 7",
    ),
    "exec": (
        "exec NAME [--as USER] [--min-ttl S] [--wait S] [--proxy] [--] CMD [ARGS...]",
        "run CMD with the token in its environment",
        "Run CMD in place of sugarctl with SUGAR_URL, SUGAR_TOKEN and SUGAR_DOWNLOAD_TOKEN in "
        "its environment. Everything from CMD on is CMD's, even words that look like "
        "sugarctl's options. CMD's exit status becomes sugarctl's.",
        [
            _AS,
            _MIN_TTL,
            _WAIT,
            (
                "--proxy",
                "SUGAR_URL is the instance's loopback listener (its `listen` key) and CMD gets no "
                "token at all: every call goes through sugard, which keeps it valid however long "
                "CMD runs",
            ),
        ],
        "before CMD runs 2 (also: --proxy for an instance without listen), 3, 4, 5, 6, 7; "
        "126 CMD cannot be run, 127 CMD not found",
    ),
    "api": (
        "api NAME [PATH] [--as USER] [-X METHOD] [-f KEY=VALUE]... [-F KEY=JSON]... "
        "[--input FILE|-] [--paginate] [-o FILE] [-i] [-H 'Name: value']...",
        "call Sugar's REST API through sugard",
        "Call Sugar's REST API through sugard's proxy: sugard adds the token (it never reaches "
        "sugarctl), renews and replays once if Sugar refuses it. PATH is relative to the "
        "instance's REST root and its api_version (default v10): Accounts, Accounts/ID, "
        "Notes/ID/file/filename; without PATH: me. v11_20/Accounts or /rest/v11_20/Accounts "
        "choose another version. Without -X: GET, or POST with fields or --input (not with "
        "--paginate). stdout "
        "carries Sugar's body whatever the status (JSON pretty on a terminal, as sent "
        "otherwise).\n"
        "Examples:\n"
        '  sugarctl api prod Accounts/filter -F \'filter=[{"name":{"$starts":"A"}}]\'\n'
        "  sugarctl api prod Accounts -f name=Acme -F employees=12    # create\n"
        "  sugarctl api prod Accounts/ID -X PUT -f industry=Retail    # update\n"
        "  sugarctl api prod Notes/ID/file/filename -o report.pdf     # download\n"
        "  sugarctl api prod Notes/ID/file/filename -X PUT --input a.pdf  # upload\n"
        "  sugarctl api prod Accounts --paginate -f max_num=200 | jq -r .name",
        [
            ("-X, --method M", "the HTTP method (GET, POST, PUT, DELETE...)"),
            (
                "-f, --raw-field K=V",
                "a string field: in the query string for GET and DELETE (and with --input), "
                "else a key of the JSON object sent as the body",
            ),
            (
                "-F, --field K=JSON",
                "a field of JSON type, as -f: -F employees=12 -F active=true -F 'tags=[\"a\"]' "
                "(in a query string a list or object goes as key[0]=..., as PHP reads it)",
            ),
            (
                "--input FILE",
                "send FILE's bytes as the body, streamed ('-': stdin); its Content-Type is "
                "guessed from the name (or the first bytes), unless -H sets it",
            ),
            (
                "--paginate",
                "follow next_offset of a list answer (records and next_offset: GET lists, POST "
                "filter) until it is -1, and print one record per line (JSON lines); without "
                "-X, a GET",
            ),
            (
                "-o, --output FILE",
                "write the body to FILE (any size, in constant memory; whole or not at all)",
            ),
            ("-i, --include", "print the status line and the headers first"),
            ("-H, --header 'N: V'", "add a header to the request (Content-Type, Accept...)"),
            _AS,
        ],
        "2 (bad arguments, before anything is sent), 3, 4, 5, 6, 7 (sugard's own failures, as "
        "for the other commands); 8 Sugar answered 400 or more (one line on stderr: the "
        "status, Sugar's error and error_message)",
    ),
    "status": (
        "status [NAME] [--json] [--names] [--wait S]",
        "the state of each instance, or all about one",
        "A table of the instances, 80 columns wide: STATE, EXPIRES IN, NEXT REFRESH, LAST "
        "REFRESH, and LAST ERROR as its kind and age ('was ...' once the instance has "
        "recovered). With NAME: everything about that instance, on lines of their own, with "
        "the current token's fingerprint and the last error's full text. Colour on a "
        "terminal only; NO_COLOR=1 turns it off.",
        [
            ("--json", "print the daemon's STATUS list (or object, with NAME) as JSON"),
            ("--names", "print only the instance names, one a line"),
            (
                "--wait S",
                "first wait at most S seconds while instances are starting or logging in (at "
                "most 300); on a terminal, say so on stderr meanwhile. Exit 5 if some still are",
            ),
        ],
        "2, 3, 4, 5 (--wait ran out), 7",
    ),
    "invalidate": (
        "invalidate NAME [TOKEN] [--as USER]",
        "report a token Sugar refused; print the one to use now",
        "Report TOKEN as refused by Sugar (a 401), and print the token to use now. TOKEN "
        "missing or '-': the first line of stdin. sugard renews the session only if TOKEN "
        "is its current one, once however many scripts report it.",
        [("--as USER", "TOKEN is one of Sugar user USER (sugarctl token NAME --as USER)")],
        "2, 3, 4, 5, 6, 7",
    ),
    "refresh": (
        "refresh NAME [--retry-rejected | --as USER]",
        "make sugard renew the session now; print the new token",
        "Make sugard renew the session of NAME now, even when it failed or backs off, and "
        "print the new token. After Sugar rejected the password (or client secret), sugard "
        "sends it again only if it changed since: fix it where it comes from first.",
        [
            (
                "--retry-rejected",
                "send a rejected password once more although it did not change, e.g. after an "
                "administrator unlocked the account. It may count as a failed login at Sugar, "
                "and enough of those lock the account",
            ),
            (
                "--as USER",
                "a new token of Sugar user USER instead (Sugar's sudo); also asks Sugar again "
                "after it refused the sudo (once USER exists, or sugard's user is an admin)",
            ),
        ],
        "2, 3, 4, 5, 6 (Sugar rejected it, or it was rejected before and did not change), 7",
    ),
    "revoke": (
        "revoke NAME",
        "end the session at Sugar, log in anew; print the new token",
        "For a token that leaked: end the session of NAME at Sugar (a logout with its refresh "
        "token), so that no token sugard handed out works any more, then log in anew (once) "
        "and print the new token. Scripts holding an old token get 401 and ask again. Only "
        "the daemon's owner and root may. A password Sugar rejected is never sent again: "
        "then nothing is ended.",
        [],
        "2 (in a fleet: not the leading host), 3, 4, 5 (logged out, but the login failed for "
        "now: sugard tries again), 6, 7 (not the owner)",
    ),
    "proxy-url": (
        "proxy-url NAME",
        "print the Sugar site URL to give an SDK",
        "Print the site URL to give a Sugar client or SDK so that it goes through sugard's "
        "proxy (sugard adds the token; the client's own logins and logouts are answered "
        "locally): the instance's `listen` address, else the socket form "
        "http://sugard/v1/instances/NAME, with how to reach it over the socket on stderr.",
        [],
        "3, 4, 7",
    ),
    "clients": (
        "clients NAME [--json]",
        "who sent what through the proxy to NAME",
        "Print, per client process that used instance NAME through sugard's proxy in the "
        "last 15 minutes (at most 1,000): its pid, uid and command, the requests it sent, "
        "how many failed (no answer, or 4xx/5xx), the bytes of their bodies both ways, the "
        "seconds they waited for NAME's rate_limit, when it was last seen and the last path "
        "it asked for (never the query). Sugar's audit trail names sugard's user for all of "
        "them; this says which script it was.",
        [("--json", "print the daemon's answer as JSON, times in RFC 3339 UTC")],
        "3, 4, 7",
    ),
    "reload": (
        "reload",
        "make sugard re-read its config; print what changed",
        "Make sugard re-read its config and print what changed; or exit 6 with each problem "
        "of the new config on a line of its own (the old config keeps running).",
        [],
        "4, 6, 7 (only the daemon's owner and root may reload)",
    ),
    "shutdown": (
        "shutdown [--wait S]",
        "stop a sugard started by hand",
        "Stop a sugard started by hand (sugard run) as SIGTERM does: requests in flight "
        "finish, the socket goes; prints once it is gone. Only the daemon's owner and root "
        "may. A sugard that systemd runs refuses: stop it with `systemctl --user stop "
        "sugard`.",
        [("--wait S", "wait at most S seconds for it to be gone (default 30, at most 300)")],
        "2 (systemd runs it), 4, 5 (still stopping after --wait), 7 (not the owner)",
    ),
    "env": (
        "env [--shell sh|fish]",
        "print the SUGARD_SOCKET line for eval",
        "Print `SUGARD_SOCKET=<path>; export SUGARD_SOCKET;` for the socket sugarctl found "
        "sugard answering on, for cron jobs, su and containers without $XDG_RUNTIME_DIR: "
        'eval "$(sugarctl env)".',
        [
            (
                "--shell SHELL",
                "sh (also bash, zsh) or fish (`set -gx SUGARD_SOCKET <path>;`); the default "
                "follows $SHELL",
            )
        ],
        "2, 4, 7",
    ),
    "ping": (
        "ping",
        "print 'ok' and the daemon's version",
        "Print 'ok', the daemon's version and how many instances it serves.",
        [],
        "4, 7",
    ),
    "help": (
        "help [COMMAND]",
        "print the help of a command",
        "Print the help of COMMAND, or of sugarctl.",
        [],
        "2 (no such command)",
    ),
    "completion": (
        "completion bash|zsh|fish",
        "print a shell completion script",
        "Print a script that completes sugarctl's commands, options and instance names (asked "
        "from the running sugard at each TAB). Install it with one of:\n"
        '  eval "$(sugarctl completion bash)"         # in ~/.bashrc\n'
        '  sugarctl completion zsh > "${fpath[1]}/_sugarctl"    # or: any dir in $fpath\n'
        "  sugarctl completion fish > ~/.config/fish/completions/sugarctl.fish",
        [],
        "2",
    ),
}


def general_help(commands: tuple[str, ...]) -> str:
    """The help of sugarctl itself: every command in a line or two, the socket, exit codes."""
    lines = [
        "usage: sugarctl [--socket PATH] COMMAND [ARGS]",
        "",
        "Get SugarCRM tokens from the sugard daemon.",
        "",
        "commands:",
    ]
    for name in commands:
        usage, summary, *_ = _COMMANDS[name]
        lines += _wrapped(f"  {usage}", summary, 17)
    lines += [
        "",
        "sugarctl help COMMAND (or sugarctl COMMAND --help): a command and its options.",
        "",
        "options:",
        *_options([_SOCKET, _HELP, ("--version", "print sugarctl's version")]),
        "",
        "exit codes:",
        *(
            line
            for code, meaning in EXIT_CODES.items()
            for line in _wrapped(f"  {code}", meaning, 8)
        ),
        "  exec: CMD's exit status; 126 if CMD cannot be run, 127 if it is not found",
        "",
        *textwrap.wrap(
            "When Sugar answers 401 to a token, report it (the token on stdin of "
            "sugarctl invalidate NAME) and retry once with the token printed. Never log in, "
            "refresh or log out from a script: that ends the shared session for every other "
            "script.",
            WIDTH,
        ),
    ]
    return "\n".join(lines) + "\n"


def command_help(name: str) -> str:
    """The help of one command: usage, what it does, every option it takes, its exit codes."""
    usage, _, what, options, codes = _COMMANDS[name]
    lines = [
        *textwrap.wrap(
            f"usage: sugarctl [--socket PATH] {usage}", WIDTH, subsequent_indent=" " * 7
        ),
        "",
        *_paragraph(what),
        "",
    ]
    lines += ["options:", *_options([*options, _SOCKET, _HELP]), ""]
    lines += textwrap.wrap(
        f"exit codes: 0 ok; {codes}; 130 interrupted (see: sugarctl help)",
        WIDTH,
        subsequent_indent="  ",
    )
    return "\n".join(lines) + "\n"


def described_options(name: str) -> list[str]:
    """The options the help of `name` describes (for tests/unit/cli/test_help.py)."""
    return [option.split()[0] for option, _ in _COMMANDS[name][3]]


def option_summary(name: str, option: str) -> str:
    """The first words of what `option` of command `name` does (for shell completion)."""
    for described, text in _COMMANDS[name][3]:
        if described.split()[0].rstrip(",") == option:
            return text.split(";")[0].split(" (")[0].split(":")[0].split(", e.g.")[0]
    return ""


def long_option(name: str, option: str) -> str | None:
    """The long form the help of `name` gives short `option` (-X, --method M: --method)."""
    for described, _ in _COMMANDS[name][3]:
        words = described.split()
        if words[0] == f"{option}," and len(words) > 1:
            return words[1]
    return None


def summary(name: str) -> str:
    """What `name` does, in a few words (the list of commands, shell completion)."""
    return _COMMANDS[name][1]


def _paragraph(text: str) -> list[str]:
    lines: list[str] = []
    for part in text.split("\n"):
        # An indented part is a command line to copy: never wrapped.
        lines += [part] if part.startswith("  ") else textwrap.wrap(part, WIDTH)
    return lines


def _options(options: list[tuple[str, str]]) -> list[str]:
    lines: list[str] = []
    for option, text in options:
        lines += _wrapped(f"  {option}", text, 17)
    return lines


def _wrapped(head: str, text: str, indent: int) -> list[str]:
    """`head`, then `text` from column `indent` (on a line of its own if `head` reaches it)."""
    lines = textwrap.wrap(head, WIDTH, subsequent_indent="    ") if len(head) > indent - 2 else []
    first = " " * indent if lines else head.ljust(indent)
    return lines + textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=" " * indent)
