"""What every part of the demo shares: its error, its patience, how it prints."""

from __future__ import annotations

import sys

# How long any one step may take before the demo gives up on it.
STEP_TIMEOUT_S = 15.0


class DemoError(Exception):
    """A step of the demo did not turn out as it should; the message says which."""


def say(text: str = "") -> None:
    print(text, flush=True)


def error(message: str) -> None:
    print(f"cdc-invalidator: error: {message}", file=sys.stderr, flush=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"
