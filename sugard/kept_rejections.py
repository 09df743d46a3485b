"""A secret Sugar rejected stays rejected across a restart or a crash, under systemd.

The rule (docs/configuration.md) is that a rejected password or client secret is never sent
again on its own; a sugard that forgot it at every start would break the rule each time
systemd restarts it (`Restart=on-failure` after a crash, an upgrade's restart), one failed
login towards a lockout each time. So the moment an instance's rejection changes, it goes to
the service manager's fd store (a sealed memfd per instance, as the sessions of `handoff` do
at stop, but written at once, since a crash gives no chance to write it later), and a start
takes it back before the first login.

The record never holds the secret, not even as a plain hash: a keyed hash of what was sent
(the site, the account or client, the secret) with a random salt of its own. A start applies
it only if the configured secret hashes the same, so a secret changed meanwhile gets its one
try. Outside systemd there is no fd store, and a restart forgets (said in the docs).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Mapping, MutableMapping

from .config import InstanceConfig
from .handoff import put, stored_records
from .keeper import Rejection
from .secret import Secret
from .systemd import Notifier

__all__ = ["PREFIX", "RejectionStore", "dump", "load"]

log = logging.getLogger("sugard.kept_rejections")

FORMAT = 1  # of the memfd's JSON; another is dropped, never misread
PREFIX = "rejected."  # the fd store name is systemd.STORE_PREFIX + PREFIX + instance name


def _digest(salt: bytes, field: str, sent: tuple[object, ...]) -> str:
    shown = [field, *(v.reveal() if isinstance(v, Secret) else v for v in sent)]
    return hmac.new(salt, json.dumps(shown).encode(), hashlib.sha256).hexdigest()


def dump(rejection: Rejection) -> bytes:
    salt = secrets.token_bytes(16)
    return json.dumps(
        {
            "format": FORMAT,
            "field": rejection.field,
            "salt": salt.hex(),
            "sent": _digest(salt, rejection.field, rejection.sent),
        }
    ).encode()


def load(config: InstanceConfig, data: bytes) -> Rejection | None:
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
        ours = {key: stored.pop(key) for key in [key for key in stored if key.startswith(PREFIX)]}
        rejections: dict[str, Rejection] = {}
        for name, config, data in stored_records(self._notifier, ours, PREFIX, configs):
            try:
                rejection = load(config, data)
            except ValueError as exc:
                log.warning("%s: dropping the rejection kept across the restart: %s", name, exc)
                continue
            if rejection is None:
                log.info("%s: the secret Sugar rejected before the restart changed since", name)
                continue
            log.warning(
                "%s: Sugar rejected its %s before the restart, and it has not changed: "
                "not sending it",
                name,
                rejection.field.replace("_", " "),
            )
            rejections[name] = rejection
        return rejections

    def keep(self, name: str, rejection: Rejection | None) -> None:
        """Store `rejection` as the instance's (None: it has none now)."""
        if not self._notifier.enabled:
            return
        data = None if rejection is None else dump(rejection)
        try:
            put(self._notifier, PREFIX + name, f"sugard-rejected-{name}", data)
        except OSError as exc:  # no memfd (a seccomp filter, no memory)
            log.warning("%s: cannot keep the rejection across a restart: %s", name, exc)
