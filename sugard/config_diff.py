"""What a reload changes: which instances the new config adds, removes, changes or leaves alone.

Split from `config` (reading the document) because only the reload needs it: the reload plan
acts on the diff and the daemon's report logs it; both compare two configs already loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config

__all__ = ["ConfigDiff", "diff_configs"]


@dataclass(frozen=True)
class ConfigDiff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]

    def as_dict(self) -> dict[str, list[str]]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": list(self.changed),
            "unchanged": list(self.unchanged),
        }


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Which instances a reload adds, removes, changes or leaves alone."""
    old_names, new_names = set(old.instances), set(new.instances)
    both = sorted(old_names & new_names)
    return ConfigDiff(
        added=tuple(sorted(new_names - old_names)),
        removed=tuple(sorted(old_names - new_names)),
        changed=tuple(n for n in both if old.instances[n] != new.instances[n]),
        unchanged=tuple(n for n in both if old.instances[n] == new.instances[n]),
    )
