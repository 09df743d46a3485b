"""A hostile network and hostile neighbours on the TCP side: credentials never follow a
redirect, a site URL never carries a password, the TCP listeners hold a bounded number of
another uid's connections, and the proxy passes neither cookies nor hop-by-hop headers."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from support.daemon import SUGARD, DaemonProcess, instance, sugarctl, write_config
from support.redirects import redirecting, serving

from sugard.auth import SugarAuth
from sugard.client import SugardClient
from sugard.testing import FakeSugar

URL_PASSWORD = "hunter2-in-the-url"


def test_a_site_url_with_a_password_is_refused_by_check_run_and_reload(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """`url = "https://user:pw@host"` is refused by check, run and reload, naming the key;
    the password shows nowhere."""
    userinfo_url = fake.url.replace("http://", f"http://alice:{URL_PASSWORD}@")
    bad = write_config(short_dir, {"prod": instance(fake, url=userinfo_url)}, name="bad.toml")
    for argv in (
        [SUGARD, "check", "--unit", "none", "-c", str(bad)],
        [SUGARD, "run", "-c", str(bad), "--socket", str(short_dir / "bad.sock")],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        said = result.stdout + result.stderr
        assert 0 != result.returncode, said
        assert "instances.prod.url" in said
        assert "user name or password" in said
        assert URL_PASSWORD not in said

    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    write_config(short_dir, {"prod": instance(fake, url=userinfo_url)})
    reload = sugarctl(daemon.socket, "reload")
    assert 0 != reload.returncode
    assert "instances.prod.url" in reload.stderr
    assert URL_PASSWORD not in reload.stderr + reload.stdout + daemon.log()
    with daemon.client() as client:
        assert fake.url == client.status()[0]["url"]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_sugar_auth_drops_the_token_on_a_redirect_to_another_host(
    daemon: DaemonProcess, status: int
) -> None:
    """requests with SugarAuth follows a redirect to another host without `OAuth-Token` (as
    requests drops Authorization there); the token reached only the host it was meant for."""
    with daemon.client() as client:
        token = client.token("prod")["access_token"]
    with (
        redirecting(status) as (url, _, ours, theirs),
        SugarAuth("prod", SugardClient(daemon.socket)) as auth,
        requests.Session() as http,
    ):
        http.auth = auth
        answer = http.post(f"{url}/rest/v10/Accounts", json={"name": "x"}, timeout=30)
        assert 200 == answer.status_code
        assert [status] == [r.status_code for r in answer.history]
    assert ours.carried(token)
    assert 1 == len(theirs.requests)
    assert not theirs.carried(token)
    assert "OAuth-Token" not in theirs.requests[0][2]


def test_sugar_auth_keeps_the_token_on_a_redirect_within_the_site(daemon: DaemonProcess) -> None:
    """A redirect to another path of the same site keeps `OAuth-Token` (the site is the one
    the token is for)."""
    with (
        serving() as (url, reached),
        SugarAuth("prod", SugardClient(daemon.socket)) as auth,
        requests.Session() as http,
    ):
        http.auth = auth
        token = auth.client.token("prod")["access_token"]
        answer = http.get(f"{url}/rest/v10/Moved/1", timeout=30)
        assert 200 == answer.status_code
        assert [301] == [r.status_code for r in answer.history]
    assert [("/rest/v10/Moved/1", token), ("/rest/v10/Here/1", token)] == [
        (path, headers.get("OAuth-Token")) for _, path, headers, _ in reached.requests
    ]
