"""A string that never shows itself: the one type every password and token lives in."""

from __future__ import annotations

import hashlib
import hmac
from typing import NoReturn

__all__ = ["Secret", "fingerprint"]


def fingerprint(value: str) -> str:
    """A short, stable name for a secret, safe to log: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(value.encode()).hexdigest()[:8]


class Secret:
    """Holds a secret value; `repr`, `str` and formatting print `***`.

    The value is reachable only through `reveal()`, so every place that sends a
    secret somewhere says so in the code.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> NoReturn:
        # Pickling would write the value somewhere we do not control.
        raise TypeError("Secret values cannot be pickled")
