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
_SOCKET = ("--socket PATH", f"the daemon's socket (may come anywhere); without it {SOCKET_ORDER}")
_HELP = ("-h, --help", "print this help")

# command: (usage, summary, what it does, options, exit codes beyond 0 and 130)
_COMMANDS: dict[str, tuple[str, str, str, list[tuple[str, str]], str]] = {
    "token": (
        "token NAME [--min-ttl S] [--wait S] [--format bare|header|json|env] [--fingerprint]",
        "print the access token of instance NAME",
        "Print the access token of instance NAME, and nothing else.",
        [
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
        "header NAME [--min-ttl S] [--wait S]",
        "print 'OAuth-Token: <token>'",
        "Print 'OAuth-Token: <token>', for curl -H \"$(sugarctl header NAME)\".",
        [_MIN_TTL, _WAIT],
        "2, 3, 4, 5, 6, 7",
    ),
    "exec": (
        "exec NAME [--min-ttl S] [--wait S] [--] CMD [ARGS...]",
        "run CMD with the token in its environment",
        "Run CMD in place of sugarctl with SUGAR_URL, SUGAR_TOKEN and SUGAR_DOWNLOAD_TOKEN in "
        "its environment. Everything from CMD on is CMD's, even words that look like "
        "sugarctl's options. CMD's exit status becomes sugarctl's.",
        [_MIN_TTL, _WAIT],
        "before CMD runs 2, 3, 4, 5, 6, 7; 126 CMD cannot be run, 127 CMD not found",
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
        "invalidate NAME [TOKEN]",
        "report a token Sugar refused; print the one to use now",
        "Report TOKEN as refused by Sugar (a 401), and print the token to use now. TOKEN "
        "missing or '-': the first line of stdin. sugard renews the session only if TOKEN "
        "is its current one, once however many scripts report it.",
        [],
        "2, 3, 4, 5, 6, 7",
    ),
    "refresh": (
        "refresh NAME [--retry-rejected]",
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
            )
        ],
        "2, 3, 4, 5, 6 (Sugar rejected it, or it was rejected before and did not change), 7",
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
            "When Sugar answers 401 to a token, report it (sugarctl invalidate NAME TOKEN) and "
            "retry once with the token printed. Never log in, refresh or log out from a "
            "script: that ends the shared session for every other script.",
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
        if described.split()[0] == option:
            return text.split(";")[0].split(" (")[0].split(":")[0].split(", e.g.")[0]
    return ""


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
