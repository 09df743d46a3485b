"""The daemon's memory stays its own: started with an unlimited core size as an ordinary user
(uid 65534), it writes no core file and is not dumpable, so no other process of that uid may
read its memory or environment (as ssh-agent does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import SUGARD, instance, write_config
from support.nobody import NOBODY, as_nobody
from support.wait import wait_for

from sugard.testing import FakeSugar


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A short directory owned by uid 65534, for its config, secrets and socket."""
    path = Path(tempfile.mkdtemp(prefix="sd-nb-"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_daemon_started_with_unlimited_core_dumps_is_neither_dumpable_nor_readable(
    fake: FakeSugar, nobody_dir: Path
) -> None:
    """Core size 0 (soft and hard) and not dumpable: /proc/PID/ belongs to root, and a
    process of the daemon's own uid cannot read its environ."""
    config = write_config(nobody_dir, {"prod": instance(fake)})
    for path in nobody_dir.iterdir():
        os.chown(path, NOBODY, NOBODY)
    socket = nobody_dir / "s.sock"
    proc = subprocess.Popen(
        [
            "prlimit",
            "--core=unlimited",
            *as_nobody(SUGARD, "run", "-c", str(config), "--socket", str(socket)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(socket.exists, "the daemon's socket")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert f"Uid:\t{NOBODY}" in status, status  # it is the daemon, not a wrapper
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        core = next(x for x in limits.splitlines() if x.startswith("Max core file size"))
        assert ["0", "0"] == core.split()[4:6], core
        assert 0 == os.stat(f"/proc/{proc.pid}/environ").st_uid  # undumpable: root's
        same_uid = subprocess.run(
            as_nobody("cat", f"/proc/{proc.pid}/environ"), capture_output=True, timeout=30
        )
        assert 0 != same_uid.returncode
        assert b"Permission denied" in same_uid.stderr
        assert b"" == same_uid.stdout
    finally:
        proc.terminate()
        proc.wait(15)
