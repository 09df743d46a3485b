"""Fleet mode's errors: one tree, no secret in any of them."""

from __future__ import annotations


class FleetError(Exception):
    """Fleet mode cannot do what was asked; the message says what to fix."""


class StoreUnreachable(FleetError):
    """Redis did not answer within the timeout, or the connection failed."""


class StoreRefused(StoreUnreachable):
    """Redis answered but refused: wrong password, or the ACL user lacks a right."""


class WrongKey(FleetError):
    """A stored record does not open with this host's fleet key."""
