"""`sugarctl status`: the table of instances in 80 columns, everything about one instance, and
`--wait` for instances still logging in. Imported only for `status` (and by `sugard demo`).

Colour only on a terminal, and never with NO_COLOR set (https://no-color.org) or TERM=dumb.
The last error is shown with its age, and as past once the instance serves tokens again:
`last_error.current` from the daemon says which, or else the state does.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

from sugard.client import SugardClient, SugardError, UnknownInstance
from sugard.wire import EXIT_UNAVAILABLE, SERVING, SETTLING

__all__ = ["detail", "status", "table"]

WIDTH = 80
POLL = 0.1  # seconds between two looks at a settling daemon
_GREEN, _YELLOW, _RED, _DIM = "32", "33", "31", "2"
_STATE_COLOURS = {"ready": _GREEN, "failed": _RED}  # the others: yellow


class StillSettling(SugardError):
    """--wait ran out while instances were still starting or logging in."""

    exit_code = EXIT_UNAVAILABLE


def status(
    client: SugardClient, name: str | None, options: dict[str, str], wait: float | None
) -> int:
    """`sugarctl status [NAME] [--json] [--names] [--wait S]`: print, return the exit code."""
    data = _wait_settled(client, name, wait) if wait else client.status(name)
    rows: list[dict[str, Any]] = [data] if name else data
    if "--names" in options:
        if not rows:
            raise UnknownInstance(f"sugard on {client.socket_path} serves no instance to you")
        print("\n".join(str(row.get("name")) for row in rows))
    elif "--json" in options:
        import json

        print(json.dumps(data, indent=2))
    else:
        colour = _colour(sys.stdout)
        print(detail(data, colour=colour) if name else table(rows, colour=colour))
    settling = [str(row.get("name")) for row in rows if row.get("state") in SETTLING]
    if wait and settling:
        raise StillSettling(
            f"still starting or logging in after --wait {wait:g} s: {', '.join(settling)}"
        )
    return 0


def _wait_settled(client: SugardClient, name: str | None, wait: float) -> Any:
    """The status once no instance is starting or logging in, or when `wait` runs out; on a
    terminal, a line on stderr says what it waits for meanwhile."""
    shown = sys.stderr.isatty()
    started = time.monotonic()
    try:
        while True:
            data = client.status(name)
            rows = [data] if name else data
            settling = [row for row in rows if row.get("state") in SETTLING]
            waited = time.monotonic() - started
            if not settling or waited >= wait:
                return data
            if shown:
                names = ", ".join(f"{row.get('name')} ({row.get('state')})" for row in settling)
                line = f"sugarctl: waiting for {names}: {waited:.0f} s of --wait {wait:g}"
                sys.stderr.write("\r" + line[: WIDTH - 1] + "\x1b[K")
                sys.stderr.flush()
            time.sleep(min(POLL, max(0.0, wait - waited)))
    finally:
        if shown:
            sys.stderr.write("\r\x1b[K")  # the line goes: what follows starts clean
            sys.stderr.flush()


def table(rows: list[dict[str, Any]], *, colour: bool = False, width: int = WIDTH) -> str:
    """One line per instance. The last error is cut to what is left of `width`: its full text
    is in `sugarctl status NAME` and `--json`."""
    now = time.time()
    header = ("NAME", "STATE", "EXPIRES IN", "NEXT REFRESH", "LAST REFRESH", "LAST ERROR")
    lines = [header] + [_cells(row, now) for row in rows]
    if any(row.get("fleet") for row in rows):  # fleet mode: who leads, per instance
        roles = ["ROLE", *(_role(row) for row in rows)]
        lines = [
            (line[0], line[1], role, *line[2:]) for line, role in zip(lines, roles, strict=True)
        ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    room = max(12, width - sum(widths) - 2 * len(widths))
    out = []
    for index, line in enumerate(lines):
        error = line[-1] if len(line[-1]) <= room else line[-1][: room - 3] + "..."
        cells = [cell.ljust(w) for cell, w in zip(line, widths, strict=False)] + [error]
        if colour and index:
            row = rows[index - 1]
            cells[1] = _paint(cells[1], _state_colour(line[1]))
            if error != "-":
                cells[-1] = _paint(error, _RED if _current(row) else _DIM)
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def detail(row: dict[str, Any], *, colour: bool = False) -> str:
    """Everything about one instance, a line per item, the last error in full."""
    now = time.time()
    state = str(row.get("state", "?"))
    expires = _epoch(row.get("expires_at"))
    fingerprint = row.get("token_fingerprint")
    if expires is None:
        held = "none"
    else:
        left = f"expires in {_duration(expires - now)}" if expires > now else "expired"
        named = f"{fingerprint} (fingerprint), " if fingerprint else ""
        held = f"{named}{left} ({row.get('expires_at')})"
    items = [
        ("url", str(row.get("url", "?"))),
        ("username", f"{row.get('username', '?')} (platform {row.get('platform', '?')})"),
        ("token", held),
        ("next refresh", _next_refresh(row, now, long=True)),
        ("last refresh", _ago(_epoch(row.get("last_refresh")), now, row.get("last_refresh"))),
        (
            "upstream",
            f"{row.get('logins', 0)} login(s), {row.get('refreshes', 0)} refresh(es), "
            f"{row.get('failures', 0)} failure(s)",
        ),
    ]
    fleet = row.get("fleet")
    if isinstance(fleet, dict):
        holder = fleet.get("holder") or "nobody yet"
        items.append(("fleet", f"{fleet.get('role')}, epoch {fleet.get('epoch')}, lease: {holder}"))
    sudo = row.get("sudo")
    if isinstance(sudo, dict):
        items.extend(_sudo_items(sudo, now, str(row.get("name", "NAME"))))
    error = row.get("last_error")
    if error:
        at = _epoch(error.get("at"))
        when = _ago(at, now, error.get("at"))
        standing = "now" if _current(row) else "past: it recovered since"
        text = " ".join(str(error.get("message", "")).split())
        summary = f"{error.get('kind', '?')}, {when}, {standing}"
        if colour:
            summary = _paint(summary, _RED if _current(row) else _DIM)
        items.append(("last error", summary))
        items.append(("", text))
    else:
        items.append(("last error", "none"))
    head = f"{row.get('name', '?')}: {_paint(state, _state_colour(state)) if colour else state}"
    return "\n".join([head, *(f"  {key:<13} {value}".rstrip() for key, value in items)])


def _sudo_items(sudo: dict[str, Any], now: float, name: str) -> list[tuple[str, str]]:
    """The users an instance acts as (Sugar's sudo): how many are held, each one's token
    where the config names them, and the latest error of them all."""
    allowed = sudo.get("allowed")
    who = "any user" if allowed == "*" else ", ".join(map(str, allowed or []))
    refused = "every user (sugard's user is no admin)" if sudo.get("refused_all") else None
    summary = f"as {who}: {sudo.get('held', 0)} held, {refused or sudo.get('refused', 0)} refused"
    items = [("sudo", summary)]
    for user in sudo.get("users") or []:
        expires = _epoch(user.get("expires_at"))
        if user.get("refused"):
            again = f"sugarctl refresh {name} --as {user.get('user', 'USER')}"
            held = f"refused by Sugar: not asked again before `{again}`"
        elif expires is None:
            held = "no token"
        else:
            held = f"expires in {_duration(expires - now)}" if expires > now else "expired"
        items.append((f"  {user.get('user', '?')}", held))
    error = sudo.get("last_error")
    if error:
        text = " ".join(str(error.get("message", "")).split())
        items.append(("sudo error", f"{error.get('kind', '?')}: {text}"))
    return items


def _cells(row: dict[str, Any], now: float) -> tuple[str, ...]:
    expires = _epoch(row.get("expires_at"))
    if expires is None:
        expires_in = "-"
    else:
        expires_in = _duration(expires - now) if expires > now else "expired"
    refreshed = _epoch(row.get("last_refresh"))
    error = row.get("last_error")
    if error:
        at = _epoch(error.get("at"))
        age = f", {_duration(now - at)} ago" if at is not None else ""
        last_error = ("" if _current(row) else "was ") + f"{error.get('kind', '?')}{age}"
    else:
        last_error = "-"
    return (
        str(row.get("name", "?")),
        str(row.get("state", "?")),
        expires_in,
        _next_refresh(row, now),
        "never" if refreshed is None else _duration(now - refreshed) + " ago",
        last_error,
    )


def _role(row: dict[str, Any]) -> str:
    fleet = row.get("fleet")
    return str(fleet.get("role", "?")) if isinstance(fleet, dict) else "local"


def _current(row: dict[str, Any]) -> bool:
    """Whether the last error is the instance's state now, not a past one it recovered from."""
    error = row.get("last_error") or {}
    if isinstance(error.get("current"), bool):
        return bool(error["current"])
    return row.get("state") not in SERVING  # a daemon that does not say


def _next_refresh(row: dict[str, Any], now: float, *, long: bool = False) -> str:
    if row.get("state") == "refreshing":
        return "now"
    at = _epoch(row.get("refresh_at"))
    if row.get("state") != "ready" or at is None:
        return "-"
    if at <= now:
        return "now"
    return f"in {_duration(at - now)} ({row.get('refresh_at')})" if long else _duration(at - now)


def _ago(epoch: float | None, now: float, stamp: Any) -> str:
    return "never" if epoch is None else f"{_duration(now - epoch)} ago ({stamp})"


def _colour(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except ValueError:  # closed
        return False


def _state_colour(state: str) -> str:
    return _STATE_COLOURS.get(state.strip(), _YELLOW)


def _paint(text: str, code: str) -> str:
    """`text` in an SGR colour; trailing padding stays outside it."""
    core = text.rstrip()
    return f"\x1b[{code}m{core}\x1b[0m" + text[len(core) :]


def _epoch(stamp: Any) -> float | None:
    """An RFC 3339 UTC time from the daemon, as epoch seconds."""
    if not isinstance(stamp, str) or not stamp:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
