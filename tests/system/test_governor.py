"""The request governor against the fake SugarCRM, measured at the fake's side: no one-second
window over rate_limit, the limit used under load, a second client process served in about one
turn while another floods, 429 with Retry-After past rate_wait, and who sent what."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.daemon import DaemonProcess, instance, proxy_url, sugarctl, write_config
from support.http import run_curl
from support.load import Answer, busiest_second, flood, rate_at_sugar
from support.metrics import samples, scrape, value
from support.wait import wait_for

from sugard.testing import FakeSugar

SOCKET_SITE = "http://sugard/v1/instances/prod"


@pytest.fixture
def governed(fake: FakeSugar, short_dir: Path, start_daemon) -> Callable[..., DaemonProcess]:
    """Start a daemon whose instance `prod` (the fake, with a listener) has these settings."""

    def start(**settings: Any) -> DaemonProcess:
        table = instance(fake, listen="127.0.0.1:0", **settings)
        daemon: DaemonProcess = start_daemon(write_config(short_dir, {"prod": table}))
        with daemon.client() as client:
            client.token("prod", wait=20)
        return daemon

    return start


@pytest.mark.slow
@pytest.mark.parametrize("route", ["socket", "listener"])
def test_no_second_at_sugar_is_over_the_limit_and_the_limit_is_used(
    governed: Callable[..., DaemonProcess], fake: FakeSugar, route: str
) -> None:
    """70 requests, 20 at a time, with rate_limit 20: the fake never sees more than 20 in
    any one-second window, and gets them at no less than 0.85 of the limit; all succeed."""
    daemon = governed(rate_limit=20)
    fake.reset_counters()
    if route == "socket":
        answers = asyncio.run(flood(SOCKET_SITE, "/rest/v10/me", 70, 20, daemon.socket))
    else:
        answers = asyncio.run(flood(proxy_url(daemon), "/rest/v10/me", 70, 20))
    assert [200] * 70 == [answer.status for answer in answers]
    arrivals = fake.arrivals
    assert 70 <= len(arrivals)
    assert busiest_second(arrivals) <= 20
    assert rate_at_sugar(arrivals) >= 0.85 * 20


def test_without_a_limit_nothing_waits(
    governed: Callable[..., DaemonProcess], fake: FakeSugar
) -> None:
    """rate_limit 0 (the default for a site outside SugarCloud): 40 requests at once reach
    the fake unpaced, more than 20 of them within one second."""
    daemon = governed()
    fake.reset_counters()
    answers = asyncio.run(flood(SOCKET_SITE, "/rest/v10/ping", 40, 20, daemon.socket))
    assert [200] * 40 == [answer.status for answer in answers]
    assert busiest_second(fake.arrivals) > 20


def test_past_rate_wait_the_answer_is_429_with_retry_after(
    governed: Callable[..., DaemonProcess], fake: FakeSugar
) -> None:
    """rate_limit 2 and rate_wait 2: of 20 requests at once, those that cannot go within two
    seconds get 429 in Sugar's envelope with Retry-After; the fake never sees more than 2 in
    any one-second window; the metrics count both, by instance only."""
    daemon = governed(rate_limit=2, rate_wait=2)
    fake.reset_counters()
    answers = asyncio.run(flood(SOCKET_SITE, "/rest/v10/ping", 20, 20, daemon.socket))
    refused = [answer for answer in answers if answer.status == 429]
    served = [answer for answer in answers if answer.status == 200]
    assert refused and served
    assert len(refused) + len(served) == 20
    for answer in refused:
        assert answer.retry_after is not None and int(answer.retry_after) >= 1
        body = json.loads(answer.body)
        assert "too_many_requests" == body["error"]
        assert "rate_wait" in body["error_message"]
    assert busiest_second(fake.arrivals) <= 2
    assert len(served) == sum(a.path.endswith("/ping") for a in fake.arrivals)
    found = samples(scrape(daemon.socket)[1])
    assert len(refused) == value(found, "sugard_proxy_rate_refused_total", sugar_instance="prod")
    assert len(served) == value(found, "sugard_proxy_queued_seconds_count", sugar_instance="prod")
    labels = {name for (metric, labels) in found for name, _ in labels if "queued" in metric}
    assert {"sugar_instance", "le"} == labels  # never a pid or a uid


@pytest.mark.slow
@pytest.mark.parametrize("route", ["socket", "listener"])
def test_a_second_client_waits_about_one_turn_while_another_floods(
    governed: Callable[..., DaemonProcess], fake: FakeSugar, route: str
) -> None:
    """While this process floods (80 requests, 20 at a time, rate_limit 10), curl, another
    process, sends one request: at most 5 of the flood's requests reach Sugar between curl's
    start and its request's arrival (round robin: about one turn), not the flood's backlog."""
    daemon = governed(rate_limit=10)
    fake.reset_counters()
    answers: list[Answer] = []
    if route == "socket":
        run = flood(SOCKET_SITE, "/rest/v10/me", 80, 20, daemon.socket)
        curl = ["--unix-socket", str(daemon.socket), SOCKET_SITE + "/rest/v10/ping"]
    else:
        run = flood(proxy_url(daemon), "/rest/v10/me", 80, 20)
        curl = [proxy_url(daemon) + "/rest/v10/ping"]
    flooding = threading.Thread(target=lambda: answers.extend(asyncio.run(run)))
    flooding.start()
    try:
        wait_for(
            lambda: sum(a.path.endswith("/me") for a in fake.arrivals) >= 25,
            "the flood to start",
            timeout=30,
        )
        sent = time.monotonic()
        done = run_curl("-o", "/dev/null", "-w", "%{http_code}", *curl, timeout=60)
    finally:
        flooding.join(120)
    assert "200" == done.stdout
    arrivals = fake.arrivals
    pinged = next(a.at for a in arrivals if a.path.endswith("/ping"))
    flood_between = [a for a in arrivals if a.path.endswith("/me") and sent < a.at < pinged]
    flood_after = [a for a in arrivals if a.path.endswith("/me") and a.at > pinged]
    assert len(flood_between) <= 5
    assert len(flood_after) >= 20  # the flood still had its backlog when curl got through
    assert [200] * 80 == [answer.status for answer in answers]


def test_sugarctl_clients_names_each_process_with_its_counts(
    governed: Callable[..., DaemonProcess], fake: FakeSugar
) -> None:
    """curl (3 requests on the socket, one refused) and a Python process (2 on the listener)
    are two rows of `sugarctl clients prod`: their pids, commands, counts and last paths,
    never a query; the table names both."""
    daemon = governed(rate_limit=50)
    curl = subprocess.Popen(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--unix-socket",
            str(daemon.socket),
            SOCKET_SITE + "/rest/v10/me",
            SOCKET_SITE + "/rest/v10/ping",
            SOCKET_SITE + "/rest/v10/oauth2/sudo/admin?secret=query",
        ]
    )
    assert 0 == curl.wait(60)
    script = (
        "import sys, urllib.request\n"
        "for path in ('/rest/v10/me', '/rest/v10/ping?q=1'):\n"
        "    urllib.request.urlopen(sys.argv[1] + path, timeout=30).read()\n"
    )
    python = subprocess.Popen(
        [sys.executable, "-c", script, proxy_url(daemon)], env={"NO_PROXY": "*"}
    )
    assert 0 == python.wait(60)
    shown = sugarctl(daemon.socket, "clients", "prod", "--json")
    assert 0 == shown.returncode, shown.stderr
    rows = {row["pid"]: row for row in json.loads(shown.stdout)["clients"]}
    assert {curl.pid, python.pid} <= set(rows)
    mine = rows[curl.pid]
    assert (3, 1, "/v1/instances/prod/rest/v10/oauth2/sudo/admin") == (
        mine["requests"],
        mine["errors"],
        mine["last_path"],
    )
    assert mine["command"].startswith("curl -sS")
    theirs = rows[python.pid]
    assert (2, 0, "/rest/v10/ping") == (theirs["requests"], theirs["errors"], theirs["last_path"])
    assert os.getuid() == theirs["uid"] == mine["uid"]
    assert "secret=query" not in shown.stdout
    table = sugarctl(daemon.socket, "clients", "prod")
    assert 0 == table.returncode, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["PID", "UID", "REQUESTS"]
    assert any(line.split()[:3] == [str(curl.pid), str(os.getuid()), "3"] for line in lines)
    assert any(line.split()[:3] == [str(python.pid), str(os.getuid()), "2"] for line in lines)


@pytest.mark.slow
def test_sugards_own_renewal_goes_before_the_queue(
    governed: Callable[..., DaemonProcess], fake: FakeSugar
) -> None:
    """While this process floods (rate_limit 10), `sugarctl refresh prod` gets its call to
    Sugar's token endpoint out first: at most 5 of the flood's requests reach Sugar between
    the refresh's start (sugarctl starting up included) and its arrival."""
    daemon = governed(rate_limit=10)
    fake.reset_counters()
    answers: list[Answer] = []
    run = flood(SOCKET_SITE, "/rest/v10/me", 60, 20, daemon.socket)
    flooding = threading.Thread(target=lambda: answers.extend(asyncio.run(run)))
    flooding.start()
    try:
        wait_for(
            lambda: sum(a.path.endswith("/me") for a in fake.arrivals) >= 15,
            "the flood to start",
            timeout=30,
        )
        sent = time.monotonic()
        refreshed = sugarctl(daemon.socket, "refresh", "prod")
    finally:
        flooding.join(120)
    assert 0 == refreshed.returncode, refreshed.stderr
    arrivals = fake.arrivals
    renewed = next(a.at for a in arrivals if a.path.endswith("/oauth2/token") and a.at > sent)
    assert len([a for a in arrivals if a.path.endswith("/me") and sent < a.at < renewed]) <= 5
    assert len([a for a in arrivals if a.path.endswith("/me") and a.at > renewed]) >= 15
