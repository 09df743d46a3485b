"""Start and stop with real signals: graceful SIGTERM within the grace period, a second signal
forcing the exit, stale sockets, the lock against two daemons at once, over-long paths."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.daemon import SUGARD, DaemonProcess, InFlight, instance, sugarctl, write_config
from support.http import accepted_connections, wait_until_read
from support.wait import wait_for

from sugard.client import DaemonUnreachable, SugardClient
from sugard.testing import FakeSugar


def slow_login_daemon(
    fake: FakeSugar,
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
    *,
    delay: float,
    grace: float,
) -> tuple[DaemonProcess, InFlight]:
    """A daemon whose first login takes `delay` s, with a token request waiting on it."""
    fake.delay = delay
    config = write_config(short_dir, {"prod": instance(fake)}, daemon={"shutdown_grace": grace})
    daemon = start_daemon(config)
    before = accepted_connections(daemon.socket)
    waiting = InFlight(daemon.socket, "token", "prod", "--wait", "30")
    wait_for(lambda: fake.calls["token"] >= 1)  # the login is in flight upstream
    wait_until_read(daemon.socket, before)  # and the request has reached the daemon
    return daemon, waiting


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_lets_a_slow_request_finish(
    fake: FakeSugar,
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
    sig: signal.Signals,
) -> None:
    """SIGTERM/SIGINT during a slow request: new connections are refused at once, the request
    still gets its token, then sugard exits 0 and removes its socket and lock file."""
    # The login outlasts the test's own steps up to the signal, however busy the machine.
    daemon, waiting = slow_login_daemon(fake, short_dir, start_daemon, delay=4, grace=10)
    signalled = time.monotonic()
    daemon.signal(sig)
    wait_for(lambda: "stopping; send it again" in daemon.log())
    with pytest.raises(DaemonUnreachable), SugardClient(daemon.socket, timeout=5) as client:
        client.health()

    result = waiting.join()
    assert 0 == result.returncode, result.stderr
    assert fake.valid(result.stdout.strip())
    assert 0 == daemon.proc.wait(15)
    assert time.monotonic() - signalled < 10  # it did not sit out the whole grace period
    assert [] == sorted(p.name for p in short_dir.glob("s.sock*"))
    assert "waiting up to 10 s for 1 open connection(s) to finish" in daemon.log()


@pytest.mark.slow
@pytest.mark.parametrize("grace", [0.5, 0])
def test_grace_period_bounds_the_stop(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess], grace: float
) -> None:
    """A request that outlasts shutdown_grace is cut off: sugard still exits 0, promptly
    (and 0 means no wait, not aiohttp's "no limit")."""
    daemon, waiting = slow_login_daemon(fake, short_dir, start_daemon, delay=10, grace=grace)
    signalled = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert 0 == daemon.proc.wait(15)
    assert time.monotonic() - signalled < 4
    assert 4 == waiting.join().returncode  # the connection closed without an answer
    assert not daemon.socket.exists()


@pytest.mark.slow
def test_second_signal_forces_the_exit(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A second signal during the grace period exits at once (status 1), socket removed."""
    daemon, waiting = slow_login_daemon(fake, short_dir, start_daemon, delay=10, grace=30)
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "stopping; send it again" in daemon.log())
    signalled = time.monotonic()
    daemon.signal(signal.SIGINT)
    assert 1 == daemon.proc.wait(15)
    assert time.monotonic() - signalled < 2
    assert "SIGINT again: exiting now" in daemon.log()
    assert [] == sorted(p.name for p in short_dir.glob("s.sock*"))
    assert 4 == waiting.join().returncode


@pytest.mark.slow
def test_second_signal_cancels_what_is_left_and_says_how_many(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """The forced stop is still a stop, not a crash: it says how many connections it cut off,
    stops the keepers and the log ends with "sugard stopped"."""
    daemon, waiting = slow_login_daemon(fake, short_dir, start_daemon, delay=10, grace=30)
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "stopping; send it again" in daemon.log())
    daemon.signal(signal.SIGTERM)
    assert 1 == daemon.proc.wait(15)
    assert 4 == waiting.join().returncode
    log = daemon.log()
    assert "SIGTERM again: exiting now" in log
    assert "cancelled 1 connection(s) still open" in log
    assert log.rstrip().endswith("sugard stopped")


def test_stale_socket_from_a_crash_is_replaced(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A socket file nobody listens on (a crashed daemon's) is removed and sugard starts."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_dir / "s.sock"))
    stale.close()  # the file stays, as after a SIGKILL
    daemon = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    assert 0 == sugarctl(daemon.socket, "token", "prod").returncode
    assert f"removing stale socket {daemon.socket}" in daemon.log()


def run_sugard(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SUGARD, "run", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.slow
def test_second_daemon_on_a_live_socket_refuses(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A second `sugard run` on a live daemon's socket exits 1 naming the running one's pid,
    and the first one keeps serving."""
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    second = run_sugard("-c", str(config), "--socket", str(daemon.socket))
    assert 1 == second.returncode
    assert (
        f"sugard: another sugard (pid {daemon.proc.pid}) is already running on {daemon.socket}; "
        f"use it (sugarctl --socket {daemon.socket} ...), or stop it first\n"
    ) == second.stderr
    assert 0 == sugarctl(daemon.socket, "ping").returncode


def test_something_else_answering_on_the_socket_is_left_alone(
    fake: FakeSugar, short_dir: Path
) -> None:
    """A live listener on the path, without sugard's lock, is not removed: sugard refuses."""
    path = short_dir / "s.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen()
    try:
        config = write_config(short_dir, {"prod": instance(fake)})
        result = run_sugard("-c", str(config), "--socket", str(path))
        assert 1 == result.returncode
        assert f"something already answers on {path}" in result.stderr
        assert path.exists()
    finally:
        other.close()


@pytest.mark.slow
def test_daemons_started_at_the_same_moment_bind_once(fake: FakeSugar, short_dir: Path) -> None:
    """Of four `sugard run` started together on one socket, exactly one serves; the others
    exit 1 saying another sugard is running."""
    config = write_config(short_dir, {"prod": instance(fake)})
    path = short_dir / "s.sock"
    procs = [
        subprocess.Popen(
            [SUGARD, "run", "-c", str(config), "--socket", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        wait_for(lambda: sum(p.poll() is not None for p in procs) == 3, timeout=30)
        (survivor,) = [p for p in procs if p.poll() is None]
        for proc in procs:
            if proc is not survivor:
                assert 1 == proc.returncode
                assert proc.stderr is not None
                assert "is already running on" in proc.stderr.read()
        with SugardClient(path) as client:
            assert client.token("prod")["access_token"]
        assert f"{survivor.pid}\n" == (short_dir / "s.sock.lock").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(15)
            if proc.stderr is not None:
                proc.stderr.close()
    assert 0 == survivor.returncode


def test_over_long_socket_path_is_a_readable_error(fake: FakeSugar, short_dir: Path) -> None:
    """A socket path over the kernel's 107 bytes exits 1 with one line saying the limit."""
    path = short_dir / ("x" * 120) / "s.sock"
    config = write_config(short_dir, {"prod": instance(fake)})
    result = run_sugard("-c", str(config), "--socket", str(path))
    size = len(os.fsencode(path))
    assert 1 == result.returncode
    assert (
        f"sugard: socket path {path} is {size} bytes; Unix sockets allow at most 107: "
        "choose a shorter --socket\n"
    ) == result.stderr
    assert not path.parent.exists()  # nothing created on the way to the error


@pytest.mark.slow
def test_sighup_during_the_stop_is_ignored(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """SIGHUP while stopping does not start keepers again: the stop completes with 0."""
    # The login outlasts the test's own steps up to the signal, however busy the machine.
    daemon, waiting = slow_login_daemon(fake, short_dir, start_daemon, delay=4, grace=10)
    daemon.signal(signal.SIGTERM)
    wait_for(lambda: "stopping; send it again" in daemon.log())
    daemon.signal(signal.SIGHUP)
    assert 0 == daemon.proc.wait(15)
    assert "SIGHUP ignored: sugard is stopping" in daemon.log()
    assert 0 == waiting.join().returncode


def test_a_twin_of_a_running_daemon_is_refused_whatever_its_socket(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A second sugard on another socket and another $XDG_RUNTIME_DIR, logging in as the same
    url, user and platform, exits 1 naming the running daemon's pid and socket and how to use
    it (never another socket); no login of its own, and the first keeps its token. A reload of
    the first that adds an instance a third daemon keeps is refused the same way."""
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config)
    first = sugarctl(daemon.socket, "token", "prod").stdout.strip()
    logins = fake.calls["password"]
    other = short_dir / "other"
    other.mkdir(mode=0o700)
    twin = subprocess.run(
        [SUGARD, "run", "-c", str(config), "--socket", str(other / "twin.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "XDG_RUNTIME_DIR": str(other)},
    )
    assert 1 == twin.returncode
    [line] = twin.stderr.splitlines()
    assert line.startswith(
        f"sugard: another sugard (pid {daemon.proc.pid}, socket {daemon.socket}) already keeps "
        f"the session of 'prod' (alice at {fake.url}, platform sugard)"
    )
    assert f"Use that one: sugarctl --socket {daemon.socket} token prod" in line
    assert "another socket" not in line and "another --socket" not in line
    assert not (other / "twin.sock").exists()
    assert logins == fake.calls["password"]
    assert first == sugarctl(daemon.socket, "token", "prod").stdout.strip()

    # Another platform is another session: that one may run beside it.
    staging = write_config(
        other, {"staging": instance(fake, platform="mobile")}, name="staging.toml"
    )
    beside = DaemonProcess(staging, other / "s.sock")
    try:
        beside.wait_ready()
        assert 0 == sugarctl(other / "s.sock", "token", "staging").returncode
        write_config(
            short_dir,
            {"prod": instance(fake), "staging": instance(fake, platform="mobile")},
        )
        refused = sugarctl(daemon.socket, "reload")
        assert 6 == refused.returncode
        assert f"(pid {beside.proc.pid}, socket {other / 's.sock'})" in refused.stderr
        assert first == sugarctl(daemon.socket, "token", "prod").stdout.strip()
    finally:
        assert 0 == beside.stop()
    assert 0 == sugarctl(daemon.socket, "reload").returncode  # the session is free now
    assert 0 == sugarctl(daemon.socket, "token", "staging", "--wait", "20").returncode
