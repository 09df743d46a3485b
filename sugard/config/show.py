"""The config as `sugard show-config` prints it: defaults merged in, every secret hidden.

It turns a loaded config into plain tables for TOML or JSON, and never shows a secret's value.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from sugard.config import Config, FleetConfig, InstanceConfig
from sugard.config.sources import SecretRef, is_empty_inline, resolve_path

__all__ = ["effective_config"]


def effective_config(config: Config) -> dict[str, Any]:
    """The config with defaults merged into each instance; every secret shown as `***` with
    where it comes from. Ready for tomli-w or json."""
    daemon = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in vars(config.daemon).items()
        if v is not None and v != ()
    }
    base_dir = Path(config.path).parent
    instances = {name: _shown(i, base_dir) for name, i in config.instances.items()}
    shown: dict[str, Any] = {"daemon": daemon, "instances": instances}
    if config.fleet is not None:
        shown["fleet"] = _shown(config.fleet, base_dir)
    return shown


def _shown(item: InstanceConfig | FleetConfig, base_dir: Path) -> dict[str, Any]:
    """One table of `effective_config`: secrets as `***` and where they come from."""
    table: dict[str, Any] = {}
    for f in fields(item):
        value = getattr(item, f.name)
        if f.name == "name" or value is None:
            continue
        if isinstance(value, SecretRef):
            if value.kind == "file" and isinstance(value.ref, str):
                # The path sugard reads, not the one written: relative ones confuse.
                value = replace(value, ref=str(resolve_path(value.ref, base_dir)))
            value = "(empty)" if is_empty_inline(value) else f"*** ({value.describe()})"
        elif isinstance(value, tuple):
            value = list(value)
        table[f.name] = value
    return table
