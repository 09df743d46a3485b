"""The checkers of the config's schema: each takes one TOML value and returns it normalised, or
raises ValueError with a message that says what a valid value looks like. `instances` (and
`fleet`) map each key to one of them, so each value is checked in one place.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal

from sugard.config.sources import SECRET_KINDS, SecretRef
from sugard.secret import Secret
from sugard.wire import INSTANCE_NAME_PATTERN, SUDO_ALL, sudo_user_problem

# Used with fullmatch: `$` would also match before a trailing newline ("prod\n").
INSTANCE_NAME = re.compile(INSTANCE_NAME_PATTERN)
PLATFORM_NAME = re.compile(r"[a-z0-9_-]{1,127}")
# The REST API versions Sugar 8 to 26 route: v10, v11 and v11_N (v11_20 is /rest/v11_20/).
API_VERSION = re.compile(r"v10|v11(?:_[1-9][0-9]?)?")
PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]+")
LOG_LEVELS = ("debug", "info", "warning", "error")
DIRECT = "none"  # the `proxy` value that means: no proxy, whatever the environment says
GRACE_AUTO: Final = "auto"  # old_token_grace: learn it from Sugar's version


def string(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, not {type_name(v)}")
    return v


def nonempty(v: Any) -> str:
    s = string(v)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def _unquote_hint(v: Any) -> str:
    """TOML's commonest slip: a number or boolean written in quotes."""
    if isinstance(v, str):
        text = v.strip()
        if text in ("true", "false"):
            return f"; write {text} without quotes"
        try:
            float(text)
        except ValueError:
            return ""
        return f"; write {text} without quotes"
    return ""


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {type_name(v)}{_unquote_hint(v)}")
    return v


def number(low: float, high: float) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"must be a number, not {type_name(v)}{_unquote_hint(v)}")
        if not low <= v <= high:
            raise ValueError(f"must be between {low:g} and {high:g}, not {v:g}")
        return float(v)

    return check


def integer(low: int, high: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer, not {type_name(v)}{_unquote_hint(v)}")
        if not low <= v <= high:
            raise ValueError(f"must be between {low} and {high}, not {v}")
        return v

    return check


def ids(v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v
    ):
        raise ValueError("must be a list of numeric ids, like [1000, 1001]")
    return tuple(v)


def site_url(v: Any) -> str:
    s = nonempty(v).rstrip("/")
    authority = re.split(r"[/?#]", s.split("://", 1)[-1], maxsplit=1)[0]
    if "@" in authority:  # never echoed: the part before the @ may be a password
        raise ValueError(
            "must not hold a user name or password (user:password@): sugard logs in with "
            "username and password (or password_file, _env, _command, _credential); give "
            "the site root alone, like https://crm.example.com"
        )
    if not re.match(r"^https?://[^/\s]+", s):
        raise ValueError(f"must start with https:// (or http://), not {s!r}")
    if any(c.isspace() or not c.isprintable() for c in s):
        raise ValueError(f"must not contain spaces or control characters, not {s!r}")
    if "/rest/v" in s:
        raise ValueError("give the site root (like https://crm.example.com), without /rest/v10")
    return s


def platform_name(v: Any) -> str:
    s = string(v)
    if not PLATFORM_NAME.fullmatch(s):
        like = re.sub(r"[^a-z0-9_-]+", "_", s.lower()).strip("_")[:127] or "sugard"
        raise ValueError(
            f"{s!r} is not a valid platform name: use 1-127 of a-z, 0-9, '_' and '-', "
            f"like {like!r} (and register it in Sugar: Admin > Configure API Platforms)"
        )
    return s


def api_version(v: Any) -> str:
    s = string(v).strip()
    if not API_VERSION.fullmatch(s):
        raise ValueError(
            f'must be a version of Sugar\'s REST API as its paths name it, like "v10" or '
            f'"v11_20" (/rest/v11_20/...), not {s!r}'
        )
    return s


def log_level(v: Any) -> str:
    s = string(v).lower()
    if s not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, not {v!r}")
    return s


def file_path(v: Any) -> str:
    return nonempty(v)


def proxy_url(v: Any) -> str:
    s = string(v).strip()
    if s.lower() in ("", DIRECT):
        return DIRECT
    if "@" in s:  # never echoed: it may hold the proxy's password
        raise ValueError(
            "must not hold credentials: give the user as proxy_username and the password as "
            "proxy_password_file (or proxy_password_env, _command, _credential)"
        )
    if not re.fullmatch(r"http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?/?", s):
        raise ValueError(
            f'must be an http:// proxy URL like "http://proxy.example:3128" (https sites are '
            f'tunnelled through it), or "none" to connect directly; not {s!r}'
        )
    return s.rstrip("/")


def proxy_username(v: Any) -> str:
    s = nonempty(v)
    if ":" in s:
        raise ValueError("must not contain ':' (HTTP Basic authentication cannot carry it)")
    return s


def grace(v: Any) -> float | Literal["auto"]:
    if v == GRACE_AUTO:
        return GRACE_AUTO
    try:
        return number(0, 86400)(v)
    except ValueError as exc:
        raise ValueError(f'must be "auto" or seconds; {exc}') from None


def listen_address(v: Any) -> str:
    """A loopback "HOST:PORT" for the proxy: other addresses would serve the token beyond
    this machine's users, whom only loopback lets sugard tell apart."""
    s = nonempty(v).strip()
    host, _ = split_host_port(s)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a name, or every address ("":PORT): not provably this machine
    if not loopback:
        raise ValueError(
            f"must be a loopback address (127.0.0.0/8, or [::1]) and a port, like "
            f'"127.0.0.1:8401", not {s!r}: sugard serves only peers on this machine'
        )
    return s


def argv(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v) or not v[0]:
        raise ValueError('must be a list of a command and its arguments, like ["notify", "-u"]')
    return tuple(v)


SUDO_SHAPE = 'must be a list of Sugar user names, like ["jim", "sally"], or ["*"] for any user'


def sudo_users(v: Any) -> tuple[str, ...]:
    """The users an instance may act as (Sugar's sudo): names, or `["*"]` alone."""
    if not isinstance(v, list):
        raise ValueError(f"{SUDO_SHAPE}, not {type_name(v)}")
    for user in v:
        if not isinstance(user, str):
            raise ValueError(f"{SUDO_SHAPE}, not a list holding {type_name(user)}")
    if SUDO_ALL in v:
        if len(v) > 1:
            raise ValueError(f'"*" already means any user: write ["*"] alone, not {v!r}')
        return (SUDO_ALL,)
    for user in v:
        problem = sudo_user_problem(user)
        if problem is not None:
            raise ValueError(problem)
    return tuple(dict.fromkeys(v))


def split_host_port(text: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9101` for IPv6; an empty HOST is every address) as (host, port)."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f'must be "HOST:PORT" with a port of 0-65535, like "127.0.0.1:9101", not {text!r}'
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'an IPv6 address needs brackets, like "[::1]:9101", not {text!r}')
    if any(c.isspace() or c in "[]/" for c in host):
        raise ValueError(f"must be a host name or address and a port, not {text!r}")
    return host, int(port)


def host_port(v: Any) -> str:
    split_host_port(nonempty(v))
    return str(v)


def type_name(v: Any) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def shown_key(name: str) -> str:
    """A key as written in a problem: bare if it is plain, else quoted and escaped as TOML
    writes it, so a newline or a space in a key cannot break or blur the one-line message."""
    return name if PLAIN_KEY.fullmatch(name) else json.dumps(name)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key.lower(), list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def table_of(
    data: Mapping[str, Any], name: str, problem: Callable[[str, str], None]
) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        problem(name, f"must be a table ([{name}]), not {type_name(value)}")
        return {}
    return value


def secret_ref(
    base: str, table: Mapping[str, Any], where: str, problem: Callable[[str, str], None]
) -> SecretRef | Literal[False] | None:
    """The one source of secret `base` in `table`; None if there is none, False if it is wrong."""
    given = [base + kind for kind in SECRET_KINDS if base + kind in table]
    if not given:
        return None
    if len(given) > 1:
        problem(f"{where}.{given[1]}", f"give only one of {', '.join(given)}")
        return False
    key = given[0]
    value = table[key]
    kind = key[len(base) + 1 :] or "inline"
    if kind == "command":
        if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
            return SecretRef(kind, tuple(value))
        if isinstance(value, str) and value.strip():
            return SecretRef(kind, value)
        problem(f"{where}.{key}", "must be a shell command string or a list of arguments")
        return False
    if not isinstance(value, str):
        problem(f"{where}.{key}", f"must be a string, not {type_name(value)}")
        return False
    if kind == "inline":
        return SecretRef("inline", "", Secret(value))
    if not value.strip():
        problem(f"{where}.{key}", "must not be empty")
        return False
    if kind == "credential" and "/" in value:
        problem(
            f"{where}.{key}", "is a credential name (as in LoadCredential=NAME:...), not a path"
        )
        return False
    return SecretRef(kind, value)
