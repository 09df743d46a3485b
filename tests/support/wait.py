"""Waiting for a condition, never for a fixed time: from a test's thread, and from asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], what: str = "", timeout: float = 40.0, interval: float = 0.02
) -> T:
    """Poll `predicate` until it is true, and return its value. The deadline is generous (the
    machine may be busy with other suites): a test waits for a signal, never a fixed time."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)
    return value


async def until(
    predicate: Callable[[], object], what: str = "", timeout: float = 30.0, interval: float = 0.005
) -> None:
    """`wait_for` inside the event loop: the loop runs (the daemon, the fake) while this polls.
    The interval is short, so a passing state (a refresh in flight) is seen."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        await asyncio.sleep(interval)
