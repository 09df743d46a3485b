"""systemd, with its own tools: sd_notify read from a real datagram socket, socket activation by
`systemd-socket-activate`, the units checked by `systemd-analyze`, and journald-style logs."""

from __future__ import annotations

import itertools
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import ROOT
from support.daemon import SUGARD, DaemonProcess, instance, sugarctl, write_config
from support.wait import wait_for

from sugard.client import SugardClient
from sugard.daemon.systemd import JournalFormatter
from sugard.testing import FakeSugar

UNITS = ROOT / "systemd"
SERVICE = UNITS / "sugard.service"
SOCKET = UNITS / "sugard.socket"
PIPX_BIN = "%h/.local/bin"  # where the shipped unit expects sugard and sugarctl
SYSTEMD_DOC = (UNITS.parent / "docs" / "systemd.md").read_text()


class NotifySocket:
    """What systemd's end of NOTIFY_SOCKET receives: one datagram per sd_notify call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout: float = 15.0) -> tuple[float, dict[str, str]]:
        """The next message, as (arrival on the monotonic clock, {KEY: VALUE})."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        return time.monotonic(), fields

    def next(self, timeout: float = 15.0) -> dict[str, str]:
        """The next message that is not a watchdog ping."""
        deadline = time.monotonic() + timeout
        while True:
            _, fields = self.receive(max(0.01, deadline - time.monotonic()))
            if fields != {"WATCHDOG": "1"}:
                return fields

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(short_dir: Path) -> Iterator[NotifySocket]:
    """A datagram socket standing in for systemd's notify socket."""
    listener = NotifySocket(short_dir / "notify")
    yield listener
    listener.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.mark.slow
def test_notify_sequence_ready_reloading_stopping(
    fake: FakeSugar,
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
    notify_socket: NotifySocket,
) -> None:
    """READY=1 with STATUS once the socket answers; RELOADING=1 + MONOTONIC_USEC then READY=1
    around a reload, good or bad (the error in STATUS); STOPPING=1 on SIGTERM."""
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config, wait=False, env={"NOTIFY_SOCKET": str(notify_socket.path)})

    ready = notify_socket.next()
    with SugardClient(daemon.socket, timeout=5) as client:
        assert 1 == client.health()["instances"]  # answers now, without any retry
    assert "1" == ready["READY"]
    assert f"serving 1 instance(s) on {daemon.socket}" == ready["STATUS"]

    before = monotonic_usec()
    daemon.signal(signal.SIGHUP)
    reloading = notify_socket.next()
    after = monotonic_usec()
    assert "1" == reloading["RELOADING"]
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    done = notify_socket.next()
    assert "1" == done["READY"]
    assert done["STATUS"].startswith("reloaded (0 added, 0 removed, 0 changed, 1 unchanged)")

    write_config(short_dir, {"prod": instance(fake)}, daemon={"bogus": 1})
    assert 0 != sugarctl(daemon.socket, "reload").returncode  # the API path notifies too
    assert "1" == notify_socket.next()["RELOADING"]
    failed = notify_socket.next()
    assert "1" == failed["READY"]
    assert failed["STATUS"].startswith("reload failed, still running the old config: ")
    assert "bogus" in failed["STATUS"]

    daemon.signal(signal.SIGTERM)
    stopping = notify_socket.next()
    assert {"STOPPING": "1", "STATUS": "stopping"} == stopping
    assert 0 == daemon.proc.wait(15)


@pytest.mark.slow
def test_watchdog_pings_at_half_of_watchdog_usec(
    fake: FakeSugar,
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
    notify_socket: NotifySocket,
) -> None:
    """With WATCHDOG_USEC=400000 the event loop sends WATCHDOG=1 about every 0.2 s."""
    config = write_config(short_dir, {"prod": instance(fake)})
    start_daemon(
        config,
        wait=False,
        env={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"},
    )
    pings: list[float] = []
    deadline = time.monotonic() + 15
    while len(pings) < 8 and time.monotonic() < deadline:
        at, fields = notify_socket.receive()
        if fields == {"WATCHDOG": "1"}:
            pings.append(at)
    assert 8 == len(pings)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.15 <= statistics.median(gaps) <= 0.3, gaps


@pytest.mark.slow
def test_watchdog_meant_for_another_pid_is_ignored(
    fake: FakeSugar,
    short_dir: Path,
    start_daemon: Callable[..., DaemonProcess],
    notify_socket: NotifySocket,
) -> None:
    """WATCHDOG_PID naming another process (a parent's watchdog) makes sugard send no pings."""
    config = write_config(short_dir, {"prod": instance(fake)})
    start_daemon(
        config,
        wait=False,
        env={
            "NOTIFY_SOCKET": str(notify_socket.path),
            "WATCHDOG_USEC": "100000",
            "WATCHDOG_PID": "1",
        },
    )
    assert "1" == notify_socket.next()["READY"]
    with pytest.raises(TimeoutError):
        notify_socket.receive(timeout=0.6)


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


@pytest.mark.slow
def test_socket_activation_first_connection_starts_the_daemon(
    fake: FakeSugar, short_dir: Path
) -> None:
    """Under `systemd-socket-activate`, the first `sugarctl token` starts sugard on the passed
    socket and gets a token; on SIGTERM sugard exits 0 and leaves systemd's socket alone."""
    config = write_config(short_dir, {"prod": instance(fake)})
    path = short_dir / "act.sock"
    log_path = short_dir / "activate.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l",
                str(path),
                "--fdname=sugard",
                SUGARD,
                "run",
                "-c",
                str(config),
                "--log-level",
                "debug",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(path.exists)
        assert "systemd-socket-activate" in _cmdline(proc.pid)[0]  # sugard not started yet
        assert 0 == fake.calls["password"]

        result = sugarctl(path, "token", "prod")
        assert 0 == result.returncode, result.stderr + log_path.read_text()
        assert fake.valid(result.stdout.strip())
        assert [SUGARD, "run"] == _cmdline(proc.pid)[1:3]  # exec'd in place: LISTEN_PID is ours
        text = log_path.read_text()
        assert f"listening on {path} (socket passed in by systemd)" in text

        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(15)
        assert path.exists()  # systemd's socket: sugard never removes it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_socket_activation_refuses_an_inet_socket(fake: FakeSugar, short_dir: Path) -> None:
    """A TCP socket passed in is refused with a line naming the fix (peer credentials need a
    Unix socket), not served to the network."""
    config = write_config(short_dir, {"prod": instance(fake)})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", SUGARD, "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def connect() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_for(connect)
        output, _ = proc.communicate(timeout=30)
        assert 1 == proc.returncode
        assert "which is not a Unix stream socket" in output
        assert "ListenStream=%t/sugard/sugard.sock" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _unit_settings(path: Path, section: str | None = None) -> list[tuple[str, str]]:
    pairs = []
    current = ""
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif line and not line.startswith("#") and section in (None, current):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    """`%t` for systemd-analyze --user: it refuses to expand specifiers without one."""
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    return path


def test_units_pass_systemd_analyze_verify(tmp_path: Path, runtime_dir: Path) -> None:
    """`systemd-analyze verify --user` accepts both units, with the drop-in docs/systemd.md gives
    for a sugard installed elsewhere, without a single warning.

    verify insists that the programs of ExecStart and ExecReload exist, and the shipped unit
    names the pipx location (`%h/.local/bin`), which a test machine lacks: the documented drop-in,
    pointed at this venv's bin, must replace both (a drop-in that forgot ExecReload fails here).
    """
    settings = _unit_settings(SERVICE)
    assert ["%h/.local/bin/sugard run"] == [v for k, v in settings if k == "ExecStart"]
    assert [f"{PIPX_BIN}/sugarctl --socket %t/sugard/sugard.sock reload"] == [
        v for k, v in settings if k == "ExecReload"
    ]
    shutil.copy(SERVICE, tmp_path / "sugard.service")
    shutil.copy(SOCKET, tmp_path / "sugard.socket")
    [drop_in] = re.findall(r"```ini\n(\[Service\]\nExecStart=\n.*?)```", SYSTEMD_DOC, re.DOTALL)
    (tmp_path / "sugard.service.d").mkdir()
    (tmp_path / "sugard.service.d" / "override.conf").write_text(
        drop_in.replace("/opt/sugard/venv/bin/", f"{Path(SUGARD).parent}/")
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", "--user", "sugard.service", "sugard.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)},
        check=False,
    )
    assert (0, "") == (result.returncode, result.stderr)


def test_service_exposure_is_at_most_2(runtime_dir: Path) -> None:
    """`systemd-analyze security --user --offline=yes` rates the shipped service 2.0 or below."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--user", "--offline=yes", str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)},
        check=False,
    )
    match = re.search(r"Overall exposure level for sugard\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_units_say_what_the_daemon_relies_on() -> None:
    """The service is Type=notify with a watchdog, reloads through sugarctl (which waits for the
    outcome), restarts on failure, and its hardening still leaves the config readable,
    %t/sugard writable and the network open; the socket is private and at the path sugarctl
    looks for by default."""
    service = _unit_settings(SERVICE)
    for setting in [
        ("Type", "notify"),
        ("ExecReload", f"{PIPX_BIN}/sugarctl --socket %t/sugard/sugard.sock reload"),
        ("Restart", "on-failure"),
        ("WatchdogSec", "30s"),
        ("ProtectHome", "read-only"),
        ("RuntimeDirectory", "sugard"),
        ("RuntimeDirectoryPreserve", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ]:
        assert setting in service
    assert not any(key == "PrivateNetwork" for key, _ in service)
    assert [
        ("ListenStream", "%t/sugard/sugard.sock"),
        ("SocketMode", "0600"),
        ("DirectoryMode", "0700"),
        ("FileDescriptorName", "sugard"),
    ] == _unit_settings(SOCKET, "Socket")


def test_journald_stderr_gets_priorities_and_no_timestamps(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """When JOURNAL_STREAM names sugard's stderr, every line starts `<N>` (6 info, 3 error)
    with no time of day, so `journalctl -p err` finds the errors."""
    log_file = short_dir / "sugard.log"  # where DaemonProcess sends stderr; same inode kept
    log_file.touch()
    st = log_file.stat()
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    write_config(short_dir, {"prod": instance(fake)}, daemon={"bogus": 1})
    assert 0 != sugarctl(daemon.socket, "reload").returncode
    assert 0 == daemon.stop()
    lines = daemon.log_path.read_text().splitlines()
    assert lines
    assert [] == [line for line in lines if not re.match(r"<[0-7]>[\w.]+: ", line)]
    assert [] == [line for line in lines if re.search(r"\d\d:\d\d:\d\d (INFO|DEBUG)", line)]
    assert any(line.startswith("<6>sugard.daemon: sugard ") for line in lines)
    assert any(line.startswith("<3>sugard.daemon: reload refused") for line in lines)


def test_terminal_stderr_gets_timestamps(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """A JOURNAL_STREAM inherited by a shell (not sugard's stderr) changes nothing: lines keep
    their time and level names."""
    other = short_dir.stat()
    config = write_config(short_dir, {"prod": instance(fake)})
    daemon = start_daemon(config, env={"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"})
    assert 0 == daemon.stop()
    first = daemon.log_path.read_text().splitlines()[0]
    assert re.match(r"\d\d:\d\d:\d\d (INFO|DEBUG) [\w.]+: ", first), first


def test_journal_lines_of_a_traceback_all_carry_the_priority() -> None:
    """journald stores each line as its own entry: a traceback's every line starts `<3>`."""
    formatter = JournalFormatter("%(name)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("sugard.test").makeRecord(
            "sugard.test", logging.ERROR, __file__, 1, "failed: %s", ("x",), sys.exc_info()
        )
    lines = formatter.format(record).splitlines()
    assert "<3>sugard.test: failed: x" == lines[0]
    assert "<3>ValueError: boom" == lines[-1]
    assert [] == [line for line in lines if not line.startswith("<3>")]


@pytest.mark.slow
def test_a_refused_config_under_systemd_answers_instead_of_looping(
    fake: FakeSugar, short_dir: Path, notify_socket: NotifySocket
) -> None:
    """Socket-activated with a config it refuses, sugard stays up with no instance: READY=1
    with the problem in STATUS, each problem logged once, every request answered at once with
    invalid_config (sugarctl: exit 6, the problem in one line); a reload of a config still
    wrong makes its problems the answer; one of a fixed config brings the instance up.
    Started by hand, the same config exits 1."""
    config = write_config(short_dir, {"prod": instance(fake, timeout="10")})
    by_hand = subprocess.run(
        [SUGARD, "run", "-c", str(config), "--socket", str(short_dir / "hand.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 1 == by_hand.returncode
    assert "instances.prod.timeout" in by_hand.stderr

    path = short_dir / "act.sock"
    log_path = short_dir / "activate.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                "systemd-socket-activate",
                "-l",
                str(path),
                f"--setenv=NOTIFY_SOCKET={notify_socket.path}",
                SUGARD,
                "run",
                "-c",
                str(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(path.exists)
        for command in (["token", "prod"], ["ping"], ["status"], ["token", "prod"]):
            started = time.monotonic()
            result = sugarctl(path, *command)
            took = time.monotonic() - started
            assert 6 == result.returncode, result.stderr + log_path.read_text()
            assert "" == result.stdout
            [line] = result.stderr.splitlines()
            assert line.startswith("sugarctl: sugard serves nothing until its config is fixed: ")
            assert "instances.prod.timeout" in line
            assert line.endswith("fix it, then `systemctl --user reload sugard`")
            assert took < 5, took  # at once (under a second on an idle machine), not 40 s
        ready = notify_socket.next()
        assert "1" == ready["READY"]
        assert ready["STATUS"].startswith("config refused, serving no instance: ")
        assert "instances.prod.timeout" in ready["STATUS"]
        assert proc.poll() is None  # still up: no exit, so no restart loop
        assert 1 == log_path.read_text().count("config refused: ")
        with pytest.raises(TimeoutError):
            notify_socket.next(timeout=0.3)  # nothing more said per request

        write_config(short_dir, {"prod": instance(fake)}, daemon={"bogus": 1})
        still = sugarctl(path, "reload")
        assert 6 == still.returncode
        assert "bogus" in still.stderr and "timeout" not in still.stderr
        assert "bogus" in sugarctl(path, "token", "prod").stderr  # the new problems now
        assert "1" == notify_socket.next()["RELOADING"]
        assert "bogus" in notify_socket.next()["STATUS"]

        write_config(short_dir, {"prod": instance(fake)})
        reloaded = sugarctl(path, "reload")
        assert 0 == reloaded.returncode, reloaded.stderr + log_path.read_text()
        assert "added: prod (0 unchanged)" == reloaded.stdout.strip()
        assert "1" == notify_socket.next()["RELOADING"]
        assert f"serving 1 instance(s) on {path}" == notify_socket.next()["STATUS"]
        token = sugarctl(path, "token", "prod", "--wait", "20")
        assert 0 == token.returncode, token.stderr
        assert fake.valid(token.stdout.strip())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(15)


def test_a_twin_started_by_systemd_answers_who_keeps_the_session(
    fake: FakeSugar, short_dir: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    """Socket-activated while another sugard keeps the same session, sugard does not exit into
    a restart loop: it answers every request with the running daemon's pid and socket (exit 6),
    and logs in nowhere."""
    config = write_config(short_dir, {"prod": instance(fake)})
    running = start_daemon(config)
    assert 0 == sugarctl(running.socket, "token", "prod", "--wait", "20").returncode
    logins = fake.calls["password"]
    path = short_dir / "act.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(path), SUGARD, "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(path.exists)
        twin = sugarctl(path, "token", "prod")
        assert 6 == twin.returncode, twin.stderr
        [line] = twin.stderr.splitlines()
        assert f"another sugard (pid {running.proc.pid}, socket {running.socket})" in line
        assert f"sugarctl --socket {running.socket} token prod" in line
        assert proc.poll() is None
        assert logins == fake.calls["password"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert 0 == proc.wait(15)
