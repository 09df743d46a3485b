"""`on_event` commands: real processes started by `EventHooks` through the observer interface
the keeper calls; each event kind, the environment, a slow command (killed with its process
group), a failing one, coalescing, and a caller that never waits; then inside a real daemon,
a hook that asks `sugarctl` for the token."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path

import pytest
from support.daemon import SUGARCTL, instance, write_config
from support.hooks import lines, recorder
from support.wait import until

from sugard.config import ConfigError, load_config, parse_config
from sugard.daemon import Daemon
from sugard.observe import Evicted, Renewed, StateChanged
from sugard.observe.events import EventHooks
from sugard.testing import FakeSugar

JAN_1 = 1767225600.0  # 2026-01-01T00:00:00Z
SUGARD_VARIABLES = {"SUGARD_EVENT", "SUGARD_INSTANCE", "SUGARD_EXPIRES_AT", "SUGARD_ERROR_KIND"}


def gone(pid: int) -> bool:
    """The process is dead: no longer in /proc, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture
def events_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, "sugard.observe.events")
    return caplog


async def test_each_event_runs_the_command_with_its_facts(tmp_path: Path) -> None:
    """renewed and evicted as reported; failed on entering `failed`; recovered when a failed
    or backing-off instance is ready again (and not after an ordinary refresh)."""
    out = tmp_path / "out"
    hooks = EventHooks(lambda name: recorder(out))

    async def settle(expected: int) -> None:
        await until(lambda: len(lines(out)) == expected and not hooks.busy, f"{expected} runs")

    hooks.observe(Renewed("prod", expires_at=JAN_1, error_kind=None))
    await settle(1)
    hooks.observe(Evicted("prod", "probe", expires_at=JAN_1, error_kind="refresh_token"))
    await settle(2)
    for state in ("refreshing", "ready", "refreshing", "backing_off", "logging_in", "ready"):
        hooks.observe(StateChanged("prod", state, expires_at=JAN_1, error_kind="unreachable"))
        await until(lambda: not hooks.busy, "quiet")
    await settle(3)
    hooks.observe(StateChanged("prod", "failed", expires_at=None, error_kind="credentials"))
    await settle(4)
    hooks.observe(StateChanged("prod", "failed", expires_at=None, error_kind="credentials"))
    hooks.observe(StateChanged("prod", "logging_in", expires_at=None, error_kind="credentials"))
    hooks.observe(StateChanged("prod", "ready", expires_at=JAN_1, error_kind="credentials"))
    await settle(5)
    assert [
        "renewed prod 2026-01-01T00:00:00Z ",
        "evicted prod 2026-01-01T00:00:00Z refresh_token",
        "recovered prod 2026-01-01T00:00:00Z unreachable",
        "failed prod  credentials",
        "recovered prod 2026-01-01T00:00:00Z credentials",
    ] == lines(out)
    await hooks.close()


async def test_an_instance_without_on_event_runs_nothing(tmp_path: Path) -> None:
    """No command configured: nothing starts, nothing is kept waiting."""
    hooks = EventHooks(lambda name: None)
    hooks.observe(Renewed("prod", expires_at=JAN_1, error_kind=None))
    assert not hooks.busy
    await hooks.close()


async def test_the_environment_has_no_secret_of_the_daemon(tmp_path: Path) -> None:
    """The hook sees the SUGARD_* facts, the socket and a few harmless variables; none of the
    daemon's secrets (password_env variables, keys, credentials, systemd's sockets)."""
    out = tmp_path / "env.json"
    dump = [
        sys.executable,
        "-c",
        "import os,json,sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))",
    ]
    daemon_environment = {
        "PATH": os.environ["PATH"],
        "HOME": "/home/alice",
        "LC_ALL": "C.UTF-8",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "SUGAR_PROD_PASSWORD": "alice-secret-pw",
        "SUGAR_CLIENT_SECRET": "client-secret",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "CREDENTIALS_DIRECTORY": "/run/credentials/sugard.service",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "SUGARD_SOCKET": "/somewhere/else.sock",
    }
    hooks = EventHooks(
        lambda name: [*dump, str(out)],
        environ=daemon_environment,
        socket_path="/run/user/1000/sugard/sugard.sock",
    )
    hooks.observe(Evicted("prod", "report", expires_at=None, error_kind="refresh_token"))
    await until(lambda: out.exists() and not hooks.busy, "the hook")
    seen = json.loads(out.read_text())
    assert {
        "PATH": os.environ["PATH"],
        "HOME": "/home/alice",
        "LC_ALL": "C.UTF-8",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "SUGARD_SOCKET": "/run/user/1000/sugard/sugard.sock",
        "SUGARD_EVENT": "evicted",
        "SUGARD_INSTANCE": "prod",
        "SUGARD_EXPIRES_AT": "",
        "SUGARD_ERROR_KIND": "refresh_token",
    } == seen
    await hooks.close()


@pytest.mark.slow
async def test_a_slow_command_is_killed_with_its_process_group(
    tmp_path: Path, events_log: pytest.LogCaptureFixture
) -> None:
    """At the timeout the command and the process it started are killed; the log says so,
    with stderr's first line; the instance runs its next event afterwards."""
    pid_file, out = tmp_path / "pid", tmp_path / "out"
    slow = ["sh", "-c", 'sleep 600 & echo $! > "$1"; echo "still going" >&2; wait', "hook"]
    commands = {"prod": [*slow, str(pid_file)]}
    hooks = EventHooks(lambda name: commands[name], timeout=3.0)
    hooks.observe(Renewed("prod", expires_at=JAN_1, error_kind=None))
    await until(lambda: "did not finish" in events_log.text, "the kill", timeout=60)
    assert "prod: on_event command for renewed ('sh') did not finish" in events_log.text
    assert "did not finish within 3 s; killed its process group; stderr: 'still going'" in (
        events_log.text
    )
    grandchild = int(pid_file.read_text())
    await until(lambda: gone(grandchild), "the grandchild's death")
    await until(lambda: not hooks.busy, "quiet")
    commands["prod"] = recorder(out)
    hooks.observe(Renewed("prod", expires_at=JAN_1, error_kind=None))
    await until(lambda: len(lines(out)) == 1, "the next event's command")
    await hooks.close()


async def test_a_failing_command_is_logged_with_status_and_first_stderr_line(
    tmp_path: Path, events_log: pytest.LogCaptureFixture
) -> None:
    """Exit status 3 and stderr's first line (only it) logged as a warning; a command killed
    by a signal and one that cannot start are logged too; the program's name, never its
    arguments."""
    failing = ["sh", "-c", 'echo "no route to pager" >&2; echo "second line" >&2; exit 3']
    killed = ["sh", "-c", "kill -TERM $$"]
    missing = [str(tmp_path / "no-such-hook")]
    webhook = ["sh", "-c", "exit 1", "hook", "https://hooks.example/services/WEBHOOK-KEY"]
    commands = {"a": failing, "b": killed, "c": missing, "d": webhook}
    hooks = EventHooks(lambda name: commands[name])
    hooks.observe(StateChanged("a", "failed", expires_at=None, error_kind="credentials"))
    hooks.observe(Renewed("b", expires_at=JAN_1, error_kind=None))
    hooks.observe(Renewed("c", expires_at=JAN_1, error_kind=None))
    hooks.observe(Renewed("d", expires_at=JAN_1, error_kind=None))
    await until(lambda: len(events_log.records) >= 4 and not hooks.busy, "four results")
    warnings = {r.getMessage() for r in events_log.records if r.levelno == logging.WARNING}
    assert {
        "a: on_event command for failed ('sh') exited with status 3; stderr: 'no route to pager'",
        "b: on_event command for renewed ('sh') was killed by signal 15",
        f"c: on_event command for renewed ({missing[0]!r}) cannot run: No such file or directory",
        "d: on_event command for renewed ('sh') exited with status 1",
    } == warnings
    assert "WEBHOOK-KEY" not in events_log.text  # arguments may hold secrets: never logged
    await hooks.close()


async def test_events_coalesce_while_a_command_runs(
    tmp_path: Path, events_log: pytest.LogCaptureFixture
) -> None:
    """One command at a time per instance: events meanwhile leave only the newest waiting,
    run once the current one ends; another instance's command runs alongside."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    hooks = EventHooks(lambda name: recorder(out, gate))
    hooks.observe(Renewed("prod", expires_at=JAN_1, error_kind=None))
    await until(lambda: len(lines(out)) == 1, "the first command")
    hooks.observe(Evicted("prod", "report", expires_at=JAN_1, error_kind=None))
    hooks.observe(Renewed("prod", expires_at=JAN_1 + 60, error_kind=None))
    hooks.observe(StateChanged("prod", "failed", expires_at=None, error_kind="credentials"))
    hooks.observe(Renewed("test", expires_at=JAN_1, error_kind=None))
    await until(lambda: len(lines(out)) == 2, "the other instance's command, alongside")
    assert 1 == sum(line.startswith("renewed prod") for line in lines(out))  # prod still waits
    gate.touch()
    await until(lambda: not hooks.busy, "quiet")
    assert [
        "renewed prod 2026-01-01T00:00:00Z ",
        "renewed test 2026-01-01T00:00:00Z ",
        "failed prod  credentials",
    ] == lines(out)
    assert "prod: event failed replaces renewed, still waiting" in events_log.text
    await hooks.close()


async def test_the_caller_never_waits(tmp_path: Path) -> None:
    """The call returns while the command has not even started, and the command runs while
    the caller goes on: it finishes only on a gate the test opens after the call."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    hooks = EventHooks(lambda name: recorder(out, gate))
    assert None is hooks.observe(Renewed("prod", expires_at=JAN_1, error_kind=None))
    assert not out.exists()  # nothing has run yet: the call did not wait for the start either
    await until(lambda: len(lines(out)) == 1, "the command")
    assert hooks.busy
    gate.touch()
    await until(lambda: not hooks.busy, "the end of the command")
    await hooks.close()


async def test_close_kills_what_still_runs_and_runs_nothing_more(
    tmp_path: Path, events_log: pytest.LogCaptureFixture
) -> None:
    """At stop a command gets the grace to finish, then its process group is killed; the
    waiting event is dropped, no task is left and later events run nothing."""
    pid_file, out = tmp_path / "pid", tmp_path / "out"
    stuck = ["sh", "-c", 'echo run >> "$2"; sleep 600 & echo $! > "$1"; wait', "hook"]
    hooks = EventHooks(lambda name: [*stuck, str(pid_file), str(out)], stop_grace=0.2)
    hooks.observe(Renewed("prod", expires_at=JAN_1, error_kind=None))
    await until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", "the start")
    hooks.observe(Evicted("prod", "probe", expires_at=None, error_kind=None))
    await hooks.close()
    assert not hooks.busy
    assert [] == [t for t in asyncio.all_tasks() if t.get_name().startswith("on_event:")]
    await until(lambda: gone(int(pid_file.read_text())), "the grandchild's death")
    assert "killed 1 on_event command(s) still running at stop" in events_log.text
    hooks.observe(Renewed("prod", expires_at=JAN_1, error_kind=None))
    assert not hooks.busy
    assert ["run"] == lines(out)


async def test_a_hook_in_a_real_daemon_asks_sugarctl_for_the_token(
    fake: FakeSugar, short_dir: Path
) -> None:
    """In a daemon, the renewed event of the first login runs the instance's on_event,
    which finds this daemon through SUGARD_SOCKET and gets the token from sugarctl."""
    out = short_dir / "token"
    hook = ["sh", "-c", f'{SUGARCTL} token prod > "$1"', "hook", str(out)]
    config = load_config(write_config(short_dir, {"prod": instance(fake, on_event=hook)}))
    daemon = Daemon(config, short_dir / "s.sock")
    await daemon.start()
    try:
        grant = await daemon.keepers["prod"].token(wait=20)  # the login: renewed
        await until(lambda: out.exists() and out.read_text().strip() != "", "the hook's token")
        await until(lambda: not daemon.hooks.busy, "the end of the hook")
        assert grant.access_token.reveal() == out.read_text().strip()
    finally:
        await daemon.stop()


def test_on_event_in_defaults_and_per_instance() -> None:
    """[defaults] on_event applies to every instance; an instance's own replaces it."""
    config = parse_config(
        {
            "defaults": {"on_event": ["notify", "--all"]},
            "instances": {
                "prod": {"url": "https://a.example", "username": "u", "password": "p"},
                "test": {
                    "url": "https://b.example",
                    "username": "u",
                    "password": "p",
                    "on_event": ["/usr/local/bin/page-me"],
                },
            },
        }
    )
    assert ("notify", "--all") == config.instances["prod"].on_event
    assert ("/usr/local/bin/page-me",) == config.instances["test"].on_event


@pytest.mark.parametrize("given", ["notify-send sugard", [], [""], ["ok", 3]])
def test_a_bad_on_event_is_named(given: object) -> None:
    """on_event must be a non-empty list of strings (an argv: no shell unless asked for)."""
    table = {"url": "https://a.example", "username": "u", "password": "p", "on_event": given}
    with pytest.raises(ConfigError) as caught:
        parse_config({"instances": {"prod": table}}, "c.toml")
    assert [
        "c.toml: instances.prod.on_event: must be a list of a command and its arguments, like "
        '["notify", "-u"]'
    ] == [str(p) for p in caught.value.problems]


async def test_a_reload_changes_the_command_without_a_new_login(
    fake: FakeSugar, short_dir: Path
) -> None:
    """on_event edited and reloaded: the next event runs the new command; no new login."""
    first, second = short_dir / "first", short_dir / "second"

    def config_with(out: Path) -> Path:
        hook = ["sh", "-c", 'echo "$SUGARD_EVENT" >> "$1"', "hook", str(out)]
        return write_config(short_dir, {"prod": instance(fake, on_event=hook)})

    daemon = Daemon(load_config(config_with(first)), short_dir / "s.sock")
    await daemon.start()
    try:
        await daemon.keepers["prod"].token(wait=20)  # the login: renewed
        await until(lambda: ["renewed"] == lines(first), "the first command")
        config_with(second)
        assert ["prod"] == (await daemon.reload())["changed"]
        daemon.observer.observe(Evicted("prod", "report", expires_at=None, error_kind=None))
        await until(lambda: ["evicted"] == lines(second), "the new command")
        assert ["renewed"] == lines(first)
        assert 1 == fake.calls["password"]
    finally:
        await daemon.stop()
