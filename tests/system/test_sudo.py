"""Tokens of other users (Sugar's sudo) through a real daemon and the real sugarctl: the user's
token on the instance's own platform, one sudo call however many ask, users not listed refused
with no call, renewal ahead of expiry, the proxy under /as/USER on the socket and the listener,
Sugar's refusals said once and not asked again, STATUS and metrics without user names."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from support.daemon import (
    PASSWORD,
    USER,
    DaemonProcess,
    instance,
    proxy_url,
    sugarctl,
    write_config,
)
from support.http import curl, curl_json

from sugard.client import SugardClient
from sugard.testing import FakeSugar

NAME = "prod"
USERS = {USER: PASSWORD, "jim": "jim-pw", "sally": "sally-pw"}
pytestmark = pytest.mark.fake(users=USERS, admins={USER})


def me(fake: FakeSugar, token: str) -> dict[str, Any]:
    """Sugar's /me with `token`: who the token belongs to."""
    answer = requests.get(f"{fake.url}/rest/v10/me", headers={"OAuth-Token": token}, timeout=30)
    return answer.json()["current_user"]  # type: ignore[no-any-return]


def user_me(url: str) -> str:
    """Who the proxy at `url` (a site URL) calls Sugar as."""
    return requests.get(f"{url}/rest/v10/me", timeout=30).json()["current_user"]["user_name"]  # type: ignore[no-any-return]


def password_login(fake: FakeSugar, user: str, platform: str) -> str:
    """A login of `user` at the fake, as the web UI (platform base) makes it."""
    fields = {
        "grant_type": "password",
        "username": user,
        "password": USERS[user],
        "client_id": "sugar",
        "platform": platform,
    }
    answer = requests.post(f"{fake.url}/rest/v10/oauth2/token", json=fields, timeout=30)
    return answer.json()["access_token"]  # type: ignore[no-any-return]


def start(start_daemon: Any, short_dir: Path, fake: FakeSugar, **settings: Any) -> DaemonProcess:
    table = instance(fake, **({"sudo": ["jim", "sally"]} | settings))
    return start_daemon(write_config(short_dir, {NAME: table}))  # type: ignore[no-any-return]


def test_a_token_of_jim_is_jims_on_the_instances_platform(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """`sugarctl token prod --as jim` is a token /me says is jim's, made on the instance's
    platform (sugard): jim's web UI session on base lives on."""
    web_ui = password_login(fake, "jim", "base")
    daemon = start(start_daemon, short_dir, fake)
    done = sugarctl(daemon.socket, "token", NAME, "--as", "jim")
    assert 0 == done.returncode, done.stderr
    token = done.stdout.strip()
    assert "jim" == me(fake, token)["user_name"]
    assert USER == me(fake, sugarctl(daemon.socket, "token", NAME).stdout.strip())["user_name"]
    assert fake.valid(web_ui)  # a sudo on base would have logged jim out there
    assert 1 == fake.evict("jim", "sugard")  # the sudo's session is on the instance's platform
    header = sugarctl(daemon.socket, "header", NAME, "--as", "sally")
    assert header.stdout.startswith("OAuth-Token: "), header.stderr
    assert {"jim": 1, "sally": 1} == fake.sudo_calls


def test_thirty_requests_at_once_make_one_sudo_call(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """30 clients asking for jim's token at the same moment get one token from one sudo."""
    daemon = start(start_daemon, short_dir, fake)
    sugarctl(daemon.socket, "token", NAME)  # the admin session first: the sudo is the subject
    barrier = threading.Barrier(30)
    tokens: list[str] = []

    def ask() -> None:
        with SugardClient(daemon.socket) as client:
            barrier.wait()
            tokens.append(client.token(NAME, as_user="jim")["access_token"])

    threads = [threading.Thread(target=ask) for _ in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert 30 == len(tokens)
    assert 1 == len(set(tokens))
    assert {"jim": 1} == fake.sudo_calls


def test_a_user_not_listed_is_refused_with_no_call_to_sugar(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """A user the `sudo` list lacks: exit 7 (403 forbidden) naming the user, no sudo made;
    a name with '/', a space or a control character: 400 (exit 2) naming it."""
    daemon = start(start_daemon, short_dir, fake)
    refused = sugarctl(daemon.socket, "token", NAME, "--as", "bob")
    assert 7 == refused.returncode
    assert "'bob'" in refused.stderr and "jim, sally" in refused.stderr
    status, body = curl_json(daemon.socket, f"/v1/instances/{NAME}/token?as=bob")
    assert (403, "forbidden") == (status, body["error"])
    for bad, quoted in (("a/b", "a%2Fb"), ("a b", "a%20b"), ("a\nb", "a%0Ab")):
        status, body = curl_json(daemon.socket, f"/v1/instances/{NAME}/token?as={quoted}")
        assert (400, "bad_request") == (status, body["error"])
        assert repr(bad) in body["message"]
        status, text = curl(daemon.socket, f"/v1/instances/{NAME}/as/{quoted}/rest/v10/me")
        assert 400 == status and repr(bad) in json.loads(text)["error_message"]
        assert 2 == sugarctl(daemon.socket, "token", NAME, "--as", bad).returncode
    assert 0 == fake.calls["sudo"]


@pytest.mark.slow
@pytest.mark.fake(users=USERS, admins={USER}, access_lifetime=6)
def test_six_second_tokens_are_renewed_ahead_and_never_handed_out_dead(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """With 6 s tokens, jim's token is renewed ahead of expiry by new sudos while the admin
    session refreshes: every token handed out works when it arrives, no password login."""
    daemon = start(start_daemon, short_dir, fake)
    seen: list[str] = []
    with daemon.client() as client:
        end = time.monotonic() + 13
        while time.monotonic() < end:
            answer = client.token(NAME, as_user="jim")
            assert fake.valid(answer["access_token"]), answer["expires_in"]
            assert answer["expires_in"] > 0
            seen.append(answer["access_token"])
            time.sleep(0.4)
    renewed = len(dict.fromkeys(seen))
    assert renewed >= 3  # about one sudo per 3 s: renewed ahead, not at expiry
    assert renewed - 1 <= fake.sudo_calls["jim"] <= renewed + 1
    assert 1 == fake.calls["password"]  # the admin's one login; it refreshed since
    assert fake.calls["refresh_token"] >= 2


def test_the_proxy_acts_as_jim_on_the_socket_and_the_listener(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """/v1/instances/prod/as/jim/rest/... and the listener's /as/jim/rest/... reach Sugar on
    jim's token; a 401 of a revoked jim token is renewed once and replayed."""
    daemon = start(start_daemon, short_dir, fake, listen="127.0.0.1:0")
    status, body = curl_json(daemon.socket, f"/v1/instances/{NAME}/as/jim/rest/v10/me")
    assert (200, "jim") == (status, body["current_user"]["user_name"])
    status, body = curl_json(daemon.socket, f"/v1/instances/{NAME}/rest/v10/me")
    assert (200, USER) == (status, body["current_user"]["user_name"])
    listen = proxy_url(daemon, NAME)
    assert "sally" == user_me(f"{listen}/as/sally")
    assert fake.revoke(sugarctl(daemon.socket, "token", NAME, "--as", "jim").stdout.strip())
    assert "jim" == user_me(f"{listen}/as/jim")
    assert {"jim": 2, "sally": 1} == fake.sudo_calls
    status, body = curl_json(daemon.socket, f"/v1/instances/{NAME}/as/bob/rest/v10/me")
    assert (403, "forbidden") == (status, body["error"])
    assert 3 == fake.calls["sudo"]


@pytest.mark.fake(users=USERS, admins={"admin"})
def test_a_user_that_is_no_admin_is_refused_once_until_a_person_asks_again(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """Sugar's 403: exit 6 saying alice is no admin; no second sudo for jim (nor sally) until
    `sugarctl refresh prod --as jim`, which asks once more and works once alice is admin."""
    daemon = start(start_daemon, short_dir, fake)
    first = sugarctl(daemon.socket, "token", NAME, "--as", "jim")
    assert 6 == first.returncode
    assert f"{USER} is not an admin in Sugar" in first.stderr
    assert 1 == len(first.stderr.splitlines())
    for user in ("jim", "sally", "jim"):
        again = sugarctl(daemon.socket, "exec", NAME, "--as", user, "--", "true")
        assert (6, first.stderr) == (again.returncode, first.stderr)
    assert {"jim": 1} == fake.sudo_calls
    assert 6 == sugarctl(daemon.socket, "refresh", NAME, "--as", "jim").returncode
    assert {"jim": 2} == fake.sudo_calls
    fake.admins.add(USER)  # an administrator made alice an admin
    assert 6 == sugarctl(daemon.socket, "token", NAME, "--as", "jim").returncode
    done = sugarctl(daemon.socket, "refresh", NAME, "--as", "jim")
    assert 0 == done.returncode, done.stderr
    assert "jim" == me(fake, done.stdout.strip())["user_name"]
    assert {"jim": 3} == fake.sudo_calls


def test_an_unknown_user_is_refused_once_and_status_says_why(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """Sugar's 404 for a listed user it does not know: exit 6 naming the user, not asked
    again; STATUS shows the users held, their expiry and that error."""
    daemon = start(start_daemon, short_dir, fake, sudo=["jim", "ghost"])
    assert 0 == sugarctl(daemon.socket, "token", NAME, "--as", "jim").returncode
    for _ in range(2):
        refused = sugarctl(daemon.socket, "token", NAME, "--as", "ghost")
        assert 6 == refused.returncode
        assert "no active user named 'ghost'" in refused.stderr
    assert {"jim": 1, "ghost": 1} == fake.sudo_calls
    status = json.loads(sugarctl(daemon.socket, "status", NAME, "--json").stdout)["sudo"]
    assert ["jim", "ghost"] == status["allowed"]
    assert (1, 1, False) == (status["held"], status["refused"], status["refused_all"])
    users = {user["user"]: user for user in status["users"]}
    assert users["jim"]["expires_at"] is not None and users["jim"]["last_error"] is None
    assert users["ghost"]["refused"] and users["ghost"]["expires_at"] is None
    assert "sudo_no_user" == users["ghost"]["last_error"]["kind"]
    assert status["last_error"]["message"] == users["ghost"]["last_error"]["message"]


def test_with_any_user_status_and_metrics_show_counts_and_no_names(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """sudo = ["*"]: any user, and STATUS and the metrics show counts, never a user's name."""
    daemon = start(start_daemon, short_dir, fake, sudo=["*"])
    assert 0 == sugarctl(daemon.socket, "token", NAME, "--as", "sally").returncode
    assert 6 == sugarctl(daemon.socket, "token", NAME, "--as", "nobody-here").returncode
    status = json.loads(sugarctl(daemon.socket, "status", NAME, "--json").stdout)["sudo"]
    assert ("*", None, 1, 1) == (
        status["allowed"],
        status["users"],
        status["held"],
        status["refused"],
    )
    assert "nobody-here" not in json.dumps(status) and "sally" not in json.dumps(status)
    code, metrics = curl(daemon.socket, "/v1/metrics")
    assert 200 == code
    assert f'sugard_sudo_calls_total{{outcome="ok",sugar_instance="{NAME}"}} 1.0' in metrics
    assert f'sugard_sudo_calls_total{{outcome="rejected",sugar_instance="{NAME}"}} 1.0' in metrics
    assert f'sugard_sudo_tokens{{sugar_instance="{NAME}"}} 1.0' in metrics
    assert "sally" not in metrics and "nobody-here" not in metrics


def test_sugarctl_api_as_jim_calls_sugar_as_jim(
    fake: FakeSugar, short_dir: Path, start_daemon: Any
) -> None:
    """`sugarctl api prod me --as jim` goes through the proxy as jim (no token in sugarctl);
    a user not listed is refused by the daemon (exit 7) and a bad name before anything is sent."""
    daemon = start(start_daemon, short_dir, fake)
    done = sugarctl(daemon.socket, "api", NAME, "me", "--as", "jim")
    assert 0 == done.returncode, done.stderr
    assert "jim" == json.loads(done.stdout)["current_user"]["user_name"]
    assert {"jim": 1} == fake.sudo_calls
    refused = sugarctl(daemon.socket, "api", NAME, "me", "--as", "bob")
    assert 7 == refused.returncode, refused.stderr
    assert "bob" in refused.stderr
    bad = sugarctl(daemon.socket, "api", NAME, "me", "--as", "a/b")
    assert 2 == bad.returncode, bad.stderr
    assert {"jim": 1} == fake.sudo_calls
