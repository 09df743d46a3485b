"""Prometheus metrics: `/v1/metrics` on the socket scraped with curl from a real daemon, and
`/metrics` on `metrics_listen` over TCP, parsed with prometheus_client's own parser; the counters
behind the observer interface, fed as the keeper and proxy will feed them."""

from __future__ import annotations

import asyncio
import calendar
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from support.daemon import PASSWORD, USER, DaemonProcess, instance, write_config
from support.daemon import status as daemon_status
from support.http import run_curl
from support.metrics import Samples, samples, scrape, value, with_name
from support.nobody import AS_NOBODY, NOBODY
from support.wait import wait_for

from sugard.keeper import State
from sugard.observe import (
    RENEWAL_REASONS,
    UPSTREAM_GRANTS,
    UPSTREAM_OUTCOMES,
    Evicted,
    Fanout,
    Observer,
    Proxied,
    RenewalReason,
    RenewalStarted,
    TokenRequested,
    UpstreamCall,
)
from sugard.observe.metrics import Metrics, status_class
from sugard.testing import FakeSugar, running_fake
from sugard.wire import STATES


def token_json(sock: Path, name: str = "prod") -> dict[str, Any]:
    done = run_curl("--unix-socket", str(sock), f"http://sugard/v1/instances/{name}/token")
    assert 0 == done.returncode, done.stderr
    body: dict[str, Any] = json.loads(done.stdout)
    return body


def epoch(rfc3339: str) -> float:
    return calendar.timegm(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ"))


@pytest.fixture
def short_lived() -> Iterator[FakeSugar]:
    """A fake whose access tokens live 2 s, so the daemon refreshes about every second."""
    with running_fake(users={USER: PASSWORD}, access_lifetime=2) as server:
        yield server


def test_the_states_are_the_keepers() -> None:
    """The state gauge's label values are exactly the keeper's states."""
    assert [s.value for s in State] == list(STATES)


@pytest.mark.slow
def test_scrape_agrees_with_the_fake_over_a_login_and_refreshes(
    short_lived: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """After a login and refreshes: state `ready` one-hot, the expiry of the token the fake
    issued last, every token request counted by outcome, process metrics of the daemon's pid;
    and no username, password or token anywhere in the text."""
    fake = short_lived
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    served = 0
    for _ in range(3):
        assert fake.valid(token_json(daemon.socket)["access_token"])
        served += 1
    wait_for(lambda: fake.calls["refresh_token"] >= 2, "two refreshes")
    fake.access_lifetime = 3600  # the next refresh brings a token that lasts: things settle
    wait_for(
        lambda: (daemon_status(daemon)["expires_at"] or "") > _rfc(time.time() + 600),
        "a token that lasts",
    )
    last = token_json(daemon.socket)
    served += 1
    bad = run_curl(
        "--unix-socket", str(daemon.socket), "http://sugard/v1/instances/prod/token?wait=x"
    )
    assert '"bad_request"' in bad.stdout
    run_curl("--unix-socket", str(daemon.socket), "http://sugard/v1/instances/nope/token")

    before = time.time()
    content_type, text = scrape(daemon.socket)
    after = time.time()
    found = samples(text)

    assert content_type.startswith("text/plain; version=")
    assert 1 == fake.calls["password"]
    assert fake.valid(last["access_token"])
    assert {s: float(s == "ready") for s in STATES} == {
        dict(labels)["state"]: v for labels, v in with_name(found, "sugard_instance_state").items()
    }
    expiry = value(found, "sugard_token_expiry_timestamp_seconds", sugar_instance="prod")
    assert epoch(last["expires_at"]) == int(expiry)
    assert fake.requests[-1].time + 3600 == pytest.approx(expiry, abs=2)
    expires_in = value(found, "sugard_token_expires_in_seconds", sugar_instance="prod")
    assert before - 1 <= expiry - expires_in <= after + 1
    renewed = value(found, "sugard_last_renewal_timestamp_seconds", sugar_instance="prod")
    assert fake.requests[-1].time == pytest.approx(renewed, abs=2)

    requests = {
        dict(labels)["outcome"]: v
        for labels, v in with_name(found, "sugard_token_requests_total").items()
    }
    assert {
        "served": served,
        "unavailable": 0,
        "rejected": 0,
        "forbidden": 0,
        "gone": 0,
        "bad_request": 1,
    } == requests
    # Counted through the observer by the keeper: every series is there from the start.
    assert len(UPSTREAM_GRANTS) * len(UPSTREAM_OUTCOMES) == len(
        with_name(found, "sugard_upstream_calls_total")
    )
    assert len(RENEWAL_REASONS) == len(with_name(found, "sugard_renewals_total"))
    assert not with_name(found, "sugard_proxy_request_duration_seconds_count")  # none proxied
    assert not with_name(found, "sugard_fleet_role")  # fleet mode is off

    assert 0 < value(found, "process_resident_memory_bytes")
    assert len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) == pytest.approx(
        value(found, "process_open_fds"), abs=3
    )
    assert 1 == len(with_name(found, "python_info"))
    assert 1 == len(with_name(found, "sugard_build_info"))

    for secret in (USER, PASSWORD, *fake.issued):
        assert secret not in text
    labels = {v for key in found for _, v in key[1]}
    assert USER not in labels
    assert "nope" not in labels  # an unknown name in a URL makes no series
    # Prometheus owns `instance` (the target) and `job`: a series of ours with either would
    # have it renamed to exported_instance at every scrape.
    assert not {"instance", "job"} & {k for key in found for k, _ in key[1]}


def _rfc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def test_openmetrics_when_the_scraper_asks_for_it(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """An Accept of application/openmetrics-text (what Prometheus sends) gets OpenMetrics,
    which prometheus_client's OpenMetrics parser reads to its `# EOF`."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    content_type, text = scrape(
        daemon.socket, "Accept: application/openmetrics-text; version=1.0.0"
    )
    assert content_type.startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(text)}
    assert {"sugard_instance_state", "sugard_token_requests", "process_cpu_seconds"} <= names


@pytest.mark.slow
def test_metrics_on_the_socket_follow_the_socket_rules(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """uid 65534 gets 403 for /v1/metrics as for any route, and its refused token request is
    counted as `forbidden`."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run curl as uid 65534 with setpriv")
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    daemon.socket.parent.chmod(0o755)
    daemon.socket.chmod(0o666)
    for path in ("/v1/metrics", "/v1/instances/prod/token"):
        done = subprocess.run(
            [
                *AS_NOBODY,
                "curl",
                "-sS",
                "-w",
                "\n%{http_code}",
                "--unix-socket",
                str(daemon.socket),
                f"http://sugard{path}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.stdout.endswith("\n403"), done.stdout + done.stderr
        assert '"forbidden"' in done.stdout
    found = samples(scrape(daemon.socket)[1])
    assert 1 == value(
        found, "sugard_token_requests_total", sugar_instance="prod", outcome="forbidden"
    )


def instances_in(found: Samples) -> set[str]:
    """The instances a scrape has series of."""
    return {
        dict(labels)["sugar_instance"] for _, labels in found if "sugar_instance" in dict(labels)
    }


def test_metrics_on_the_socket_show_a_uid_only_the_instances_it_may_use(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A uid allowed on `prod` but not on `finance` scrapes only prod's series on the socket
    (as /v1/instances lists only prod); the owner, and metrics_listen, see both."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run curl as uid 65534 with setpriv")
    config = write_config(
        short_dir,
        {
            "prod": instance(fake),
            "finance": instance(fake, allowed_uids=[], username="admin", password="admin-pw"),
        },
        daemon={"allowed_uids": [NOBODY], "metrics_listen": "127.0.0.1:0"},
    )
    daemon = start_daemon(config)
    daemon.socket.parent.chmod(0o755)
    daemon.socket.chmod(0o666)
    token_json(daemon.socket, "finance")
    done = subprocess.run(
        [
            *AS_NOBODY,
            "curl",
            "-sS",
            "--unix-socket",
            str(daemon.socket),
            "http://sugard/v1/metrics",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    theirs = samples(done.stdout)
    assert {"prod"} == instances_in(theirs)
    assert ("process_open_fds", frozenset()) in theirs  # the daemon's own series stay
    assert {"prod", "finance"} == instances_in(samples(scrape(daemon.socket)[1]))
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", daemon.log())
    assert match, daemon.log()
    over_tcp = run_curl(f"{match.group(1)}/metrics")
    assert {"prod", "finance"} == instances_in(samples(over_tcp.stdout))


@pytest.mark.slow
def test_metrics_listen_serves_the_same_over_tcp(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """`metrics_listen = "127.0.0.1:0"`: the log names the port; GET /metrics there answers
    the same families as the socket, counters included; other paths are 404."""
    config = write_config(
        short_dir, {"prod": instance(fake)}, daemon={"metrics_listen": "127.0.0.1:0"}
    )
    daemon = start_daemon(config)
    token_json(daemon.socket)
    match = re.search(r"metrics on (http://127\.0\.0\.1:\d+)/metrics", daemon.log())
    assert match, daemon.log()
    done = run_curl("-w", "\n%{content_type}", f"{match.group(1)}/metrics")
    assert 0 == done.returncode, done.stderr
    body, _, content_type = done.stdout.rpartition("\n")
    assert content_type.startswith("text/plain; version=")
    over_tcp = samples(body)
    assert 1 == value(
        over_tcp, "sugard_token_requests_total", sugar_instance="prod", outcome="served"
    )
    on_socket = samples(scrape(daemon.socket)[1])
    assert {k[0] for k in on_socket} == {k[0] for k in over_tcp}
    assert "404" == run_curl("-o", "/dev/null", "-w", "%{http_code}", f"{match.group(1)}/").stdout


def test_metrics_listen_on_a_taken_port_stops_the_start(fake: FakeSugar, short_dir: Path) -> None:
    """A port already in use: sugard exits 1 with a line naming metrics_listen, and leaves no
    socket behind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(
            short_dir, {"prod": instance(fake)}, daemon={"metrics_listen": f"127.0.0.1:{port}"}
        )
        daemon = DaemonProcess(config, short_dir / "s.sock")
        assert 1 == daemon.proc.wait(30)
        log = daemon.log()
        daemon.stop()
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in log
    assert "choose another [daemon] metrics_listen" in log
    assert not daemon.socket.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("9101", 'must be "HOST:PORT"'),
        ("127.0.0.1:70000", 'must be "HOST:PORT" with a port of 0-65535'),
        ("::1:9101", "an IPv6 address needs brackets"),
        (9101, "must be a string"),
    ],
)
def test_a_bad_metrics_listen_is_named(short_dir: Path, given: object, message: str) -> None:
    """`sugard check` names daemon.metrics_listen and what a good value looks like."""
    from support.daemon import SUGARD

    config = write_config(
        short_dir,
        {"prod": {"url": "https://crm.example.com", "username": "u", "password": "p"}},
        daemon={"metrics_listen": given},
    )
    done = subprocess.run(
        [SUGARD, "check", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert 0 != done.returncode
    assert f"{config}: daemon.metrics_listen: {message}" in done.stdout + done.stderr


# The counters, through the observer interface


def statuses(*names: str, fleet: dict[str, Any] | None = None) -> Callable[[], list[Any]]:
    def read() -> list[dict[str, Any]]:
        return [
            {"name": n, "state": "ready", "expires_at": None, "last_refresh": None, "fleet": fleet}
            for n in names
        ]

    return read


def render(metrics: Metrics) -> Samples:
    body, content_type = asyncio.run(metrics.render())
    assert content_type.startswith("text/plain")
    return samples(body.decode())


def test_counters_count_what_the_observer_hears() -> None:
    """Each observer call lands in its own series; two daemons' metrics in one process stay
    apart (each has its own registry)."""
    metrics = Metrics(statuses("prod", "test"), process=False)
    other = Metrics(statuses("prod"), process=False)
    observer: Observer = Fanout(metrics)
    observer.observe(UpstreamCall("prod", "password", "ok"))
    observer.observe(UpstreamCall("prod", "refresh", "rejected"))
    observer.observe(UpstreamCall("prod", "refresh", "rejected"))
    observer.observe(RenewalStarted("prod", RenewalReason.REPORTED))
    observer.observe(Evicted("prod", "report", expires_at=None, error_kind=None))
    observer.observe(TokenRequested("test", "unavailable"))
    found = render(metrics)
    assert 1 == value(
        found, "sugard_upstream_calls_total", sugar_instance="prod", grant="password", outcome="ok"
    )
    assert 2 == value(
        found,
        "sugard_upstream_calls_total",
        sugar_instance="prod",
        grant="refresh",
        outcome="rejected",
    )
    assert 0 == value(
        found, "sugard_upstream_calls_total", sugar_instance="test", grant="password", outcome="ok"
    )
    assert 1 == value(found, "sugard_renewals_total", sugar_instance="prod", reason="reported")
    assert 1 == value(found, "sugard_evictions_total", sugar_instance="prod", found_by="report")
    assert 1 == value(
        found, "sugard_token_requests_total", sugar_instance="test", outcome="unavailable"
    )
    assert 0 == value(
        render(other),
        "sugard_upstream_calls_total",
        sugar_instance="prod",
        grant="password",
        outcome="ok",
    )


def test_proxied_requests_by_status_class_with_latency() -> None:
    """Status classes 2xx..5xx and `none`; the histogram's buckets hold the latencies."""
    metrics = Metrics(statuses("prod"), process=False)
    for status, seconds in [(200, 0.02), (204, 0.3), (401, 0.03), (502, 20.0), (None, 0.001)]:
        metrics.observe(Proxied("prod", status, seconds))
    found = render(metrics)
    by_class = {
        dict(labels)["status_class"]: v
        for labels, v in with_name(found, "sugard_proxy_requests_total").items()
    }
    assert {"2xx": 2, "4xx": 1, "5xx": 1, "none": 1} == by_class
    assert 5 == value(found, "sugard_proxy_request_duration_seconds_count", sugar_instance="prod")
    assert 3 == value(
        found, "sugard_proxy_request_duration_seconds_bucket", sugar_instance="prod", le="0.05"
    )
    assert 4 == value(
        found, "sugard_proxy_request_duration_seconds_bucket", sugar_instance="prod", le="1.0"
    )
    assert ["none", "2xx", "5xx"] == [status_class(s) for s in (99, 299, 599)]


def test_an_instance_removed_loses_its_series() -> None:
    """After a reload removes `test`, no series names it; `prod` keeps its counts."""
    names = ["prod", "test"]
    metrics = Metrics(lambda: statuses(*names)(), process=False)
    metrics.observe(TokenRequested("prod", "served"))
    metrics.observe(TokenRequested("test", "served"))
    assert {"prod", "test"} == _instances(render(metrics))
    names.remove("test")
    found = render(metrics)
    assert {"prod"} == _instances(found)
    assert 1 == value(found, "sugard_token_requests_total", sugar_instance="prod", outcome="served")


def _instances(found: Samples) -> set[str]:
    return {v for key in found for k, v in key[1] if k == "sugar_instance"}


def test_fleet_role_only_in_fleet_mode() -> None:
    """A status with `fleet` gets a one-hot role; one without gets no role series at all."""
    fleet = {"role": "follower", "holder": "host-a:123", "epoch": 7}
    found = render(Metrics(statuses("prod", fleet=fleet), process=False))
    assert {"leader": 0.0, "follower": 1.0} == {
        dict(labels)["role"]: v for labels, v in with_name(found, "sugard_fleet_role").items()
    }
    assert "host-a" not in json.dumps(sorted(map(str, found)))
    assert not with_name(render(Metrics(statuses("prod"), process=False)), "sugard_fleet_role")


def test_an_observer_that_raises_does_not_reach_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken observer is logged; the next one still hears, and the caller sees nothing."""

    class Broken(Observer):
        def observe(self, event: Any) -> None:
            raise RuntimeError("bug")

    metrics = Metrics(statuses("prod"), process=False)
    Fanout(Broken(), metrics).observe(RenewalStarted("prod", RenewalReason.FORCED))
    assert 1 == value(
        render(metrics), "sugard_renewals_total", sugar_instance="prod", reason="forced"
    )
    assert "Broken failed on RenewalStarted" in caplog.text


def test_a_scrape_can_ask_for_some_metrics_only() -> None:
    """`?name[]=` limits the answer to the samples of those names."""
    metrics = Metrics(statuses("prod"), process=False)
    metrics.observe(TokenRequested("prod", "served"))
    body, _ = asyncio.run(
        metrics.render("", ["sugard_instance_state", "sugard_token_requests_total"])
    )
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"sugard_instance_state", "sugard_token_requests"} == names


def test_a_reload_says_metrics_listen_waits_for_a_restart(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """metrics_listen changed in a reload: the log says it takes effect at the next start."""
    from support.daemon import sugarctl

    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    write_config(short_dir, {"prod": instance(fake)}, daemon={"metrics_listen": "127.0.0.1:0"})
    assert 0 == sugarctl(daemon.socket, "reload").returncode
    assert "[daemon] metrics_listen changed: takes effect when sugard restarts" in daemon.log()
    assert "metrics on http" not in daemon.log()
