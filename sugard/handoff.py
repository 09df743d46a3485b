"""Sessions handed over a restart through the service manager's fd store (systemd).

Before it stops, the daemon writes each instance's session (its tokens and their expiries,
the Sugar version it learnt) into a sealed memfd, named per instance, and hands it to the fd
store; the next sugard gets them back in LISTEN_FDS and resumes each session after one probe,
so a `systemctl --user restart sugard` or an upgrade costs no login. A memfd is anonymous
memory, never a file on disk, and only its holders (this user's processes that may ptrace the
daemon, and the service manager) can reach it.

A session is for the login settings it was made with: a hash of them (url, username,
platform, client and TLS settings, and the password) goes with it, keyed with a random salt of
its own so that the memfd never holds the password, not even as a plain hash. A session whose
settings changed meanwhile is dropped, and that instance logs in as at any start.

`put` and `stored_records` (one record in, each record back out) are shared with
`kept_rejections`, which keeps a rejected secret's record in the same store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .config import InstanceConfig
from .keeper import Grant
from .secret import Secret
from .systemd import Notifier, read_memfd, sealed_memfd

__all__ = ["FORMAT", "Session", "give", "identity", "put", "stored_records", "take"]

log = logging.getLogger("sugard.handoff")

FORMAT = 1  # of the memfd's JSON; another is dropped (a downgrade), never misread
PREFIX = "session."  # the fd store name is systemd.STORE_PREFIX + PREFIX + instance name


@dataclass(frozen=True)
class Session:
    """What one instance hands over: its grant and the Sugar version it learnt."""

    grant: Grant
    sugar_version: str | None


def identity(config: InstanceConfig, salt: bytes) -> str:
    """The keyed hash of what the session was made with; a new password changes it too."""
    fields = [*map(str, config.session_key()), config.password.reveal()]
    return hmac.new(salt, json.dumps(fields).encode(), hashlib.sha256).hexdigest()


def dump(config: InstanceConfig, session: Session) -> bytes:
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


def load(config: InstanceConfig, data: bytes) -> Session | None:
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
    sessions: dict[str, Session] = {}
    for name, config, data in stored_records(notifier, stored, PREFIX, configs):
        try:
            session = load(config, data)
        except ValueError as exc:
            log.warning("%s: dropping the session kept across the restart: %s", name, exc)
            continue
        if session is None:
            log.info("%s: its login settings changed since the session was kept; logging in", name)
            continue
        sessions[name] = session
    return sessions


def give(notifier: Notifier, sessions: Mapping[str, tuple[InstanceConfig, Session | None]]) -> int:
    """Hand every instance's session to the fd store (replacing what it held under that
    name); how many were stored. Waits, within limits, until the manager has them."""
    stored = 0
    for name, (config, session) in sessions.items():
        data = None if session is None else dump(config, session)
        stored += put(notifier, PREFIX + name, f"sugard-{name}", data)
    if sessions:
        notifier.barrier()
    return stored
