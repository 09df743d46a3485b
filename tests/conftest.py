"""Fixtures only: the fake SugarCRM on 127.0.0.1, the real daemon as a process, a real
redis-server, the test CA, the Sugar front and the service manager of the test's own. What
tests share besides fixtures is in tests/support/."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.daemon import PASSWORD, USER, DaemonProcess, instance, write_config
from support.forward_proxy import PROXY_VARIABLES
from support.proxy_upstream import SugarFront, running_front
from support.redis_server import RedisServer
from support.service_manager import FdStore
from support.tls import running_tls_fake

from sugard.testing import FakeSugar, running_fake


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private (0700) directory with a short path: Unix socket paths are limited to 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[FakeSugar]:
    """The fake SugarCRM on 127.0.0.1 in a background thread, with one user; a module or test
    marked `@pytest.mark.fake(**switches)` gets a fake started with those switches instead."""
    marker = request.node.get_closest_marker("fake")
    switches = marker.kwargs if marker else {"users": {USER: PASSWORD, "admin": "admin-pw"}}
    with running_fake(**switches) as server:
        yield server


@pytest.fixture
def start_daemon(short_dir: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Start `sugard run` on a config; stopped (SIGTERM) at the end of the test."""
    started: list[DaemonProcess] = []

    def start(
        config: Path, *, wait: bool = True, env: dict[str, str] | None = None
    ) -> DaemonProcess:
        daemon = DaemonProcess(config, short_dir / "s.sock", env)
        started.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="session")
def foreign_sugarctl() -> Iterator[str]:
    """The real `sugarctl` code, launchable by another uid (65534) wherever the checkout lives.

    Why a copy: a checkout inside a 0700 home directory is unreadable to uid 65534, so the
    venv's console script (and its interpreter symlink) cannot be run by it. sugarctl is
    standard-library only, so the package's files and the base interpreter are all it needs.
    """
    import sugard

    home = Path(tempfile.mkdtemp(prefix="sd-foreign-"))
    home.chmod(0o755)
    shutil.copytree(
        Path(sugard.__file__).parent,
        home / "sugard",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    script = home / "sugarctl"
    script.write_text(
        f"#!{python} -I\n"
        "import sys\n"
        f"sys.path.insert(0, {str(home)!r})\n"
        "from sugard.client.ctl import main\n"
        "sys.exit(main())\n"
    )
    for path in [home, *home.rglob("*")]:
        path.chmod(0o755 if path.is_dir() or path == script else 0o644)
    yield str(script)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def daemon(fake: FakeSugar, short_dir: Path, start_daemon) -> DaemonProcess:
    """A daemon with one instance, `prod`, ready with a token."""
    started: DaemonProcess = start_daemon(write_config(short_dir, {"prod": instance(fake)}))
    with started.client() as client:
        client.token("prod", wait=20)
    return started


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of the test's own on a unix socket (no disk): see
    support/redis_server.py."""
    directory = Path(tempfile.mkdtemp(prefix="sd-redis-"))
    server = RedisServer(directory)
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def start_fake() -> Iterator[Callable[..., FakeSugar]]:
    """Start fake SugarCRMs with chosen switches (alice's password is PASSWORD)."""
    with contextlib.ExitStack() as stack:

        def start(**switches: Any) -> FakeSugar:
            switches.setdefault("users", {USER: PASSWORD})
            return stack.enter_context(running_fake(**switches))

        yield start


@pytest.fixture
def front(fake: FakeSugar) -> Iterator[SugarFront]:
    """The Sugar front (support/proxy_upstream.py) before `fake`."""
    with running_front(fake.url) as server:
        yield server


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private CA and a server certificate for 127.0.0.1 it signed (openssl CLI)."""
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sugard test CA",
    )
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    )
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@pytest.fixture
def tls_fake(certs: dict[str, Path]) -> Iterator[FakeSugar]:
    with running_tls_fake(certs["cert"], certs["key"]) as fake:
        yield fake


@pytest.fixture
def no_proxy_of_our_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the proxy tests: each sets the daemon's proxy variables itself, none leak in from
    the runner's."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def manager(short_dir: Path) -> Iterator[FdStore]:
    """The service manager of the test's own, on a NOTIFY_SOCKET in `short_dir`."""
    store = FdStore(short_dir / "notify")
    yield store
    store.close()
