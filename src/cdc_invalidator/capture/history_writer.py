"""Logical mode's replay history, written behind the loop.

Each acknowledged batch is recorded in cdc_invalidator.history_v1 (what a replay after
a Redis snapshot restore deletes again). The INSERT used to be waited for before the
next batch was read: 15% of a 100k-change drain went to that wait (py-spy). It now runs
on a helper thread while the loop reads and deletes the next batches. The loop waits
only when the writes it queued hold more than MAX_QUEUED_BYTES of text: a committed
streamed transaction's keys are handed out faster than PostgreSQL takes their history
(profiled on a 1M-row UPDATE: the loop waited 2 s for the write before each batch's).

What keeps the history whole: the writes run one at a time, in the order queued (one
thread); once one fails, those queued after it are not done; and flush(), which waits
for them all and raises the failure, comes before the slot is told anything (the
stream's SAVE_ACK), so the slot never moves past a batch whose history is not written.
A failed write is raised by the next write() or flush(), and by every one after it
(close() included): the batches acknowledged since have no history now, so this stream
must tell the slot nothing more (LogicalStream.close() confirms only once the writer
closed cleanly). The runner reconnects, with a new writer, and the slot sends those
changes again.

Batches' texts are gathered into one INSERT, queued by the write() that finds them
holding GATHER_BYTES or the oldest GATHER_S old, or by flush() (every status update
that confirms anything; a replay's settle(); close()): a quiet listener's last batches
wait for its next status update. Why: at 300 changes/s each batch is one change, and an
INSERT each cost 160 of the listener's 430 µs of CPU per change (and the server a commit
each). History written later only widens a replay's reach (its `at` is the INSERT's);
what is not written yet was not confirmed to the slot either.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg

from cdc_invalidator.pg.queries import Q

# History text queued behind the write in progress: the loop waits beyond it, so the
# listener's memory stays bounded (a 1M-row transaction's history is ~100 MB of text).
MAX_QUEUED_BYTES = 4 << 20
# Texts gathered into one INSERT up to this much, or this long after the first.
GATHER_BYTES = 256 << 10
GATHER_S = 0.2


class HistoryWriter:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn  # psycopg serializes it with the loop's own statements
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[tuple[Future[None], int]] = deque()  # in order, with sizes
        self._queued = 0  # bytes of text in _pending
        self._failed = False  # a write failed: the ones queued after it do nothing
        # The failure collected: raised again by every write(), flush() and close().
        self._lost: BaseException | None = None
        self._gathered: list[str] = []  # texts not queued yet, in order
        self._gathered_bytes = 0
        self._gathered_since = 0.0  # monotonic time of the first gathered

    def write(self, events: str) -> None:
        """Record a batch's history (encode_history's text, a JSON array) behind the
        loop: gathered, then queued with the texts after it."""
        if self._lost is not None:
            raise self._lost
        if not self._gathered:
            self._gathered_since = time.monotonic()
        self._gathered.append(events)
        self._gathered_bytes += len(events)
        if (
            self._gathered_bytes >= GATHER_BYTES
            or time.monotonic() - self._gathered_since >= GATHER_S
        ):
            self._queue_gathered()

    def _queue_gathered(self) -> None:
        gathered = self._gathered
        if not gathered:
            return
        # (each text a JSON array: their items joined into one)
        text = (
            gathered[0]
            if len(gathered) == 1
            else "[" + ",".join(t[1:-1] for t in gathered if t != "[]") + "]"
        )
        self._gathered = []
        self._gathered_bytes = 0
        self._collect(MAX_QUEUED_BYTES - len(text))  # a failure surfaces here
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cdc-history")
        self._pending.append((self._pool.submit(self._insert, text), len(text)))
        self._queued += len(text)

    def _insert(self, events: str) -> None:
        if self._failed:
            return  # after a failure: the slot sends these changes again
        try:
            self._conn.execute(Q.RECORD_HISTORY.sql, {"events": events})
        except BaseException:
            self._failed = True
            raise

    def _collect(self, room: int) -> None:
        """Forget the writes done, and wait for the oldest ones until at most `room`
        bytes are queued (-1: all); raise a failure."""
        pending = self._pending
        while pending and (self._queued > room or pending[0][0].done()):
            future, size = pending.popleft()
            self._queued -= size
            try:
                future.result()
            except BaseException as exc:
                self._lost = exc
                self._drop()
                raise

    def _drop(self) -> None:
        """After a failure: forget the writes queued after it (they do nothing), and
        what is gathered (its batches' history is lost with theirs)."""
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._queued = 0
        self._gathered = []
        self._gathered_bytes = 0
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def flush(self) -> None:
        """Write what is gathered and wait for every write queued; raise a failure (any
        there was)."""
        if self._lost is not None:
            raise self._lost
        self._queue_gathered()
        self._collect(-1)

    def close(self) -> None:
        """Wait for the writes queued (their failure is the caller's to ignore or not)
        and stop the thread."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
