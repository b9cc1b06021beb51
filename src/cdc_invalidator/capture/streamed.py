"""A transaction streamed before its commit (pgoutput `streaming 'on'`): its keys,
computed as its changes arrive, held until Stream Commit says it committed.

Nothing is deleted before then: a transaction that aborts, or a subtransaction rolled
back inside it (Stream Abort with its subxid), is dropped with whatever it held. What is
held is compact: each chunk of changes of one (sub)transaction is mapped to its keys at
once, and the keys are kept as one string per Redis database, joined by NUL (a value
PostgreSQL text cannot hold), not as a Python object per change or per key. Past
`spill_bytes` the chunks go to an unnamed temporary file (deleted when closed), so a
million-row statement with two templates (2M keys, ~30 MB of keys) is never all in memory.

The chunks come back in the order they were added, each a share of the transaction's
keys, patterns (TRUNCATE), dead letters and replay history, handed out in batches after
the commit. They are read back and unpacked a few ahead of the loop, on a helper thread
(Prefetch), while the loop waits for Redis to confirm the share before.
"""

from __future__ import annotations

import contextlib
import pickle
import queue
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, NamedTuple, cast

from cdc_invalidator.events import ChangeEvent, StandInKind, TableName
from cdc_invalidator.mapping.mapper import (
    Invalidation,
    PackedKeys,
    Routed,
    StoodIn,
    pack_keys,
    unpack_keys,
)


class Dead(NamedTuple):
    position: int
    error: str
    event: ChangeEvent | None  # what is known of it, for the dead letter


class Keys(NamedTuple):
    """One Redis database's share of a chunk."""

    keys: PackedKeys
    patterns: frozenset[str]
    stood_in: dict[tuple[TableName, StandInKind], StoodIn]  # (Invalidation's)


@dataclass(slots=True)
class Chunk:
    subxid: int  # the (sub)transaction whose changes these are
    changes: int  # how many (events and dead letters)
    routed: dict[int | None, Keys]
    dead: list[Dead] = field(default_factory=list)
    history: str | None = None  # history_v1's encoding of its events, if kept

    @property
    def weight(self) -> int:
        """About what it holds in memory, in bytes."""
        held = sum(
            len(k.keys) if isinstance(k.keys, str) else 64 * len(k.keys)
            for k in self.routed.values()
        )
        return held + len(self.history or "") + 200 * len(self.dead) + 100

    def invalidations(self) -> Routed:
        out: Routed = {}
        for db, share in self.routed.items():
            keys = share.keys
            out[db] = Invalidation(
                set(unpack_keys(keys)),
                set(share.patterns),
                dict(share.stood_in),
            )
        return out


def pack(routed: Routed) -> dict[int | None, Keys]:
    """A batch's invalidations, compactly."""
    out: dict[int | None, Keys] = {}
    for db, work in routed.items():
        out[db] = Keys(pack_keys(work.keys), frozenset(work.patterns), dict(work.stood_in))
    return out


class StreamedTxn:
    """One in-progress transaction's chunks, in memory up to `spill_bytes`, then in a
    temporary file. close() deletes the file."""

    def __init__(self, xid: int, first_position: int, spill_bytes: int) -> None:
        self.xid = xid
        self.first_position = first_position  # the decoder's position of its first change
        self._spill_bytes = spill_bytes
        self._chunks: list[Chunk] = []
        self._held = 0
        self._file: IO[bytes] | None = None
        self._spilled = 0  # chunks in the file
        self._aborted: set[int] = set()
        # When a snapshot first saw it complete (time.monotonic()), if one did before its
        # Stream Commit: capture.logical asks while it is open.
        self.seen_complete_at: float | None = None
        self.spilled_bytes = 0
        self.spill_error: str | None = None  # why spilling stopped, if it did

    def add(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self._held += chunk.weight
        if self._held > self._spill_bytes:
            self._spill()

    def abort(self, subxid: int) -> None:
        """Stream Abort of a subtransaction: its changes are dropped (now in memory;
        when read back from the file)."""
        self._aborted.add(subxid)
        kept = [c for c in self._chunks if c.subxid != subxid]
        if len(kept) != len(self._chunks):
            self._chunks = kept
            self._held = sum(c.weight for c in kept)

    @property
    def held_bytes(self) -> int:
        return self._held

    def chunks(self) -> Iterator[Chunk]:
        """Every chunk not rolled back, in the order added (once: the file is read
        through)."""
        if self._file is not None:
            self._file.seek(0)
            for _ in range(self._spilled):
                chunk: Chunk = pickle.load(self._file)  # noqa: S301 - our own file, written above
                if chunk.subxid not in self._aborted:
                    yield chunk
        for chunk in self._chunks:
            if chunk.subxid not in self._aborted:
                yield chunk

    def _spill(self) -> None:
        written = 0
        try:
            if self._file is None:
                # Closed by close(), which its owner calls however the transaction ends.
                self._file = tempfile.TemporaryFile(prefix="cdc-invalidator-txn-")  # noqa: SIM115
            for chunk in self._chunks:
                data = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
                self._file.write(data)
                self._file.flush()  # a full disk fails here, not later in a read
                written += 1
                self._spilled += 1
                self.spilled_bytes += len(data)
        except OSError as exc:
            # No room (TMPDIR full, not writable): the rest stays in memory, past the
            # bound, rather than the transaction being lost or the listener stopped. The
            # chunks already in the file are whole; what a failed write left after them
            # is never read (only `_spilled` chunks are).
            self.spill_error = f"{type(exc).__name__}: {exc}"
            self._spill_bytes = sys.maxsize
        self._chunks = self._chunks[written:]
        self._held = sum(c.weight for c in self._chunks)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# Chunks read back and unpacked ahead of the loop: each ~10,000 keys as a set (~1 MB).
PREFETCH_AHEAD = 2
_END = object()


class Prefetch:
    """A committed transaction's chunks with their invalidations, read back (from the
    file) and unpacked on a helper thread, up to PREFETCH_AHEAD ahead of the loop.

    Unpacking a chunk's keys into a set is most of the loop's own work while it hands a
    streamed transaction to Redis (profiled on a 1M-row UPDATE: Chunk.invalidations,
    ~3 ms per 10,000 keys, after the COMMIT); on the helper thread it overlaps with the
    loop's wait for Redis's replies. A failure reading the file is raised by next()."""

    def __init__(self, chunks: Iterator[Chunk]) -> None:
        self._queue: queue.Queue[object] = queue.Queue(PREFETCH_AHEAD)
        self._stopped = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._run, args=(chunks,), name="cdc-stream-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, chunks: Iterator[Chunk]) -> None:
        end: object = _END
        try:
            for chunk in chunks:
                if not self._put((chunk, chunk.invalidations())):
                    return
        except Exception as exc:  # handed to the loop, which raises it
            end = exc
        self._put(end)

    def _put(self, item: object) -> bool:
        """Queue `item` unless stopped first (close() empties the queue to let it in)."""
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.05)
            except queue.Full:
                continue
            return True
        return False

    def next(self) -> tuple[Chunk, Routed] | None:
        """The next chunk and its invalidations; None after the last."""
        if self._done:
            return None
        item = self._queue.get()
        if item is _END:
            self._done = True
            return None
        if isinstance(item, Exception):
            self._done = True
            raise item
        return cast("tuple[Chunk, Routed]", item)

    def close(self) -> None:
        """Stop the thread (at once, or after the chunk in hand): then the transaction's
        file may be closed."""
        self._stopped.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self._thread.join(0.05)
