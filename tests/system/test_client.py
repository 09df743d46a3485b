"""sugard.client and sugard.auth against the real daemon and the fake SugarCRM: the API, typed
errors, one kept connection shared by threads, the 401 rule in the requests auth and in the
documented aiohttp recipe, and a smoke run of the benchmark."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from support import ROOT
from support.daemon import PASSWORD, USER, instance, write_config
from support.wait import wait_for

from sugard.auth import SugarAuth
from sugard.client import (
    BadRequest,
    DaemonUnreachable,
    NeedsAttention,
    PermissionDenied,
    SugardClient,
    SugardError,
    TokenUnavailable,
    UnknownInstance,
    default_config_path,
    default_socket_path,
    resolve_socket,
)
from sugard.testing import FakeSugar, running_fake

REPORTED = "reported as refused by Sugar"  # the daemon's log line for each accepted report


# The API and its errors


def test_every_call_through_the_daemon(fake: FakeSugar, daemon) -> None:
    """token, status, invalidate, refresh, reload and health answer the design's shapes."""
    with SugardClient(daemon.socket) as client:
        token = client.token("prod", min_ttl=60, wait=5)
        assert fake.valid(token["access_token"])
        assert (fake.url, "prod") == (token["url"], token["instance"])
        assert ["prod"] == [s["name"] for s in client.status()]
        assert "ready" == client.status("prod")["state"]
        assert fake.revoke(token["access_token"])  # sugard checks a report before renewing
        renewed = client.invalidate("prod", token["access_token"])["access_token"]
        assert renewed != token["access_token"]
        assert renewed == client.invalidate("prod", token["access_token"])["access_token"]
        refreshed = client.refresh("prod")["access_token"]
        assert refreshed not in (renewed, token["access_token"])
        assert fake.valid(refreshed)
        assert {"added": [], "removed": [], "changed": [], "unchanged": ["prod"]} == client.reload()
        assert ("ok", 1) == (client.health()["status"], client.health()["instances"])
        assert fake.valid(client.refresh("prod", retry_rejected=True)["access_token"])
        assert 1 == client.connections_opened


def test_token_answer_gives_the_lifetime_when_min_ttl_cannot_be_met(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """token_answer() is token() plus, when the token has less than min_ttl left, the
    lifetime Sugar gives this instance's tokens; None when min_ttl is met."""
    fake.access_lifetime = 60
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    with SugardClient(daemon.socket) as client:
        token, lifetime = client.token_answer("prod", min_ttl=10, wait=20)
        assert (True, None) == (fake.valid(token["access_token"]), lifetime)
        token, lifetime = client.token_answer("prod", min_ttl=3600)
        assert (True, 60.0) == (fake.valid(token["access_token"]), lifetime)
        assert token["expires_in"] <= 60


@pytest.mark.slow
def test_shutdown_of_a_daemon_systemd_runs_is_a_bad_request(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """shutdown() of a daemon started by systemd raises BadRequest (`under_systemd`) naming
    systemctl; of one started by hand, it answers and the daemon goes."""
    config = write_config(short_dir, {"prod": instance(fake)})
    supervised = start_daemon(config, env={"INVOCATION_ID": "0123456789abcdef"})
    with SugardClient(supervised.socket) as client, pytest.raises(BadRequest) as caught:
        client.shutdown()
    assert ("under_systemd", 2) == (caught.value.body["error"], caught.value.exit_code)
    assert "systemctl --user stop sugard" in caught.value.message
    supervised.stop()
    by_hand = start_daemon(config)
    with SugardClient(by_hand.socket) as client:
        answer = client.shutdown()
    assert {"status": "stopping", "pid": by_hand.proc.pid} == answer
    assert 0 == by_hand.proc.wait(15)


def test_the_clients_limits_are_the_daemons() -> None:
    """The bounds the client checks before asking are the ones the daemon enforces."""
    from sugard import client, wire

    assert (wire.DEFAULT_WAIT, wire.MAX_WAIT, wire.MAX_MIN_TTL) == (
        client.DEFAULT_WAIT,
        client.MAX_WAIT,
        client.MAX_MIN_TTL,
    )
    assert wire.TOKEN_LIFETIME_HEADER.lower().encode() == client.LIFETIME_HEADER


def test_errors_are_typed_with_the_exit_codes(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Each failure raises its own SugardError subclass carrying sugarctl's exit code and a
    one-line message."""
    config = write_config(
        short_dir,
        {"prod": instance(fake), "broken": instance(fake, username="admin", password="nope")},
    )
    daemon = start_daemon(config)
    with SugardClient(daemon.socket) as client:
        client.token("prod", wait=20)
        cases = [
            (lambda: client.token("nope"), UnknownInstance, 3, "configured: broken, prod"),
            (lambda: client.token("prod", wait=-1), BadRequest, 2, "wait must be"),
            (lambda: client.token("prod", min_ttl=math.nan), BadRequest, 2, "min_ttl must be"),
            (lambda: client.token("prod", wait=301), BadRequest, 2, "wait"),
            (lambda: client.token(""), BadRequest, 2, "instance name is empty"),
            (lambda: client.invalidate("prod", ""), BadRequest, 2, "access token"),
            (lambda: client.token("broken", wait=20), NeedsAttention, 6, "credentials"),
        ]
        for call, kind, code, says in cases:
            with pytest.raises(kind) as caught:
                call()
            assert code == caught.value.exit_code
            assert says in caught.value.message
            assert "\n" not in str(caught.value)
    with pytest.raises(DaemonUnreachable) as caught:
        SugardClient(short_dir / "none.sock").health()
    assert 4 == caught.value.exit_code
    config.write_text(
        config.read_text() + '\n[instances.bad]\nurl = 1\nusername = "u"\npassword = "p"\n'
    )
    with pytest.raises(NeedsAttention) as refused:
        SugardClient(daemon.socket).reload()
    assert 1 == len(refused.value.errors)
    assert "instances.bad" in refused.value.errors[0]


@pytest.mark.slow
def test_token_unavailable_carries_retry_after(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """While Sugar is down, token() raises TokenUnavailable (exit 5) with a retry_after."""
    fake.fail_next(1000, "503")
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    with SugardClient(daemon.socket) as client, pytest.raises(TokenUnavailable) as caught:
        client.token("prod", wait=0.3)
    assert 5 == caught.value.exit_code
    assert isinstance(caught.value.retry_after, float)
    assert caught.value.retry_after >= 1


# One kept connection, threads


@pytest.mark.slow
def test_threads_share_one_client(fake: FakeSugar, daemon) -> None:
    """8 threads x 100 calls on one client all get the valid token over at most 8 connections
    (one per concurrent call, kept for reuse); afterwards calls open no new ones."""
    with SugardClient(daemon.socket) as client:
        assert 8 == client.MAX_IDLE

        def ask(_: int) -> set[str]:
            return {client.token("prod")["access_token"] for _ in range(100)}

        with ThreadPoolExecutor(8) as pool:
            tokens = set().union(*pool.map(ask, range(8)))
        assert 1 == len(tokens)
        assert fake.valid(tokens.pop())
        assert 1 <= client.connections_opened <= 8
        opened = client.connections_opened
        for _ in range(100):
            client.status("prod")
        assert opened == client.connections_opened


@pytest.mark.slow
def test_a_long_wait_in_one_thread_does_not_hold_up_another(fake: FakeSugar, daemon) -> None:
    """While one thread waits on a slow refresh, another thread's call on the same client
    answers at once."""
    fake.delay = 2.0
    with SugardClient(daemon.socket) as client:
        client.health()  # the kept connection exists, and the slow call below takes it
        calls = fake.calls["token"]
        slow = threading.Thread(target=client.refresh, args=("prod",))
        slow.start()
        wait_for(lambda: fake.calls["token"] > calls, what="the refresh to reach Sugar")
        started = time.monotonic()
        assert "refreshing" == client.status("prod")["state"]
        assert time.monotonic() - started < 1.0
        slow.join(10)
        assert "ready" == client.status("prod")["state"]


@pytest.mark.slow
def test_the_kept_connection_survives_a_daemon_restart(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """After the daemon restarts, the next calls (GET and POST) reconnect by themselves."""
    config = write_config(short_dir, {"prod": instance(fake)})
    first = start_daemon(config)
    with SugardClient(first.socket) as client:
        assert client.token("prod", wait=20)["access_token"]
        assert 0 == first.stop()
        second = start_daemon(config)
        assert fake.valid(client.token("prod", wait=20)["access_token"])
        assert fake.valid(client.refresh("prod")["access_token"])
        assert 2 == client.connections_opened
        second.stop()
        with pytest.raises(DaemonUnreachable, match="sugard run"):
            client.health()


# Where the socket is


def test_socket_resolution_matches_the_daemon(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client resolves the socket in the order `sugard run` does: explicit >
    $SUGARD_SOCKET > [daemon].socket > default."""
    home = os.path.expanduser("~")
    uid = os.getuid()
    expected = [
        ({}, f"{home}/.config/sugard/config.toml", f"/tmp/sugard-{uid}/sugard.sock"),
        ({"XDG_RUNTIME_DIR": "/run/user/1000"}, None, "/run/user/1000/sugard/sugard.sock"),
        ({"XDG_CONFIG_HOME": "/cfg", "SUGARD_CONFIG": ""}, "/cfg/sugard/config.toml", None),
        (
            {"SUGARD_CONFIG": "~/sugard.toml", "XDG_CONFIG_HOME": "/cfg"},
            f"{home}/sugard.toml",
            None,
        ),
    ]
    for env, config_path, socket_file in expected:
        if config_path is not None:
            assert default_config_path(env) == config_path
        if socket_file is not None:
            assert default_socket_path(env) == socket_file
    config = write_config(short_dir, {}, daemon={"socket": "~/from-config.sock"})
    monkeypatch.setenv("SUGARD_CONFIG", str(config))
    monkeypatch.setenv("SUGARD_SOCKET", "")
    monkeypatch.setenv("HOME", "/home/someone")
    assert "/home/someone/from-config.sock" == resolve_socket()
    monkeypatch.setenv("SUGARD_SOCKET", "/env.sock")
    assert "/env.sock" == resolve_socket()
    assert "/explicit.sock" == resolve_socket(Path("/explicit.sock"))
    monkeypatch.setenv("SUGARD_SOCKET", "")
    config.write_text("[daemon]\nlog_level = 'info'\n")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert "/run/user/7/sugard/sugard.sock" == resolve_socket()


# The HTTP the client understands, from a stand-in daemon: the real one never sends chunked
# bodies, close-delimited bodies, HTML or garbage, but a proxy or a future version might.


@contextmanager
def canned(path: Path, answer: bytes, *, read_first: bool = True) -> Iterator[None]:
    """A Unix socket server that answers one connection with `answer`, then closes it."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while read_first and b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            conn.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield
    finally:
        thread.join(10)
        server.close()
        path.unlink()


def test_http_answers_the_client_understands(short_dir: Path) -> None:
    """Chunked and close-delimited bodies parse; an error code the client does not know is a
    plain SugardError (exit 1); non-JSON, garbage and silence are clear errors; an answer sent
    before the request was read (how the daemon turns a uid away) is still read."""
    path = short_dir / "canned.sock"
    ok = b"HTTP/1.1 200 OK\r\n"
    with canned(
        path, ok + b'Transfer-Encoding: chunked\r\n\r\n7\r\n{"a": 1\r\n1\r\n}\r\n0\r\n\r\n'
    ):
        assert {"a": 1} == SugardClient(path).health()
    with canned(path, ok + b'Content-Type: application/json\r\n\r\n{"b": [2]}'):
        assert {"b": [2]} == SugardClient(path).health()
    internal = b'{"error": "internal", "message": "internal error in sugard; see its log"}'
    with canned(
        path, b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(internal) + internal
    ):
        with pytest.raises(SugardError) as caught:
            SugardClient(path).health()
        assert (1, "internal error in sugard; see its log") == (
            caught.value.exit_code,
            caught.value.message,
        )
    failures = [
        (ok + b"Content-Length: 6\r\n\r\n<html>", SugardError, "not JSON"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", SugardError, "malformed HTTP answer"),
        (ok + b"Content-Length: 10\r\n\r\n{}", SugardError, "malformed HTTP answer"),
        (b"", DaemonUnreachable, "dropped the connection"),
    ]
    for answer, kind, says in failures:
        with canned(path, answer), pytest.raises(kind, match=says):
            SugardClient(path).health()
    refusal = b'{"error": "forbidden", "message": "uid 1 may not use this sugard"}'
    head = b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
    with canned(path, head % len(refusal) + refusal, read_first=False):
        with pytest.raises(PermissionDenied) as denied:
            SugardClient(path).token("prod")
        assert 7 == denied.value.exit_code


def test_importing_the_client_needs_neither_requests_nor_heavy_modules() -> None:
    """sugard.client and sugard.auth import with requests absent, and the client pulls in no
    json, socket, re or typing module."""
    code = (
        "import sys; sys.modules['requests'] = None\n"
        "import sugard.client, sugard.auth\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    flags = ["-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code]
    result = subprocess.run(
        [sys.executable, *flags], capture_output=True, text=True, timeout=30, check=True
    )
    loaded = set(result.stdout.split())
    assert {"sugard.client", "sugard.auth"} <= loaded
    lean = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); import sugard.client; "
            "print(' '.join(sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    for heavy in ("json", "socket", "re", "typing", "enum", "http.client", "pathlib"):
        assert heavy not in lean


# The 401 rule: the requests auth and the documented recipes


@pytest.mark.slow
def test_requests_auth_recovers_from_an_eviction_with_one_report_and_one_retry(
    fake: FakeSugar, daemon
) -> None:
    """After Sugar evicts the session, the next request gets a 401, which the auth reports once
    and retries once with the new token: the caller sees a 200."""
    with daemon.client() as client, requests.Session() as http:
        auth = SugarAuth("prod", client)
        http.auth = auth
        assert 200 == http.get(f"{auth.url}/rest/v10/me", timeout=30).status_code
        fake.reset_counters()
        assert 1 == fake.evict(USER, "sugard")
        response = http.get(f"{fake.url}/rest/v10/me", timeout=30)
    assert 200 == response.status_code
    assert USER == response.json()["current_user"]["user_name"]
    assert [401] == [r.status_code for r in response.history]
    assert 1 == auth.reports
    assert 1 == daemon.log().count(REPORTED)
    assert 2 == fake.calls["me"]  # the 401, then the one retry
    assert 1 == fake.calls["password"]  # the eviction took the refresh token too: one login
    assert fake.valid(response.request.headers["OAuth-Token"])


def test_requests_auth_retries_only_once_and_never_logs_in(fake: FakeSugar, daemon) -> None:
    """A 401 that persists after the retry is returned as it is: one report, one retry, and
    no call to Sugar's token endpoint from the script."""
    with running_fake(users={USER: PASSWORD}) as elsewhere, requests.Session() as http:
        # Another Sugar knows none of sugard's tokens: every call there is a 401.
        auth = SugarAuth("prod", SugardClient(daemon.socket))
        response = http.get(f"{elsewhere.url}/rest/v10/me", auth=auth, timeout=30)
        assert 401 == response.status_code
        assert 1 == len(response.history)
        assert (2, 0) == (elsewhere.calls["me"], elsewhere.calls["token"])
        assert 1 == auth.reports
    assert 1 == daemon.log().count(REPORTED)


@pytest.mark.slow
def test_requests_auth_in_threads_renews_the_session_once(fake: FakeSugar, daemon) -> None:
    """Eight threads hit by the same eviction all recover, and sugard logs in again once."""
    auth = SugarAuth("prod", SugardClient(daemon.socket))
    fake.reset_counters()
    fake.evict(USER, "sugard")
    barrier = threading.Barrier(8)

    def call(_: int) -> int:
        with requests.Session() as http:
            barrier.wait(10)
            return http.get(f"{fake.url}/rest/v10/me", auth=auth, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        assert [200] * 8 == list(pool.map(call, range(8)))
    assert 1 == fake.calls["password"]
    assert 1 <= auth.reports <= 8
    assert 1 == daemon.log().count(REPORTED)


def recipe(heading: str) -> list[str]:
    """The python code blocks of one section of docs/client.md."""
    text = (ROOT / "docs" / "client.md").read_text()
    section = text.split(f"\n### {heading}\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


@pytest.mark.slow
def test_the_documented_requests_recipe_runs(
    daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The requests example of docs/client.md runs as written and prints the user."""
    monkeypatch.setenv("SUGARD_SOCKET", str(daemon.socket))
    (code,) = recipe("requests")
    exec(compile(code, "docs/client.md", "exec"), {})  # noqa: S102 - the doc's own example
    assert f"{USER}\n" == capsys.readouterr().out


@pytest.mark.slow
async def test_the_documented_aiohttp_recipe_follows_the_401_rule(
    fake: FakeSugar, daemon, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The aiohttp recipe of docs/client.md runs as written, and after an eviction recovers
    with one report and one retry."""
    monkeypatch.setenv("SUGARD_SOCKET", str(daemon.socket))
    namespace: dict[str, object] = {}
    for code in recipe("aiohttp"):
        exec(compile(code, "docs/client.md", "exec"), namespace)  # noqa: S102
    await namespace["main"]()  # type: ignore[operator]
    assert f"{USER}\n" == capsys.readouterr().out
    fake.reset_counters()
    fake.evict(USER, "sugard")
    import aiohttp

    sugar_request = namespace["sugar_request"]
    with SugardClient() as sugard:
        async with aiohttp.ClientSession() as http:
            response = await sugar_request(http, sugard, "prod", "GET", "/me")  # type: ignore[operator]
            async with response:
                assert 200 == response.status
    assert 2 == fake.calls["me"]
    assert 1 == daemon.log().count(REPORTED)


# The benchmark must keep running


@pytest.mark.slow
def test_benchmark_runs_at_a_tiny_size() -> None:
    """bench/bench_client.py runs end to end and prints its table and the in-process rate."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_client.py"), "--runs", "2", "--calls", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    for row in ("(bare interpreter) |", "`sugarctl token bench` |", "`curl --unix-socket` |"):
        assert row in result.stdout
    assert "calls/s" in result.stdout
    assert "on 1 connection(s)" in result.stdout
    assert "sugarctl / bare interpreter: " in result.stdout
