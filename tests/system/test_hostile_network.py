"""A hostile network and hostile neighbours on the TCP side: credentials never follow a
redirect, a site URL never carries a password, the TCP listeners hold a bounded number of
another uid's connections, and the proxy passes neither cookies nor hop-by-hop headers."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from support.daemon import SUGARD, DaemonProcess, instance, sugarctl, write_config

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
