"""`sugard demo`: the whole path on one machine, with nothing to configure.

Starts the bundled fake SugarCRM on 127.0.0.1, writes a config for it in a private temporary
directory, runs a real daemon on a real socket there, and fetches a token through the same
client code `sugarctl` uses.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from sugard.cli.init import write_private
from sugard.client import SugardClient
from sugard.client.status import table
from sugard.config import load_config
from sugard.daemon import Daemon
from sugard.testing import FakeSugar

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"  # noqa: S105 - the fake's own account, printed nowhere


def _sugarctl_command() -> str:
    """`sugarctl` if the shell finds this installation's, else its path (a venv not activated)."""
    ours = Path(sys.executable).parent / "sugarctl"
    if not ours.exists():
        return "sugarctl"
    found = shutil.which("sugarctl")
    return "sugarctl" if found and Path(found).resolve() == ours.resolve() else str(ours)


def run_demo(*, once: bool) -> int:
    return asyncio.run(_demo(once))


async def _demo(once: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sugard-demo-"))
    fake = FakeSugar(users={DEMO_USER: DEMO_PASSWORD}, access_lifetime=600)
    await fake.start("127.0.0.1", 0)
    daemon: Daemon | None = None
    try:
        write_private(workdir / "demo.password", DEMO_PASSWORD + "\n", force=True)
        config_path = workdir / "config.toml"
        write_private(
            config_path,
            f'[instances.demo]\nurl = "{fake.url}"\nusername = "{DEMO_USER}"\n'
            'password_file = "demo.password"\nplatform = "sugard"\n'
            # The fake is on 127.0.0.1: no proxy of the environment could reach it.
            'proxy = "none"\n',
            force=True,
        )
        socket_path = workdir / "sugard.sock"
        daemon = Daemon(load_config(config_path), socket_path)
        await daemon.start()

        def fetch() -> tuple[dict[str, object], list[dict[str, object]]]:
            with SugardClient(socket_path) as client:
                return client.token("demo", wait=10), client.status()

        token, status = await asyncio.to_thread(fetch)
        print(f"fake SugarCRM:  {fake.url}")
        print(f"sugard socket:  {socket_path}")
        print(f"token for demo: {token['access_token']} (expires in {token['expires_in']} s)")
        print(f"password logins the fake saw: {fake.calls['password']}\n")
        print(table(status))
        ctl = _sugarctl_command()
        print(
            "\nRun `sugard demo` (no --once) to keep it running; then, in another terminal:"
            if once
            else "\nTry, in another terminal:"
        )
        print(
            f"  export SUGARD_SOCKET={socket_path}\n"
            f"  {ctl} token demo\n"
            f"  {ctl} status\n"
            f"  {ctl} exec demo -- env | grep SUGAR_\n"
            f"  curl --unix-socket {socket_path} http://sugard/v1/instances/demo/token"
        )
        if not once:
            print("\nsugard demo is running; press Ctrl-C to stop it.", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        return 0
    finally:
        if daemon is not None:
            await daemon.stop()
        await fake.close()
        shutil.rmtree(workdir, ignore_errors=True)
