"""The daemon: wires config -> keepers -> API, owns the socket, handles signals and reloads.

`Daemon.serve()` reads as the program's table of contents: start, wait for a stop signal
(reloading on SIGHUP meanwhile), stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
from aiohttp import web

from . import __version__
from .api import Peer, ReloadFailed, make_app
from .config import Config, ConfigError, InstanceConfig, diff_configs, load_config
from .keeper import MAX_SLEEP, Keeper
from .paths import SOCKET_PATH_MAX
from .sugar import SugarClient, new_http_session

__all__ = ["Daemon", "SocketError", "prepare_socket"]

log = logging.getLogger("sugard.daemon")


class SocketError(Exception):
    """The socket cannot be set up; the message says what to do."""


def check_socket_dir(directory: Path) -> None:
    """Create the socket's directory 0700, or refuse one that others could get into."""
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SocketError(f"cannot create socket directory {directory}: {exc.strerror}") from None
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise SocketError(f"{directory} is not a directory")
    if st.st_uid != os.getuid():
        raise SocketError(
            f"socket directory {directory} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.getuid()}); choose another --socket"
        )
    if st.st_mode & 0o077:
        raise SocketError(
            f"socket directory {directory} is open to others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 700 {directory}"
        )


def prepare_socket(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 from birth, in a private directory.

    A socket file left by a crashed daemon is removed; a live daemon there is not disturbed.
    """
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise SocketError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow "
            f"at most {SOCKET_PATH_MAX}: choose a shorter --socket"
        )
    check_socket_dir(path.parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketError(f"{path} exists and is not a socket; remove it or choose another")
        if _answers(path):
            raise SocketError(f"another sugard is already running on {path}")
        log.info("removing stale socket %s", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: no window where others could connect
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    sock.listen(512)
    sock.setblocking(False)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(os.fspath(path))
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


class Daemon:
    """Holds the keepers and the socket; `reload()` applies a new config as a diff."""

    def __init__(
        self,
        config: Config,
        socket_path: Path,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        listen_socket: socket.socket | None = None,
        max_sleep: float = MAX_SLEEP,
    ) -> None:
        self.config = config
        self.socket_path = socket_path
        self._environ = environ
        self._clock = clock
        self._inherited_socket = listen_socket
        self._keepers: dict[str, Keeper] = {}
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._login_slots = asyncio.Semaphore(config.daemon.max_parallel_logins)
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._owns_socket = listen_socket is None
        self._max_sleep = max_sleep

    @property
    def keepers(self) -> Mapping[str, Keeper]:
        return self._keepers

    def allowed(self, peer: Peer, instance: str | None) -> bool:
        """Own uid and root by default; `allowed_uids`/`allowed_gids` widen (daemon) or
        narrow (instance) that."""
        me = os.getuid()
        daemon = self.config.daemon
        ok = (
            peer.uid in (me, 0)
            or peer.uid in daemon.allowed_uids
            or peer.gid in daemon.allowed_gids
        )
        keeper = self._keepers.get(instance) if instance else None
        if ok and keeper is not None:
            cfg = keeper.config
            if cfg.allowed_uids is not None or cfg.allowed_gids is not None:
                ok = peer.uid in (me, 0) or peer.uid in (cfg.allowed_uids or ()) or (
                    peer.gid in (cfg.allowed_gids or ())
                )
        return ok

    async def start(self) -> None:
        """Open the socket first (so a second daemon fails fast), then start every keeper."""
        sock = self._inherited_socket or prepare_socket(self.socket_path)
        self._http = new_http_session()
        for instance in self.config.instances.values():
            self._add(instance)
        self._runner = web.AppRunner(
            make_app(self, self._clock),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.config.daemon.shutdown_grace,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        log.info(
            "sugard %s listening on %s with %d instance(s)",
            __version__,
            self.socket_path,
            len(self._keepers),
        )

    def _add(self, instance: InstanceConfig) -> None:
        assert self._http is not None
        if not instance.verify_tls:
            log.warning("%s: TLS verification is OFF (verify_tls = false)", instance.name)
        keeper = Keeper(
            instance,
            SugarClient(instance, self._http, clock=self._clock),
            login_slots=self._login_slots,
            clock=self._clock,
            max_sleep=self._max_sleep,
        )
        self._keepers[instance.name] = keeper
        keeper.start()

    async def reload(self) -> dict[str, list[str]]:
        """Load the config again; apply it only if all of it is valid."""
        async with self._reload_lock:
            try:
                new = await asyncio.to_thread(load_config, self.config.path, self._environ)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("reload refused: %s", problem)
                raise ReloadFailed([str(p) for p in exc.problems]) from None
            diff = diff_configs(self.config, new)
            for name in diff.removed:
                await self._keepers.pop(name).stop()
            for name in diff.changed:
                keeper = self._keepers[name]
                if keeper.config.auth_key() == new.instances[name].auth_key():
                    keeper.adopt(new.instances[name])
                else:
                    await self._keepers.pop(name).stop()
                    self._add(new.instances[name])
            for name in diff.added:
                self._add(new.instances[name])
            self.config = new
            log.info(
                "reloaded: %d added, %d removed, %d changed, %d unchanged",
                len(diff.added),
                len(diff.removed),
                len(diff.changed),
                len(diff.unchanged),
            )
            return diff.as_dict()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (shutdown_grace), stop keepers."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for keeper in self._keepers.values():
            await keeper.stop()
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self._owns_socket:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        log.info("sugard stopped")

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Run until SIGTERM or SIGINT; SIGHUP reloads."""
        loop = asyncio.get_running_loop()
        await self.start()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_from_signal)
        try:
            await self._stop.wait()
            log.info("stopping")
            # A second signal during the grace period stops at once.
            loop.add_signal_handler(signal.SIGTERM, os._exit, 1)
            loop.add_signal_handler(signal.SIGINT, os._exit, 1)
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _reload_from_signal(self) -> None:
        task = asyncio.create_task(self._reload_quietly())
        self._background = task

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(ReloadFailed):
            await self.reload()
