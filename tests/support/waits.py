"""Waiting on the event a test expects, never on a clock."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object], timeout_s: float = 15.0, what: str = "condition"
) -> None:
    """Poll a condition until it holds (the event we wait on), or fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
