"""A restart that keeps the sessions, the daemon's side: under systemd, the keepers' sessions
go to the fd store as the daemon stops and come back as it starts (the format is in
`handoff`); anywhere else, the next start logs in."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from . import handoff
from .config import Config, InstanceConfig
from .keeper import Keeper
from .systemd import Notifier

__all__ = ["hand_over_sessions", "keeps_sessions", "take_sessions"]

log = logging.getLogger("sugard.kept_sessions")


def keeps_sessions(notifier: Notifier, config: Config) -> bool:
    """Under systemd, whose fd store keeps them; not in fleet mode, where Redis does."""
    return notifier.enabled and config.fleet is None


def take_sessions(
    notifier: Notifier, config: Config, stored: Mapping[str, int]
) -> dict[str, handoff.Session]:
    """The sessions the fd store passed back (`stored`: name -> fd), for `config`'s
    instances; every fd is closed, used or not."""
    if not keeps_sessions(notifier, config):
        for fd in stored.values():
            os.close(fd)
        return {}
    sessions = handoff.take(notifier, stored, config.instances)
    if stored:
        log.info(
            "fd store: %d of %d session(s) kept across the restart", len(sessions), len(stored)
        )
    return sessions


def hand_over_sessions(notifier: Notifier, config: Config, keepers: Mapping[str, Keeper]) -> None:
    """Once the keepers have stopped (no renewal in flight can change a session)."""
    if not keeps_sessions(notifier, config):
        return
    sessions: dict[str, tuple[InstanceConfig, handoff.Session | None]] = {}
    for name, keeper in keepers.items():
        grant = keeper.session()
        kept = None if grant is None else handoff.Session(grant, keeper.sugar_version)
        sessions[name] = (keeper.config, kept)
    try:
        stored = handoff.give(notifier, sessions)
    except OSError as exc:  # no memfd (a seccomp filter, no memory): the next start logs in
        log.warning("fd store: cannot hand the sessions over: %s", exc.strerror or exc)
        return
    log.info("fd store: handed %d session(s) to the service manager", stored)
