"""The request governor against the fake SugarCRM, measured at the fake's side: no one-second
window over rate_limit, the limit used under load, a second client process served in about one
turn while another floods, 429 with Retry-After past rate_wait, and who sent what."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.daemon import DaemonProcess, instance, sugarctl, write_config
from support.load import Answer, busiest_second, flood, rate_at_sugar

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


def listener_url(daemon: DaemonProcess) -> str:
    return sugarctl(daemon.socket, "proxy-url", "prod").stdout.strip()


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
        answers = asyncio.run(flood(listener_url(daemon), "/rest/v10/me", 70, 20))
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
    any one-second window."""
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


@pytest.mark.slow
@pytest.mark.parametrize("route", ["socket", "listener"])
def test_a_second_client_waits_about_one_turn_while_another_floods(
    governed: Callable[..., DaemonProcess], fake: FakeSugar, route: str
) -> None:
    """While this process floods (80 requests, 20 at a time, rate_limit 10), curl, another
    process, sends one request: at most 3 of the flood's requests reach Sugar between curl's
    start and its request's arrival (round robin: about one turn), not the flood's backlog."""
    daemon = governed(rate_limit=10)
    fake.reset_counters()
    answers: list[Answer] = []
    if route == "socket":
        run = flood(SOCKET_SITE, "/rest/v10/me", 80, 20, daemon.socket)
        curl = ["--unix-socket", str(daemon.socket), SOCKET_SITE + "/rest/v10/ping"]
    else:
        run = flood(listener_url(daemon), "/rest/v10/me", 80, 20)
        curl = [listener_url(daemon) + "/rest/v10/ping"]
    flooding = threading.Thread(target=lambda: answers.extend(asyncio.run(run)))
    flooding.start()
    try:
        deadline = time.monotonic() + 30
        while sum(a.path.endswith("/me") for a in fake.arrivals) < 25:
            assert time.monotonic() < deadline, "the flood did not start"
            time.sleep(0.02)
        sent = time.monotonic()
        done = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *curl],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        flooding.join(120)
    assert "200" == done.stdout
    arrivals = fake.arrivals
    pinged = next(a.at for a in arrivals if a.path.endswith("/ping"))
    flood_between = [a for a in arrivals if a.path.endswith("/me") and sent < a.at < pinged]
    flood_after = [a for a in arrivals if a.path.endswith("/me") and a.at > pinged]
    assert len(flood_between) <= 3
    assert len(flood_after) >= 20  # the flood still had its backlog when curl got through
    assert [200] * 80 == [answer.status for answer in answers]
