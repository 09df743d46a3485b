"""`on_event` commands: run a program when an instance is renewed, fails, recovers, is evicted
or revoked.

- `renewed`: a new token from a login or a refresh is in place;
- `evicted`: Sugar no longer accepts the session (found by a script's report, a probe or a
  refused refresh);
- `revoked`: the session was ended at Sugar as a person asked (`sugarctl revoke`), so every
  token it handed out is dead; a new login follows (and `renewed` with it);
- `failed`: the instance entered the `failed` state;
- `recovered`: an instance that was `failed` or `backing_off` is `ready` again.

The command gets `SUGARD_EVENT`, `SUGARD_INSTANCE`, `SUGARD_EXPIRES_AT` (RFC 3339 UTC, empty
without a token), `SUGARD_ERROR_KIND` (the last error's kind, or empty) and `SUGARD_SOCKET`, and
of the daemon's own environment only a short list of harmless variables (PASSED_ENVIRONMENT):
the daemon's may hold secrets (`password_env`, `client_secret_env`, whatever the unit sets),
and a hook never needs them. Never a token: a hook that needs one asks `sugarctl`.

At most one command runs per instance; events that arrive meanwhile coalesce into one, the
newest, run when the current one ends. A command runs in a process group of its own, so that
at its timeout (and when the daemon stops) the whole group is killed, grandchildren too. Its
exit status and the first line of its stderr are logged; its stdout is discarded. Whoever
reports an event never waits: `EventHooks` schedules the command and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

from sugard.observe import Event as ObservedEvent
from sugard.observe import Evicted, Forgotten, Observer, Renewed, Revoked, StateChanged

__all__ = ["EVENT_TIMEOUT", "PASSED_ENVIRONMENT", "EventHooks", "EventKind", "HookEvent"]

log = logging.getLogger("sugard.observe.events")

EventKind = Literal["renewed", "failed", "recovered", "evicted", "revoked"]
EVENT_TIMEOUT: Final = 30.0  # seconds a command may run before its process group is killed
STOP_GRACE: Final = 2.0  # seconds a running command may finish when the daemon stops
AFTER_EXIT: Final = 1.0  # how long stderr may stay open once the command itself has exited
MAX_LINE: Final = 200  # characters of stderr's first line kept for the log

# What a hook inherits from the daemon: where things are, who and where it runs, and how to
# reach the desktop (notify-send needs the session bus and the display).
PASSED_ENVIRONMENT: Final = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "XDG_RUNTIME_DIR",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "XDG_CACHE_HOME",
        "DBUS_SESSION_BUS_ADDRESS",
        "DISPLAY",
        "WAYLAND_DISPLAY",
    }
)
TROUBLED_STATES: Final = frozenset({"failed", "backing_off"})

Commands = Callable[[str], Sequence[str] | None]


@dataclass(frozen=True)
class HookEvent:
    kind: EventKind
    instance: str
    expires_at: float | None
    error_kind: str | None

    def environment(self) -> dict[str, str]:
        expires = (
            ""
            if self.expires_at is None
            else datetime.fromtimestamp(self.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        return {
            "SUGARD_EVENT": self.kind,
            "SUGARD_INSTANCE": self.instance,
            "SUGARD_EXPIRES_AT": expires,
            "SUGARD_ERROR_KIND": self.error_kind or "",
        }


class EventHooks(Observer):
    """Turns what the keeper reports into events, and runs each instance's `on_event`.

    `commands(name)` is the instance's command now (None: no hook), read again for every run
    so that a reload's change applies to the next event.
    """

    def __init__(
        self,
        commands: Commands,
        *,
        environ: Mapping[str, str] | None = None,
        socket_path: str | None = None,
        timeout: float = EVENT_TIMEOUT,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self._commands = commands
        source = os.environ if environ is None else environ
        self._inherited = {
            key: value
            for key, value in source.items()
            if key in PASSED_ENVIRONMENT or key.startswith("LC_")
        }
        if socket_path is not None:
            self._inherited["SUGARD_SOCKET"] = socket_path
        self._timeout = timeout
        self._stop_grace = stop_grace
        self._running: dict[str, asyncio.Task[None]] = {}
        self._pending: dict[str, HookEvent] = {}
        self._states: dict[str, str] = {}
        self._troubled: set[str] = set()
        self._closed = False

    # Observer: what the keeper reports, as events

    def observe(self, event: ObservedEvent) -> None:
        match event:
            case StateChanged(instance, state):
                self._state_changed(instance, state, event.expires_at, event.error_kind)
            case Renewed(instance):
                self.fire(HookEvent("renewed", instance, event.expires_at, event.error_kind))
            case Evicted(instance):
                self.fire(HookEvent("evicted", instance, event.expires_at, event.error_kind))
            case Revoked(instance):
                self.fire(HookEvent("revoked", instance, event.expires_at, event.error_kind))
            case Forgotten(instances):
                for name in instances:
                    self._states.pop(name, None)
                    self._troubled.discard(name)
                    self._pending.pop(name, None)

    def _state_changed(
        self, instance: str, state: str, expires_at: float | None, error_kind: str | None
    ) -> None:
        previous = self._states.get(instance)
        self._states[instance] = state
        if state in TROUBLED_STATES:
            self._troubled.add(instance)
        if state == "failed" and previous != "failed":
            self.fire(HookEvent("failed", instance, expires_at, error_kind))
        elif state == "ready" and instance in self._troubled:
            self._troubled.discard(instance)
            self.fire(HookEvent("recovered", instance, expires_at, error_kind))

    # Running

    def fire(self, event: HookEvent) -> None:
        """Run the instance's command for `event`, now or after the one running; never waits."""
        if self._closed or not self._commands(event.instance):
            return
        if event.instance in self._running:
            replaced = self._pending.get(event.instance)
            if replaced is not None:
                log.debug(
                    "%s: event %s replaces %s, still waiting for the running command",
                    event.instance,
                    event.kind,
                    replaced.kind,
                )
            self._pending[event.instance] = event
            return
        self._running[event.instance] = asyncio.create_task(
            self._run_in_turn(event), name=f"on_event:{event.instance}"
        )

    @property
    def busy(self) -> bool:
        """Whether any command is running or waiting."""
        return bool(self._running)

    async def close(self) -> None:
        """Run nothing more; let running commands finish within the grace, then kill them."""
        self._closed = True
        self._pending.clear()
        tasks = list(self._running.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=self._stop_grace)
        for task in late:
            task.cancel()  # kills the command's process group, see _run
        await asyncio.gather(*tasks, return_exceptions=True)
        if late:
            log.warning("killed %d on_event command(s) still running at stop", len(late))

    async def _run_in_turn(self, event: HookEvent) -> None:
        try:
            next_event: HookEvent | None = event
            while next_event is not None and not self._closed:
                argv = self._commands(next_event.instance)
                if argv:
                    await self._run(next_event, tuple(argv))
                next_event = self._pending.pop(event.instance, None)
        finally:
            self._running.pop(event.instance, None)

    async def _run(self, event: HookEvent, argv: tuple[str, ...]) -> None:
        # The program only: its arguments may hold a secret (a webhook URL with its key).
        what = f"{event.instance}: on_event command for {event.kind} ({argv[0]!r})"
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={**self._inherited, **event.environment()},
                start_new_session=True,  # its own process group, to kill it whole
            )
        except OSError as exc:
            log.warning("%s cannot run: %s", what, exc.strerror or exc)
            return
        assert proc.stderr is not None
        reader = asyncio.create_task(_first_line(proc.stderr))
        try:
            async with asyncio.timeout(self._timeout):
                status = await proc.wait()
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            log.warning(
                "%s did not finish within %g s; killed its process group%s",
                what,
                self._timeout,
                _said(await _result(reader)),
            )
            return
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            await proc.wait()
            reader.cancel()
            raise
        line = await _result(reader)
        if status == 0:
            log.info("%s exited 0%s", what, _said(line))
        elif status < 0:
            log.warning("%s was killed by signal %d%s", what, -status, _said(line))
        else:
            log.warning("%s exited with status %d%s", what, status, _said(line))


async def _first_line(stream: asyncio.StreamReader) -> str:
    """The first line of `stream`, cut short; the rest is read and dropped until EOF, so that
    a talkative command never blocks on a full pipe."""
    first = b""
    with contextlib.suppress(ValueError):  # a first line longer than the reader's limit
        first = await stream.readline()
    while await stream.read(65536):
        pass
    return first.decode("utf-8", "replace").strip()[:MAX_LINE]


async def _result(reader: asyncio.Task[str]) -> str:
    """The first line, once the command has exited: whatever it wrote is in the pipe by then,
    and a process it left behind holding stderr open does not get to hold up the log."""
    await asyncio.wait({reader}, timeout=AFTER_EXIT)
    reader.cancel()
    try:
        return await reader
    except (asyncio.CancelledError, OSError):
        return ""


def _said(line: str) -> str:
    # repr: a line could carry control characters into the log.
    return f"; stderr: {line!r}" if line else ""


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
