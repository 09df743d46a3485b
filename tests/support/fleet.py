"""Fleet mode's building blocks for the store tests: configs, an instance, a session record."""

from __future__ import annotations

import base64
import time
from typing import Any

from sugard.config import FleetConfig, InstanceConfig, SecretRef
from sugard.fleet import SessionRecord
from sugard.secret import Secret

KEY = base64.b64encode(bytes(range(32))).decode()


OTHER_KEY = base64.b64encode(bytes(range(1, 33))).decode()


ACCESS, REFRESH, DOWNLOAD = "access-tok-3f9a1c", "refresh-tok-77d2e0", "download-tok-a1b2c3"
USERNAME = "alice.fleet"


def fleet_config(url: str, key: str = KEY, **overrides: Any) -> FleetConfig:
    values: dict[str, Any] = {"lease": 30.0, "timeout": 1.0, **overrides}
    return FleetConfig(redis_url=url, key=SecretRef("inline", "", Secret(key)), **values)


def sugar_instance(name: str = "prod", **overrides: Any) -> InstanceConfig:
    values: dict[str, Any] = {
        "url": "https://crm.example.com",
        "username": USERNAME,
        "password": SecretRef("inline", "", Secret("pw")),
        **overrides,
    }
    return InstanceConfig(name=name, **values)


def record(n: int = 0) -> SessionRecord:
    return SessionRecord(
        access_token=Secret(f"{ACCESS}-{n}"),
        refresh_token=Secret(f"{REFRESH}-{n}"),
        download_token=Secret(f"{DOWNLOAD}-{n}"),
        expires_at=time.time() + 3600,
        refresh_expires_at=time.time() + 7200,
    )
