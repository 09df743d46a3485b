"""Sessions and rejected secrets kept across a restart in systemd's fd store.

Before it stops, the daemon writes each instance's session (its tokens and their expiries,
the Sugar version it learnt) into a sealed memfd, named per instance, and hands it to the fd
store; the next sugard gets them back in LISTEN_FDS and resumes each session after one probe,
so a `systemctl --user restart sugard` or an upgrade costs no login. A memfd is anonymous
memory, never a file on disk, and only its holders (this user's processes that may ptrace the
daemon, and the service manager) can reach it. In fleet mode Redis keeps the sessions instead;
outside systemd the next start logs in.

A secret Sugar rejected is kept the same way, written the moment it changes (a crash gives no
chance to write it later), so a restart never sends it again on its own.

Neither record holds a secret, not even as a plain hash: each carries a keyed hash of what it
was made with (the login settings and the password; the site, account and the rejected
secret) with a random salt of its own. A record whose settings changed meanwhile is dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sugard.config import Config, InstanceConfig
from sugard.daemon.systemd import Notifier, read_memfd, sealed_memfd
from sugard.keeper import Keeper, Rejection
from sugard.secret import Secret
from sugard.sugar import Grant

__all__ = [
    "FORMAT",
    "REJECTION_PREFIX",
    "SESSION_PREFIX",
    "RejectionStore",
    "Session",
    "dump_rejection",
    "dump_session",
    "give",
    "hand_over_sessions",
    "identity",
    "keeps_sessions",
    "load_rejection",
    "load_session",
    "put",
    "stored_records",
    "take",
    "take_sessions",
]

log = logging.getLogger("sugard.daemon.fdstore")

FORMAT = 1  # of each memfd's JSON; another is dropped (a downgrade), never misread
# The fd store names are systemd.STORE_PREFIX + one of these + the instance name.
SESSION_PREFIX = "session."
REJECTION_PREFIX = "rejected."

T = TypeVar("T")


@dataclass(frozen=True)
class Session:
    """What one instance hands over: its grant and the Sugar version it learnt."""

    grant: Grant
    sugar_version: str | None


def identity(config: InstanceConfig, salt: bytes) -> str:
    """The keyed hash of what the session was made with; a new password changes it too."""
    fields = [*map(str, config.session_key()), config.password.reveal()]
    return hmac.new(salt, json.dumps(fields).encode(), hashlib.sha256).hexdigest()


def dump_session(config: InstanceConfig, session: Session) -> bytes:
    salt = secrets.token_bytes(16)
    grant = session.grant
    return json.dumps(
        {
            "format": FORMAT,
            "salt": salt.hex(),
            "identity": identity(config, salt),
            "sugar_version": session.sugar_version,
            "access_token": grant.access_token.reveal(),
            "refresh_token": grant.refresh_token.reveal(),
            "download_token": grant.download_token.reveal(),
            "token_type": grant.token_type,
            "issued_at": grant.issued_at,
            "expires_at": grant.expires_at,
            "refresh_expires_at": grant.refresh_expires_at,
        }
    ).encode()


def load_session(config: InstanceConfig, data: bytes) -> Session | None:
    """The session in `data`, None if it was made with other login settings; ValueError
    (naming no value: they are secrets) if it is not a session this sugard wrote."""
    try:
        fields: dict[str, Any] = json.loads(data)
        if fields.get("format") != FORMAT:
            raise ValueError(f"format {fields.get('format')!r}, not {FORMAT}")
        made_with = identity(config, bytes.fromhex(fields["salt"]))
        if not hmac.compare_digest(made_with, fields["identity"]):
            return None
        grant = Grant(
            access_token=Secret(str(fields["access_token"])),
            refresh_token=Secret(str(fields["refresh_token"])),
            download_token=Secret(str(fields["download_token"])),
            token_type=str(fields["token_type"]),
            issued_at=float(fields["issued_at"]),
            expires_at=float(fields["expires_at"]),
            refresh_expires_at=(
                None
                if fields["refresh_expires_at"] is None
                else float(fields["refresh_expires_at"])
            ),
        )
        version = fields["sugar_version"]
        return Session(grant, version if isinstance(version, str) else None)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # json's and float()'s messages may quote the content: say which field, never what.
        what = type(exc).__name__ if not isinstance(exc, ValueError) else "bad content"
        raise ValueError(f"not a session sugard wrote ({what})") from None


def stored_records(
    notifier: Notifier,
    stored: Mapping[str, int],
    prefix: str,
    configs: Mapping[str, InstanceConfig],
) -> Iterator[tuple[str, InstanceConfig, bytes]]:
    """(instance name, its config, the memfd's content) for each record the fd store passed
    back under `prefix` for an instance of `configs`. Every fd is closed and its entry
    removed from the store; what is not such a record is logged and dropped."""
    for key, fd in stored.items():
        notifier.remove_fd(key)
        try:
            data = read_memfd(fd)
        except ValueError as exc:
            log.warning("fd store: dropping %s: %s", key, exc)
            continue
        finally:
            os.close(fd)
        name = key.removeprefix(prefix)
        config = configs.get(name)
        if not key.startswith(prefix) or config is None:
            log.info("fd store: dropping %s: no such instance in the config now", key)
            continue
        yield name, config, data


def put(notifier: Notifier, key: str, memfd_name: str, data: bytes | None) -> bool:
    """Replace what the fd store holds as `key` by a sealed memfd of `data` (None: by
    nothing); whether the manager was sent it."""
    notifier.remove_fd(key)  # the store keeps every fd sent under a name
    if data is None:
        return False
    fd = sealed_memfd(memfd_name, data)
    try:
        return notifier.store_fd(key, fd)
    finally:
        os.close(fd)  # the manager holds its own copy


def take(
    notifier: Notifier, stored: Mapping[str, int], configs: Mapping[str, InstanceConfig]
) -> dict[str, Session]:
    """The sessions the fd store passed back, by instance; each fd is closed and its entry
    removed from the store (while this sugard runs, the store holds nothing it could later
    be handed by mistake: a crash leaves no stale session behind)."""
    return taken_back(
        stored_records(notifier, stored, SESSION_PREFIX, configs),
        load_session,
        "session",
        "its login settings changed since the session was kept; logging in",
    )


def taken_back(
    records: Iterator[tuple[str, InstanceConfig, bytes]],
    load: Callable[[InstanceConfig, bytes], T | None],
    what: str,
    changed: str,
) -> dict[str, T]:
    """Each record `load` reads and that still applies, by instance; the others are logged
    (as `what` that cannot be read, or with `changed`) and dropped."""
    kept: dict[str, T] = {}
    for name, config, data in records:
        try:
            record = load(config, data)
        except ValueError as exc:
            log.warning("%s: dropping the %s kept across the restart: %s", name, what, exc)
            continue
        if record is None:
            log.info("%s: %s", name, changed)
            continue
        kept[name] = record
    return kept


def give(notifier: Notifier, sessions: Mapping[str, tuple[InstanceConfig, Session | None]]) -> int:
    """Hand every instance's session to the fd store (replacing what it held under that
    name); how many were stored. Waits, within limits, until the manager has them."""
    stored = 0
    for name, (config, session) in sessions.items():
        data = None if session is None else dump_session(config, session)
        stored += put(notifier, SESSION_PREFIX + name, f"sugard-{name}", data)
    if sessions:
        notifier.barrier()
    return stored


def keeps_sessions(notifier: Notifier, config: Config) -> bool:
    """Under systemd, whose fd store keeps them; not in fleet mode, where Redis does."""
    return notifier.enabled and config.fleet is None


def take_sessions(
    notifier: Notifier, config: Config, stored: Mapping[str, int]
) -> dict[str, Session]:
    """The sessions the fd store passed back (`stored`: name -> fd), for `config`'s
    instances; every fd is closed, used or not."""
    if not keeps_sessions(notifier, config):
        for fd in stored.values():
            os.close(fd)
        return {}
    sessions = take(notifier, stored, config.instances)
    if stored:
        log.info(
            "fd store: %d of %d session(s) kept across the restart", len(sessions), len(stored)
        )
    return sessions


def hand_over_sessions(notifier: Notifier, config: Config, keepers: Mapping[str, Keeper]) -> None:
    """Once the keepers have stopped (no renewal in flight can change a session)."""
    if not keeps_sessions(notifier, config):
        return
    sessions: dict[str, tuple[InstanceConfig, Session | None]] = {}
    for name, keeper in keepers.items():
        grant = keeper.session()
        kept = None if grant is None else Session(grant, keeper.sugar_version)
        sessions[name] = (keeper.config, kept)
    try:
        stored = give(notifier, sessions)
    except OSError as exc:  # no memfd (a seccomp filter, no memory): the next start logs in
        log.warning("fd store: cannot hand the sessions over: %s", exc.strerror or exc)
        return
    log.info("fd store: handed %d session(s) to the service manager", stored)


def _digest(salt: bytes, field: str, sent: tuple[object, ...]) -> str:
    shown = [field, *(v.reveal() if isinstance(v, Secret) else v for v in sent)]
    return hmac.new(salt, json.dumps(shown).encode(), hashlib.sha256).hexdigest()


def dump_rejection(rejection: Rejection) -> bytes:
    salt = secrets.token_bytes(16)
    return json.dumps(
        {
            "format": FORMAT,
            "field": rejection.field,
            "salt": salt.hex(),
            "sent": _digest(salt, rejection.field, rejection.sent),
        }
    ).encode()


def load_rejection(config: InstanceConfig, data: bytes) -> Rejection | None:
    """The rejection in `data` if `config` would send the very secret it is about, else None;
    ValueError (naming no value) if it is not a record this sugard wrote."""
    try:
        fields = json.loads(data)
        if fields.get("format") != FORMAT or fields["field"] not in Rejection.FIELDS:
            raise ValueError(f"format {fields.get('format')!r}, not {FORMAT}")
        now = Rejection.would_send(fields["field"], config)
        digest = _digest(bytes.fromhex(fields["salt"]), now.field, now.sent)
        return now if hmac.compare_digest(digest, str(fields["sent"])) else None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        what = type(exc).__name__ if not isinstance(exc, ValueError) else "bad content"
        raise ValueError(f"not a rejection sugard wrote ({what})") from None


class RejectionStore:
    """Each instance's rejection in the fd store, replaced the moment it changes."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier

    def take(
        self, stored: MutableMapping[str, int], configs: Mapping[str, InstanceConfig]
    ) -> dict[str, Rejection]:
        """The rejections the fd store passed back that still apply, by instance. Their fds
        are taken out of `stored` and closed, and they leave the store (one that applies is
        stored again by the keeper it is handed to)."""
        ours = {
            key: stored.pop(key)
            for key in [key for key in stored if key.startswith(REJECTION_PREFIX)]
        }
        rejections = taken_back(
            stored_records(self._notifier, ours, REJECTION_PREFIX, configs),
            load_rejection,
            "rejection",
            "the secret Sugar rejected before the restart changed since",
        )
        for name, rejection in rejections.items():
            log.warning(
                "%s: Sugar rejected its %s before the restart, and it has not changed: "
                "not sending it",
                name,
                rejection.field.replace("_", " "),
            )
        return rejections

    def keep(self, name: str, rejection: Rejection | None) -> None:
        """Store `rejection` as the instance's (None: it has none now)."""
        if not self._notifier.enabled:
            return
        data = None if rejection is None else dump_rejection(rejection)
        try:
            put(self._notifier, REJECTION_PREFIX + name, f"sugard-rejected-{name}", data)
        except OSError as exc:  # no memfd (a seccomp filter, no memory)
            log.warning("%s: cannot keep the rejection across a restart: %s", name, exc)
