"""The shared key, the identity of an instance, and the session record sealed with AES-GCM."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sugard.config import InstanceConfig, decode_fleet_key
from sugard.fleet.errors import FleetError, WrongKey
from sugard.secret import Secret

RECORD_VERSION = b"\x01"
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce, random per record


class FleetKey:
    """The shared key; two subkeys derived from it (HKDF), one to seal records, one to name
    them, so neither use can weaken the other. Never shows itself."""

    __slots__ = ("_aead", "_naming")

    def __init__(self, raw: bytes) -> None:
        self._aead = AESGCM(_derive(raw, b"sugard fleet record v1"))
        self._naming = _derive(raw, b"sugard fleet identity v1")

    @classmethod
    def from_text(cls, text: str) -> FleetKey:
        """From the one-line form `sugard init --fleet-key` writes; ValueError if it is not."""
        return cls(decode_fleet_key(text))

    def mark(self) -> str:
        """A public check value of the key (a MAC of a constant): equal marks, equal keys."""
        return hmac.new(self._naming, b"sugard fleet key check", hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return "FleetKey(***)"


def _derive(raw: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(raw)


def identity_of(instance: InstanceConfig, key: FleetKey) -> str:
    """The fleet-wide name of an instance's session: what Sugar's one-session rule is keyed on
    (url, username, platform, client_id), hashed under the key so Redis shows no username.
    The local name is not part of it: hosts may call the same instance differently."""
    fields = [instance.url, instance.username, instance.platform, instance.client_id]
    digest = hmac.new(key._naming, json.dumps(fields).encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class SessionRecord:
    """One Sugar session as the fleet shares it. Times are wall clock (`time.time()`): hosts
    share them, and their monotonic clocks mean nothing to each other."""

    access_token: Secret
    refresh_token: Secret
    expires_at: float
    refresh_expires_at: float | None = None
    download_token: Secret | None = None
    epoch: int = 0  # given by the store: 0 means never stored
    issued_at: float | None = None  # when Sugar issued it (the token's lifetime counts from it)

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "access_token": self.access_token.reveal(),
                "refresh_token": self.refresh_token.reveal(),
                "download_token": self.download_token.reveal() if self.download_token else None,
                "expires_at": self.expires_at,
                "refresh_expires_at": self.refresh_expires_at,
                "issued_at": self.issued_at,
            }
        ).encode()


def _aad(identity: str, epoch: int) -> bytes:
    # Bound to its identity and epoch: a record copied to another instance's key, or an old
    # record put back under a newer epoch, does not open.
    return f"sugard-fleet:{identity}:{epoch}".encode()


def seal(key: FleetKey, identity: str, epoch: int, record: SessionRecord) -> bytes:
    """`record` encrypted for `identity` at `epoch`: version, random nonce, AES-GCM output."""
    nonce = os.urandom(NONCE_BYTES)
    return (
        RECORD_VERSION + nonce + key._aead.encrypt(nonce, record.as_json(), _aad(identity, epoch))
    )


def unseal(key: FleetKey, identity: str, epoch: int, blob: bytes) -> SessionRecord:
    """The record in `blob`; WrongKey if it does not open (another key, moved, or altered)."""
    body = blob[len(RECORD_VERSION) + NONCE_BYTES :]
    nonce = blob[len(RECORD_VERSION) : len(RECORD_VERSION) + NONCE_BYTES]
    if not blob.startswith(RECORD_VERSION) or not body:
        raise FleetError(
            f"the stored session {identity} has a form this sugard does not read; "
            "run the same sugard version on every host"
        )
    try:
        data = json.loads(key._aead.decrypt(nonce, body, _aad(identity, epoch)))
    except InvalidTag:
        raise WrongKey(
            f"the stored session {identity} does not open with this host's fleet key: every "
            "host needs the same key (copy the key file of the others, then sugard check --online)"
        ) from None
    return SessionRecord(
        access_token=Secret(data["access_token"]),
        refresh_token=Secret(data["refresh_token"]),
        download_token=Secret(data["download_token"]) if data["download_token"] else None,
        expires_at=float(data["expires_at"]),
        refresh_expires_at=data["refresh_expires_at"],
        epoch=epoch,
        issued_at=data.get("issued_at"),
    )
