"""Trigger-queue capture: read cdc_invalidator.queue_v1 by snapshot windows, woken by NOTIFY.

Every committed transaction becomes visible in exactly one step from one snapshot to the
next. The listener remembers the snapshot it finished (`done`), takes a new one, and reads
the rows of the transactions that became visible in between: no row is locked, deleted
or updated on the way, which keeps the writers' tables and the WAL quiet. A window is
read in chunks ordered by (xid, id). The runner acknowledges a chunk only after Redis
confirmed its deletes; only then does the position move on, and only a finished window
moves `done` (saved in listener_state_v1, for restarts). Rows below `done` are deleted
later in bulk. A batch whose sweep runs behind the loop (capture/holds.py) holds what is
saved, and so the pruning, at the position before it until the sweep is done.

One autocommit connection LISTENs, reads and saves; a session advisory lock makes sure
that only one listener consumes at a time. A statement that changed one row also sends
it in its NOTIFY payload: deleted before the queue read that acknowledges it
(capture/early.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import select
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from typing import Any, cast

import psycopg
import structlog
from psycopg import pq, sql
from psycopg.rows import tuple_row

from cdc_invalidator.capture.early import Content, EarlyBatch, EarlyChanges, Sender, early_batch
from cdc_invalidator.capture.errors import (
    Fatal,
    MappingSuperseded,
    NotInstalled,
    Standby,
    missing_privilege,
)
from cdc_invalidator.capture.holds import Hold, Holds
from cdc_invalidator.capture.lineage import CrashSetting, after_crash, note_server
from cdc_invalidator.capture.rows import RowDecoder, pack_element, queue_id
from cdc_invalidator.capture.trigger_sql import (
    CHANNEL,
    ERAS_ASK_EVERY_S,
    LISTEN_PAYLOADS,
    NO_STAMP,
    MappingStamp,
    call_state,
    eras_again,
    mapping_eras_of,
    require_current_mapping,
    require_installed,
    warn_subscribed,
)
from cdc_invalidator.events import ChangeEvent, Origin, TableName
from cdc_invalidator.mapping.mapper import Era, Mapper, Routed
from cdc_invalidator.pg import raw_text
from cdc_invalidator.pg.connect import LISTENER, PgConnector
from cdc_invalidator.pg.queries import Q

log = structlog.get_logger("cdc_invalidator.capture.trigger")

# Progress is saved at most this often, and this long at most after going idle: a crash
# re-delivers at most this much work, where a save per batch would cost a write per batch.
SAVE_EVERY_S = 0.1
# Processed rows deleted per statement, so that a large clean-up never holds up an event.
PRUNE_CHUNK = 5000
# Batches this large mean changes arrive faster than the listener wakes: stop NOTIFY.
UNLISTEN_AT = 8
# Busy, the listener holds busy.sql's lock and capture functions send no wake-up; a try
# that failed (a writer testing it that instant) is tried again this long after.
BUSY_RETRY_S = 1.0
# Quiet again, the queue is read this long after, then twice as long each time up to the
# second figure, until no transaction that found the listener busy (and sent no wake-up)
# is open (writers_seen.sql): a long one is polled for, not waited on.
WRITERS_POLL_S = 0.01
WRITERS_POLL_MAX_S = 0.2
# While synchronous standbys are configured (asked this often), no commit sends a
# wake-up (wake_needed_v1() in schema.sql: PostgreSQL would hold every other notifying
# commit of the server behind one that waits for the standby, and a commit's
# synchronous_commit is known only at COMMIT): the quiet listener reads the queue this
# often instead.
SYNC_CHECK_S = 1.0
SYNC_READ_S = 0.01
# No queue read for this long (Redis is down: the loop waits for it, not for us): the
# notifications that keep coming are read off the socket anyway. Left unread, they
# would fill it and block our backend as it sends them, which holds the server's NOTIFY
# queue for every session: once full, every write to a watched table fails at commit.
DRAIN_AFTER_S = 1.0
# ... for at most this long each time (libpq reads some tens of kB a call: read on while
# more waits).
DRAIN_FOR_S = 0.5
# NOTIFY payloads kept for an early batch, at most, in bytes: those past it go by the
# queue read (a long outage with the payload on would otherwise keep every one in
# memory; ours are 100-200 bytes, a foreign NOTIFY on the channel up to 8000).
PAYLOAD_BYTES_KEPT = 4 << 20
# As libpq names the channel of a notification.
CHANNEL_BYTES = CHANNEL.encode()
# A pack's dead letter names at most this many of its failed elements (and how many more).
DEAD_ELEMENTS_NAMED = 10

_START = ("0", 0)  # before every (xid, id)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A pg_snapshot: xmin:xmax:xip,... (transaction ids below xmax and not in xip are
    complete)."""

    text: str
    xmax: str
    xip: str  # as an array literal for xid8[]

    @classmethod
    def parse(cls, text: str) -> Snapshot:
        _xmin, xmax, xip = text.split(":")
        return cls(text, xmax, "{" + xip + "}")


@dataclass(slots=True)
class QueueBatch:
    """The runner's Batch (the fields mean what runner.Batch says). Here a position is
    a queue row's id, or an element of its pack (capture/rows.py, pack_position), and
    an age is measured from the row's enqueued_at: now() in the writer, the start of its
    transaction. `size` counts events: a pack weighs its rows.

    A pack the mapper could map column-wise (Mapper.map_pack) is in `premapped` (the
    runner's Premapped), not in `events`: no event per row. all_events() builds every
    event, for the tail."""

    size: int
    events: list[ChangeEvent]
    dead: dict[int, str] = field(default_factory=dict)
    read_at: float = 0.0
    # The rows as read (fetch_batch.sql's row columns: xid at 1, id at 3), for origins(),
    # and each transaction's age by xid.
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    xid_ages: dict[int, float] = field(default_factory=dict)
    # When the window's snapshot was taken: every row read in it had committed by then.
    visible_at: float | None = None
    held: Hold | None = None  # hold(): acknowledged once its sweep is done
    # The keys of the packs mapped column-wise, and how many packs they were.
    premapped: Routed = field(default_factory=dict)
    mapped_packs: int = 0

    @property
    def ages_s(self) -> list[float]:
        return list(self.xid_ages.values())

    @property
    def oldest_s(self) -> float | None:
        return max(self.xid_ages.values(), default=None)

    def dead_letter(self, position: int, error: str) -> None:
        self.dead[position] = error

    def hold(self) -> Hold:
        if self.held is None:
            self.held = Hold()
        return self.held

    def all_events(self) -> list[ChangeEvent]:
        """Every change of the batch as an event, those of the packs mapped column-wise
        too (decoded again, as they would have been without map_pack): what `tail`
        shows. Built only when asked."""
        if not self.mapped_packs:
            return self.events
        return RowDecoder().queue_rows(self.rows, at=3, count_at=9).events

    def origins(self) -> list[Origin]:
        """Each event's writer, in the order of all_events(): its xid, and the start of
        its transaction (enqueued_at, the writer's now(): the queue records no commit
        time) on our clock."""
        read_wall = time.time() - (time.monotonic() - self.read_at)
        xids = {row[3]: row[1] for row in self.rows}
        out = []
        for event in self.all_events():
            xid = xids.get(queue_id(event.position))
            age = None if xid is None else self.xid_ages.get(xid)
            out.append(
                Origin(
                    None if age is None else read_wall - age,
                    "" if xid is None else f"xid {xid}",
                )
            )
        return out


@dataclass(frozen=True, slots=True)
class Chunk:
    """fetch_batch.sql's answer: its header, and the rows (in no promised order)."""

    window: str  # the window's end snapshot
    rows: list[tuple[Any, ...]]
    now: str  # the snapshot the read ran in (another than `window` past a window's first)
    last: tuple[str, int] | None  # the greatest (xid, id) among the rows
    xid_ages: dict[int, float]
    # The rows' events (a pack weighs its rows): the chunk is full, and more of its
    # window may wait, when they reach the limit.
    events: int

    @classmethod
    def read(cls, answer: list[tuple[Any, ...]]) -> Chunk:
        # The header is the row whose first column is set: first, as the query is
        # written, but UNION ALL promises no order.
        at = 0 if answer[0][0] is not None else next(i for i, r in enumerate(answer) if r[0])
        header = answer.pop(at)
        snapshot, count, last_xid, last_id, now, _, _, ages, _, events = header
        if count != len(answer):
            raise Fatal(f"fetch_batch.sql counted {count} rows and returned {len(answer)}")
        return cls(
            snapshot,
            answer,
            now,
            None if last_xid is None else (str(last_xid), last_id),
            {xid: age for xid, age in json.loads(ages)} if ages else {},
            events,
        )


# What Progress saves: done, window, after.
_State = tuple[Snapshot, Snapshot | None, tuple[str, int]]


@dataclass(slots=True)
class Progress:
    """How far the listener got; kept across reconnects, saved to listener_state_v1."""

    done: Snapshot  # every transaction visible here has been invalidated
    window: Snapshot | None = None  # the end of a window being read in chunks
    after: tuple[str, int] = _START  # the last (xid, id) acknowledged in that window
    unsaved_events: int = 0
    saved: _State | None = None  # the state() last saved
    saved_at: float = 0.0
    # Batches read past whose sweeps are not done: nothing past the first is saved.
    holds: Holds[_State] = field(default_factory=Holds)

    def state(self) -> _State:
        return (self.done, self.window, self.after)

    def acknowledged(self) -> _State:
        """What may be saved: state(), or the position before the oldest batch held."""
        return self.holds.limit() or self.state()

    @property
    def unsaved(self) -> bool:
        return bool(self.unsaved_events) or self.acknowledged() != self.saved

    @property
    def saved_done(self) -> Snapshot:
        return self.saved[0] if self.saved is not None else self.done


class Retention:
    """Which finished snapshot processed rows may be pruned below, when they are kept for
    replay: the newest one finished at least `keep_s` ago. (The queue's index is on
    (xid, id), so rows are pruned by snapshot; a time on each row would need a scan.)
    Remembered in memory: after a restart pruning resumes `keep_s` later.

    Also where pruning got to: the last (xid, id) deleted, from which the next chunk is
    looked for (prune.sql). Of one server: another's ids are not comparable."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._seen: deque[tuple[float, Snapshot]] = deque()
        self.pruned_to: tuple[int, int] = (0, 0)

    def prunable(self, done: Snapshot) -> Snapshot | None:
        if not self.keep_s:
            return done
        seen, now = self._seen, time.monotonic()
        if not seen or seen[-1][1] is not done:
            seen.append((now, done))
        cutoff = now - self.keep_s
        while len(seen) > 1 and seen[1][0] <= cutoff:  # a newer one is old enough too
            seen.popleft()
        return seen[0][1] if seen[0][0] <= cutoff else None


class WakeupPolicy:
    """NOTIFY or poll, decided from the sizes of the batches handed out.

    Quiet (one change at a time), each commit's NOTIFY wakes the listener at once.
    Clearly busy, the wake-up per commit only costs (the backend a signal and a queue
    read, us a message) while the runner lingers and takes what gathered: UNLISTEN, and
    the queue holds busy.sql's lock, so that writers send none (their notifying commits
    would be serialized). Quiet again: LISTEN, let the lock go, then look once more for
    what committed before the LISTEN took effect (its NOTIFY went to nobody), and until
    the writers that found the lock held have ended (TriggerQueue.wait()).
    """

    def __init__(self, unlisten_at: int = UNLISTEN_AT) -> None:
        self.unlisten_at = unlisten_at
        self.listening = True  # the connection starts LISTENing (_prepare)
        # Just LISTENed again: the next wait() returns at once, for the look.
        self.look_again = False

    def after_batch(self, size: int, limit: int) -> bool | None:
        """An acknowledged batch of `size` taken with `limit`: True to LISTEN, False to
        UNLISTEN (the queue does it as the next batch begins), None to leave it."""
        self.look_again = False
        if size >= limit:
            return None  # a full batch: more is waiting, the runner reads on at once
        if size > 1:
            # Only when clearly busy: LISTEN again costs the backend a walk over the
            # server's NOTIFY queue (measured: p99 at 300 changes/s went from 1.2 to
            # 55 ms when a batch of 2 was enough to switch).
            if self.listening and size >= self.unlisten_at:
                self.listening = False
                return False
            return None
        if not self.listening:
            self.listening = self.look_again = True
            return True
        return None


# fetch_batch.sql's parameters: cur, prev_xip, after_xid, after_id, from_xid, from_id,
# limit. Equal keys read the same rows (the end snapshot given, or a new one either way).
FetchKey = tuple[str | None, str, str, int, str, int, int]


def fetch_key(
    done: Snapshot, window: Snapshot | None, after: tuple[str, int], limit: int
) -> FetchKey:
    """The read that continues from `after` in `window` (None: a new window from now),
    past what `done` saw."""
    after_xid, after_id = after
    # Rows of transactions begun after `done` start at (done.xmax, 0): past both that
    # and the position.
    from_xid, from_id = (
        (after_xid, after_id) if int(after_xid) >= int(done.xmax) else (done.xmax, -1)
    )
    cur = window.text if window else None
    return (cur, done.xip, after_xid, after_id, from_xid, from_id, limit)


def fetch_params(key: FetchKey) -> dict[str, Any]:
    """fetch_batch.sql's parameters for the read `key`."""
    cur, prev_xip, after_xid, after_id, from_xid, from_id, limit = key
    return {
        "cur": cur,
        "prev_xip": prev_xip,
        "after_xid": after_xid,
        "after_id": after_id,
        "from_xid": from_xid,
        "from_id": from_id,
        "limit": limit,
    }


# A read's answer, and when it was asked for (time.monotonic(), before it was sent).
Fetched = tuple[float, list[tuple[Any, ...]]]


class ReadAhead:
    """One read done ahead on a helper thread, on the queue's own connection (psycopg
    serializes the connection's users: anything else the queue runs meanwhile waits for
    it).

    A backlog is read in chunks; each chunk's keys are deleted before the next is read,
    and the listener used to wait for PostgreSQL's answer, then for Redis, in turn
    (profile of a 100k-change drain: 28% of the time waiting on the chunk). A read
    started as a chunk goes to Redis runs while Redis deletes.
    """

    def __init__(self, fetch: Callable[[FetchKey], Fetched]) -> None:
        self._fetch = fetch
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[FetchKey, Future[Fetched]] | None = None

    def start(self, key: FetchKey) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cdc-read-ahead")
        self._pending = (key, self._pool.submit(self._fetch, key))

    def take(self, key: FetchKey | None) -> Fetched | None:
        """The answer read ahead for `key`, or None if none was (or another one, which is
        thrown away: its chunk was not acknowledged). Waits for a read in progress."""
        if self._pending is None:
            return None
        (ahead, future), self._pending = self._pending, None
        try:
            answer = future.result()
        except psycopg.Error:
            if ahead == key:
                raise  # the same read again would meet the same failure
            return None
        return answer if ahead == key else None

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.take(None)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class Renames:
    """Queue rows carrying a name the mapping lacks, mapped by the name their table has
    now, where the mapping has that.

    A capture function queues under the name its last install compiled in, which a
    rename (ALTER TABLE ... RENAME TO / SET SCHEMA, ALTER SCHEMA ... RENAME TO) leaves
    alone; `check` then says to configure the new name and run install. Until that
    install, rows carry the old name; after it, the rows queued before it (and dead
    letters requeued) still do; and a listener started on the file edited before or
    after it must map both. resolve_renamed.sql finds the watched table whose events
    carried a name (as install recorded it, or before: watched_v1.renamed_from, which
    install extends in the same transaction that compiles the new name, so that a row
    read at any time is found), and such rows are mapped under the first of its names
    now, as recorded, and as before (newest first) that the mapping has. Logical mode
    needs none of this: it resolves relations by OID.

    Only names the mapping lacks are looked up (a set of a chunk's names, in C), once
    each while they resolve (a table's identity does not change); a name that does not
    resolve is looked up again in each chunk that holds it (it goes to the dead letters,
    or makes a listener whose file changed restart: neither is the steady state).
    replay reads the queue's history through it too.

    `at`: the rows' id column, as RowDecoder.queue_rows takes it (schema_name and
    table_name follow it)."""

    def __init__(
        self, conn: psycopg.Connection[Any], tables: Mapping[TableName, object], at: int
    ) -> None:
        self._conn = conn
        self._tables = tables
        self._at = at
        self._name_of = itemgetter(at + 1, at + 2)
        self._found: dict[tuple[str, str], tuple[str, str]] = {}

    def apply(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """`rows` with each name the mapping lacks replaced by the one it maps the table
        under (the same list when there is none)."""
        if not rows:
            return rows
        name_of = self._name_of
        unknown = set(map(name_of, rows)).difference(self._tables.keys())
        if not unknown:
            return rows
        moved: dict[tuple[str, str], tuple[str, str]] = {}
        for name in unknown:
            to = self._found.get(name)
            if to is None:
                to = self._resolve(name)
            if to is not None:
                moved[name] = to
        if not moved:
            return rows
        at = self._at
        return [
            row
            if (to := moved.get(name_of(row))) is None
            else (*row[: at + 1], *to, *row[at + 3 :])
            for row in rows
        ]

    def _resolve(self, name: tuple[str, str]) -> tuple[str, str] | None:
        schema, table = name
        if not isinstance(schema, str) or not isinstance(table, str):
            return None  # a malformed row written by hand: the decoder's to refuse
        answer = self._conn.execute(
            Q.RESOLVE_RENAMED.sql, {"schema": schema, "name": table}
        ).fetchall()
        for now_schema, now_table, schema_as, table_as, before in answer:
            candidates = [(now_schema, now_table), (schema_as, table_as)]
            for pair in reversed(json.loads(before)):
                match pair:
                    case [str() as schema_before, str() as table_before]:
                        candidates.append((schema_before, table_before))
            for candidate in candidates:
                if TableName(*candidate) in self._tables:
                    to = (str(candidate[0]), str(candidate[1]))
                    log.info(
                        "renamed_table_followed",
                        carried=str(TableName(schema, table)),
                        mapped_as=str(TableName(*to)),
                    )
                    self._found[name] = to
                    return to
        return None


class TriggerCapture:
    """Connects the trigger queue, and reconnects it where the last connection left off."""

    def __init__(  # noqa: PLR0913 - every option is keyword-only
        self,
        pg: PgConnector,
        *,
        prune_every_s: float = 1.0,
        history_s: float = 0.0,
        mapper: Mapper | None = None,
        mapping: MappingStamp | None = None,
        payloads: bool = False,
        sweep_after_failover: bool = True,
        sweep_after_crash: CrashSetting = "always",
    ) -> None:
        self._pg = pg
        # A sweep of every watched table queued on another server than the last (a
        # promoted standby, a restore: capture/lineage.py); False: logged only.
        self._sweep_after_failover = sweep_after_failover
        # And on one that came up from a crash since (capture/lineage.py).
        self._sweep_after_crash = sweep_after_crash
        self._lineage: str | None = None  # the server's, as the last connection saw it
        # notify_payload: NOTIFY payloads are deleted early. Off, they are not read: the
        # tables' owners may send payloads (notify_row_v1()), which would delete any
        # configured table's keys on demand.
        self._payloads = payloads
        # The mapping's fingerprint (Settings.mapping_fingerprint): a later install's
        # stops this listener, at connect and at each save. None: never asked.
        self._mapping = mapping
        # Maps packs column-wise (Mapper.map_pack); None: every pack as events.
        self._mapper = mapper
        self._prune_every_s = prune_every_s
        self._progress: Progress | None = None
        self._server_started: str | None = None  # the run: progress_ahead.sql
        self._retention = Retention(history_s)

    def connect(self) -> TriggerQueue:
        conn = self._pg.connect(LISTENER)
        try:
            saved, started, payload_channel = _prepare(conn, self._mapping)
            # (before the first read: a sweep it queues is in the next window)
            seen = self._lineage
            crash = after_crash(conn, self._sweep_after_crash)
            noted = note_server(conn, sweep=self._sweep_after_failover, seen=seen, crash=crash)
            self._lineage = noted or seen
        except psycopg.errors.InsufficientPrivilege as exc:
            user = conn.info.user
            conn.close()
            raise missing_privilege(user, "trigger", exc) from None
        except BaseException:
            conn.close()
            raise
        # Within one run of one server, the progress in memory is never behind what was
        # saved, and the next connection goes on from it. Another server (a standby
        # promoted after a failover, which may lack the last transactions and hand
        # their ids out again: a position reached on the old one would skip new
        # transactions), the same one restarted, or recovered from a crash (which loses
        # the ids handed out since the last WAL flushed, and hands them out again): from
        # the position saved, which came with the data (replicated or recovered with it;
        # a save not flushed is lost with them). Read again: harmless.
        if self._progress is not None and started != self._server_started:
            log.warning(
                "postgres_server_changed",
                previous_start=self._server_started,
                start=started,
                detail="another PostgreSQL server, restarted, or recovered from a crash: "
                "resuming from the position saved there",
            )
            self._progress = None
            # The positions kept for pruning were the other server's too.
            self._retention = Retention(self._retention.keep_s)
        if self._progress is None:
            self._progress = saved
        self._server_started = started
        try:
            eras = (
                mapping_eras_of(conn, self._mapping, "trigger") if self._mapper is not None else []
            )
            if self._mapper is not None:
                warn_subscribed(conn, self._mapper.tables)
        except BaseException:
            conn.close()
            raise
        return TriggerQueue(
            conn,
            self._progress,
            self._prune_every_s,
            self._retention,
            self._mapper,
            mapping=self._mapping,
            payloads=self._payloads,
            payload_channel=payload_channel,
            eras=eras,
        )


class TriggerQueue:
    def __init__(  # noqa: PLR0913 - `mapping` is keyword-only
        self,
        conn: psycopg.Connection[Any],
        progress: Progress,
        prune_every_s: float,
        retention: Retention,
        mapper: Mapper | None = None,
        *,
        mapping: MappingStamp | None = None,
        payloads: bool = False,
        payload_channel: bool | None = None,
        eras: list[Era] | None = None,
    ) -> None:
        self._conn = conn
        # The templates earlier mappings gave tables this one renders otherwise, with
        # the queue ids captured under each (_eras): empty, nothing more is done.
        self._eras: list[Era] = []
        self._eras_below: float = 0  # the highest "below" (inf: one is open)
        self._eras_asked_at = time.monotonic()
        self._set_eras(eras or [])
        self._mapper = mapper
        self._read_payloads = payloads  # (TriggerCapture's `payloads`)
        # LISTENing on the payloads' own channel too (_prepare): payloads count only from
        # there, and one on CHANNEL (which anyone may send) only wakes. None: an earlier
        # install's capture functions, which sent them on CHANNEL. False: the install has
        # the channel, but this role may not call listen_v1(): on CHANNEL alone, woken
        # (notify_row_v1() sends the wake-up too), whose payloads still count for nothing
        # (they counted: any role's NOTIFY there deleted keys on demand).
        self._ignore_wake_up_payloads = payload_channel is not None
        self._listen_sql = _listen_sql(payload_channel)
        self._mapping = mapping
        self._progress = progress
        self._prune_every_s = prune_every_s
        self._retention = retention
        self._pruned_for: Snapshot | None = None
        self._pruned_at = time.monotonic()
        self._prune_more = False
        self._decoder = RowDecoder(raw=raw_text.reads_raw(conn))
        # Rows under a table's name from before a rename (Renames); None without a mapper.
        self._renames = None if mapper is None else Renames(conn, mapper.tables, at=3)
        self._wakeup = WakeupPolicy()
        self._read_ahead = ReadAhead(self._fetch)
        # When the window's snapshot was taken (time.monotonic(), an upper bound): its
        # rows were visible to readers by then. A window saved by an earlier connection
        # was taken before this one started.
        self._window_at = time.monotonic()
        # NOTIFY payloads received (one-row statements' rows), not yet deleted early;
        # the changes deleted early that the queue read acknowledges; whether that read
        # is owed (an early batch was just handed out).
        self._payloads: list[tuple[int, str | bytes]] = []  # (sender's pid, payload)
        self._payload_bytes = 0  # theirs (PAYLOAD_BYTES_KEPT)
        self._early = EarlyChanges()
        self._read_owed = False
        # A NOTIFY came since the last queue read began: read again. Those that arrive
        # with a query's results go to _notified() (psycopg hands them over as it reads
        # the results); those that arrive while idle are read off the socket by wait(),
        # or by maintain() while no queue read comes (a Redis outage).
        self._woken = True  # notifications before this were dropped (_prepare)
        # LISTEN (True) or UNLISTEN (False) as the next batch() begins: the wake-up
        # policy's switch after the last batch.
        self._listen_next: bool | None = None
        # Busy (UNLISTENed): whether we hold busy.sql's lock, and when to try again if not.
        self._busy = False
        self._busy_retry_at = 0.0
        # Quiet again: until writers_seen.sql says none is open of the transactions that
        # found us busy, wait() returns after this long (doubling) instead of a wake-up.
        # So too after a connect: a session of ours that ended busy (a dropped connection,
        # a restart, the other listener of a pair) left such writers, prepared ones too.
        self._writers_poll_s: float | None = WRITERS_POLL_S
        # Whether synchronous standbys are configured (sync_standbys.sql), and when asked.
        self._sync_standbys = False
        self._sync_asked_at = -SYNC_CHECK_S
        self._read_at = time.monotonic()  # the last queue read began
        # Straight from libpq, as bytes (see _prepare).
        conn.pgconn.notify_handler = self._notified

    @contextmanager
    def batch(self, limit: int) -> Iterator[QueueBatch | EarlyBatch]:
        """Up to `limit` events. A clean exit acknowledges them, an exception does not:
        the same events come again.

        When NOTIFY payloads came, their rows first, as an early batch: deleted at once,
        acknowledged by the queue read that follows (which skips deleting them again)."""
        if (listen := self._listen_next) is not None:
            self._listen_next = None
            self._listen(listen)
        elif not self._wakeup.listening and not self._busy:
            self._take_busy()
        self._woken = False  # this batch, or the queue read owed after it, sees them
        if self._payloads:
            payloads, self._payloads, self._payload_bytes = self._payloads, [], 0
            early = self._early_batch(payloads, limit)
            if early.events:
                yield early
                # Redis confirmed the deletes (a failure raised): the queue read skips
                # them, except those left to it (refused by the mapper, or a sweep).
                self._early.add(early.deleted())
                self._read_owed = True
                return
        with self._queue_batch(limit) as batch:
            yield batch

    def _early_batch(self, payloads: list[tuple[int, str | bytes]], limit: int) -> EarlyBatch:
        return early_batch(self._decoder, payloads, self._progress.done.text, limit)

    @contextmanager
    def _queue_batch(self, limit: int) -> Iterator[QueueBatch]:
        self._read_owed = False
        self._read_at = time.monotonic()
        progress = self._progress
        before = progress.state()
        key = fetch_key(progress.done, progress.window, progress.after, limit)
        asked_at, answer = self._read_ahead.take(key) or self._fetch(key)
        chunk = Chunk.read(answer)
        if self._early:
            self._drop_uncommitted_early(chunk.now, asked_at)
        window = progress.window
        if window is None:  # a new window: its snapshot was taken by this read
            window, self._window_at = Snapshot.parse(chunk.window), time.monotonic()
        # (before the read ahead starts: a name looked up would wait for it)
        rows = chunk.rows if self._renames is None else self._renames.apply(chunk.rows)
        if chunk.last is not None and chunk.events >= limit:
            # More of this window waits: read its next chunk while this one's keys are
            # deleted (the server works on it meanwhile). Taken by the next batch() if
            # this one is acknowledged, thrown away if it is not.
            self._read_ahead.start(fetch_key(progress.done, window, chunk.last, limit))
        # Columns 3 to 8: id, schema_name, table_name, op, old_row, new_row; 9: rows.
        # A pack's keys rendered column-wise where the mapper can (a bulk statement's
        # drain: profiled, building a dict and an event per row was most of decoding).
        premapped: Routed = {}
        map_pack = None if self._mapper is None else partial(self._mapper.map_pack, into=premapped)
        decoded = self._decoder.queue_rows(rows, at=3, count_at=9, map_pack=map_pack)
        if self._eras:
            self._add_eras(rows, premapped)
        events, deleted_early = self._without_early(decoded.events, rows)
        batch = QueueBatch(
            size=chunk.events,
            events=events,
            dead=dict(decoded.dead),
            read_at=time.monotonic(),
            rows=rows,
            xid_ages=chunk.xid_ages,
            visible_at=self._window_at,
            premapped=premapped,
            mapped_packs=decoded.mapped_packs,
        )
        yield batch
        # Acknowledged: Redis confirmed every delete of the batch (a sweep, if the batch
        # was held, is still running: saving stays before the batch until it is done).
        self._acknowledge(batch, chunk, window, limit)
        if deleted_early:
            self._early.forget(deleted_early)
        if batch.held is not None:
            progress.holds.add(batch.held, before)
        # LISTEN or UNLISTEN as the next batch begins, not now: the position has moved
        # and the batch's hold is registered, and a failure before the runner hands
        # the hold's sweep to the sweeper would keep it held for good (its sweep never
        # run, nothing saved or pruned past it).
        self._listen_next = self._wakeup.after_batch(chunk.events, limit)

    def _set_eras(self, eras: list[Era]) -> None:
        self._eras = eras
        self._eras_below = max((math.inf if e.below is None else e.below for e in eras), default=0)

    def _ask_eras_again(self) -> None:
        self._eras_asked_at = time.monotonic()
        self._set_eras(eras_again(self._conn, self._mapping, "trigger", self._eras))

    def _add_eras(self, rows: Sequence[Sequence[Any]], into: Routed) -> None:
        """The keys of the rows an earlier mapping's capture queued (ids below the
        listener's mapping's boundary) of tables that mapping rendered otherwise, with
        that mapping's templates, added to `into` under their Redis databases: an
        install replaced `a:{id}` by `b:{id}` while they waited, and `a:1` was the app's
        key when the change committed (before, only `b:1` was deleted). Rows queued
        since cost one comparison each; their failures are the listener's mapping's."""
        below = self._eras_below
        old = [row for row in rows if row[3] < below]
        if not old:
            return
        for era in self._eras:
            start, tables = era.start, era.tables
            end = math.inf if era.below is None else era.below
            theirs = [
                row
                for row in old
                if row[3] < end
                and (start is None or row[3] >= start)
                and (row[4], row[5]) in tables
            ]
            if not theirs:
                continue
            era.add_keys(self._decoder.queue_rows(theirs, at=3, count_at=9).events, into)

    def _drop_uncommitted_early(self, snapshot: str, asked_at: float) -> None:
        """Changes deleted early before a read was asked for (at `asked_at`) whose
        transaction its snapshot (`snapshot`, taken as it ran, whatever window it read)
        saw still open: their payloads were sent in their name before they committed
        (early.py), so the queue deletes their keys again; said, with the backends that
        sent them."""
        for xid, pid in self._early.drop_uncommitted(snapshot, asked_at):
            log.warning(
                "payload_before_commit",
                xid=xid,
                pid=pid,
                detail="a NOTIFY payload named a transaction that had not committed: not "
                "sent by its capture function (a session that prepared it, or took its "
                "backend's pid, sent it). Its keys are deleted again once it commits",
            )

    def _without_early(
        self, events: list[ChangeEvent], rows: list[tuple[Any, ...]]
    ) -> tuple[list[ChangeEvent], list[tuple[Sender, Content]]]:
        """`events` less those deleted early (acknowledged by this read, not deleted
        again), and which those were."""
        if not self._early:
            return events, []
        # Columns 1 to 3: xid, pid (the writer's backend, NULL but for a row a payload
        # was sent for), id. Only single changes were deleted early: a pack's elements
        # (positions that are no queue id) are never found.
        return self._early.split(events, {row[3]: (int(row[1]), row[2]) for row in rows})

    def _acknowledge(self, batch: QueueBatch, chunk: Chunk, window: Snapshot, limit: int) -> None:
        progress = self._progress
        if batch.dead:
            xids = {row[3]: row[1] for row in chunk.rows}
            self._conn.cursor().executemany(
                Q.DEAD_LETTER.sql,
                [
                    {"xid": str(xids[id_]), "id": id_, "error": error}
                    for id_, error in _dead_rows(batch.dead).items()
                ],
            )
        progress.unsaved_events += batch.size
        if chunk.last is None and progress.window is None:
            # Nothing new: keep the old snapshot (still correct, just older), so that an
            # idle listener writes nothing and has nothing to prune.
            return
        if batch.size < limit or chunk.last is None:  # the window is finished
            progress.done, progress.window, progress.after = window, None, _START
        else:
            progress.window, progress.after = window, chunk.last

    def settle(self) -> None:
        """Nothing to wait for: the queue rows are the history, written by the writers."""

    def maintain(self) -> None:
        """Save progress if due, prune if due, read notifications while no queue read
        comes: cheap when nothing is (three clock reads). Called on every turn of the
        runner's loop, busy or idle, and during Redis outages."""
        progress = self._progress
        now = time.monotonic()
        if progress.unsaved and now - progress.saved_at >= SAVE_EVERY_S:
            self._save()
        if self._eras_below == math.inf and now - self._eras_asked_at >= ERAS_ASK_EVERY_S:
            self._ask_eras_again()
        self._prune()
        if now - self._read_at >= DRAIN_AFTER_S:
            self._read_at = now
            fd = self._conn.fileno()
            while select.select([fd], [], [], 0)[0] and time.monotonic() < now + DRAIN_FOR_S:
                self._take_notifies()

    def wait(self, timeout_s: float, wakeup_fd: int | None = None) -> None:
        """Return on a NOTIFY, a byte on `wakeup_fd` (shutdown) or after timeout_s; at
        once if there is something to look at or to do.

        That is: just after LISTEN again (the look for what committed before it took
        effect), while pruning has more chunks to delete, and at the latest when saving
        progress falls due (at most SAVE_EVERY_S after going idle). Until writers_seen.sql
        says no transaction that found us busy is open (their commits wake nobody): after
        WRITERS_POLL_S, doubling up to WRITERS_POLL_MAX_S.
        """
        if self._wakeup.look_again or self._prune_more or self._read_owed:
            return
        progress = self._progress
        if progress.unsaved:
            timeout_s = min(timeout_s, progress.saved_at + SAVE_EVERY_S - time.monotonic())
            if timeout_s <= 0:
                return
        if self._woken:  # with the last query's results
            return
        if (poll_s := self._writers_poll_s) is not None:  # only before waiting: a query
            if self._conn.execute(Q.WRITERS_SEEN.sql).fetchone() == (True,):
                self._writers_poll_s = None
                return  # the last ones ended: their rows are visible to the next read
            timeout_s = min(timeout_s, poll_s)
            self._writers_poll_s = min(poll_s * 2, WRITERS_POLL_MAX_S)
        watching = self._writers_poll_s is None and self._wakeup.listening
        if watching and self._synced():
            # With synchronous standbys, commits send no wake-up: read for them.
            timeout_s = min(timeout_s, SYNC_READ_S)
            watching = False
        if not self._woken:
            # (Set: a wake-up came with one of those queries' answers, read by psycopg
            # and handed to _notified: the socket holds nothing more to end a select.)
            self._select(timeout_s, wakeup_fd, watching=watching)

    def _select(self, timeout_s: float, wakeup_fd: int | None, *, watching: bool) -> None:
        """wait()'s wait on the socket (and `wakeup_fd`): asking whether synchronous
        standbys were configured meanwhile, once a second, while `watching`."""
        fds = [self._conn.fileno()] if wakeup_fd is None else [self._conn.fileno(), wakeup_fd]
        deadline = time.monotonic() + timeout_s
        while True:
            if watching:
                # Synchronous standbys configured while we wait (ALTER SYSTEM, a reload)
                # end every wake-up at once: ask again when due, not at the next poll
                # only (a review: poll_interval_ms = 60000 left a change's keys 58 s).
                timeout_s = min(timeout_s, self._sync_asked_at + SYNC_CHECK_S - time.monotonic())
            readable, _, _ = select.select(fds, [], [], max(0.0, timeout_s))
            if self._conn.fileno() in readable:
                self._take_notifies()
            if readable or not watching or (timeout_s := deadline - time.monotonic()) <= 0:
                return
            if self._synced() or self._woken:
                # Set meanwhile: read now, then every SYNC_READ_S. Or a wake-up came
                # with the question's answer, read by psycopg, not off the socket: it
                # was left unread until the poll (a review: a 15 s wait timed out).
                return

    def _synced(self) -> bool:
        """Whether synchronous standbys are configured (asked every SYNC_CHECK_S)."""
        now = time.monotonic()
        if now - self._sync_asked_at >= SYNC_CHECK_S:
            self._sync_asked_at = now
            self._sync_standbys = self._conn.execute(Q.SYNC_STANDBYS.sql).fetchone() == (True,)
        return self._sync_standbys

    def _take_notifies(self) -> None:
        """Read the notifications waiting on the socket (raises OperationalError if the
        server is gone).

        Straight from libpq, not through Connection.notifies(): on the path from a
        commit to its delete, and that generator's locking, waiting and timeout cost
        ~55 us per call where this costs a few (profiled: the latency phase at
        300 changes/s, notify_payload on; commit -> UNLINK sent 185 us, of which this
        call 59)."""
        pgconn = self._conn.pgconn
        with self._conn.lock:  # the read-ahead thread may use the connection
            pgconn.consume_input()
            while (notify := pgconn.notifies()) is not None:
                self._note(notify)

    def _notified(self, notify: pq.PGnotify) -> None:
        """A notification psycopg read with a query's results."""
        self._note(notify)

    def _note(self, notify: pq.PGnotify) -> None:
        """A wake-up, and its payload (a one-row statement's row) if it has one, with
        the backend that sent it."""
        self._woken = True
        payload = notify.extra  # JSON: orjson reads the bytes
        if (
            payload
            and self._read_payloads
            and self._payload_bytes < PAYLOAD_BYTES_KEPT
            and not (self._ignore_wake_up_payloads and notify.relname == CHANNEL_BYTES)
        ):
            self._payloads.append((notify.be_pid, payload))
            self._payload_bytes += len(payload)

    def _listen(self, on: bool) -> None:
        """LISTEN (idle: woken per commit) or UNLISTEN (busy: the runner lingers, and
        capture functions stop sending wake-ups while we hold busy.sql's lock)."""
        self._conn.execute(self._listen_sql if on else "UNLISTEN *")
        if on:
            if self._busy:
                # LISTEN first: a writer that finds the lock free from now on is heard.
                self._conn.execute(Q.QUIET.sql)
                self._busy = False
                self._writers_poll_s = WRITERS_POLL_S
            return
        # Drop the wake-ups already received, and their rows: the queue reads have them.
        self._take_notifies()
        self._woken = False
        self._payloads.clear()
        self._payload_bytes = 0
        self._take_busy()

    def _take_busy(self) -> None:
        now = time.monotonic()
        if now < self._busy_retry_at:
            return
        self._busy = self._conn.execute(Q.BUSY.sql).fetchone() == (True,)
        if not self._busy:  # (a writer testing it that instant): not again at once
            self._busy_retry_at = now + BUSY_RETRY_S

    def _fetch(self, key: FetchKey) -> Fetched:
        asked_at = time.monotonic()
        return asked_at, (
            self._conn.cursor(row_factory=tuple_row)
            .execute(Q.FETCH_BATCH.compact, fetch_params(key))
            .fetchall()
        )

    def close(self) -> None:
        """Save progress if the connection still works, then close it."""
        self._read_ahead.close()
        if not self._conn.closed and not self._conn.broken:
            # Progress since the last save is re-delivered if this fails: harmless.
            with contextlib.suppress(psycopg.Error, MappingSuperseded):
                self._save()
        self._conn.close()

    def _save(self) -> None:
        progress = self._progress
        if not progress.unsaved:
            return
        state = progress.acknowledged()
        done, window, (after_xid, after_id) = state
        saved = self._conn.execute(
            Q.SAVE_PROGRESS.sql,
            {
                "snapshot": done.text,
                "window_end": window.text if window else None,
                "after_xid": after_xid if window else None,
                "after_id": after_id if window else None,
                "events": progress.unsaved_events,
                **(self._mapping.params() if self._mapping else NO_STAMP),
            },
        ).fetchone()
        if not saved or not saved[0]:
            if self._mapping is not None:
                require_current_mapping(self._conn, self._mapping)  # which it was, then
            raise NotInstalled(
                "cdc_invalidator.listener_state_v1 is empty: run `cdc-invalidator install`"
            )
        progress.saved, progress.unsaved_events = state, 0
        progress.saved_at = time.monotonic()

    def _prune(self) -> bool:
        """Delete a chunk of processed rows, now and then; True if more remain.

        Only below the saved snapshot (an empty queue table means saved progress), and
        only once they are older than replay_history; the saved snapshots older than
        that (progress_v1) with them, less the newest."""
        # Every prune_every_s, and at once again while chunks come back full: the
        # clean-up keeps up with any rate, in statements of bounded size.
        if not self._prune_more and time.monotonic() - self._pruned_at < self._prune_every_s:
            return False
        done = self._retention.prunable(self._progress.saved_done)
        if done is None or self._pruned_for is done:
            return False
        retention = self._retention
        after_xid, after_id = retention.pruned_to
        last = self._conn.execute(
            Q.PRUNE.sql,
            {
                "snapshot": done.text,
                "after_xid": str(after_xid),
                "after_id": after_id,
                "limit": PRUNE_CHUNK,
                "keep_s": retention.keep_s,
            },
        ).fetchone()
        deleted = 0
        if last is not None:
            retention.pruned_to, deleted = (int(last[0]), int(last[1])), int(last[2])
        self._pruned_at = time.monotonic()
        self._prune_more = deleted >= PRUNE_CHUNK
        if not self._prune_more:
            self._pruned_for = done
        return self._prune_more


def _dead_rows(dead: dict[int, str]) -> dict[int, str]:
    """Dead letters by queue row: a pack is parked once, whole, its error naming the
    elements that failed (the others' keys were deleted)."""
    out: dict[int, str] = {}
    failed: dict[int, list[str]] = {}
    for position, error in dead.items():
        element = pack_element(position)
        if element is None:
            out[position] = error
        else:
            failed.setdefault(queue_id(position), []).append(f"element {element}: {error}")
    for id_, errors in failed.items():
        named = "; ".join(errors[:DEAD_ELEMENTS_NAMED])
        more = len(errors) - DEAD_ELEMENTS_NAMED
        text = f"{len(errors)} element(s) failed, the pack's others were invalidated: {named}"
        out[id_] = text + (f"; and {more} more" if more > 0 else "")
    return out


def _standby(conn: psycopg.Connection[Any]) -> Standby:
    """Another session holds the queue's lock: a listener of ours (this one's role and
    application_name), or another session (Standby.foreign), of any role that can
    connect, the listener's own included (a psql session)."""
    holder = conn.execute(Q.LOCK_HOLDER.sql).fetchone()
    if holder is None or holder[3]:
        return Standby("another listener is consuming the queue of this database")
    pid, role, application_name, _ours, gid = holder
    if gid is not None:  # (no listener of ours prepares a transaction)
        return Standby(
            "a prepared transaction holds the queue's lock",
            foreign=f"prepared transaction {gid!r} (role {role}): no listener consumes the "
            "queue until it is committed or rolled back (ROLLBACK PREPARED "
            f"{sql.Literal(gid).as_string(conn)}), whatever restarts",
        )
    return Standby(
        "another session holds the queue's lock",
        foreign=f"backend {pid} (role {role}, application_name {application_name!r}), not "
        f"a listener like this one (role {conn.info.user}, application_name "
        f"{conn.info.parameter_status('application_name')!r}): if it is no listener of "
        "yours, no listener consumes the queue until it ends (SELECT pg_terminate_backend("
        f"{pid}))",
    )


def _listen_sql(payload_channel: bool | None) -> sql.SQL | str:
    """What LISTENs: on the wake-up's channel and the payloads' where this role may
    (listen_v1()), else on the wake-up's alone (CHANNEL is a plain identifier)."""
    return Q.LISTEN_PAYLOADS.sql if payload_channel else f"LISTEN {CHANNEL}"


def _prepare(
    conn: psycopg.Connection[Any], mapping: MappingStamp | None
) -> tuple[Progress, str, bool | None]:
    """The progress saved, this run of the server (progress_ahead.sql: when it started,
    and when it last recovered from a crash), and whether the session LISTENs on the
    payloads' channel too (None: an earlier install of this revision has none; False:
    this role may not call listen_v1())."""
    # The session's settings (no fsync wait, no bitmap scans) are the LISTENER kind's.
    require_installed(conn)
    if mapping is not None:
        require_current_mapping(conn, mapping)
    locked = conn.execute(Q.TAKE_LOCK.sql).fetchone()
    if not locked or not locked[0]:
        raise _standby(conn)
    # Until TriggerQueue hands them to itself, notifications are dropped (its first turn
    # reads the queue): psycopg's own handler decodes them, which a SQL_ASCII database's
    # payload failed, and the query it came with (pg/raw_text.py).
    conn.pgconn.notify_handler = None
    payload_channel = call_state(conn, LISTEN_PAYLOADS)
    if payload_channel is False:
        log.warning(
            "payload_channel_not_granted",
            role=conn.info.user,
            detail=f"this role may not run {LISTEN_PAYLOADS}: it hears no NOTIFY payload, "
            "and deletes each change once the queue read gets it; run "
            "cdc_invalidator.grant_listener() for it",
        )
    conn.execute(_listen_sql(payload_channel))
    row = conn.execute(Q.LOAD_PROGRESS.sql).fetchone()
    if row is None:
        raise NotInstalled(
            "cdc_invalidator.listener_state_v1 is empty: run `cdc-invalidator install`"
        )
    done, window_end, after_xid, after_id = row
    # (a SELECT of values: one row)
    ahead, next_xid, started = cast(
        "tuple[bool, str, str]",
        conn.execute(Q.PROGRESS_AHEAD.sql, {"snapshot": done}).fetchone(),
    )
    if ahead:
        raise Fatal(
            f"the saved position ({done}) lies past this server's transaction ids (next "
            f"{next_xid}): the database was restored from a dump into another cluster, or "
            "copied there, and changes committed here would be skipped. Stop every listener, "
            "run sql/reset_after_restore.sql as the installing role (docs/DBA.md, "
            '"After restoring the database"), then start again'
        )
    progress = Progress(Snapshot.parse(done))
    if window_end is not None:
        progress.window = Snapshot.parse(window_end)
        progress.after = (after_xid, after_id)
    progress.saved = progress.state()
    progress.saved_at = time.monotonic()
    return progress, started, payload_channel
