"""Logical-replication capture: changes from the WAL through pgoutput, no triggers.

The listener streams its slot (START_REPLICATION on a `replication=database`
connection, opened by capture/logical_open.py once the slot and the server were looked
at) and keeps a second, ordinary connection for bookkeeping: the slot's state in
cdc_invalidator.slot_state_v1, dead letters, heartbeats. This module reads the stream.

Acknowledgement: the slot's confirmed position moves only in a standby status update,
and only to the end of a transaction whose keys Redis has confirmed (or, between
transactions, to the position a keepalive reports: nothing before it is left). That
position is saved in slot_state_v1 first, so a slot that is ever found ahead of the
saved position was moved by somebody else (re-created, or consumed by another client):
changes may have been missed. So may they when the slot is gone or its WAL was removed.
Then every watched table is swept as if truncated, before anything else, and the reason
is logged as an error; the sweep is owed (saved) until it has completed.

A batch whose sweep runs behind the loop (capture/holds.py) is read past at once, but the
position told to the slot and saved stays before it until the sweep is done.

Tables are followed by relation, not by name (capture/relations.py), so a table or key
column renamed later keeps its templates. A change of a table that lost a key column
cannot be rendered: it becomes a sweep of that table's templates.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import select
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, cast

import psycopg
import structlog

from cdc_invalidator.capture.history_writer import HistoryWriter
from cdc_invalidator.capture.holds import Hold, Holds
from cdc_invalidator.capture.lineage import (
    CrashSetting,
)
from cdc_invalidator.capture.logical_eras import LogicalEras
from cdc_invalidator.capture.packs import Collector, ColumnPack, map_packs
from cdc_invalidator.capture.pgoutput import (
    Begin,
    Commit,
    Decoder,
    ProtocolError,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Undecodable,
    unwrap_streamed,
)
from cdc_invalidator.capture.relations import Relations
from cdc_invalidator.capture.rows import Transaction, encode_history, with_transaction
from cdc_invalidator.capture.streamed import Chunk, Dead, Prefetch, StreamedTxn, pack
from cdc_invalidator.capture.trigger_sql import (
    NO_STAMP,
    MappingStamp,
    may_call,
    require_current_mapping,
)
from cdc_invalidator.capture.visibility import Complete, Visibility
from cdc_invalidator.capture.walstream import (
    Keepalive,
    WalStream,
    format_lsn,
)
from cdc_invalidator.events import ChangeEvent, InvalidEvent, Op, Origin, StandInKind, TableName
from cdc_invalidator.mapping.columns import ColumnFilter
from cdc_invalidator.mapping.mapper import Mapper, RetiredLookup, Routed, merge
from cdc_invalidator.pg.queries import Q

log = structlog.get_logger("cdc_invalidator.capture.logical")
# A sweep done this long after its batch was handed back has the batch's history written
# again (see LogicalStream.batch). Sooner, the row written at hand-back is as good: a
# replay's window reaches seconds (MARGIN_S) before anything a restore can have lost.
SWEPT_HISTORY_AGAIN_S = 1.0

# Progress that is only a keepalive's (WAL of other tables or databases, or our own
# bookkeeping) is saved and confirmed once it amounts to this much: the slot never
# holds back more than this, and an idle listener does not write to chase its own
# writes. (WAL is kept in 16 MB segments anyway.)
CHASE_BYTES = 1 << 20
# On a clean stop, how long the stream stays open at most for the walsender to read the
# last status update (LogicalStream._await_slot): 9 ms measured, behind a 25 MB backlog.
CLOSE_CONFIRM_S = 2.0
# How long a batch that ends inside a transaction waits for the rest of it, which the
# server is sending (a few ms for a transaction split by the socket's reads).
TXN_REST_WAIT_S = 0.02
# A streamed transaction's changes are mapped to keys this many at a time (one chunk of
# capture/streamed.py; up to twice as many where decoded events and gathered packs share
# a chunk, each side counting against it), and its chunks held in memory up to this many
# bytes (then in a temporary file) per transaction: a listener's RSS is ~65 MB without it.
STREAM_CHUNK = 5000
SPILL_BYTES = 8 << 20
# A transaction sent once committed (below logical_decoding_work_mem: a backfill's
# 10,000-row statements) has its changes from this many on gathered column-wise, as a
# streamed one's are (capture/packs.py): decoded one by one, each cost a dict, an event
# and a history item (profiled on a backfill of 100 statements of 10,000 rows: decoding,
# mapping and history, 35% of the listener's samples). The first few go through the
# Decoder: a small transaction's latency is what it was.
GATHER_AFTER = 64
_UNLIMITED = 1 << 62
_POSITION = attrgetter("position")
# Snapshots asked for at a Stream Commit before its transaction is taken as not visible
# yet (its second deletes then owed as after any first delete).
SEEN_COMPLETE_ASKS = 3
# While a streamed transaction is open, a snapshot is taken at most this often, on the
# loop's turns (maintain(): after a batch's deletes, never before them), to see whether
# it ended: after a bulk statement the WAL sender decodes for seconds past its COMMIT (a
# 1M-row DELETE: Stream Commit 2-3 s later on 2 cores), and a transaction visible since
# then owes no second deletes for keys deleted that late. Seen only at its Stream
# Commit, every key deleted in the 300 ms after was deleted twice: that DELETE's keys
# went a median 4.1 s after COMMIT, 3.4 s now (six interleaved rounds).
SEE_COMPLETE_EVERY_S = 0.1
# synchronous_standby_names, read again before a batch is handed out if it was last read
# longer ago than this (a snapshot taken for any other reason reads it too): a DBA who
# sets it has commits gated within this long, at most 10 reads a second under load and
# none while idle. (Read once a second on the loop's turns, a review's commit held by a
# standby that was down, made half a second after the setting, was deleted before it was
# visible. Waking the idle loop ten times a second for it instead cost the listener 12-13
# ticks of CPU in 20 s against 2.)
GATE_READ_EVERY_S = 0.1


@dataclass(slots=True)
class LogicalBatch:
    """The runner's Batch (size, events, dead, ages_s, read_at, dead_letter mean what
    runner.Batch says). Here a position is the decoder's serial number of the change,
    and an age is measured from the transaction's commit time; the rest is this
    capture's own bookkeeping."""

    size: int
    events: list[ChangeEvent]
    dead: dict[int, str] = field(default_factory=dict)
    ages_s: list[float] = field(default_factory=list)
    read_at: float = 0.0
    undecodable: dict[int, ChangeEvent] = field(default_factory=dict)  # what is known of them
    # (first position, xid, commit LSN, commit time: microseconds since 2000-01-01 by
    # the server's clock) of each transaction the batch holds events of.
    transactions: list[tuple[int, int, int, int]] = field(default_factory=list)
    clock_offset_s: float = 0.0  # the server's clock minus ours (for origins())
    # When every transaction of the batch was certainly visible to readers (runner.Batch)
    visible_at: float | None = None
    ack_lsn: int = 0  # confirmed once the batch is acknowledged
    event_commit: int = 0  # end of the last transaction with events that the batch ends
    resync: bool = False  # the sweep owed after missed changes
    # Keys already rendered (a streamed transaction's, computed before its commit, and
    # those of `packs`): deleted with those of `events` (runner.Premapped).
    premapped: Routed = field(default_factory=dict)
    history: list[str] = field(default_factory=list)  # their history_v1 texts, if kept
    # Changes of large transactions gathered column-wise (GATHER_AFTER), mapped into
    # `premapped`: counted in `size`, not in `events`.
    packs: list[ColumnPack] = field(default_factory=list)
    held: Hold | None = None  # hold(): acknowledged once its sweep is done
    # A share of a streamed transaction before its last: its acknowledgement tells the
    # slot nothing, so its deletes may be confirmed with a later share's (runner.Pipelined).
    confirm_later: bool = False

    def dead_letter(self, position: int, error: str) -> None:
        self.dead[position] = error

    def hold(self) -> Hold:
        if self.held is None:
            self.held = Hold()
        return self.held

    @property
    def oldest_s(self) -> float | None:
        """From the oldest Begin: a transaction streamed in pieces counts before its
        commit is read (its Begin carries the commit time)."""
        if not self.transactions:
            return None
        oldest = min(t[3] for t in self.transactions)
        read_wall = time.time() - (time.monotonic() - self.read_at) + self.clock_offset_s
        return max(0.0, read_wall - PG_EPOCH - oldest / 1e6)

    def all_events(self) -> list[ChangeEvent]:
        """Every change of the batch as an event, those of its packs too (as the Decoder
        would have made them), in position order: what `tail` shows. Built only when
        asked."""
        if not self.packs:
            return self.events
        every = self.events + [e for p in self.packs for e in p.events()]
        every.sort(key=_POSITION)
        return every

    def origins(self) -> list[Origin]:
        """Each event's transaction, in the order of all_events(): its xid, commit LSN
        and commit time (on our clock)."""
        starts = [t[0] for t in self.transactions]
        out = []
        for event in self.all_events():
            i = bisect.bisect_right(starts, event.position) - 1
            if i < 0:  # a sweep (resync) belongs to no transaction
                out.append(Origin(None, ""))
                continue
            _, xid, lsn, commit_time = self.transactions[i]
            out.append(
                Origin(
                    PG_EPOCH + commit_time / 1e6 - self.clock_offset_s,
                    f"xid {xid}, commit LSN {format_lsn(lsn)}",
                )
            )
        return out


@dataclass(frozen=True, slots=True)
class LogicalConfig:
    slot: str
    publication: str
    # The columns each configured table's templates use.
    columns: Mapping[TableName, Sequence[str]]
    # The column filters of the tables that have one: their UPDATEs are judged.
    filters: Mapping[TableName, ColumnFilter] = field(default_factory=dict)
    status_interval_s: float = 1.0
    heartbeat_s: float = 0.0  # 0: off
    history_s: float = 0.0  # how long what was invalidated is kept for replay (0: not kept)
    prune_every_s: float = 1.0
    # The templates: with it, large transactions are streamed before their commit
    # (protocol 2, `streaming 'on'`) and their keys computed as they come; without it
    # (units), protocol 1: a transaction is sent only once committed.
    mapper: Mapper | None = None
    # The lookup `mapper` was given for tables the configuration lacks (listener.py):
    # Relations decodes such a table's template columns from the same answer.
    retired: RetiredLookup | None = None
    spill_bytes: int = SPILL_BYTES
    # The mapping's fingerprint (Settings.mapping_fingerprint): a later install's stops
    # this listener, at connect and at each save. None: never asked.
    mapping: MappingStamp | None = None
    # A sweep of every watched table when the server came up from a crash since the run
    # recorded for the slot (capture/lineage.py).
    sweep_after_crash: CrashSetting = "always"


@dataclass(slots=True)
class _Delivery:
    """A committed streamed transaction being handed out."""

    txn: StreamedTxn
    commit: StreamCommit
    chunks: Prefetch
    # When it was certainly visible to readers (time.monotonic()), if a snapshot saw it
    # complete (while it was open, or at its Stream Commit): the runner's second deletes
    # are owed only for the shares handed out less than second_delete_ms after then.
    visible_at: float | None = None
    history_started: bool = False


# 2000-01-01 00:00:00 UTC, PostgreSQL's epoch, in Unix time.
PG_EPOCH = 946_684_800.0


def _clock_and_complete(visibility: Visibility) -> tuple[float, Complete | None]:
    """The server's clock minus ours, to within half a round trip; and what the server
    saw complete."""
    before = time.time()
    got = visibility.now()
    after = time.time()
    if got is None:
        return 0.0, None
    return got[0] - (before + after) / 2, got[1]


class LogicalStream:
    """The runner's source in logical mode: batches of decoded events off the stream."""

    def __init__(
        self,
        stream: WalStream,
        side: psycopg.Connection[Any],
        config: LogicalConfig,
        *,
        acked: int,
        resync: str | None,
    ) -> None:
        self._stream = stream
        self._side = side
        self._history = HistoryWriter(side)
        self._config = config
        # The templates earlier mappings gave tables this one renders otherwise
        # (logical_eras.py): their columns are decoded too.
        self._eras = LogicalEras(side, config.mapping, asked=config.mapper is not None)
        relations = self._relations = Relations(
            side, config.columns, config.filters, config.retired, self._eras.columns(config.columns)
        )
        self._decoder = Decoder(
            relations.resolve,
            relations.old_values_not_sent,
            relations.unrenderable,
            base_types=relations.bases,
        )
        self._resync = resync
        # The resync batch read past, its sweep still running: owed until released.
        self._resync_held: tuple[Hold, int, str | None] | None = None
        # Batches read past whose sweeps are not done: the slot is told nothing past the
        # first (the position confirmed before it).
        self._holds: Holds[int] = Holds()
        # Those batches' history_v1 texts, and when they were handed back: written again
        # once the sweep is done, if it took SWEPT_HISTORY_AGAIN_S or longer.
        self._swept_history: list[tuple[Hold, list[str], float]] = []
        self._pending: LogicalBatch | None = None
        # Streamed transactions: those in progress by xid, the one whose block is being
        # read, the changes of its chunk not mapped yet, and one committed, being handed out.
        self._open: dict[int, StreamedTxn] = {}
        self._block: StreamedTxn | None = None
        self._block_start = 0  # the WAL position of its first change (_add_streamed_eras)
        self._chunk: list[ChangeEvent] = []
        self._chunk_packs = Collector(self._decoder, STREAM_CHUNK)  # the chunk's, column-wise
        # A large transaction's changes sent once committed, column-wise (GATHER_AFTER);
        # drained at its commit and at a batch's end. (Without a mapper, units: never.)
        self._txn_packs = Collector(self._decoder, _UNLIMITED, streamed=False)
        self._chunk_dead: list[Dead] = []
        self._delivery: _Delivery | None = None
        self._seen_at = 0.0  # when a snapshot was last taken for the open ones
        # (xid, commit LSN, commit time) of an open one
        self._in_txn: tuple[int, int, int] | None = None
        self._read_upto = acked  # everything before it has been read into batches
        self._received = acked  # the furthest position the server reported
        self._confirmed = acked  # Redis confirmed every transaction before it
        self._persisted = acked  # saved in slot_state_v1: the slot is never told more
        self._told = 0  # the slot was last told this (0: nothing yet, by this stream)
        self._event_commit = acked  # the end of the last acknowledged transaction with events
        self._txn_events = 0  # events (and dead letters) of the open transaction so far
        self._unsaved_events = 0  # counted in slot_state_v1
        self._more = False  # the last read stopped at its limit: more is buffered
        self._reply_due = False
        self._status_at = time.monotonic()
        self._heartbeat_at = time.monotonic()
        self._pruned_at = time.monotonic()
        # The server's clock minus ours: commit times are the server's. And what was
        # complete when the stream started: a backlog's transactions, visible to readers
        # before then (second deletes need no more than that).
        self._visibility = Visibility(side, stream.application_name)
        self._clock_offset_s, self._complete = _clock_and_complete(self._visibility)
        self._gate_read_at = time.monotonic()  # when synchronous_standby_names was read

    # --- the runner's Source protocol ---------------------------------------------------

    @contextmanager
    def batch(self, limit: int) -> Iterator[LogicalBatch]:
        """Up to `limit` events. A clean exit acknowledges them; an exception keeps them
        to be handed out again (the stream cannot be read twice)."""
        if self._pending is None:
            if self._resync:
                self._pending = self._resync_batch()
            elif self._delivery is not None:
                self._pending = self._deliver(limit)
            else:
                self._pending = self._read(limit)
        batch = self._pending
        if not self._visible(batch):
            # Its commits wait for a synchronous standby: nothing is deleted (nor
            # acknowledged) before they are visible (capture/visibility.py).
            yield self._waiting(batch)
            return
        yield batch
        self._acknowledged(batch)

    def _acknowledged(self, batch: LogicalBatch) -> None:
        """Redis confirmed every delete of the batch: what that makes owed."""
        self._pending = None
        if batch.dead:
            self._save_dead(batch)
        history = batch.history  # (the writer gathers them into one INSERT)
        if batch.events and self._config.history_s:
            history = [encode_history(batch.events, batch.transactions), *history]
        for text in history:
            self._history.write(text)
        if batch.held is not None:
            self._holds.add(batch.held, self._confirmed)
        if batch.held is not None and history:
            # Its history again once its sweep is done, if that took a while: a replay
            # takes the rows written in its window, and a sweep that failed for longer
            # than that (SCAN refused, a resharding) deletes after the history written
            # now has aged out. (Now too: its keys are deleted, and a replay before the
            # sweep is done must find them.)
            self._swept_history.append((batch.held, history, time.monotonic()))
        if batch.resync:
            if batch.held is not None:
                self._resync_held = (batch.held, len(batch.events), self._resync)
            else:
                self._resync_swept(len(batch.events), self._resync)
            self._resync = None
        self._confirmed = max(self._confirmed, batch.ack_lsn)
        self._event_commit = max(self._event_commit, batch.event_commit)
        self._unsaved_events += batch.size
        for relid in self._relations.forget_passed(self._read_upto):
            self._decoder.forget(relid)

    def wait(self, timeout_s: float, wakeup_fd: int | None = None) -> None:
        """Return when the stream has data, on a byte on `wakeup_fd` (shutdown) or after
        timeout_s; at once if the last read stopped at its limit (more is buffered), and
        at the latest when a status update or a heartbeat falls due. (The stream pushes
        whatever commits: there is nothing to switch on or off.)"""
        if self._more and self._visibility.recheck_at is None:
            return
        now = time.monotonic()
        timeout_s = min(timeout_s, self._status_at + self._config.status_interval_s - now)
        if self._config.heartbeat_s:
            timeout_s = min(timeout_s, self._heartbeat_at + self._config.heartbeat_s - now)
        if (recheck_at := self._visibility.recheck_at) is not None:
            # A batch waits for its commits to be visible: the stream is not read
            # meanwhile (what it has buffered would wake this at once).
            fds = [] if wakeup_fd is None else [wakeup_fd]
            select.select(fds, [], [], max(0.0, min(timeout_s, recheck_at - now)))
            return
        self._stream.wait(timeout_s, wakeup_fd)

    def settle(self) -> None:
        """Wait for the replay history queued (HistoryWriter); raise its failure."""
        self._write_swept_history()
        self._history.flush()

    def _write_swept_history(self) -> None:
        """Queue again the history of the batches whose sweeps are done (in any order: a
        replay reads by time, and the slot waits for the oldest sweep anyway)."""
        if not self._swept_history:
            return
        waiting = []
        now = time.monotonic()
        for hold, history, handed_back_at in self._swept_history:
            if not hold.released:
                waiting.append((hold, history, handed_back_at))
            elif now - handed_back_at >= SWEPT_HISTORY_AGAIN_S:
                for text in history:
                    self._history.write(text)
        self._swept_history = waiting

    def maintain(self) -> None:
        """Status update, heartbeat, history pruning, and while streamed transactions
        are open whether they ended, each if due: cheap when none is (clock reads).
        Called on every turn of the runner's loop, busy or idle."""
        self._resync_if_swept()
        self._status_if_due()
        self._heartbeat_if_due()
        self._prune_if_due()
        if self._open:
            self._see_complete_if_due()
        self._read_gate_if_due()
        if self._eras.ask_if_due():
            self._decoder.unjudged = frozenset()  # (set per transaction while eras are)

    def _resync_if_swept(self) -> None:
        if (held := self._resync_held) is not None and held[0].released:
            self._resync_swept(held[1], held[2])
            self._resync_held = None

    def _resync_swept(self, tables: int, reason: str | None) -> None:
        """The sweep owed after missed changes is done: no longer owed."""
        self._side.execute(
            Q.CLEAR_RESYNC.sql,
            {"slot": self._config.slot, "reason": reason, "walsender": self._stream.walsender},
        )
        log.warning("missed_changes_swept", tables=tables, reason=reason)

    def _prune_if_due(self) -> None:
        cfg = self._config
        if cfg.history_s and time.monotonic() >= self._pruned_at + cfg.prune_every_s:
            self._side.execute(Q.PRUNE_HISTORY.sql, {"seconds": cfg.history_s})
            self._pruned_at = time.monotonic()

    def close(self) -> None:
        """Confirm what is done if the connections still work, then close them."""
        with contextlib.suppress(psycopg.Error, OSError):
            try:
                # Raises if any history write failed: then nothing more is confirmed
                # (the batches acknowledged since have no history; the slot sends them
                # again). The writer is closed after the last confirmation, which may
                # queue the history of sweeps done meanwhile.
                self._history.flush()
                self._resync_if_swept()
                if self._confirmed > self._persisted:
                    self._status_if_due(force=True)
                self._await_slot()  # (that update, or the last one: it may be unread too)
            finally:
                self._history.close()
        self._stream.close()
        self._side.close()
        # Streamed transactions not committed yet: the slot sends them again from their
        # start to the next stream.
        for txn in self._open.values():
            txn.close()
        self._open.clear()
        if self._delivery is not None:
            self._delivery.chunks.close()
            self._delivery.txn.close()
            self._delivery = None

    def _await_slot(self) -> None:
        """Return once the slot is confirmed where the last status update sent says, or
        after CLOSE_CONFIRM_S. Closed at once, the stream's connection, with data we
        have not read, is reset; a walsender blocked on it, sending the rest of a
        backlog, then exits without reading that update (every time, measured): the
        slot would hold the WAL that update let go until the next listener confirms."""
        if not self._told:
            return
        params = {"slot": self._config.slot, "lsn": format_lsn(self._told)}
        deadline = time.monotonic() + CLOSE_CONFIRM_S
        pause = 0.001
        while not (row := self._side.execute(Q.SLOT_TOOK.sql, params).fetchone()) or not row[0]:
            if time.monotonic() >= deadline:
                log.info(
                    "slot_confirmation_unseen",
                    lsn=params["lsn"],
                    detail="the walsender had not read the last status update: the slot "
                    "holds that WAL until the next listener confirms (it resumes from the "
                    "position saved, which is past it)",
                )
                return
            time.sleep(pause)
            pause = min(2 * pause, 0.05)

    # --- reading ------------------------------------------------------------------------

    def _new_batch(self) -> LogicalBatch:
        """An empty batch read now, acknowledging up to what was read before it."""
        return LogicalBatch(
            size=0,
            events=[],
            ack_lsn=self._read_upto,
            read_at=time.monotonic(),
            clock_offset_s=self._clock_offset_s,
        )

    def _read(self, limit: int) -> LogicalBatch:  # noqa: PLR0912, PLR0915 - the hot loop, inlined
        batch = self._new_batch()
        events, transactions = batch.events, batch.transactions
        decoder = self._decoder
        decode = decoder.decode
        eras = self._eras
        with_eras = bool(eras)  # (eras change between batches only: maintain())
        if self._in_txn is not None:  # a transaction continued from the last batch
            transactions.append((decoder.position + 1, *self._in_txn))
        size = 0
        streamed = 0  # changes of streamed transactions, held until their commit
        txn_from = 0  # the batch's size when the open transaction began
        # The batch's size from which the open transaction's changes are gathered
        # column-wise (GATHER_AFTER): never between transactions.
        gather_from = self._gather_from(0)
        self._more = False
        read = self._stream.read
        gather = self._chunk_packs.take  # (C: the common streamed change, column-wise)
        gather_committed = self._txn_packs.take  # (C: the same, of a large transaction)
        while size + streamed < limit:
            msg = read() or self._rest_of_transaction()
            if msg is None:
                break
            if isinstance(msg, Keepalive):
                self._keepalive(msg, batch)
                continue
            if self._block is not None:
                streamed += 1 if gather(msg) else self._in_block(msg)
                continue
            if size >= gather_from and gather_committed(msg):
                size += 1
                continue
            try:
                out = decode(msg)
            except InvalidEvent as exc:
                self._invalid(exc, batch)
                size += 1
                continue
            if out is None:
                if msg[:1] == b"R":  # (the relation's columns may differ from here on)
                    self._txn_packs.close_open()
                continue
            cls = out.__class__
            if cls is ChangeEvent:
                # (a ChangeEvent, as just checked: no cast() call for every event)
                events.append(out)  # type: ignore[arg-type]
                size += 1
            elif cls is Begin:
                begin = cast(Begin, out)
                self._in_txn = (begin.xid, begin.final_lsn, begin.commit_time)
                if with_eras:
                    decoder.unjudged = eras.tables(eras.committed_in(begin.final_lsn))
                self._txn_events = 0
                txn_from = size
                gather_from = self._gather_from(size)
                transactions.append((decoder.position + 1, *self._in_txn))
            elif cls is Commit:
                self._map_gathered(batch)
                self._commit(cast(Commit, out), batch, self._txn_events + size - txn_from)
                gather_from = _UNLIMITED
            elif cls is list:
                changes = cast("list[ChangeEvent]", out)
                events.extend(changes)
                size += len(changes)
            elif self._stream_message(out):
                # A streamed transaction committed: its keys are handed out next, in
                # batches of their own, before anything after its commit is read.
                self._more = True
                break
        else:
            self._more = True
        if self._in_txn is not None:
            self._map_gathered(batch)  # (the rest of the transaction comes in later batches)
            self._txn_events += size - txn_from
        if with_eras and events:
            eras.add_committed(events, transactions, batch.premapped, decoder.unprintable)
        batch.size = size
        batch.visible_at = self._visible_at(transactions)
        return batch

    def _gather_from(self, size: int) -> int:
        """The batch's size from which the open transaction (if any), `size` changes into
        the batch when it began or the batch did, is gathered column-wise."""
        if self._in_txn is None or self._config.mapper is None:
            return _UNLIMITED
        return size + max(0, GATHER_AFTER - self._txn_events)

    def _map_gathered(self, batch: LogicalBatch) -> None:
        """The open transaction's changes gathered column-wise, mapped into the batch's
        keys, their history written as its (each item with the transaction)."""
        packs = self._txn_packs.drain()
        if not packs:
            return
        mapper = cast(Mapper, self._config.mapper)  # (set: _gather_from)
        if self._eras:
            self._add_era_packs(packs, batch.premapped)
        mapped, back = map_packs(mapper, packs, batch.premapped)
        if back:  # (the runner maps them, or dead-letters them, and their history is events')
            batch.events += back
            batch.events.sort(key=_POSITION)  # (origins() and the history go by position)
        batch.packs += mapped
        if mapped and self._config.history_s:
            batch.history.append(
                encode_history([], packs=mapped, transaction=cast(Transaction, self._in_txn))
            )

    def _add_era_packs(self, packs: list[ColumnPack], into: Routed) -> None:
        """The open transaction's changes gathered column-wise, committed under an
        earlier mapping, rendered with its templates too."""
        eras = self._eras
        for era in eras.committed_in(cast("tuple[int, int, int]", self._in_txn)[1]):
            eras.render(era, [], packs, into, self._decoder.unprintable)

    def _add_streamed_eras(
        self, events: list[ChangeEvent], packs: list[ColumnPack], into: Routed
    ) -> None:
        """A chunk of a streamed transaction rendered with the templates of the earlier
        mappings its block may have been captured under (LogicalEras.begun_before)."""
        eras = self._eras
        for era in eras.begun_before(self._block_start):
            eras.render(era, events, packs, into, self._decoder.unprintable)

    # --- streamed transactions ------------------------------------------------------------

    def _stream_message(self, out: object) -> bool:
        """Stream Start, Commit or Abort outside a block; True on a commit."""
        cls = out.__class__
        if cls is StreamStart:
            start = cast(StreamStart, out)
            txn = self._open.get(start.xid)
            if start.first or txn is None:
                if not start.first:
                    # Its first blocks went to another stream: the slot sends a
                    # transaction from its start to each new one, so this cannot be.
                    raise ProtocolError(
                        f"stream block of transaction {start.xid}, whose first block was not sent"
                    )
                if txn is not None:
                    txn.close()
                txn = self._open[start.xid] = StreamedTxn(
                    start.xid, self._decoder.position + 1, self._config.spill_bytes
                )
                log.debug("transaction_streaming", xid=start.xid)
            self._block = txn
            self._block_start = self._stream.block_start
            if eras := self._eras:
                self._decoder.unjudged = eras.tables(eras.begun_before(self._block_start))
            self._chunk_packs.subxid = start.xid
            return False
        if cls is StreamCommit:
            commit = cast(StreamCommit, out)
            txn = self._open.pop(commit.xid, None)
            if txn is None:
                raise ProtocolError(f"Stream Commit of transaction {commit.xid}, never streamed")
            visible_at = txn.seen_complete_at or self._seen_complete(commit.xid)
            self._delivery = _Delivery(txn, commit, Prefetch(txn.chunks()), visible_at)
            log.debug(
                "streamed_transaction_committed",
                xid=commit.xid,
                spilled_bytes=txn.spilled_bytes,
                seen_complete=visible_at is not None,
                seen_before=txn.seen_complete_at is not None,
            )
            return True
        if cls is StreamAbort:
            abort = cast(StreamAbort, out)
            txn = self._open.get(abort.xid)
            log.debug("streamed_transaction_rolled_back", xid=abort.xid, subxid=abort.subxid)
            if txn is not None and abort.subxid == abort.xid:
                del self._open[abort.xid]
                txn.close()
            elif txn is not None:
                txn.abort(abort.subxid)
            return False
        raise ProtocolError(f"{cls.__name__} message outside a stream block")

    def _seen_complete(self, xid: int) -> float | None:
        """When a snapshot saw the committed transaction `xid` complete: now, unless the
        server has not made it visible yet (None: the runner then goes by the first
        delete). Asked at Stream Commit when no snapshot saw it end while it was open
        (_see_complete_if_due): it spares the second deletes of most of its keys, its
        shares being handed out over seconds.

        Asked up to SEEN_COMPLETE_ASKS times: the committing backend leaves the proc
        array (becomes visible) just after flushing its commit record, which the stream
        may already have sent; a round trip or two is plenty for it to finish."""
        for _ in range(SEEN_COMPLETE_ASKS):
            complete = self._complete_now()
            if complete is None:
                return None
            if complete.has(xid):
                return complete.at
        return None

    def _complete_now(self) -> Complete | None:
        """What a snapshot taken now sees complete (one round trip on the side
        connection)."""
        return self._visibility.complete()

    def _visible(self, batch: LogicalBatch) -> bool:
        """Whether the batch may be handed out: its commits are visible, or are so soon
        after they are streamed that it need not be seen (no synchronous standby, or the
        batch's commits seen complete already). Seen now, its second deletes are timed
        from that snapshot."""
        gate = self._visibility
        unseen = bool(batch.size and batch.transactions and batch.visible_at is None)
        if unseen:
            self._read_gate_if_due()
        if unseen and gate.gated:
            visible_at = gate.seen([t[1] for t in batch.transactions])
            # (that look may have found the setting emptied: the batch goes out as it is)
            if visible_at is None and gate.gated:
                return False
            batch.visible_at = visible_at
        gate.settled()  # nothing waits: wait() waits for the stream again (a review: spun)
        return True

    def _read_gate_if_due(self) -> None:
        """synchronous_standby_names read again, if last read GATE_READ_EVERY_S ago."""
        if time.monotonic() >= self._gate_read_at + GATE_READ_EVERY_S:
            self._visibility.now()
            self._gate_read_at = time.monotonic()

    def _waiting(self, batch: LogicalBatch) -> LogicalBatch:
        """What the runner is handed while `batch` waits for its commits to be visible:
        nothing to delete or acknowledge, behind by as much as `batch` is."""
        waiting = self._new_batch()
        waiting.ack_lsn = self._confirmed
        waiting.read_at = batch.read_at
        waiting.transactions = batch.transactions
        waiting.clock_offset_s = batch.clock_offset_s
        waiting.ages_s = batch.ages_s or [batch.oldest_s or 0.0]
        return waiting

    def _see_complete_if_due(self) -> None:
        """Every SEE_COMPLETE_EVERY_S while streamed transactions are open: note when a
        snapshot first saw each complete. One that ended so is committed if its Stream
        Commit comes (else its Stream Abort does), and was visible to every reader by
        then: an upper bound of when, as _seen_complete() gives at Stream Commit."""
        now = time.monotonic()
        if now < self._seen_at + SEE_COMPLETE_EVERY_S:
            return
        unseen = [txn for txn in self._open.values() if txn.seen_complete_at is None]
        if not unseen:
            return
        self._seen_at = now
        if (complete := self._complete_now()) is None:
            return
        for txn in unseen:
            if complete.has(txn.xid):
                txn.seen_complete_at = complete.at
                log.debug("streamed_transaction_seen_complete", xid=txn.xid)

    def _in_block(self, msg: bytes) -> int:
        """A message inside a stream block: its change mapped into the open chunk (1),
        or the block's end (0)."""
        packs = self._chunk_packs
        if msg[:1] == b"R":
            packs.close_open()  # (the relation's columns may differ from here on)
        try:
            xid, out = self._decoder.decode_streamed(msg)
        except InvalidEvent as exc:
            xid = unwrap_streamed(msg)[0]  # (the message's framing parsed: it has one)
            self._decoder.position += 1
            event = exc.event if isinstance(exc, Undecodable) else None
            self._to_chunk(xid, None, Dead(self._decoder.position, str(exc), event))
            return 1
        if out is None:
            return 0
        cls = out.__class__
        if cls is ChangeEvent:
            if xid == self._chunk_packs.subxid and len(self._chunk) + packs.size < STREAM_CHUNK:
                self._chunk.append(out)  # type: ignore[arg-type] # (checked: a ChangeEvent)
            else:
                self._to_chunk(xid, cast(ChangeEvent, out))
            return 1
        if cls is list:
            for event in cast("list[ChangeEvent]", out):
                self._to_chunk(xid, event)
            return 1
        if cls is StreamStop:
            self._flush_chunk()
            self._block = None
            return 0
        raise ProtocolError(f"{cls.__name__} message inside a stream block")

    def _to_chunk(self, subxid: int, event: ChangeEvent | None, dead: Dead | None = None) -> None:
        full = len(self._chunk) + self._chunk_packs.size >= STREAM_CHUNK
        if subxid != self._chunk_packs.subxid or full:
            self._flush_chunk()
            self._chunk_packs.subxid = subxid
        if event is not None:
            self._chunk.append(event)
        if dead is not None:
            self._chunk_dead.append(dead)

    def _flush_chunk(self) -> None:
        """Map the open chunk's changes to their keys, held by their transaction."""
        events, dead = self._chunk, self._chunk_dead
        packs = self._chunk_packs.drain()  # (always: what it knew of the relations too)
        if (not events and not dead and not packs) or self._block is None:
            return
        self._chunk, self._chunk_dead = [], []
        mapper = cast(Mapper, self._config.mapper)  # set: streaming is on
        routed, failed = mapper.map_all(events)
        if self._eras:
            self._add_streamed_eras(events, packs, routed)
        changes = len(events) + len(dead) + sum(len(p) for p in packs)
        _, back = map_packs(mapper, packs, routed)
        if back:
            more, more_failed = mapper.map_all(back)
            merge(routed, more)
            failed += more_failed
        dead += [Dead(e.position, str(exc), e) for e, exc in failed]
        history = (
            encode_history(events, packs=packs)
            if self._config.history_s and (events or packs)
            else None
        )
        block = self._block
        failed_before = block.spill_error
        block.add(Chunk(self._chunk_packs.subxid, changes, pack(routed), dead, history))
        if block.spill_error is not None and failed_before is None:
            log.warning(
                "streamed_transaction_kept_in_memory",
                xid=block.xid,
                error=block.spill_error,
                detail="its keys could not be written to a temporary file (TMPDIR): the "
                "rest of the transaction is held in memory until its commit",
            )

    def _deliver(self, limit: int) -> LogicalBatch:
        """The next share of a committed streamed transaction's keys, `limit` changes'
        worth; the last one acknowledges its commit."""
        delivery = cast(_Delivery, self._delivery)
        txn, commit = delivery.txn, delivery.commit
        batch = self._new_batch()
        batch.transactions.append(
            (txn.first_position, txn.xid, commit.commit_lsn, commit.commit_time)
        )
        while batch.size < limit:
            got = delivery.chunks.next()
            if got is None:
                break
            chunk, routed = got
            batch.size += chunk.changes
            if batch.premapped:
                merge(batch.premapped, routed)
            else:
                batch.premapped = routed  # (its own: no copy)
            for dead in chunk.dead:
                batch.dead[dead.position] = dead.error
                if dead.event is not None:
                    batch.undecodable[dead.position] = dead.event
            if chunk.history is not None:
                text = chunk.history
                if not delivery.history_started:
                    # The transaction's first event carries its xid, commit LSN and time.
                    text = with_transaction(text, (txn.xid, commit.commit_lsn, commit.commit_time))
                    delivery.history_started = True
                batch.history.append(text)
        else:
            self._more = True
            batch.visible_at = self._visible_at(batch.transactions) or delivery.visible_at
            batch.confirm_later = True  # (the last share confirms them all, then acknowledges)
            return batch
        self._delivery = None
        delivery.chunks.close()
        txn.close()
        self._read_upto = batch.ack_lsn = batch.event_commit = commit.end_lsn
        self._received = max(self._received, commit.end_lsn)
        now = time.time() + self._clock_offset_s
        batch.ages_s.append(max(0.0, now - PG_EPOCH - commit.commit_time / 1e6))
        batch.visible_at = self._visible_at(batch.transactions) or delivery.visible_at
        self._more = True  # what follows the commit may be buffered already
        return batch

    def _visible_at(self, transactions: list[tuple[int, int, int, int]]) -> float | None:
        """When the batch's transactions were all visible: while the stream hands out
        the backlog complete when it started. (The stream is in commit order: once one
        was not complete then, none after it was.)"""
        complete = self._complete
        if complete is None:
            return None
        if all(complete.has(t[1]) for t in transactions):
            return complete.at
        self._complete = None
        return None

    def _rest_of_transaction(self) -> bytes | Keepalive | None:
        """The next message of a transaction the buffer ended in: the server sends a
        transaction whole once it committed, so the rest is on its way. Waited for a
        moment (TXN_REST_WAIT_S at most), so that a batch ends at a commit, which it can
        acknowledge, rather than wherever the socket's last read ended. None at once
        between transactions."""
        if self._in_txn is None:
            return None
        deadline = time.monotonic() + TXN_REST_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            if not self._stream.wait(left):
                return None
            if (msg := self._stream.read()) is not None:
                return msg
        return None

    def _commit(self, commit: Commit, batch: LogicalBatch, events: int) -> None:
        self._in_txn = None
        self._txn_events = 0
        self._read_upto = batch.ack_lsn = commit.end_lsn
        self._received = max(self._received, commit.end_lsn)
        if events:
            # Some of its events may have been handed out in earlier batches: the slot
            # is owed this position all the same.
            batch.event_commit = commit.end_lsn
            # commit_time: microseconds since 2000-01-01 by the server's clock.
            now = time.time() + self._clock_offset_s
            batch.ages_s.append(max(0.0, now - PG_EPOCH - commit.commit_time / 1e6))

    def _keepalive(self, msg: Keepalive, batch: LogicalBatch) -> None:
        self._received = max(self._received, msg.wal_end)
        if msg.reply:
            self._reply_due = True
        if self._in_txn is None and msg.wal_end > self._read_upto:
            # Between transactions: everything before wal_end has been sent.
            self._read_upto = batch.ack_lsn = msg.wal_end

    def _invalid(self, exc: InvalidEvent, batch: LogicalBatch) -> None:
        """A change that cannot become keys: a dead letter, counted as an event."""
        decoder = self._decoder
        decoder.position += 1
        batch.dead[decoder.position] = str(exc)
        if isinstance(exc, Undecodable):
            batch.undecodable[decoder.position] = exc.event

    def _resync_batch(self) -> LogicalBatch:
        """Every watched table as truncated: the mapper sweeps each template as a glob.
        Each event says why (StandInKind.RESYNC), for `tail`: no TRUNCATE ran."""
        why = {StandInKind.RESYNC.value: self._resync or "changes may have been missed"}
        tables = set(self._config.columns)
        mapper = self._config.mapper
        if mapper is not None:
            # And each table still published that the file no longer names (edited,
            # install not run yet): its changes are rendered with the templates of the
            # last install that named it, and those the slot lost are swept with them.
            for _relid, schema, name, *_ in self._side.execute(Q.PUBLISHED_TABLES.sql):
                table = TableName(schema, name)
                if table not in tables and mapper.renders(table):
                    tables.add(table)
            # And each table an installed mapping named that neither does: one an
            # install stopped watching, whose changes committed before it may have been
            # lost with the slot too (before, its keys stayed cached).
            if may_call(self._side, "cdc_invalidator.retired_tables_v1()"):
                for (qualified,) in self._side.execute(Q.RETIRED_TABLES_LIST.sql).fetchall():
                    table = TableName.parse(qualified)
                    if table not in tables and mapper.renders(table):
                        tables.add(table)
        events = [
            ChangeEvent(table, Op.TRUNCATE, None, why, -(i + 1))
            for i, table in enumerate(sorted(tables))
        ]
        return LogicalBatch(len(events), events, ack_lsn=self._read_upto, resync=True)

    # --- acknowledging ------------------------------------------------------------------

    def _status_if_due(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (
            force or self._reply_due or now >= self._status_at + self._config.status_interval_s
        ):
            return
        target = self._confirmed
        if (held := self._holds.limit()) is not None:
            target = min(target, held)  # never past a batch whose sweep is not done
        if target > self._persisted and (
            force or self._event_commit > self._persisted or target - self._persisted >= CHASE_BYTES
        ):
            # Never past a batch whose history is not written yet: the swept batches'
            # (again) queued after the limit was read (every sweep done by then is done
            # now), then all of it is written.
            self._write_swept_history()
            self._history.flush()
            saved = self._side.execute(
                Q.SAVE_ACK.sql,
                {
                    "slot": self._config.slot,
                    "lsn": format_lsn(target),
                    "events": self._unsaved_events,
                    "walsender": self._stream.walsender,
                    **(self._config.mapping.params() if self._config.mapping else NO_STAMP),
                },
            ).fetchone()
            if saved is None and self._config.mapping is not None:
                # (or the slot is no longer our walsender's: the stream ends anyway)
                require_current_mapping(self._side, self._config.mapping)
            self._persisted = target
            self._unsaved_events = 0
        self._stream.send_status(self._received, self._persisted)
        self._told = self._persisted
        if self._reply_due and self._persisted < self._received:
            # The server is waiting for an answer, and on shutdown it waits until the
            # client has everything it sent: say that we received it all without moving
            # the slot past what is saved (flush 0 is "unknown": the walsender then goes by
            # the write position). Otherwise a fast shutdown waits for us forever.
            self._stream.send_status(self._received, 0)
        self._status_at = now
        self._reply_due = False

    def _heartbeat_if_due(self) -> None:
        every = self._config.heartbeat_s
        if every and time.monotonic() >= self._heartbeat_at + every:
            # A WAL record in this database: the stream moves, and the slot with it, even
            # when nothing here is written while other databases are.
            self._side.execute(Q.HEARTBEAT.sql)
            self._heartbeat_at = time.monotonic()

    def _save_dead(self, batch: LogicalBatch) -> None:
        by_position = {e.position: e for e in batch.events if e.position in batch.dead}
        starts = [t[0] for t in batch.transactions]
        rows = []
        for position, error in batch.dead.items():
            i = bisect.bisect_right(starts, position) - 1
            where = (
                f" (transaction {batch.transactions[i][1]}, commit LSN "
                f"{format_lsn(batch.transactions[i][2])})"
                if i >= 0
                else ""
            )
            event = by_position.get(position) or batch.undecodable.get(position)
            rows.append(
                {
                    "schema": event.table.schema if event else None,
                    "table": event.table.name if event else None,
                    "op": event.op.value if event else None,
                    # Only key columns were decoded: never whole rows (an unknown
                    # relation has none decoded, and stores its name and op only).
                    "old": json.dumps(event.old) if event and event.old else None,
                    "new": json.dumps(event.new) if event and event.new else None,
                    "error": error + where,
                }
            )
        self._side.cursor().executemany(Q.LOGICAL_DEAD_LETTER.sql, rows)
