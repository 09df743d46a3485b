"""Reload (SIGHUP, `sugarctl reload`, `POST /v1/reload`): all of the new config or none of it,
applied as a diff that makes upstream calls only for instances whose session changed."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import (
    PASSWORD,
    SUGARD,
    DaemonProcess,
    InFlight,
    instance,
    status,
    sugarctl,
    write_config,
)
from support.http import accepted_connections, curl_json, wait_until_read
from support.nobody import AS_NOBODY, NOBODY
from support.wait import wait_for

from sugard.client import SugardClient
from sugard.testing import FakeSugar, running_fake


def tokens(daemon: DaemonProcess, *names: str) -> dict[str, str]:
    with SugardClient(daemon.socket) as client:
        return {name: client.token(name, wait=30)["access_token"] for name in names}


@pytest.fixture
def three_users() -> Iterator[FakeSugar]:
    """A fake Sugar with users a, b and c: one session each, so instances do not evict."""
    with running_fake(users={name: f"{name}-pw" for name in "abc"}) as server:
        yield server


def test_bad_config_keeps_serving_the_old_tokens(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """SIGHUP, `sugarctl reload` and POST /v1/reload with an invalid config (a missing
    password file, an unknown key) all keep the old config and its token, with no upstream
    call; the API answers 422 with the errors."""
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    before = tokens(daemon, "prod")
    fake.reset_counters()

    table = instance(fake, password_file=str(short_dir / "missing.password"))
    del table["password"]
    write_config(short_dir, {"prod": table, "new": instance(fake, platform="mobile")})
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log())
    assert "missing.password" in daemon.log()
    assert before == tokens(daemon, "prod")

    ctl = sugarctl(daemon.socket, "reload")
    assert 0 != ctl.returncode
    assert "" == ctl.stdout
    assert "old one is still running" in ctl.stderr

    write_config(
        short_dir, {"prod": instance(fake, colour="red"), "new": instance(fake, platform="mobile")}
    )
    status_code, answer = curl_json(daemon.socket, "/v1/reload", "-X", "POST")
    code = str(status_code)
    assert "422" == code
    assert "invalid_config" == answer["error"]
    assert [f"{short_dir / 'config.toml'}: instances.prod.colour: unknown key"] == [
        e.split(";")[0] for e in answer["errors"]
    ]

    assert before == tokens(daemon, "prod")
    with SugardClient(daemon.socket) as client:
        assert ["prod"] == [s["name"] for s in client.status()]
    assert 0 == fake.calls["token"]
    assert PASSWORD not in daemon.log()


def test_one_changed_instance_is_the_only_upstream_call(
    three_users: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """SIGHUP after changing c's platform (its session) and b's refresh_before (not its
    session): one password login, for c only; a and b keep their tokens."""
    fake = three_users

    def table(name: str, **overrides: Any) -> dict[str, Any]:
        return instance(fake, username=name, password=f"{name}-pw", **overrides)

    config = write_config(short_dir, {n: table(n) for n in "abc"})
    daemon = start_daemon(config)
    before = tokens(daemon, "a", "b", "c")
    fake.reset_counters()

    write_config(
        short_dir,
        {"a": table("a"), "b": table("b", refresh_before=100), "c": table("c", platform="mobile")},
    )
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded:" in daemon.log())
    after = tokens(daemon, "a", "b", "c")

    assert before["a"] == after["a"]
    assert before["b"] == after["b"]
    assert before["c"] != after["c"]
    assert fake.valid(after["c"])
    assert [("password", "c", "mobile", 200)] == [
        (r.grant_type, r.username, r.platform, r.status) for r in fake.requests
    ]
    assert "mobile" == status(daemon, "c")["platform"]
    assert "0 added, 0 removed, 2 changed (1 logging in again), 1 unchanged" in daemon.log()


@pytest.mark.slow
def test_reload_answers_the_diff_and_fails_waiters_of_removed_instances(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Removing an instance while a request waits on its login answers that request with a
    clear unknown-instance error (exit 3); the added instance logs in; the API returns the
    design's diff."""
    fake.delay = 5  # prod's first login stays in flight
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    before = accepted_connections(daemon.socket)
    waiting = InFlight(daemon.socket, "token", "prod", "--wait", "30")
    wait_for(lambda: fake.calls["token"] >= 1)
    wait_until_read(daemon.socket, before)  # the request waits on the login

    fake.delay = 0
    write_config(short_dir, {"admin": instance(fake, username="admin", password="admin-pw")})
    with SugardClient(daemon.socket) as client:
        assert {"added": ["admin"], "removed": ["prod"], "changed": [], "unchanged": []} == (
            client.reload()
        )
    result = waiting.join()
    assert 3 == result.returncode
    assert "sugarctl: instance 'prod' is no longer configured\n" == result.stderr
    assert fake.valid(tokens(daemon, "admin")["admin"])
    gone = sugarctl(daemon.socket, "token", "prod")
    assert 3 == gone.returncode
    assert "admin" in gone.stderr


@pytest.mark.slow
def test_refresh_in_flight_for_a_replaced_instance_cannot_overwrite_the_new_session(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A refresh still in flight when its instance's session settings change is abandoned
    before the new session logs in; once Sugar has answered it, the new token still stands."""
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    tokens(daemon, "prod")
    fake.delay = 1.5
    refreshing = InFlight(daemon.socket, "refresh", "prod")
    wait_for(lambda: fake.calls["token"] >= 2)  # the refresh has reached Sugar

    fake.delay = 0
    write_config(short_dir, {"prod": instance(fake, platform="mobile")})
    with SugardClient(daemon.socket) as client:
        assert ["prod"] == client.reload()["changed"]
    new = tokens(daemon, "prod")["prod"]
    refreshing.join()
    wait_for(
        lambda: any(r.grant_type == "refresh_token" for r in fake.requests),
        what="Sugar's answer to the abandoned refresh",
    )

    assert new == tokens(daemon, "prod")["prod"]
    assert fake.valid(new)
    now = status(daemon, "prod")
    assert ("mobile", 1, 0) == (now["platform"], now["logins"], now["refreshes"])
    assert "replaces" not in daemon.log()  # no refreshed token was ever installed


@pytest.mark.slow
def test_reload_time_with_100_instances(
    short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """With 100 live instances, a reload that changes one makes exactly one login and
    answers within 5 s (the measured time is printed; run with -s to see it)."""
    users = {f"u{i:03}": f"pw-{i:03}" for i in range(100)}
    with running_fake(users=users) as fake:

        def table(name: str, **overrides: Any) -> dict[str, Any]:
            return instance(fake, username=name, password=users[name], **overrides)

        config = write_config(
            short_dir, {n: table(n) for n in users}, daemon={"max_parallel_logins": 16}
        )
        daemon = start_daemon(config)
        before = tokens(daemon, *users)
        assert 100 == fake.calls["password"]
        fake.reset_counters()

        write_config(
            short_dir,
            {n: table(n, platform="mobile") if n == "u050" else table(n) for n in users},
            daemon={"max_parallel_logins": 16},
        )
        with SugardClient(daemon.socket) as client:
            started = time.perf_counter()
            diff = client.reload()
            elapsed = time.perf_counter() - started
        after = tokens(daemon, *users)

    print(f"\nreload with 100 instances, one changed: {elapsed * 1000:.0f} ms")
    assert (["u050"], 99) == (diff["changed"], len(diff["unchanged"]))
    assert [("password", "u050")] == [(r.grant_type, r.username) for r in fake.requests]
    assert 99 == sum(before[n] == after[n] for n in users)
    assert elapsed < 5.0


@pytest.mark.slow
def test_reload_applies_log_level_and_names_restart_only_settings(
    fake: FakeSugar, short_dir: Path
) -> None:
    """Without --log-level, a reload applies [daemon].log_level at once, and says which
    [daemon] settings wait for a restart: in the log, and to whoever ran `sugarctl reload`."""
    config = write_config(short_dir, {"prod": instance(fake)}, daemon={"log_level": "warning"})
    sock = short_dir / "s.sock"
    log_path = short_dir / "run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [SUGARD, "run", "-c", str(config), "--socket", str(sock)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: sugarctl(sock, "ping").returncode == 0)
        assert "listening on" not in log_path.read_text()  # info is below "warning"
        write_config(
            short_dir,
            {"prod": instance(fake)},
            daemon={"log_level": "debug", "shutdown_grace": 3, "metrics_listen": "127.0.0.1:0"},
        )
        reloaded = sugarctl(sock, "reload")
        assert 0 == reloaded.returncode
        assert "no changes (1 unchanged)\n" == reloaded.stdout
        assert (
            "sugarctl: [daemon] shutdown_grace, [daemon] metrics_listen changed: takes effect "
            "when sugard restarts (systemctl --user restart sugard, or stop and start it)\n"
        ) == reloaded.stderr
        text = log_path.read_text()
        assert "log level is now debug" in text
        assert (
            "[daemon] shutdown_grace, metrics_listen changed: takes effect when sugard "
            "restarts (systemctl --user restart sugard)"
        ) in text
    finally:
        proc.terminate()
        assert 0 == proc.wait(15)


@pytest.mark.slow
def test_a_request_waiting_on_a_replaced_session_gets_the_new_one(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A `sugarctl token` waiting on prod's login while a reload changes prod's user (a new
    session for the same name) is answered from the new session, not with "unknown instance"."""
    fake.maintenance = True  # prod's login fails and backs off: the request waits
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    before = accepted_connections(daemon.socket)
    waiting = InFlight(daemon.socket, "token", "prod", "--wait", "10")
    wait_for(lambda: fake.calls["token"] >= 2)
    wait_until_read(daemon.socket, before)  # the request waits on the login

    write_config(short_dir, {"prod": instance(fake, username="admin", password="admin-pw")})
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "1 changed (1 logging in again)" in daemon.log())
    fake.maintenance = False
    result = waiting.join()

    assert (0, "") == (result.returncode, result.stderr)
    token = result.stdout.strip()
    assert fake.valid(token)
    assert token == tokens(daemon, "prod")["prod"]
    assert ["admin"] == [r.username for r in fake.requests if r.status == 200]


def test_a_waiting_request_gets_no_new_session_the_reload_took_away_from_its_uid(
    fake: FakeSugar,
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
    foreign_sugarctl: str,
) -> None:
    """A request of another uid waiting on prod when a reload replaces prod's session and
    narrows prod to its owner gets 403 (exit 7), not the new session's token."""
    fake.maintenance = True
    daemon = start_daemon(
        write_config(short_dir, {"prod": instance(fake)}, daemon={"allowed_uids": [NOBODY]})
    )
    short_dir.chmod(0o755)  # let nobody reach the socket; the daemon's own check decides
    daemon.socket.chmod(0o666)
    before = accepted_connections(daemon.socket)
    argv = [*AS_NOBODY, foreign_sugarctl, "--socket", str(daemon.socket), "token", "prod"]
    argv += ["--wait", "10"]
    result: list[subprocess.CompletedProcess[str]] = []
    waiting = threading.Thread(
        target=lambda: result.append(
            subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        )
    )
    waiting.start()
    wait_for(lambda: fake.calls["token"] >= 2)
    wait_until_read(daemon.socket, before)  # the request waits on the login

    write_config(
        short_dir,
        {"prod": instance(fake, username="admin", password="admin-pw", allowed_uids=[])},
        daemon={"allowed_uids": [NOBODY]},
    )
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "1 changed (1 logging in again)" in daemon.log())
    fake.maintenance = False
    waiting.join(30)

    assert 7 == result[0].returncode, result[0].stderr
    assert (
        f"sugarctl: uid {NOBODY} may not use instance 'prod'; its allowed_uids / allowed_gids "
        "in the config decide who may\n"
    ) == result[0].stderr
    assert "" == result[0].stdout
    assert f"refused uid {NOBODY} the new session of prod after a reload" in daemon.log()


def test_verify_tls_off_is_logged_for_each_instance_a_reload_adds_or_changes(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """The verify_tls = false warning comes at start, again when a reload adds such an
    instance or changes one (even a setting that keeps its session), never for one a reload
    leaves alone."""
    warning = "TLS verification is OFF (verify_tls = false)"
    insecure = instance(fake, verify_tls=False)
    config = write_config(short_dir, {"prod": insecure, "safe": instance(fake, platform="mobile")})
    daemon = start_daemon(config)
    assert 1 == daemon.log().count(f"prod: {warning}")

    def reload(instances: dict[str, dict[str, Any]], expected: dict[str, list[str]]) -> None:
        write_config(short_dir, instances)
        with SugardClient(daemon.socket) as client:
            assert expected == {k: v for k, v in client.reload().items() if v}

    reload(
        {"prod": insecure, "safe": instance(fake, platform="mobile", refresh_before=100)},
        {"changed": ["safe"], "unchanged": ["prod"]},
    )
    assert (1, 0) == (daemon.log().count(f"prod: {warning}"), daemon.log().count("safe: TLS"))
    reload(
        {
            "prod": {**insecure, "refresh_before": 100},
            "safe": instance(fake, platform="mobile", refresh_before=100),
        },
        {"changed": ["prod"], "unchanged": ["safe"]},
    )
    assert 2 == daemon.log().count(f"prod: {warning}")
    reload(
        {
            "prod": {**insecure, "refresh_before": 100},
            "safe": instance(fake, platform="mobile", refresh_before=100),
            "lab": instance(fake, platform="portal", verify_tls=False),
        },
        {"added": ["lab"], "unchanged": ["prod", "safe"]},
    )
    assert (2, 1) == (daemon.log().count(f"prod: {warning}"), daemon.log().count(f"lab: {warning}"))
