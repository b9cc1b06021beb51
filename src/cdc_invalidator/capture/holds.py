"""Acknowledgement in two steps, for batches whose sweep runs behind the loop.

A batch with a sweep (TRUNCATE, a change that cannot be rendered, the sweep after a lost
slot) has its keys deleted and is handed back like any other: the source reads on past
it (deleted), and later batches' keys are deleted meanwhile. What the source tells the
database (trigger mode: the saved snapshot and the pruning; logical mode: the flush
position told to the slot and the one saved in slot_state_v1) stays at the position
before the oldest batch whose sweep is not done (acknowledged): a crash re-delivers that
batch and everything after it, and the sweep happens again. Deleting the later batches'
keys early is harmless.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Generic, TypeVar

P = TypeVar("P")


class Hold:
    """One batch's acknowledgement, held until its sweep is done: taken by the runner
    from the batch (Batch.hold()) before the batch is handed back, released by the
    sweeper's thread once Redis confirmed the whole sweep."""

    __slots__ = ("_done",)

    def __init__(self) -> None:
        self._done = threading.Event()

    def release(self) -> None:
        self._done.set()

    @property
    def released(self) -> bool:
        return self._done.is_set()


class Holds(Generic[P]):
    """The holds of batches handed back, in their order, each with the position before
    its batch: what may be acknowledged while it is held."""

    def __init__(self) -> None:
        self._held: deque[tuple[Hold, P]] = deque()

    def add(self, hold: Hold, before: P) -> None:
        self._held.append((hold, before))

    def limit(self) -> P | None:
        """The position before the oldest batch still held (nothing past it may be
        acknowledged); None when none is."""
        held = self._held
        while held and held[0][0].released:
            held.popleft()
        return held[0][1] if held else None
