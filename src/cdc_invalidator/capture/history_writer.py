"""Logical mode's replay history, written behind the loop.

Each acknowledged batch is recorded in cdc_invalidator.history_v1 (what a replay after
a Redis snapshot restore deletes again). The INSERT used to be waited for before the
next batch was read: 15% of a 100k-change drain went to that wait (py-spy). It now runs
on a helper thread while the loop reads and deletes the next batch.

What keeps the history whole: one write at a time, in order (a write waits for the one
before it); and flush(), which waits for them and raises a write's failure, comes before
the slot is told anything (the stream's SAVE_ACK), so the slot never moves past a batch
whose history is not written. A failed write is raised by the next write() or flush():
the runner reconnects and the slot sends those changes again.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg

from cdc_invalidator.pg.queries import Q


class HistoryWriter:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn  # psycopg serializes it with the loop's own statements
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def write(self, events: str) -> None:
        """Record a batch's history (encode_history's text) behind the loop."""
        self.flush()  # one at a time: in order, and a failure surfaces here
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cdc-history")
        self._pending = self._pool.submit(self._insert, events)

    def _insert(self, events: str) -> None:
        self._conn.execute(Q.RECORD_HISTORY.sql, {"events": events})

    def flush(self) -> None:
        """Wait for the write in progress; raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the write in progress (its failure is the caller's to ignore or not)
        and stop the thread."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
