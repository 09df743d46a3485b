"""Who may ask: SO_PEERCRED checks with real clients run as another uid (setpriv), against the
real daemon. Each test loosens the socket's directory and the socket on purpose, so that only the
daemon's credential check stands between the other uid and the tokens."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from support.daemon import instance, sugarctl, write_config
from support.nobody import NOBODY, as_nobody

from sugard.api.serving import REFUSED_PER_UID
from sugard.testing import FakeSugar

OTHER_GROUP = 4242


def loosen(socket: Path) -> None:
    """Open the directory and socket to everyone: only the credential check is left."""
    socket.parent.chmod(0o755)
    socket.chmod(0o666)


def curl_socket_as_nobody(
    socket: Path, path: str, *, groups: tuple[int, ...] = (), method: str = "GET"
):
    """curl run as uid 65534; returns (status, JSON body, pid of curl)."""
    proc = subprocess.Popen(
        as_nobody(
            "curl",
            "-sS",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            str(socket),
            f"http://sugard{path}",
            groups=groups,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=30)
    assert 0 == proc.returncode, err
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body), proc.pid


def test_socket_is_born_private_and_stays_so(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """The socket directory is 0700 and the socket 0600 at start, and a reload keeps them so."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    assert (0o700, 0o600) == (
        stat.S_IMODE(daemon.socket.parent.stat().st_mode),
        stat.S_IMODE(daemon.socket.stat().st_mode),
    )
    assert 0 == sugarctl(daemon.socket, "reload").returncode
    assert (0o700, 0o600) == (
        stat.S_IMODE(daemon.socket.parent.stat().st_mode),
        stat.S_IMODE(daemon.socket.stat().st_mode),
    )


def test_another_uid_gets_403_and_the_log_names_pid_uid_and_program(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """By default another uid is refused with 403 `forbidden`; the log names its pid, uid, exe."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    loosen(daemon.socket)
    status, body, pid = curl_socket_as_nobody(daemon.socket, "/v1/instances/prod/token")
    assert 403 == status
    assert "forbidden" == body["error"]
    assert f"uid {NOBODY} may not use this sugard" in body["message"]
    assert "allowed_uids" in body["message"]
    assert "access_token" not in body
    log = daemon.log()
    assert re.search(
        rf"refused GET '/v1/instances/prod/token' from pid {pid} uid {NOBODY} "
        r"\('/usr/bin/curl'\)",
        log,
    ), log


def test_sugarctl_as_another_uid_exits_7(
    fake: FakeSugar, short_dir: Path, start_daemon, foreign_sugarctl: str
) -> None:
    """The real sugarctl run by a refused uid exits 7 (permission denied) with one line."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    loosen(daemon.socket)
    result = subprocess.run(
        as_nobody(foreign_sugarctl, "--socket", str(daemon.socket), "token", "prod"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 7 == result.returncode, result.stderr
    assert "" == result.stdout
    assert 1 == len(result.stderr.strip().splitlines())
    assert f"uid {NOBODY} may not use this sugard" in result.stderr


def test_daemon_allowed_uids_widen_after_a_reload(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Adding the uid to [daemon] allowed_uids (and reloading) lets it fetch a token."""
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    loosen(daemon.socket)
    assert 403 == curl_socket_as_nobody(daemon.socket, "/v1/instances/prod/token")[0]
    write_config(short_dir, {"prod": instance(fake)}, daemon={"allowed_uids": [NOBODY]})
    assert 0 == sugarctl(daemon.socket, "reload").returncode
    status, body, _ = curl_socket_as_nobody(daemon.socket, "/v1/instances/prod/token")
    assert 200 == status
    assert fake.valid(body["access_token"])


def connect_as_nobody(path: Path) -> socket.socket:
    """A connection to `path` made by a child running as uid 65534, handed back over
    SCM_RIGHTS: the kernel fixes a Unix socket's peer credentials at connect(), so the daemon
    sees uid 65534 on it for as long as it lives, whoever writes to it afterwards."""
    parent, child = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(str(path))
            socket.send_fds(child, [b"fd"], [conn.fileno()])
            status = 0
        finally:
            os._exit(status)
    child.close()
    _, fds, _, _ = socket.recv_fds(parent, 16, 1)
    parent.close()
    assert 0 == os.waitpid(pid, 0)[1]
    return socket.socket(fileno=fds[0])


def test_a_reload_withdraws_access_on_an_open_keep_alive_connection(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """Credentials are read once per connection, but who may ask is judged per request: a
    keep-alive connection opened while the uid was allowed is refused once a reload drops it."""
    config = write_config(short_dir, {"prod": instance(fake)}, daemon={"allowed_uids": [NOBODY]})
    daemon = start_daemon(config)
    loosen(daemon.socket)
    conn = http.client.HTTPConnection("sugard", timeout=30)
    conn.sock = connect_as_nobody(daemon.socket)
    try:
        conn.request("GET", "/v1/instances/prod/token")
        answer = conn.getresponse()
        assert 200 == answer.status
        assert fake.valid(json.loads(answer.read())["access_token"])
        write_config(short_dir, {"prod": instance(fake)})
        assert 0 == sugarctl(daemon.socket, "reload").returncode
        conn.request("GET", "/v1/instances/prod/token")
        answer = conn.getresponse()
        assert 403 == answer.status
        assert f"uid {NOBODY} may not use this sugard" in json.loads(answer.read())["message"]
    finally:
        conn.close()


@pytest.mark.slow
def test_allowed_gids_match_supplementary_groups(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """[daemon] allowed_gids admit a peer that has the group only as a supplementary group."""
    config = write_config(
        short_dir, {"prod": instance(fake)}, daemon={"allowed_gids": [OTHER_GROUP]}
    )
    daemon = start_daemon(config)
    loosen(daemon.socket)
    status, body, _ = curl_socket_as_nobody(
        daemon.socket, "/v1/instances/prod/token", groups=(OTHER_GROUP,)
    )
    assert 200 == status
    assert fake.valid(body["access_token"])
    assert 403 == curl_socket_as_nobody(daemon.socket, "/v1/instances/prod/token")[0]


@pytest.mark.slow
def test_instance_lists_narrow_the_daemon_lists(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """An instance's own allowed_uids narrow: the uid is refused there, and does not see it
    listed, while it still uses the other instances; the daemon's owner keeps every one."""
    fake.set_password("bob", "bob-secret-pw")
    config = write_config(
        short_dir,
        {
            "prod": instance(fake, allowed_uids=[]),
            "test": instance(fake, username="bob", password="bob-secret-pw"),
        },
        daemon={"allowed_uids": [NOBODY]},
    )
    daemon = start_daemon(config)
    loosen(daemon.socket)
    status, body, _ = curl_socket_as_nobody(daemon.socket, "/v1/instances/prod/token")
    assert 403 == status
    assert f"uid {NOBODY} may not use instance 'prod'" in body["message"]
    assert 200 == curl_socket_as_nobody(daemon.socket, "/v1/instances/test/token")[0]
    status, body, _ = curl_socket_as_nobody(daemon.socket, "/v1/instances")
    assert ["test"] == [i["name"] for i in body["instances"]]
    assert 0 == sugarctl(daemon.socket, "token", "prod").returncode


def test_only_the_owner_may_reload(fake: FakeSugar, short_dir: Path, start_daemon) -> None:
    """A uid allowed to fetch tokens still may not reload the daemon's config."""
    config = write_config(short_dir, {"prod": instance(fake)}, daemon={"allowed_uids": [NOBODY]})
    daemon = start_daemon(config)
    loosen(daemon.socket)
    status, body, _ = curl_socket_as_nobody(daemon.socket, "/v1/reload", method="POST")
    assert 403 == status
    assert "may not reload" in body["message"]
    assert "reloaded" not in daemon.log()


HOLD = """
import select, socket, sys, time
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    socks.append(s)
print("connected", flush=True)
# Until the daemon has answered all it may not hold (or a generous deadline has passed): the
# count below is then what the daemon decided, not how far it got.
answers = int(sys.argv[2]) - int(sys.argv[3])
deadline = time.monotonic() + 20  # within the test's own 30 s wait for this answer
while len(select.select(socks, [], [], 0.05)[0]) < answers and time.monotonic() < deadline:
    pass
open_ = 0
for s in socks:
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        open_ += 1  # nothing sent to us: the daemon still holds this connection open
    except OSError:
        pass  # reset by the daemon: closed, like an answered one
print(open_)
"""


@pytest.mark.slow
def test_a_refused_uid_cannot_hold_many_connections(
    fake: FakeSugar, short_dir: Path, start_daemon
) -> None:
    """A refused uid keeps at most REFUSED_PER_UID silent connections; the rest are answered 403
    and closed at once, and the owner is served meanwhile."""
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    loosen(daemon.socket)
    holder = subprocess.Popen(
        as_nobody("/usr/bin/python3", "-c", HOLD, str(daemon.socket), "40", str(REFUSED_PER_UID)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert "connected\n" == holder.stdout.readline()  # its 40 connections are in place
    assert 0 == sugarctl(daemon.socket, "token", "prod").returncode
    # From the reader readline() used: communicate() reads the pipe itself and would miss a
    # count that readline() had already buffered (as it does when the test runs late).
    with holder.stdout:
        out = holder.stdout.read()  # the holder ends by its own deadline (20 s)
    assert 0 == holder.wait(timeout=30)
    assert REFUSED_PER_UID == int(out)
