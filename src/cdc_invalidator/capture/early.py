"""Trigger mode's NOTIFY-payload fast path: changes deleted before the queue read.

A capture function that queued one row (a statement that changed one row; several go
in packs, without this) also sends that row in its NOTIFY payload (sql/schema.sql,
queue_early_v1), on a channel whose name only the installing role may read: on the
wake-up's, which anyone may LISTEN on, any role could read the key columns, and send
payloads (those only wake the listener: TriggerQueue._note). The listener maps and
deletes it at once, as an EarlyBatch, instead of first reading the queue: one
PostgreSQL round trip less between commit and delete. The queue stays the record: the
read that follows acknowledges the row, and skips deleting its keys again when
EarlyChanges knows it (same transaction, same content, sent by the backend that wrote
it) as deleted, confirmed by Redis. Anything else (a payload that cannot be read, a
change the mapper refuses or that needs a sweep, a delete that failed, an entry
forgotten) is left to the queue read, which deletes as it always did: the fast path
only ever adds deletes.

The sender counts because the owner of any watched table may send payloads on their
channel (its capture functions do, through notify_row_v1()), with any content: one
naming a transaction still open (its xid is in pg_locks) and that transaction's row
would be deleted early, before the commit (a reader could cache the old row again right
after), and the queue read would skip the row's real delete. So a payload counts for
the skip only if its NOTIFY came from the backend that queued the row (queue_v1.pid,
written with each row a payload is sent for; PostgreSQL gives every notification its
sender's pid): a backend's NOTIFY in the writing transaction is delivered only once
that committed, and no other backend has its pid while it runs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cdc_invalidator.capture.holds import Hold
from cdc_invalidator.capture.rows import RowDecoder
from cdc_invalidator.events import ChangeEvent, InvalidEvent, Origin

# Changes deleted early are forgotten after this long, if no queue read acknowledged
# them by then (the read of their transaction normally follows at once): one more
# UNLINK each, no more.
EARLY_KEEP_S = 60.0
EARLY_KEEP_MAX = 10_000  # transactions

# A change as the queue read recognizes one deleted early: (op, old, new), the rows as
# sorted (column, value) pairs. Queue rows have no id before they are read.
Content = tuple[str, tuple[tuple[str, Any], ...] | None, tuple[tuple[str, Any], ...] | None]
# Who wrote it: (xid, the backend's pid). A queue row's pid is None where no payload was
# sent for it (or its capture function predates queue_v1.pid): never recognized. (A row
# whose payload the listener, busy, was not sent has its pid: no payload comes to match.)
Sender = tuple[int, int | None]


def content(event: ChangeEvent) -> Content | None:
    """What recognizes `event` among its transaction's queue rows (None: a value that
    cannot be compared, never recognized)."""
    try:
        old = None if event.old is None else tuple(sorted(event.old.items()))
        new = None if event.new is None else tuple(sorted(event.new.items()))
        hash((old, new))
    except TypeError:
        return None
    return (event.op.value, old, new)


def visible_in(snapshot: str, xid: int) -> bool:
    """Whether transaction `xid` was complete in `snapshot` (xmin:xmax:xip,...)."""
    xmin, xmax, xip = snapshot.split(":")
    if xid < int(xmin):
        return True
    return xid < int(xmax) and str(xid) not in xip.split(",")


@dataclass(slots=True)
class EarlyBatch:
    """The runner's Batch (runner.Early) of changes read from NOTIFY payloads, deleted
    before the queue read that acknowledges them. It acknowledges nothing: its changes
    are counted by that read. A change the mapper refuses is only left to it (no dead
    letter here). Positions are the events' indexes: queue ids are not known yet."""

    events: list[ChangeEvent]
    xids: list[int]  # each event's transaction
    pids: list[int]  # the backend each event's NOTIFY came from
    committed: list[float | None]  # each event's writer's now() (Unix time, the server's)
    read_at: float = 0.0
    left: set[int] = field(default_factory=set)  # positions left to the queue read
    dead: dict[int, str] = field(default_factory=dict)  # always empty
    ages_s: list[float] = field(default_factory=list)  # measured by the queue read
    # The oldest writer's now() to `read_at`, by this host's clock against the server's
    # (a skew between them shifts it; the queue read's ages are the server's own): how
    # far behind the listener is while Redis holds these deletes (/readyz).
    oldest_s: float | None = None
    # Unknown: a second delete is due second_delete_s after the first.
    visible_at: float | None = None

    @property
    def size(self) -> int:
        return len(self.events)

    def dead_letter(self, position: int, error: str) -> None:
        self.left.add(position)  # the queue read dead-letters it, with its queue id

    def leave(self) -> None:
        """Leave every change to the queue read (nothing of the batch is known deleted)."""
        self.left.update(range(len(self.events)))

    def hold(self) -> Hold:
        raise TypeError("an early batch is never held: one that needs a sweep is left")

    def origins(self) -> list[Origin]:
        return [Origin(at, f"xid {xid}") for xid, at in zip(self.xids, self.committed, strict=True)]

    def deleted(self) -> Iterator[tuple[Sender, Content]]:
        """((xid, pid), content) of each change whose keys this batch deleted."""
        for i, event in enumerate(self.events):
            if i not in self.left and (found := content(event)) is not None:
                yield (self.xids[i], self.pids[i]), found


class EarlyChanges:
    """Changes whose keys were deleted early, by transaction: the queue read skips their
    deletes. Bounded: a transaction's entry expires after `keep_s` (or makes room), which
    only costs one more UNLINK of its keys."""

    def __init__(self, keep_s: float = EARLY_KEEP_S, most: int = EARLY_KEEP_MAX) -> None:
        self._keep_s = keep_s
        self._most = most
        # (xid, pid) -> (when remembered, how many of each content), oldest first.
        self._by_sender: dict[Sender, tuple[float, Counter[Content]]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_sender)

    def add(self, changes: Iterable[tuple[Sender, Content]]) -> None:
        now = time.monotonic()
        by_sender = self._by_sender
        for sender, found in changes:
            entry = by_sender.get(sender)
            if entry is None:
                entry = by_sender[sender] = (now, Counter())
            entry[1][found] += 1
        cutoff = now - self._keep_s
        while by_sender:
            oldest, (at, _) = next(iter(by_sender.items()))
            if at > cutoff and len(by_sender) <= self._most:
                break
            del by_sender[oldest]

    def drop_uncommitted(self, snapshot: str, taken_after: float) -> list[Sender]:
        """Forget what was remembered before `snapshot` (xmin:xmax:xip) was taken, at
        time.monotonic() `taken_after` or later, of transactions it did not see complete:
        their payload came before their commit, so it was no NOTIFY of theirs (delivered
        only once the commit is visible) but one sent in their name, by the backend a
        prepared transaction left (PREPARE succeeds without a payload while the listener
        is busy, and the row keeps its writer's pid), or by one that took its pid. The
        queue read deletes their keys as it always did. Returns the senders dropped."""
        dropped = [
            sender
            for sender, (at, _) in self._by_sender.items()
            if at < taken_after and not visible_in(snapshot, sender[0])
        ]
        for sender in dropped:
            del self._by_sender[sender]
        return dropped

    def split(
        self, events: list[ChangeEvent], senders: dict[int, Sender]
    ) -> tuple[list[ChangeEvent], list[tuple[Sender, Content]]]:
        """`events` (queue rows: position -> (xid, pid) in `senders`) less those deleted
        early, and which those were (for forget(), once acknowledged)."""
        kept: list[ChangeEvent] = []
        skipped: list[tuple[Sender, Content]] = []
        used: Counter[tuple[Sender, Content]] = Counter()
        by_sender = self._by_sender
        for event in events:
            sender = senders.get(event.position)
            if (
                sender is not None
                and (entry := by_sender.get(sender)) is not None
                and (found := content(event)) is not None
                and used[sender, found] < entry[1][found]
            ):
                used[sender, found] += 1
                skipped.append((sender, found))
            else:
                kept.append(event)
        return kept, skipped

    def forget(self, changes: Iterable[tuple[Sender, Content]]) -> None:
        by_sender = self._by_sender
        for sender, found in changes:
            entry = by_sender.get(sender)
            if entry is None:
                continue
            counts = entry[1]
            counts[found] -= 1
            if counts[found] <= 0:
                del counts[found]
            if not counts:
                del by_sender[sender]


def early_batch(
    decoder: RowDecoder, payloads: Sequence[tuple[int, str | bytes]], done: str, limit: int
) -> EarlyBatch:
    """The changes of `payloads` ((sender's pid, payload)) not yet read from the queue
    (their transactions not visible in `done`, the finished snapshot), up to `limit`. A
    payload that cannot be read is skipped: the queue read has its rows."""
    batch = EarlyBatch([], [], [], [], read_at=time.monotonic())
    wall = time.time()
    for pid, payload in payloads:
        try:
            found = payload_events(decoder, payload, len(batch.events))
        except (InvalidEvent, ValueError, TypeError, KeyError):
            continue
        if found is None or visible_in(done, found[0]) or batch.size + len(found[2]) > limit:
            continue  # the queue read has them (or did)
        xid, committed, events = found
        batch.events += events
        batch.xids += [xid] * len(events)
        batch.pids += [pid] * len(events)
        batch.committed += [committed] * len(events)
        if committed is not None:
            age = max(0.0, wall - committed)
            batch.oldest_s = max(age, batch.oldest_s or 0.0)
    return batch


def payload_events(
    decoder: RowDecoder, payload: str | bytes, first: int
) -> tuple[int, float | None, list[ChangeEvent]] | None:
    """A capture function's NOTIFY payload: the writer's xid, its now() and its rows'
    events (positions from `first` on), or None if it is no payload of ours. Raises what
    a malformed one makes fail."""
    parsed = orjson.loads(payload)
    if not isinstance(parsed, dict):
        return None
    schema, table, xid, at, rows = parsed["s"], parsed["t"], parsed["x"], parsed["a"], parsed["r"]
    if not isinstance(xid, int) or not isinstance(rows, list):
        return None
    committed = float(at) if isinstance(at, (int, float)) else None
    events = []
    for i, row in enumerate(rows, first):
        op, old, new = row
        events.append(decoder.event(i, (schema, table, op, old, new)))
    return xid, committed, events
