"""The walking skeleton: fake SugarCRM on 127.0.0.1, `sugard run` on a real socket, real clients."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.daemon import SUGARD, TOKEN_KEYS, USER, instance, sugarctl, write_config

from sugard.client import SugardClient
from sugard.testing import FakeSugar


def test_sugarctl_token_prints_a_token_sugar_accepts(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """`sugarctl token NAME` prints exactly the live access token, nothing else."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    result = sugarctl(daemon.socket, "token", "prod")
    assert 0 == result.returncode, result.stderr
    token = result.stdout.strip()
    assert result.stdout == token + "\n"
    assert fake.valid(token)


def test_curl_gets_the_token_json(fake: FakeSugar, short_dir: Path, start_daemon) -> None:
    """`curl --unix-socket` gets the design's TOKEN object."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--fail",
            "--unix-socket",
            str(daemon.socket),
            "http://sugard/v1/instances/prod/token",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    body = json.loads(out)
    assert TOKEN_KEYS == set(body)
    assert "prod" == body["instance"]
    assert fake.url == body["url"]
    assert "bearer" == body["token_type"]
    assert body["expires_at"].endswith("Z")
    assert 3500 < body["expires_in"] <= 3600
    assert fake.valid(body["access_token"])
    assert body["download_token"]


@pytest.mark.slow
def test_200_concurrent_requests_on_a_cold_start_make_one_login(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Requests racing a fresh daemon's first login share it: Sugar sees exactly one login."""
    fake.delay = 0.3  # keep the login in flight while the requests pile up
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))

    def ask(_: int) -> str:
        with SugardClient(daemon.socket) as client:
            return client.token("prod", wait=20)["access_token"]

    with ThreadPoolExecutor(200) as pool:
        tokens = set(pool.map(ask, range(200)))
    assert 1 == len(tokens)
    assert 1 == fake.calls["password"]
    assert 0 == fake.calls["refresh_token"]


def test_wrong_password_fails_clearly_after_one_attempt(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """A rejected password exits 6 with one line naming the credentials; Sugar sees one try."""
    daemon = start_daemon(
        write_config(short_dir, {"prod": instance(fake, password="wrong-password")})
    )
    for _ in range(3):
        result = sugarctl(daemon.socket, "token", "prod")
        assert 6 == result.returncode
        assert "" == result.stdout
        assert 1 == len(result.stderr.strip().splitlines())
        assert "rejected the credentials" in result.stderr
        assert "wrong-password" not in result.stderr
    assert 1 == fake.calls["password"]


@pytest.mark.slow
def test_status_and_ping(fake: FakeSugar, short_dir: Path, start_daemon) -> None:
    """`status --json` shows the design's STATUS; `ping` answers ok with the version."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    assert 0 == sugarctl(daemon.socket, "token", "prod").returncode
    result = sugarctl(daemon.socket, "status", "--json")
    assert 0 == result.returncode, result.stderr
    (status,) = json.loads(result.stdout)
    assert "ready" == status["state"]
    assert USER == status["username"]
    assert "sugard" == status["platform"]
    assert 1 == status["logins"]
    assert status["expires_at"].endswith("Z")
    table = sugarctl(daemon.socket, "status")
    assert "prod" in table.stdout and "ready" in table.stdout
    ping = sugarctl(daemon.socket, "ping")
    assert 0 == ping.returncode
    assert ping.stdout.startswith("ok sugard ")


def test_unknown_instance_and_no_daemon_exit_codes(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Unknown instance exits 3 naming the configured ones; no daemon exits 4 saying how."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    result = sugarctl(daemon.socket, "token", "nope")
    assert 3 == result.returncode
    assert "prod" in result.stderr
    missing = sugarctl(short_dir / "none.sock", "token", "prod")
    assert 4 == missing.returncode
    assert "sugard run" in missing.stderr


def test_socket_is_private_and_removed_on_sigterm(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """The socket is 0600 in a 0700 directory; SIGTERM exits 0 and removes it."""
    sock_dir = short_dir / "run"
    sock_dir.mkdir(mode=0o700)
    config = write_config(
        short_dir, {"prod": instance(fake)}, daemon={"socket": str(sock_dir / "x.sock")}
    )
    daemon = start_daemon(config)
    assert 0o600 == stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert 0o700 == stat.S_IMODE(os.stat(daemon.socket.parent).st_mode)
    daemon.signal(signal.SIGTERM)
    assert 0 == daemon.proc.wait(15)
    assert not daemon.socket.exists()


def test_open_socket_directory_is_refused(fake: FakeSugar, short_dir: Path) -> None:
    """A socket directory others can enter is refused with the chmod that fixes it."""
    open_dir = short_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    config = write_config(short_dir, {"prod": instance(fake)})
    result = subprocess.run(
        [SUGARD, "run", "-c", str(config), "--socket", str(open_dir / "s.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 1 == result.returncode
    assert f"chmod 700 {open_dir}" in result.stderr


def test_demo_once_prints_a_token_through_the_daemon() -> None:
    """`sugard demo --once` runs the whole path and says what to try next."""
    result = subprocess.run(
        [SUGARD, "demo", "--once"], capture_output=True, text=True, timeout=60, check=False
    )
    assert 0 == result.returncode, result.stderr
    assert "token for demo: " in result.stdout
    assert "password logins the fake saw: 1" in result.stdout
    assert "sugarctl token demo" in result.stdout


def test_the_commands_the_demo_suggests_work_while_it_runs(tmp_path: Path) -> None:
    """Without --once the demo keeps running: the commands it prints, run as printed (PATH
    without the venv), get its token; Ctrl-C stops it and removes its files."""
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    with (
        (tmp_path / "demo.log").open("w") as log,
        subprocess.Popen(
            [SUGARD, "demo"], stdout=subprocess.PIPE, stderr=log, text=True, env=env
        ) as demo,
    ):
        assert demo.stdout is not None
        try:
            lines = []
            for line in demo.stdout:
                lines.append(line)
                if "press Ctrl-C" in line:
                    break
            printed = "".join(lines)
            token = re.search(r"token for demo: (\S+)", printed)
            socket = re.search(r"export SUGARD_SOCKET=(\S+)", printed)
            command = re.search(r"^  (\S+) token demo$", printed, re.MULTILINE)
            assert token and socket and command, printed
            got = subprocess.run(
                [command[1], "token", "demo"],
                env={**env, "SUGARD_SOCKET": socket[1]},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert 0 == got.returncode, got.stderr
            assert token[1] == got.stdout.strip()
        finally:
            demo.send_signal(signal.SIGINT)
            assert 0 == demo.wait(timeout=30), (tmp_path / "demo.log").read_text()
    assert not Path(socket[1]).parent.exists()
