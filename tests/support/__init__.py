"""What the tests share that is not a fixture: the daemon as a process and its config, waiting,
curl on the socket, the in-process rig, and the servers the tests stand up (Redis, a Sugar
front, a forward proxy, TLS). Fixtures live in tests/conftest.py; tests import
`from support.X import ...` (pyproject's pytest `pythonpath` puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: README.md, docs/, sugard/
