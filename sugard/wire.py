"""The socket API's contract, shared by both ends: the daemon (sugard.api, sugard.api.openapi) and
its clients (sugard.client, sugarctl). Written once here, so that the two cannot drift.

Cheap to import on purpose: `sugarctl token` loads it on every call, so it imports only `os`
(which the interpreter has loaded anyway) and uses no dataclass, enum, typing or `re` (each
costs about as much as starting the interpreter). The instance-name rule is therefore a
pattern string that the daemon compiles.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs an import; mypy treats this name as True
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "DEFAULT_WAIT",
    "ERRORS",
    "EXIT_ATTENTION",
    "EXIT_DENIED",
    "EXIT_INTERRUPTED",
    "EXIT_SUGAR",
    "EXIT_UNAVAILABLE",
    "EXIT_UNEXPECTED",
    "EXIT_UNKNOWN",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "INSTANCE_NAME_PATTERN",
    "INSTANCE_NAME_RULE",
    "MAX_MIN_TTL",
    "MAX_WAIT",
    "PROXY_ERROR_HEADER",
    "SERVING",
    "SETTLING",
    "SOCKET_ORDER",
    "SOCKET_PATH_MAX",
    "STATES",
    "SUDO_ALL",
    "SUDO_USER_MAX",
    "SUDO_USER_PATTERN",
    "SUDO_USER_RULE",
    "TOKEN_LIFETIME_HEADER",
    "default_config_path",
    "default_socket_path",
    "default_socket_paths",
    "http_status",
    "socket_path",
    "sudo_user_problem",
]

# sugarctl's exit codes (sugard.client.help says what each means to a user).
EXIT_UNEXPECTED = 1  # an answer sugarctl does not know
EXIT_USAGE = 2
EXIT_UNKNOWN = 3
EXIT_UNREACHABLE = 4  # no answer at all: the client's own finding, no error code carries it
EXIT_UNAVAILABLE = 5
EXIT_ATTENTION = 6
EXIT_DENIED = 7
EXIT_SUGAR = 8  # `sugarctl api`: Sugar answered with a status of 400 or more
EXIT_INTERRUPTED = 130

# Each error code of a JSON error answer: (HTTP status, sugarctl exit code). `bad_request` is
# 400 unless the failure has a status of its own (408: body too slow, 413: body too large).
ERRORS: dict[str, tuple[int, int]] = {
    "bad_request": (400, EXIT_USAGE),
    "busy": (503, EXIT_UNAVAILABLE),  # at the connection limit: try again shortly
    "forbidden": (403, EXIT_DENIED),
    "internal": (500, EXIT_UNEXPECTED),
    "invalid_config": (422, EXIT_ATTENTION),  # a reload found errors in the config
    "method_not_allowed": (405, EXIT_UNEXPECTED),
    "not_found": (404, EXIT_UNEXPECTED),  # no such route
    "token_unavailable": (503, EXIT_UNAVAILABLE),
    "under_systemd": (409, EXIT_USAGE),  # shutdown is systemctl's job there
    "unknown_instance": (404, EXIT_UNKNOWN),
    "upstream_rejected": (502, EXIT_ATTENTION),
}


def http_status(code: str) -> int:
    """The HTTP status an error answer with `code` carries."""
    return ERRORS[code][0]


# On an answer of the proxy that sugard made itself (in Sugar's envelope), the error label: so
# `sugarctl api` tells sugard's own failures (no token, no route to Sugar) from Sugar's answers.
PROXY_ERROR_HEADER = "Sugard-Error"

# Defaults and bounds of a token request, applied by the daemon and checked by clients first.
DEFAULT_WAIT = 10.0  # seconds the daemon waits for a token when a request names no wait
MAX_WAIT = 300.0
MAX_MIN_TTL = 86400.0
# Sent with a token that has less than min_ttl left: the lifetime Sugar gives this instance's.
TOKEN_LIFETIME_HEADER = "Sugard-Token-Lifetime"  # noqa: S105 - a header name

# An instance's name, in config keys and in /v1/instances/{name}.
INSTANCE_NAME_PATTERN = "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
INSTANCE_NAME_RULE = (
    "use up to 64 of A-Z, a-z, 0-9, '_', '.' and '-', starting with a letter or digit"
)

# A user sugard may act as (Sugar's sudo): in the config's `sudo` list, `?as=USER`, the
# proxy's `/as/USER/` and `sugarctl --as USER`. Sugar's user names are free text; refused here
# are those that cannot be one path segment of a URL or one word of a log line: a '/', a space
# (what str.isspace calls one), a control character, or only dots and stars ("..", "*").
SUDO_ALL = "*"  # `sudo = ["*"]`: any user
SUDO_USER_MAX = 100
SUDO_USER_RULE = (
    f"a Sugar user name of 1 to {SUDO_USER_MAX} characters, with no '/', no space and no "
    "control character, and not only dots and stars"
)
_NOT_IN_USER = r"/\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# The same rule for the OpenAPI document (with maxLength); a test pins that both agree.
SUDO_USER_PATTERN = f"^[^{_NOT_IN_USER}]*[^{_NOT_IN_USER}.*][^{_NOT_IN_USER}]*$"
_ODD_SPACES = frozenset("\u1680\u2028\u2029\u202f\u205f\u3000")


def sudo_user_problem(name: str) -> str | None:
    """Why `name` cannot be a user to act as (None: it can). No `re`: see the module's doc."""
    if not name or len(name) > SUDO_USER_MAX or not name.strip(".*") or any(map(_odd, name)):
        return f"bad user name {name[:SUDO_USER_MAX]!r}: {SUDO_USER_RULE}"
    return None


def _odd(char: str) -> bool:
    """A '/', a control character or a space: the characters of `_NOT_IN_USER`."""
    code = ord(char)
    return (
        char == "/"
        or code <= 0x20
        or 0x7F <= code <= 0xA0
        or 0x2000 <= code <= 0x200A
        or char in _ODD_SPACES
    )


# An instance's states (sugard.keeper.State has the same values).
STATES = ("starting", "logging_in", "ready", "refreshing", "backing_off", "failed")
SETTLING = ("starting", "logging_in")  # no outcome yet
SERVING = ("ready", "refreshing")  # a token is there to hand out

# sun_path is 108 bytes on Linux, including the terminating NUL.
SOCKET_PATH_MAX = 107


# Where the config and the socket are, in words (sugarctl's help) and in code.
SOCKET_ORDER = (
    "$SUGARD_SOCKET, else [daemon].socket of the config ($SUGARD_CONFIG, "
    "else $XDG_CONFIG_HOME/sugard/config.toml), else $XDG_RUNTIME_DIR/sugard/sugard.sock, "
    "else /tmp/sugard-$UID/sugard.sock"
)

# On strings, not pathlib, which would cost sugarctl an import of `re`.


def default_config_path(environ: Mapping[str, str] | None = None) -> str:
    """`$SUGARD_CONFIG`, else `$XDG_CONFIG_HOME/sugard/config.toml`, else `~/.config/...`."""
    env = os.environ if environ is None else environ
    if env.get("SUGARD_CONFIG"):
        return os.path.expanduser(env["SUGARD_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "sugard", "config.toml")


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """`$XDG_RUNTIME_DIR/sugard/sugard.sock`, else `/tmp/sugard-$UID/sugard.sock`."""
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "sugard", "sugard.sock")
    return f"/tmp/sugard-{os.getuid()}/sugard.sock"


def default_socket_paths(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Where a client looks when nothing names the socket, in order: a daemon started without
    `$XDG_RUNTIME_DIR` (cron, su, a container) listens on the second, a shell with it set
    must still find that daemon."""
    env = os.environ if environ is None else environ
    fallback = f"/tmp/sugard-{os.getuid()}/sugard.sock"
    first = default_socket_path(env)
    return (first,) if first == fallback else (first, fallback)


def socket_path(
    explicit: str | os.PathLike[str] | None,
    configured: Callable[[], str | None],
    environ: Mapping[str, str] | None = None,
) -> str:
    """`explicit` (--socket) > `$SUGARD_SOCKET` > `configured()` ([daemon].socket) > the
    default: the one order both `sugard run` and its clients use, so both ends agree without
    being told. `configured` is called only when it decides (a client reads the config file
    then, and only then)."""
    env = os.environ if environ is None else environ
    if explicit:
        return os.path.expanduser(os.fspath(explicit))
    if env.get("SUGARD_SOCKET"):
        return os.path.expanduser(env["SUGARD_SOCKET"])
    configured_path = configured()
    if configured_path:
        return os.path.expanduser(configured_path)
    return default_socket_path(env)
