"""Outbound HTTP proxies: a real forward proxy on 127.0.0.1 (written here: absolute-URI
forwarding for http sites, CONNECT tunnels for https ones, Basic Proxy-Authorization), the
daemon on a real socket, the fake SugarCRM over http and over https with a test CA, tokens
fetched with the real `sugarctl`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.daemon import PASSWORD, SUGARD, USER, DaemonProcess, instance, sugarctl, write_config
from support.forward_proxy import ForwardProxy, running_proxy
from support.tls import running_tls_fake

from sugard.testing import FakeSugar, running_fake

PROXY_USER, PROXY_PASSWORD = "carol", "carol-proxy-pw-7731"
# No proxy variable leaks in from the runner: each test sets the daemon's own.
pytestmark = pytest.mark.usefixtures("no_proxy_of_our_own")

WRONG_PROXY_PASSWORD = "wrong-proxy-pw-4410"
StartDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with running_proxy() as server:
        yield server


@pytest.fixture
def auth_proxy() -> Iterator[ForwardProxy]:
    """A proxy that wants carol's credentials."""
    with running_proxy((PROXY_USER, PROXY_PASSWORD)) as server:
        yield server


@dataclass
class Site:
    """The fake SugarCRM over http or https, with the instance settings that reach it."""

    fake: FakeSugar
    settings: dict[str, Any]
    variable: str  # the proxy variable for its scheme

    def went_through(self, proxy: ForwardProxy) -> bool:
        """The daemon's calls to Sugar (the login, then ServerInfo and probes) passed this
        proxy: forwarded (http) or tunnelled (https)."""
        if self.fake.url.startswith("https://"):
            return [self.fake.url.removeprefix("https://")] == sorted(set(proxy.connects)) and (
                [] == proxy.requests
            )
        token_url = f"POST {self.fake.url}/rest/v10/oauth2/token"
        to_the_site = all(
            request.partition(" ")[2].startswith(f"{self.fake.url}/rest/v10/")
            for request in proxy.requests
        )
        return token_url in proxy.requests and to_the_site and [] == proxy.connects


@pytest.fixture(params=["http", "https"])
def site(request: pytest.FixtureRequest, certs: dict[str, Path]) -> Iterator[Site]:
    if request.param == "http":
        with running_fake(users={USER: PASSWORD}) as fake:
            yield Site(fake, {}, "HTTP_PROXY")
    else:
        with running_tls_fake(certs["cert"], certs["key"]) as fake:
            yield Site(fake, {"ca_file": str(certs["ca"])}, "HTTPS_PROXY")


def show_config(config: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [SUGARD, "show-config", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=True,
    )
    return done.stdout


def token(daemon: DaemonProcess, name: str = "prod") -> subprocess.CompletedProcess[str]:
    return sugarctl(daemon.socket, "token", name, "--wait", "20")


def config_behind(proxy: ForwardProxy, site: Site, secret: Path, password: str) -> Path:
    """A config for `site` through `proxy` as carol, her password in the 0600 file `secret`."""
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    table = instance(
        site.fake,
        proxy=proxy.url,
        proxy_username=PROXY_USER,
        proxy_password_file=str(secret),
        **site.settings,
    )
    return write_config(secret.parent, {"prod": table})


@pytest.mark.slow
def test_the_environments_proxy_carries_the_login(
    site: Site, proxy: ForwardProxy, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """HTTP_PROXY (http site: absolute-URI requests) or HTTPS_PROXY (https site: a CONNECT
    tunnel) of the daemon's environment carries the login; the start log says which proxy."""
    config = write_config(short_dir, {"prod": instance(site.fake, **site.settings)})
    daemon = start_daemon(config, env={site.variable: proxy.url})
    result = token(daemon)
    assert 0 == result.returncode, result.stderr
    assert site.fake.valid(result.stdout.strip())
    assert site.went_through(proxy), (proxy.connects, proxy.requests)
    assert f"prod: outbound via proxy {proxy.url} (from {site.variable})" in daemon.log()


def test_the_lower_case_variable_wins_as_in_curl(
    fake: FakeSugar, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """http_proxy and HTTP_PROXY both set: the lower-case one is used."""
    with running_proxy() as lower, running_proxy() as upper:
        config = write_config(short_dir, {"prod": instance(fake)})
        daemon = start_daemon(config, env={"http_proxy": lower.url, "HTTP_PROXY": upper.url})
        assert 0 == token(daemon).returncode
        assert (1, 0) == (len(lower.logins), len(upper.requests))
        assert f"prod: outbound via proxy {lower.url} (from http_proxy)" in daemon.log()
        daemon.stop()


def test_tls_settings_still_apply_through_the_tunnel(
    proxy: ForwardProxy, certs: dict[str, Path], short_dir: Path, start_daemon: StartDaemon
) -> None:
    """Through the CONNECT tunnel the site's certificate is still verified: without ca_file
    the private CA is not trusted (exit 6, naming ca_file) and no password is sent."""
    with running_tls_fake(certs["cert"], certs["key"]) as tls_fake:
        daemon = start_daemon(
            write_config(short_dir, {"prod": instance(tls_fake)}),
            env={"HTTPS_PROXY": proxy.url},
        )
        result = token(daemon)
        assert 6 == result.returncode, result.stderr
        assert "not trusted" in result.stderr
        assert "set ca_file" in result.stderr
        assert [tls_fake.url.removeprefix("https://")] == proxy.connects[:1]
        assert 0 == tls_fake.calls["token"]
        daemon.stop()


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost, 10.0.0.0/8,127.0.0.0/8"])
def test_no_proxy_goes_around_the_proxy(
    no_proxy: str, proxy: ForwardProxy, fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """A host (or, as curl and requests allow, an address range) in NO_PROXY is reached
    directly; the log says so."""
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config, env={"HTTP_PROXY": proxy.url, "NO_PROXY": no_proxy})
    assert 0 == token(daemon).returncode
    assert ([], []) == (proxy.requests, proxy.connects)
    assert "prod: outbound direct (127.0.0.1 is in NO_PROXY)" in daemon.log()


def test_the_proxy_key_wins_over_the_environment(
    proxy: ForwardProxy, fake: FakeSugar, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """[defaults] proxy beats HTTP_PROXY, and an instance's proxy = "none" beats both; the log
    and show-config say which way each instance goes."""
    fake.set_password("bob", "bob-secret-pw")
    with running_proxy() as env_proxy:
        config = write_config(
            short_dir,
            {
                "prod": instance(fake),
                "lab": instance(fake, username="bob", password="bob-secret-pw", proxy="none"),
            },
            defaults={"proxy": proxy.url},
        )
        env = {"HTTP_PROXY": env_proxy.url}
        daemon = start_daemon(config, env=env)
        assert 0 == token(daemon, "prod").returncode
        assert 0 == token(daemon, "lab").returncode
        assert (1, 2) == (len(proxy.logins), fake.calls["token"])
        assert [] == env_proxy.requests
        log = daemon.log()
        assert f"prod: outbound via proxy {proxy.url} (proxy in the config)" in log
        assert 'lab: outbound direct (proxy = "none" in the config)' in log
        shown = show_config(config, env)
        assert f'proxy = "via proxy {proxy.url} (proxy in the config)"' in shown
        assert 'proxy = "direct (proxy = \\"none\\" in the config)"' in shown
        daemon.stop()


def test_proxy_credentials_come_from_a_secret_source(
    site: Site, auth_proxy: ForwardProxy, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """proxy_username with proxy_password_file gets through a proxy that wants credentials,
    without aiohttp's deprecated proxy_auth; the password is in no log, no show-config and no
    status."""
    secret = short_dir / "proxy.password"
    config = config_behind(auth_proxy, site, secret, PROXY_PASSWORD)
    daemon = start_daemon(config, env={"PYTHONWARNINGS": "default::DeprecationWarning"})
    result = token(daemon)
    assert 0 == result.returncode, result.stderr
    assert site.went_through(auth_proxy)
    assert 0 == auth_proxy.refused
    shown = show_config(config)
    assert f"as proxy_username '{PROXY_USER}')" in shown
    assert f'proxy_password = "*** (file: {secret})"' in shown
    status = sugarctl(daemon.socket, "status", "prod", "--json").stdout
    for text in (daemon.log(), shown, status):
        assert PROXY_PASSWORD not in text
    assert "DeprecationWarning" not in daemon.log()


@pytest.mark.slow
def test_wrong_proxy_credentials_fail_once_with_one_clear_line(
    site: Site, auth_proxy: ForwardProxy, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """A proxy that refuses the credentials (407) fails the instance without a retry and
    without reaching Sugar; the error is one line naming what to fix, with no password in it
    or in the log, status or show-config; fixing the file and reloading gets a token."""
    secret = short_dir / "proxy.password"
    config = config_behind(auth_proxy, site, secret, WRONG_PROXY_PASSWORD)
    daemon = start_daemon(config)
    result = token(daemon)
    assert 6 == result.returncode, result.stderr
    assert 1 == len(result.stderr.strip().splitlines()), result.stderr
    assert (
        f"proxy {auth_proxy.url} refused proxy_username '{PROXY_USER}' "
        "(407 Proxy Authentication Required); fix proxy_username or proxy_password"
    ) in result.stderr
    assert 1 == auth_proxy.refused
    assert 0 == site.fake.calls["token"]
    status = sugarctl(daemon.socket, "status", "prod", "--json").stdout
    assert "proxy" == json.loads(status)["last_error"]["kind"]
    for text in (result.stderr, daemon.log(), status, show_config(config)):
        assert WRONG_PROXY_PASSWORD not in text
        assert PROXY_PASSWORD not in text

    secret.write_text(PROXY_PASSWORD + "\n")
    assert 0 == sugarctl(daemon.socket, "reload").returncode
    result = token(daemon)
    assert 0 == result.returncode, result.stderr
    assert site.fake.valid(result.stdout.strip())


@pytest.mark.slow
def test_credentials_in_the_environments_proxy_url_are_used_never_shown(
    auth_proxy: ForwardProxy, fake: FakeSugar, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """HTTP_PROXY=http://user:password@host:port works as in curl; the log (one line, as both
    instances go the same way) and show-config name the proxy without the credentials."""
    fake.set_password("bob", "bob-secret-pw")
    config = write_config(
        short_dir,
        {
            "prod": instance(fake),
            "lab": instance(fake, username="bob", password="bob-secret-pw"),
        },
    )
    port = auth_proxy.url.rsplit(":", 1)[1]
    env = {"HTTP_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{port}"}
    daemon = start_daemon(config, env=env)
    assert 0 == token(daemon, "prod").returncode
    assert 0 == token(daemon, "lab").returncode
    assert (0, 2) == (auth_proxy.refused, len(auth_proxy.logins))
    line = f"outbound via proxy {auth_proxy.url} (from HTTP_PROXY, with its credentials)"
    assert 1 == daemon.log().count(f"all 2 instances: {line}")
    shown = show_config(config, env)
    for text in (daemon.log(), shown):
        assert PROXY_PASSWORD not in text


@pytest.mark.slow
def test_an_unreachable_proxy_is_named_in_the_error(
    fake: FakeSugar, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """A proxy nobody listens on: the instance keeps retrying, and its error names the proxy."""
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake, proxy=url)}))
    result = sugarctl(daemon.socket, "token", "prod", "--wait", "2")
    assert 5 == result.returncode, result.stderr
    status = json.loads(sugarctl(daemon.socket, "status", "prod", "--json").stdout)
    assert status["last_error"]["message"].startswith(
        f"cannot reach proxy {url} (for {fake.url}): "
    )
    assert 0 == fake.calls["token"]


def test_a_reload_that_changes_only_the_proxy_keeps_the_session(
    proxy: ForwardProxy, fake: FakeSugar, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """Setting proxy on a running instance: the reload logs the new way out, and the next
    refresh takes it, with no new password login."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    assert 0 == token(daemon).returncode
    write_config(short_dir, {"prod": instance(fake, proxy=proxy.url)})
    assert 0 == sugarctl(daemon.socket, "reload").returncode
    assert f"prod: outbound via proxy {proxy.url} (proxy in the config)" in daemon.log()
    assert 0 == sugarctl(daemon.socket, "refresh", "prod").returncode
    assert (1, 1, 1) == (fake.calls["password"], fake.calls["refresh_token"], len(proxy.requests))


def test_an_environment_proxy_that_is_not_an_http_url_fails_the_instance_quietly(
    fake: FakeSugar, short_dir: Path, start_daemon: StartDaemon
) -> None:
    """HTTP_PROXY=user:password@host:port (no scheme) is not guessed at: the instance fails,
    saying which variable to fix, and the value, which holds a password, is not repeated."""
    daemon = start_daemon(
        write_config(short_dir, {"prod": instance(fake)}),
        env={"HTTP_PROXY": f"{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:3128"},
    )
    result = token(daemon)
    assert 6 == result.returncode, result.stderr
    assert "sugarctl: HTTP_PROXY is not an http:// proxy URL; write HTTP_PROXY as " in (
        result.stderr
    )
    assert 0 == fake.calls["token"]
    for text in (result.stderr, daemon.log()):
        assert PROXY_PASSWORD not in text


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"proxy": f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:3128"},
            "instances.prod.proxy: must not hold credentials: give the user as proxy_username "
            "and the password as proxy_password_file",
        ),
        (
            {"proxy": "https://proxy.example:3128"},
            "instances.prod.proxy: must be an http:// proxy URL like",
        ),
        (
            {"proxy": "socks5://proxy.example:1080"},
            "instances.prod.proxy: must be an http:// proxy URL like",
        ),
        (
            {"proxy_password_file": "proxy.password"},
            "instances.prod.proxy_username: missing; proxy_password needs it",
        ),
        (
            {"proxy_username": PROXY_USER},
            "instances.prod.proxy_password_file: missing; proxy_username needs it",
        ),
        (
            {"proxy_username": "carol:x", "proxy_password": "pw"},
            "instances.prod.proxy_username: must not contain ':'",
        ),
    ],
)
def test_proxy_settings_sugard_cannot_use_are_refused_by_check(
    table: dict[str, Any], expected: str, fake: FakeSugar, short_dir: Path
) -> None:
    """What cannot work is refused by `sugard check`, as `file: table.key: message`; a proxy
    URL with credentials is refused without repeating them."""
    config = write_config(short_dir, {"prod": instance(fake, **table)})
    done = subprocess.run(
        [SUGARD, "check", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert 1 == done.returncode
    assert f"{config}: {expected}" in done.stderr
    assert PROXY_PASSWORD not in done.stderr + done.stdout
