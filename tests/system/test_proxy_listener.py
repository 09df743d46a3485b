"""The proxy's loopback TCP listener: who may connect (the kernel's word on the peer's owner,
the socket's allow rules), browser guards, `listen` validation, and reloads that add, move or
remove a listener without disturbing the other instances."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests
from support.daemon import SUGARD, instance, proxy_url, sugarctl, write_config
from support.nobody import AS_NOBODY, NOBODY
from support.proxy_upstream import SugarFront
from support.wait import wait_for

from sugard.testing import FakeSugar, running_fake


def curl_as_nobody(url: str, *args: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        [*AS_NOBODY, "curl", "-sS", "-w", "\n%{http_code}", *args, url],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body)


def test_another_uid_gets_403_in_sugars_envelope_on_the_socket_and_the_listener(
    front: SugarFront, fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """uid 65534 is refused on the socket route and on the TCP listener with Sugar's envelope,
    gets no token (not even from the locally answered login), and reaches nothing upstream."""
    config = write_config(short_dir, {"prod": instance(front, listen="127.0.0.1:0")})
    daemon = start_daemon(config)
    with daemon.client() as client:
        token = client.token("prod", wait=20)["access_token"]
    daemon.socket.parent.chmod(0o755)
    daemon.socket.chmod(0o666)
    tcp = proxy_url(daemon, "prod")
    fake.reset_counters()
    seen = len(front.seen)
    for url, args in (
        ("http://sugard/v1/instances/prod/rest/v10/me", ("--unix-socket", str(daemon.socket))),
        (
            "http://sugard/v1/instances/prod/rest/v10/oauth2/token",
            ("--unix-socket", str(daemon.socket), "-XPOST"),
        ),
        (tcp + "/rest/v10/me", ()),
        (tcp + "/rest/v10/oauth2/token", ("-XPOST",)),
    ):
        status, body = curl_as_nobody(url, *args)
        assert 403 == status, (url, body)
        assert {"error", "error_message"} == set(body)
        assert "forbidden" == body["error"]
        assert f"uid {NOBODY}" in body["error_message"]
        assert token not in json.dumps(body)
    assert 0 == sum(fake.calls.values())
    assert seen == len(front.seen)


def test_allowed_uids_admit_another_uid_over_tcp(
    front: SugarFront, short_dir: Path, start_daemon
) -> None:
    """The socket's allow rules apply to TCP peers too: with uid 65534 in allowed_uids its
    curl over the listener reaches Sugar."""
    config = write_config(
        short_dir,
        {"prod": instance(front, listen="127.0.0.1:0")},
        daemon={"allowed_uids": [NOBODY]},
    )
    daemon = start_daemon(config)
    status, body = curl_as_nobody(proxy_url(daemon, "prod") + "/rest/v10/me")
    assert 200 == status, body
    assert "alice" == body["current_user"]["user_name"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Host": "evil.example"},
        {"Host": "evil.example:8401"},
    ],
)
def test_browser_and_rebinding_requests_are_refused_and_never_forwarded(
    front: SugarFront, short_dir: Path, start_daemon, headers: dict[str, str]
) -> None:
    """A POST with an Origin, a Sec-Fetch-Site other than none, or a Host that is not the
    listener's address is refused (403, Sugar's envelope) and never reaches Sugar."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(front, listen="127.0.0.1:0")}))
    answer = requests.post(
        proxy_url(daemon, "prod") + "/rest/v10/Echo", json={"a": 1}, headers=headers, timeout=30
    )
    assert 403 == answer.status_code
    assert "forbidden" == answer.json()["error"]
    assert [] == front.requests_to("/rest/v10/Echo")


def test_plain_clients_and_sec_fetch_site_none_are_served(
    front: SugarFront, short_dir: Path, start_daemon
) -> None:
    """What the guards let through: a typed-in URL (Sec-Fetch-Site: none), Host localhost:PORT."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(front, listen="127.0.0.1:0")}))
    url = proxy_url(daemon, "prod")
    port = url.rsplit(":", 1)[1]
    for headers in ({"Sec-Fetch-Site": "none"}, {"Host": f"localhost:{port}"}, {}):
        answer = requests.get(url + "/rest/v10/Echo", headers=headers, timeout=30)
        assert 200 == answer.status_code, (headers, answer.text)


@pytest.mark.parametrize(
    "listen",
    [
        "0.0.0.0:8401",
        "192.168.1.5:8401",
        "localhost:8401",
        "127.0.0.1",
        "127.0.0.1:99999",
        "::1:8401",
    ],
)
def test_check_refuses_a_listen_address_that_is_not_loopback(
    fake: FakeSugar, short_dir: Path, listen: str
) -> None:
    """`sugard check` refuses any listen value but a loopback HOST:PORT, naming the key."""
    config = write_config(short_dir, {"prod": instance(fake, listen=listen)})
    result = subprocess.run(
        [SUGARD, "check", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert 0 != result.returncode
    assert "instances.prod.listen" in result.stdout + result.stderr


@pytest.mark.slow
def test_check_refuses_two_instances_on_one_address(fake: FakeSugar, short_dir: Path) -> None:
    """Two instances cannot listen on the same address; listen in [defaults] is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    config = write_config(
        short_dir,
        {"a": instance(fake, listen=address), "b": instance(fake, listen=address)},
    )
    result = subprocess.run(
        [SUGARD, "check", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert "instances.b.listen" in result.stdout + result.stderr
    config = write_config(short_dir, {"a": instance(fake)}, defaults={"listen": address})
    result = subprocess.run(
        [SUGARD, "check", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert "defaults.listen" in result.stdout + result.stderr


def test_proxy_url_prints_the_socket_form_without_a_listener(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Without `listen`, proxy-url prints the socket site root on stdout and the curl form on
    stderr; an unknown instance exits 3."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    result = sugarctl(daemon.socket, "proxy-url", "prod")
    assert 0 == result.returncode
    assert "http://sugard/v1/instances/prod\n" == result.stdout
    assert f"curl --unix-socket {daemon.socket} http://sugard/v1/instances/prod/rest/v10/me" in (
        result.stderr
    )
    assert 3 == sugarctl(daemon.socket, "proxy-url", "nope").returncode


def _get(conn: http.client.HTTPConnection, path: str = "/rest/v10/me") -> int:
    conn.request("GET", path)
    answer = conn.getresponse()
    answer.read()
    return answer.status


def _connection(url: str) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=30)


def _get_once(url: str) -> int:
    conn = _connection(url)
    try:
        return _get(conn)
    finally:
        conn.close()


@pytest.mark.slow
def test_a_reload_adds_moves_and_removes_listeners_without_disturbing_the_others(
    short_dir: Path, start_daemon
) -> None:
    """A reload adds a listener to one instance, then moves it, then removes it; meanwhile the
    other instance's listener keeps its address and its open keep-alive connection."""
    with running_fake(users={"a": "a-pw", "b": "b-pw"}) as fake:

        def config(prod_listen: str | None) -> Path:
            prod = instance(fake, username="a", password="a-pw")
            if prod_listen:
                prod["listen"] = prod_listen
            other = instance(fake, username="b", password="b-pw", listen="127.0.0.1:0")
            return write_config(short_dir, {"prod": prod, "other": other})

        daemon = start_daemon(config(None))
        other_url = proxy_url(daemon, "other")
        kept = _connection(other_url)
        assert 200 == _get(kept)
        kept_socket = kept.sock
        assert proxy_url(daemon, "prod").startswith("http://sugard/")

        config("127.0.0.1:0")
        assert 0 == sugarctl(daemon.socket, "reload").returncode
        added = proxy_url(daemon, "prod")
        assert added.startswith("http://127.0.0.1:")
        assert 200 == _get_once(added)

        config("127.0.0.2:0")  # moved: another loopback address
        assert 0 == sugarctl(daemon.socket, "reload").returncode
        moved = proxy_url(daemon, "prod")
        assert moved.startswith("http://127.0.0.2:")
        assert 200 == _get_once(moved)
        with pytest.raises(ConnectionRefusedError):
            _get_once(added)

        config(None)
        assert 0 == sugarctl(daemon.socket, "reload").returncode
        assert "http://sugard/v1/instances/prod" == proxy_url(daemon, "prod")
        with pytest.raises(ConnectionRefusedError):
            _get_once(moved)

        assert other_url == proxy_url(daemon, "other")
        assert 200 == _get(kept)
        assert kept_socket is kept.sock  # the same connection, never closed by the reloads
        kept.close()


@pytest.mark.slow
def test_a_reload_onto_a_port_in_use_fails_and_keeps_the_old_listener(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """A listen address that cannot be bound fails the reload (exit 6, naming the key); the
    old listener keeps serving."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake, listen="127.0.0.1:0")}))
    old = proxy_url(daemon, "prod")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(short_dir, {"prod": instance(fake, listen=f"127.0.0.1:{port}")})
        result = sugarctl(daemon.socket, "reload")
        assert 6 == result.returncode
        assert "instances.prod.listen" in result.stderr
    assert old == proxy_url(daemon, "prod")
    assert 200 == _get_once(old)


def test_a_reload_that_removes_an_instance_closes_its_upstream_pool(
    front: SugarFront, fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """The kept-alive connection the proxy holds to an instance's Sugar is closed when a reload
    removes the instance; the other instance is served on."""
    config = {
        "prod": instance(front),
        "other": instance(fake, username="admin", password="admin-pw"),
    }
    daemon = start_daemon(write_config(short_dir, config))
    with daemon.client() as client:
        client.token("prod", wait=20)  # logged in: the login's connection is counted below
    before = front.open_connections()
    status = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            str(daemon.socket),
            "http://sugard/v1/instances/prod/rest/v10/me",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "200" == status
    assert before + 1 == front.open_connections()
    del config["prod"]
    write_config(short_dir, config)
    assert 0 == sugarctl(daemon.socket, "reload").returncode
    wait_for(lambda: front.open_connections() == before)
    assert proxy_url(daemon, "other").startswith("http://sugard/")
