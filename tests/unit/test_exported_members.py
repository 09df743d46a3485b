"""The public API, pinned (as httpx's tests/test_exported_members.py does): the names that
sugard.client, sugard.auth and sugard.testing export, listed here by hand, so that adding,
renaming or dropping one is a decision seen in review, never a side effect of a refactor."""

from __future__ import annotations

import importlib

import pytest

EXPORTED = {
    "sugard.client": [
        "BadRequest",
        "DEFAULT_WAIT",
        "DaemonUnreachable",
        "NeedsAttention",
        "PermissionDenied",
        "SugardClient",
        "SugardError",
        "TokenUnavailable",
        "UnknownInstance",
        "default_config_path",
        "default_socket_path",
        "resolve_socket",
    ],
    "sugard.auth": ["SugarAuth"],
    "sugard.testing": [
        "ADMIN_USER",
        "Arrival",
        "DEFAULT_PLATFORMS",
        "DEFAULT_STATUS_EXEMPT",
        "FakeSugar",
        "FaultKind",
        "LATEST_VERSION",
        "LicenseError",
        "SUGAR_VERSIONS",
        "TokenRequest",
        "running_fake",
    ],
}


@pytest.mark.parametrize("module", sorted(EXPORTED))
def test_the_exported_names_are_the_listed_ones(module: str) -> None:
    """`__all__` of each public module is exactly the list above: no name added or lost."""
    assert sorted(EXPORTED[module]) == sorted(importlib.import_module(module).__all__)


@pytest.mark.parametrize(
    ("module", "name"), [(module, name) for module, names in EXPORTED.items() for name in names]
)
def test_each_listed_name_is_importable(module: str, name: str) -> None:
    """`from MODULE import NAME` works for every listed name, and it is not left as None."""
    namespace: dict[str, object] = {}
    exec(f"from {module} import {name}", namespace)  # noqa: S102 (the import a user writes)
    assert namespace[name] is not None
