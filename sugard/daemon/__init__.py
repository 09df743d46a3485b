"""The daemon: start (socket, keepers, listeners, fleet), reload (plan, then apply) and
stop (drain, hand sessions over, close). Signal handlers only set flags; `serve()` reads
as the program's table of contents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from sugard.api import make_app, serve_metrics
from sugard.api.serving import ApiRunner
from sugard.config import Config, InstanceConfig, diff_configs, resolve_instance_secrets
from sugard.daemon.fdstore import RejectionStore, hand_over_sessions, take_sessions
from sugard.daemon.fleet import join_fleet, shared_slots, upstream
from sugard.daemon.reload import apply_daemon_settings, build_aside, plan_reload, read_config_again
from sugard.daemon.report import (
    failed_status,
    log_listening,
    log_refused,
    log_routes,
    refused_status,
    reloaded_status,
    warn_if_unverified,
    warn_restart_only,
)
from sugard.daemon.sockets import SocketLock, prepare_socket
from sugard.daemon.systemd import Notifier, started_by_systemd
from sugard.daemon.twins import SessionLocks
from sugard.errors import ConfigRefused, ReloadFailed, SocketError
from sugard.keeper import MAX_SLEEP, Keeper
from sugard.keeper.timing import steady_clock
from sugard.observe import Fanout, Forgotten
from sugard.observe.events import EventHooks
from sugard.observe.metrics import Metrics
from sugard.peer import Peer, may_use
from sugard.proxy import KEY_FORWARDER, Forwarder, ProxyListener
from sugard.proxy.governor import Governor
from sugard.proxy.listener import close_listeners, open_listeners
from sugard.sugar import new_http_session

__all__ = ["NO_WAIT", "Daemon", "drain", "grace"]

log = logging.getLogger("sugard.daemon")


NO_WAIT = 0.001  # aiohttp reads a shutdown timeout of 0 as "no limit"


def grace(config: Config) -> float:
    """`shutdown_grace` for aiohttp, which reads 0 as "wait forever", not "do not wait"."""
    return max(config.daemon.shutdown_grace, NO_WAIT)


async def drain(
    runner: web.AppRunner | None,
    close_listeners: Callable[[], Awaitable[None]],
    forced: asyncio.Event,
    shutdown_grace: float,
) -> None:
    """Close the proxy's listeners, then the socket's `runner`, each letting its requests in
    flight finish within the grace period; `forced` set ends the wait and cancels what is
    left."""
    graceful = asyncio.ensure_future(_close(runner, close_listeners, shutdown_grace))
    cut_short = asyncio.ensure_future(forced.wait())
    await asyncio.wait((graceful, cut_short), return_when=asyncio.FIRST_COMPLETED)
    cut_short.cancel()
    if graceful.done():
        graceful.result()
        return
    graceful.cancel()
    await asyncio.gather(graceful, return_exceptions=True)
    if runner is None or runner.server is None:
        return
    for site in list(runner.sites):
        await site.stop()
    left = len(runner.server.connections)
    # Public aiohttp: a shutdown with (almost) no wait cancels each handler and closes its
    # connection; the cleanup after it then finds nothing to wait for.
    await runner.server.shutdown(NO_WAIT)
    log.warning("cancelled %d connection(s) still open", left)
    await runner.cleanup()


async def _close(
    runner: web.AppRunner | None,
    close_listeners: Callable[[], Awaitable[None]],
    shutdown_grace: float,
) -> None:
    await close_listeners()
    if runner is None:
        return
    server = runner.server
    open_connections = len(server.connections) if server is not None else 0
    if open_connections:
        log.info(
            "waiting up to %g s for %d open connection(s) to finish",
            shutdown_grace,
            open_connections,
        )
    await runner.cleanup()


if TYPE_CHECKING:  # fleet mode's modules pull in redis and cryptography: only when it is on
    from sugard.fleet import Fleet

FORCED_EXIT = 1  # exit status when a second signal cuts the graceful stop short


class Daemon:
    """Holds the keepers and the socket; `reload()` applies a new config as a diff."""

    def __init__(
        self,
        config: Config,
        socket_path: Path,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        ticks: Callable[[], float] = steady_clock,
        rng: Callable[[], float] = random.random,
        listen_socket: socket.socket | None = None,
        max_sleep: float = MAX_SLEEP,
        notifier: Notifier | None = None,
        apply_log_level: bool = False,
        stored: Mapping[str, int] | None = None,
        refused: list[str] | None = None,
    ) -> None:
        self.config = config
        # Started by systemd with a config it refused (`config` then has no instances): every
        # request is answered with the problems until a reload brings a valid config.
        self.refused = ConfigRefused(refused) if refused else None
        self.socket_path = socket_path
        self._environ = environ
        self._clock = clock
        self._ticks = ticks  # intervals: a wall clock set back must not postpone them
        self._rng = rng  # injectable so tests can pin the backoff schedule
        self._inherited_socket = listen_socket
        self._keepers: dict[str, Keeper] = {}
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._login_slots = asyncio.Semaphore(config.daemon.max_parallel_logins)
        self._reload_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()  # a second stop signal: no more grace period
        self._stopping = False
        self._owns_socket = listen_socket is None
        self._lock: SocketLock | None = None
        self._session_locks = SessionLocks(socket_path)  # one daemon per session on a host
        self._max_sleep = max_sleep
        self._notifier = notifier or Notifier()
        # Then `sugarctl shutdown` is refused: stopping is systemctl's job.
        self.under_systemd = (
            self._notifier.enabled or listen_socket is not None or started_by_systemd()
        )
        self._apply_log_level = apply_log_level
        self._background: set[asyncio.Task[None]] = set()
        self._listeners: dict[str, ProxyListener] = {}  # instance -> its proxy's TCP listener
        self._forwarder: Forwarder | None = None
        # Metrics and on_event hooks: keepers, api and proxy report to `observer`.
        self.metrics = Metrics(
            lambda: [k.status().as_dict() for k in self._keepers.values()], clock=clock
        )
        self.hooks = EventHooks(self._on_event, environ=environ, socket_path=str(socket_path))
        self.observer = Fanout(self.metrics, self.hooks)
        self._metrics_runner: web.AppRunner | None = None
        # What the fd store passed back (name -> fd); see fdstore.take_sessions.
        self._stored = dict(stored or {})
        self._rejections = RejectionStore(self._notifier)  # kept across a restart (systemd)
        self._fleet: Fleet | None = None  # with [fleet]: the instances' seats in the fleet
        # Each instance's rate_limit, for the proxy's requests and the keepers' own calls.
        self.governor = Governor(self._config_of, self.observer, clock=time.monotonic)

    def _config_of(self, name: str) -> InstanceConfig | None:
        keeper = self._keepers.get(name)
        return keeper.config if keeper is not None else None

    def _on_event(self, name: str) -> tuple[str, ...] | None:
        keeper = self._keepers.get(name)
        return keeper.config.on_event if keeper is not None else None

    @property
    def keepers(self) -> Mapping[str, Keeper]:
        return self._keepers

    def allowed(self, peer: Peer, instance: str | None) -> bool:
        """sugard.peer.may_use, with this daemon's config and the instance's running one."""
        keeper = self._keepers.get(instance) if instance else None
        return may_use(peer, self.config.daemon, keeper.config if keeper else None)

    async def start(self) -> None:
        """Open the socket first (so a second daemon fails fast), then start every keeper;
        tell systemd READY=1 once the socket is served."""
        sock = self._take_socket()
        if self.refused is None:
            await self._hold_sessions_at_start(sock)
        if self.refused is not None:
            # No instances, no listeners: only the socket, answering with the problems.
            self._http = new_http_session()
            await self._serve_api(sock)
            log_refused(self.refused.problems, self.socket_path)
            self._spawn(self._notifier.watchdog())
            self._notifier.ready(refused_status(self.refused.problems))
            return
        await self._serve_metrics(sock)
        self._http = new_http_session()
        self._fleet = join_fleet(self.config)
        self._start_keepers()
        if self._fleet is not None:
            await self._fleet.start()
        log_routes(self._keepers, together=True)
        await self._serve_api(sock)
        await self._open_listeners()
        log_listening(self.socket_path, len(self._keepers), passed_in=not self._owns_socket)
        self._spawn(self._notifier.watchdog())
        self._notifier.ready(self._summary())

    async def _hold_sessions_at_start(self, sock: socket.socket) -> None:
        """Refuse to be a second daemon of the same sessions: by hand, exit (SocketError);
        under systemd, answer every request with why (as for a refused config)."""
        try:
            await self._session_locks.hold(
                self.config.instances.values(), self._fleet_on(self.config)
            )
        except SocketError as exc:
            if not self.under_systemd:
                if self._owns_socket:
                    sock.close()
                self._remove_socket()
                raise
            self.refused = ConfigRefused([str(exc)])
            self.config = replace(self.config, instances={})

    async def _hold_sessions(self, config: Config) -> None:
        """The session locks of `config`'s instances, or ReloadFailed saying who has one."""
        try:
            await self._session_locks.hold(config.instances.values(), self._fleet_on(config))
        except SocketError as exc:
            raise ReloadFailed([str(exc)]) from None

    @staticmethod
    def _fleet_on(config: Config) -> bool:
        return config.fleet is not None

    def _take_socket(self) -> socket.socket:
        if self._inherited_socket is not None:
            return self._inherited_socket
        sock, self._lock = prepare_socket(self.socket_path)
        return sock

    async def _serve_metrics(self, sock: socket.socket) -> None:
        """The TCP `/metrics`, if asked for; an address in use gives our socket back."""
        try:
            self._metrics_runner = await serve_metrics(
                self.config.daemon.metrics_listen, self.metrics.render
            )
        except SocketError:
            if self._owns_socket:
                sock.close()
            self._remove_socket()
            raise

    def _start_keepers(self) -> None:
        """A keeper per instance, resuming the session a restart kept for it, if any."""
        stored, self._stored = self._stored, {}
        rejected = self._rejections.take(stored, self.config.instances)
        resumed = take_sessions(self._notifier, self.config, stored)
        for instance in self.config.instances.values():
            warn_if_unverified(instance)
            keeper = self._keepers[instance.name] = self._new_keeper(instance)
            keeper.rejection = rejected.get(instance.name)
            if (kept := resumed.get(instance.name)) is not None:
                keeper.resume(kept.grant, kept.sugar_version)
            keeper.start()

    async def _serve_api(self, sock: socket.socket) -> None:
        app = make_app(
            self,
            self._clock,
            observer=self.observer,
            metrics=self.metrics.render,
            governor=self.governor,
        )
        self._forwarder = app[KEY_FORWARDER]
        runner = ApiRunner(
            app, lambda peer: self.allowed(peer, None), shutdown_timeout=grace(self.config)
        )
        self._runner = runner
        await runner.setup()
        await runner.serve(sock)

    async def _open_listeners(self) -> None:
        assert self._forwarder is not None
        try:
            self._listeners = await open_listeners(
                self._forwarder,
                self.config,
                {},
                shutdown_timeout=grace(self.config),
                retry=lambda: self._notifier.status(self._summary()),
            )
        except ReloadFailed as exc:
            raise SocketError(exc.problems[0]) from None

    async def _close_listeners(self, keep: Mapping[str, ProxyListener]) -> None:
        assert self._forwarder is not None
        await close_listeners(self._forwarder, self._listeners, keep)
        self._listeners = dict(keep)

    def _summary(self) -> str:
        waiting = [f"{name}: {lis.problem}" for name, lis in self._listeners.items() if lis.problem]
        retrying = f"; trying again to listen ({'; '.join(waiting)})" if waiting else ""
        return f"serving {len(self._keepers)} instance(s) on {self.socket_path}{retrying}"

    def _new_keeper(self, instance: InstanceConfig) -> Keeper:
        assert self._http is not None
        sugar, seat = upstream(self._fleet, instance, self._http, self._clock)
        sugar.pace_with(self.governor.pacer(instance.name))
        self.governor.share(instance.name, shared_slots(seat))
        return Keeper(
            instance,
            sugar,
            login_slots=self._login_slots,
            clock=self._clock,
            ticks=self._ticks,
            rng=self._rng,
            max_sleep=self._max_sleep,
            reread=self._reread_secrets,
            observer=self.observer,
            fleet=seat,
            on_rejection=lambda rejection: self._rejections.keep(instance.name, rejection),
        )

    def _reread_secrets(self, instance: InstanceConfig) -> InstanceConfig:
        return resolve_instance_secrets(instance, self.config.path, self._environ)

    async def reload(self) -> dict[str, Any]:
        """Load the config again; apply it only if all of it is valid (else ReloadFailed, and
        the old config keeps running untouched)."""
        async with self._reload_lock:
            if self._stopping:
                raise ReloadFailed(["sugard is stopping; nothing was reloaded"])
            self._notifier.reloading()
            if self.refused is not None:
                return await self._recover()
            try:
                diff = await self._reload()
            except ReloadFailed as exc:
                self._notifier.ready(failed_status(exc.problems, self._summary()))
                raise
            self._notifier.ready(reloaded_status(diff, self._summary()))
            return diff

    async def _reload(self) -> dict[str, Any]:
        new = await read_config_again(self.config.path, self._environ)
        plan = plan_reload(self.config, new, self._keepers)
        await self._hold_sessions(new)
        try:
            staged = build_aside(plan, new, self._keepers, self._new_keeper)
            # New proxy addresses are bound before the swap too, so one in use fails the
            # reload.
            assert self._forwarder is not None
            listeners = await open_listeners(
                self._forwarder, new, self._listeners, shutdown_timeout=grace(new)
            )
        except BaseException:
            self._session_locks.release_except(self.config.instances.values())
            raise

        # The swap: no await in here, so every request sees the old config or the new one,
        # never a mix (allowed() reads self.config, the routes read self._keepers).
        staged.adopt(new, self._keepers, plan.diff)
        old, self.config, self._keepers = self.config, new, staged.keepers
        self._session_locks.release_except(new.instances.values())
        self.observer.observe(Forgotten(tuple(plan.diff.removed)))
        for name in (*plan.remove, *plan.restart):  # the old keepers' rejections go with them
            keeper = self._keepers.get(name)
            self._rejections.keep(name, keeper.rejection if keeper is not None else None)
        apply_daemon_settings(old, new, log_level=self._apply_log_level)
        pending = warn_restart_only(old, new, plan.restart_only)
        await self._close_listeners(listeners)
        self._forwarder.prune(self._keepers)
        answer = await staged.settle(plan.diff, stopping=lambda: self._stopping)
        if pending:
            answer["restart_needed"] = pending  # said to whoever reloaded, not only the log
        return answer

    async def _recover(self) -> dict[str, Any]:
        """A reload while the config is refused: a valid config now starts what start()
        left out (metrics, listeners, fleet, keepers); another refused one is the new
        answer to every request."""
        try:
            new = await read_config_again(self.config.path, self._environ)
            await self._hold_sessions(new)
            try:
                listeners, metrics = await self._open_for(new)
            except ReloadFailed:
                self._session_locks.release_all()
                raise
        except ReloadFailed as exc:
            self.refused = ConfigRefused(exc.problems)
            self._notifier.ready(refused_status(exc.problems))
            raise self.refused from None
        old, self.config, self.refused = self.config, new, None
        self._listeners, self._metrics_runner = listeners, metrics
        self._login_slots = asyncio.Semaphore(new.daemon.max_parallel_logins)
        apply_daemon_settings(old, new, log_level=self._apply_log_level)
        self._fleet = join_fleet(new)
        self._start_keepers()
        if self._fleet is not None:
            await self._fleet.start()
        log_routes(self._keepers, together=True)
        log.info("config accepted: serving %d instance(s)", len(self._keepers))
        self._notifier.ready(self._summary())
        return diff_configs(old, new).as_dict()

    async def _open_for(
        self, config: Config
    ) -> tuple[dict[str, ProxyListener], web.AppRunner | None]:
        """The TCP listeners and the metrics endpoint of `config`, or ReloadFailed with
        none of them left open."""
        assert self._forwarder is not None
        try:
            metrics = await serve_metrics(config.daemon.metrics_listen, self.metrics.render)
        except SocketError as exc:
            raise ReloadFailed([str(exc)]) from None
        try:
            listeners = await open_listeners(
                self._forwarder, config, {}, shutdown_timeout=grace(config)
            )
        except ReloadFailed:
            if metrics is not None:
                await metrics.cleanup()
            raise
        return listeners, metrics

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (shutdown_grace, or less after a
        second signal), stop keepers."""
        self._stopping = True
        self._notifier.stopping()
        await self._drain()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        for keeper in self._keepers.values():
            await keeper.stop()
        await self.governor.close()
        hand_over_sessions(self._notifier, self.config, self._keepers)
        if self._fleet is not None:
            await self._fleet.stop()  # gives up the leases: another host leads at once
            self._fleet = None
        await self.hooks.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._session_locks.release_all()
        self._remove_socket()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._notifier.close()
        log.info("sugard stopped")

    async def _drain(self) -> None:
        runner, self._runner = self._runner, None
        await drain(
            runner,
            lambda: self._close_listeners({}),
            self._force,
            self.config.daemon.shutdown_grace,
        )

    def _remove_socket(self) -> None:
        """Remove our socket, then give up the lock (in that order: whoever takes the lock
        next must not find our socket). A socket systemd passed in stays: it is systemd's."""
        if self._owns_socket and self._lock is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            self._lock.release()
            self._lock = None

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> int:
        """Run until SIGTERM or SIGINT; SIGHUP reloads. A second SIGTERM or SIGINT cuts the
        stop short. Returns the exit status: 0, or FORCED_EXIT after a stop cut short."""
        loop = asyncio.get_running_loop()
        # Handlers first: a SIGTERM while starting then stops cleanly once started, and a
        # SIGHUP never meets Python's default action (which is to die).
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self._reload_from_signal)
        try:
            await self.start()
            await self._stop.wait()
            await self.stop()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return FORCED_EXIT if self._force.is_set() else 0

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        # Flags only (as uvicorn's handle_exit): serve() and stop() do the work.
        if not self._stop.is_set():
            log.info("%s: stopping; send it again to exit at once", sig.name)
            self._stop.set()
            return
        log.warning("%s again: exiting now, cutting off requests in flight", sig.name)
        self._force.set()

    def _reload_from_signal(self) -> None:
        # Decides only: the reload runs in a task of its own, off the signal's callback.
        if self._stopping or self._runner is None:
            log.info("SIGHUP ignored: sugard is %s", "stopping" if self._stopping else "starting")
            return
        log.info("SIGHUP: reloading %s", self.config.path)
        self._spawn(self._reload_quietly())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # The loop keeps only weak references to tasks: hold them until they are done.
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_quietly(self) -> None:
        # A failed reload is already logged and reported to systemd; a signal has no caller.
        with contextlib.suppress(ReloadFailed):
            await self.reload()
