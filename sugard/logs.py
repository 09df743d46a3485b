"""Kept so `from sugard.logs import setup_logging` still works; logging lives in `systemd`,
next to the rest of what sugard does for systemd and journald."""

from __future__ import annotations

from .systemd import JournalFormatter, setup_logging, stderr_is_journal

__all__ = ["JournalFormatter", "setup_logging", "stderr_is_journal"]
