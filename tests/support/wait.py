"""The one bounded wait of the tests: poll a condition until it holds, fail naming what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

WAIT_SECONDS = 60.0
"""Upper bound of every wait (a wait ends as soon as its condition holds)."""


def wait_until(
    check: Callable[[], T | None], *, what: str, timeout: float = WAIT_SECONDS, interval: float = 0.05
) -> T:
    """Poll `check` until it returns something truthy and return that; fail naming `what` (and the last value)
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(interval)
