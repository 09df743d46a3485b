"""What the keeper and the proxy report, seen from outside a real `sugard run`: the metrics a
scrape of `/v1/metrics` parses to (prometheus_client's own parser) agree with what the fake
Sugar counted over a login, refreshes, two evictions, a failure and a recovery; and the
`on_event` command runs for each of those events, a slow one holding up nothing, a failing one
logged."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support.daemon import PASSWORD, USER, DaemonProcess, instance, sugarctl, write_config
from support.hooks import lines, recorder
from support.http import run_curl
from support.metrics import samples, scrape, value, with_name
from support.wait import wait_for

from sugard.config import parse_config
from sugard.keeper.supervisor import CountedCalls
from sugard.observe import Event, Observer, UpstreamCall
from sugard.sugar import SugarClient, new_http_session
from sugard.testing import FakeSugar, running_fake


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert 0 == done.returncode, done.stderr
    return done.stdout.strip()


def events(out: Path) -> list[tuple[str, str]]:
    """(event, error kind) of each run of the recorder, in order."""
    return [(line.split(" ")[0], line.split(" ")[3]) for line in lines(out)]


def settled(daemon: DaemonProcess, out: Path) -> Callable[[], bool]:
    """Every run of the recorder has ended (logged): the next event starts a run of its own
    instead of waiting behind one, where a later event could replace it (coalescing)."""
    return lambda: daemon.log().count("') exited 0") == len(lines(out))


def by(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, label: str) -> dict:
    return {dict(labels)[label]: v for labels, v in with_name(found, name).items()}


@pytest.mark.slow
def test_counters_agree_with_the_fake_and_each_event_runs_its_command(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """login; two `sugarctl refresh`; an eviction a script reports (probe, refused refresh,
    login: one `evicted`, counted once); another with the password changed at Sugar
    (failed); the password back and `sugarctl refresh --retry-rejected` (recovered). Each
    step waits for its event."""
    out = short_dir / "events"
    config = write_config(
        short_dir, {"prod": instance(fake, probe_interval=0, on_event=recorder(out))}
    )
    daemon = start_daemon(config)
    sock = daemon.socket

    first = ok(sugarctl(sock, "token", "prod"))
    wait_for(lambda: [("renewed", "")] == events(out), "renewed after the login")
    expires_at = lines(out)[0].split(" ")[2]
    assert expires_at.endswith("Z") and expires_at.startswith("20"), expires_at
    assert "prod" == lines(out)[0].split(" ")[1]

    for n in (2, 3):
        wait_for(settled(daemon, out), "the hook's end")
        ok(sugarctl(sock, "refresh", "prod"))
        wait_for(lambda n=n: [("renewed", "")] * n == events(out), f"renewed #{n}")

    evicted_token = ok(sugarctl(sock, "token", "prod"))
    assert evicted_token != first
    assert 1 == fake.evict(USER, "sugard")
    wait_for(settled(daemon, out), "the hook's end")
    fresh = ok(sugarctl(sock, "invalidate", "prod", evicted_token))
    assert fake.valid(fresh)
    # One eviction, one event: the refresh Sugar then refuses is the same eviction.
    wait_for(lambda: ("renewed", "refresh_token") == events(out)[-1], "renewed after re-login")
    assert [("evicted", ""), ("renewed", "refresh_token")] == events(out)[3:]

    wait_for(settled(daemon, out), "the hook's end")
    seen = len(events(out))
    fake.set_password(USER, "changed-at-sugar")
    assert 1 == fake.evict(USER, "sugard")
    refused = sugarctl(sock, "invalidate", "prod", fresh)
    assert 0 != refused.returncode
    wait_for(lambda: ("failed", "credentials") in events(out)[seen:], "failed")
    assert "evicted" == events(out)[seen][0]
    assert ("failed", "credentials") == events(out)[-1]

    fake.set_password(USER, PASSWORD)
    wait_for(settled(daemon, out), "the hook's end")
    seen = len(events(out))
    back = ok(sugarctl(sock, "refresh", "prod", "--retry-rejected"))
    assert fake.valid(back)
    wait_for(
        lambda: [("recovered", "credentials"), ("renewed", "credentials")] == events(out)[seen:],
        "recovered, then renewed",
    )

    _, text = scrape(sock)
    found = samples(text)
    calls = {
        (dict(labels)["grant"], dict(labels)["outcome"]): v
        for labels, v in with_name(found, "sugard_upstream_calls_total").items()
    }
    fake_names = {"password": "password", "refresh": "refresh_token", "probe": "ping"}
    fake_names["serverinfo"] = "metadata"  # the version read, under the call's old name
    for grant, counted in fake_names.items():
        total = sum(v for (g, _), v in calls.items() if g == grant)
        assert fake.calls[counted] == total, grant
    assert {
        ("password", "ok"): 3,  # the first login, after the eviction, the recovery
        ("password", "rejected"): 1,  # the changed password
        ("refresh", "ok"): 2,
        ("refresh", "rejected"): 2,  # both evictions: Sugar deleted the refresh token
        ("probe", "rejected"): 2,  # each reported token checked once, found dead
        ("serverinfo", "ok"): 1,  # after the first login only: kept across logins
    } == {key: v for key, v in calls.items() if v}
    assert {"initial": 1, "forced": 3, "reported": 2} == {
        reason: v for reason, v in by(found, "sugard_renewals_total", "reason").items() if v
    }
    assert {"report": 2} == {  # each eviction once: not again by the refused refresh
        how: v for how, v in by(found, "sugard_evictions_total", "found_by").items() if v
    }
    # token, refresh x2, invalidate, refresh: served; the invalidate that ended failed: 502
    assert {"served": 6, "rejected": 1} == {
        outcome: v
        for outcome, v in by(found, "sugard_token_requests_total", "outcome").items()
        if v
    }
    assert 1 == value(found, "sugard_instance_state", sugar_instance="prod", state="ready")


@pytest.mark.slow
def test_a_slow_hook_holds_up_nothing_and_events_coalesce(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """The login's hook blocks until the test lets it go; meanwhile three refreshes are
    answered, and then only the newest of their events runs: two runs for four events."""
    out, gate = short_dir / "events", short_dir / "gate"
    config = write_config(
        short_dir, {"prod": instance(fake, probe_interval=0, on_event=recorder(out, gate))}
    )
    daemon = start_daemon(config)
    ok(sugarctl(daemon.socket, "token", "prod"))
    wait_for(lambda: 1 == len(lines(out)), "the first hook's start")
    for _ in range(3):
        ok(sugarctl(daemon.socket, "refresh", "prod"))
    assert 3 == fake.calls["refresh_token"]
    assert 1 == len(lines(out))  # still the first run: the keeper did not wait for it
    gate.touch()
    wait_for(lambda: 2 == len(lines(out)), "the coalesced run")
    # Both runs' ends: the first one's "exited 0" may be logged after the second has started.
    ended = "on_event command for renewed ('sh') exited 0"
    wait_for(lambda: 2 <= daemon.log().count(ended), "the second run's end")
    assert ["renewed", "renewed"] == [line.split(" ")[0] for line in lines(out)]
    assert 2 == daemon.log().count(ended)


@pytest.mark.slow
def test_a_failing_hook_is_logged_and_the_daemon_serves_on(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A hook that exits 3 after a line on stderr: its status and that line are logged, the
    next event runs it again, and tokens are served all along."""
    hook = ["sh", "-c", 'echo "boom: $SUGARD_EVENT" >&2; exit 3']
    config = write_config(short_dir, {"prod": instance(fake, probe_interval=0, on_event=hook)})
    daemon = start_daemon(config)
    said = "on_event command for renewed ('sh') exited with status 3; stderr: 'boom: renewed'"
    assert fake.valid(ok(sugarctl(daemon.socket, "token", "prod")))
    wait_for(lambda: said in daemon.log(), "the failure in the log")
    assert fake.valid(ok(sugarctl(daemon.socket, "refresh", "prod")))
    wait_for(lambda: 2 == daemon.log().count(said), "the second failure in the log")
    assert fake.valid(ok(sugarctl(daemon.socket, "token", "prod")))


@pytest.mark.slow
def test_proxied_requests_are_counted_by_status_class(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Two reads through the socket's proxy (200) and one of a missing record (404): the
    scrape counts them by class, and the latency histogram has three observations."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake, probe_interval=0)}))
    base = "http://sugard/v1/instances/prod/rest/v11_1"
    for path in ("/ping", "/me", "/Accounts/no-such-id"):
        run_curl("--unix-socket", str(daemon.socket), "-o", "/dev/null", base + path)
    found = samples(scrape(daemon.socket)[1])
    assert {"2xx": 2, "4xx": 1} == by(found, "sugard_proxy_requests_total", "status_class")
    assert 3 == value(found, "sugard_proxy_request_duration_seconds_count", sugar_instance="prod")


async def test_a_serverinfo_read_is_counted_as_sugar_answered_it() -> None:
    """ServerInfo is counted as a probe is: `ok` when Sugar answered with the token, `rejected`
    when it refused the token (a 401), `transient` when nobody answered."""
    counted: list[tuple[str, str]] = []

    class Recorder(Observer):
        def observe(self, event: Event) -> None:
            if isinstance(event, UpstreamCall):
                counted.append((event.grant, event.outcome))

    async with new_http_session() as http:
        with running_fake(users={USER: PASSWORD}, sugar_version="13.3") as fake:
            config = parse_config({"instances": {"prod": instance(fake)}}).instances["prod"]
            calls = CountedCalls(SugarClient(config, http), Recorder(), "prod")
            grant = await calls.login()
            assert "13.3.0" == await calls.server_version(grant.access_token)
            assert fake.revoke(grant.access_token.reveal())
            assert await calls.server_version(grant.access_token) is None
        assert await calls.server_version(grant.access_token) is None  # the fake is gone
    assert [
        ("password", "ok"),
        ("serverinfo", "ok"),
        ("serverinfo", "rejected"),
        ("serverinfo", "transient"),
    ] == counted
