"""`cdc-invalidator explain KEY`: why is this key stale?

Three answers, from the key alone:
- which configured tables and templates can produce it, and from which column values
  (mapping/invert.py);
- which recent changes invalidated it: the replay history (trigger mode: the queue's
  rows, kept for replay_history once processed; logical mode: history_v1), each
  event's old and new rows rendered through the candidate tables' templates as the
  listener renders them, and compared with the key;
- whether Redis holds it now, and for how long (sink/lookup.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from cdc_invalidator.capture.rows import RowDecoder, Transaction, queue_id
from cdc_invalidator.capture.walstream import format_lsn
from cdc_invalidator.events import ChangeEvent, Op, Row, TableName
from cdc_invalidator.mapping import KeyTemplate, Mapper
from cdc_invalidator.mapping.invert import Match, matches
from cdc_invalidator.mapping.templates import RenderError
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.sink.lookup import KeyState

# The most recent matching changes shown (the others are counted).
SHOWN = 20
CHUNK = 20_000
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_OPS = {Op.INSERT: "INSERT", Op.UPDATE: "UPDATE", Op.DELETE: "DELETE", Op.TRUNCATE: "TRUNCATE"}


@dataclass(frozen=True, slots=True)
class Candidate:
    table: TableName
    match: Match
    db: int | None  # the table's redis_db (None: redis_url's)


def candidates(mapper: Mapper, dbs: Mapping[TableName, int | None], key: str) -> list[Candidate]:
    """Every (table, template, split) that can produce `key`."""
    return [
        Candidate(table, m, dbs.get(table))
        for table, templates in sorted(mapper.tables.items())
        for template in templates
        for m in matches(template, key)
    ]


@dataclass(frozen=True, slots=True)
class Found:
    """A change that invalidated the key."""

    table: TableName
    op: Op
    side: str  # "old row", "new row", "old and new rows", or "swept" (TRUNCATE)
    row: Row | None
    committed: datetime | None
    committed_is: str  # what `committed` is: "committed", or "transaction began"
    deleted: str  # when its keys were deleted, in words
    transaction: str


@dataclass(slots=True)
class Reach:
    oldest: datetime | None
    rows: int  # queue rows, or history batches
    last_processed: datetime | None
    track_commit_timestamp: bool
    now: datetime


@dataclass(slots=True)
class History:
    found: list[Found] = field(default_factory=list)
    matched: int = 0  # all matches (found holds the last SHOWN)
    skipped: int = 0  # rows that are no events


def invalidated_by(
    event: ChangeEvent, templates: tuple[KeyTemplate, ...], key: str
) -> tuple[str, Row | None] | None:
    """Whether `event` deleted `key`, through which row (as the listener renders)."""
    if event.op is Op.TRUNCATE:
        return ("swept", None) if any(t.sweeps(key) for t in templates) else None
    sides = []
    if event.op is not Op.INSERT and _renders(templates, event.old, key):
        sides.append(("old row", event.old))
    if event.op is not Op.DELETE and _renders(templates, event.new, key):
        sides.append(("new row", event.new))
    if not sides:
        return None
    if len(sides) == 2:  # noqa: PLR2004 - old and new
        return ("old and new rows", sides[0][1])
    return sides[0]


def _renders(templates: tuple[KeyTemplate, ...], row: Row | None, key: str) -> bool:
    if row is None:
        return False
    for template in templates:
        try:
            if template.render(row) == key:
                return True
        except RenderError:
            continue
    return False


def read_trigger(
    conn: psycopg.Connection[Any], mapper: Mapper, tables: list[TableName], key: str
) -> tuple[History, Reach]:
    reach = _reach(conn, Q.EXPLAIN_REACH_TRIGGER)
    history = History()
    decoder = RowDecoder()
    params = {"schemas": [t.schema for t in tables], "tables": [t.name for t in tables]}
    # A pack is up to a thousand events: fewer rows per fetch than the history's.
    for rows in _chunks(conn, Q.EXPLAIN_TRIGGER, params, CHUNK // 20):
        # Columns 0 to 5 as the listener reads them, 6 to 9 what explain shows, 10: rows.
        decoded = decoder.queue_rows(rows, count_at=10)
        history.skipped += len(decoded.dead)
        extra = {row[0]: row[6:10] for row in rows}
        for event in decoded.events:
            hit = invalidated_by(event, mapper.tables.get(event.table, ()), key)
            if hit is None:
                continue
            xid, began, committed, processed = extra[queue_id(event.position)]
            if processed:
                by = reach.last_processed
                deleted = "deleted: the listener's saved progress has passed it" + (
                    f" (saved {_when(by)}; trigger mode records no time per change)" if by else ""
                )
            else:
                deleted = "not deleted yet: the listener has not acknowledged it"
            _add(
                history,
                Found(
                    event.table,
                    event.op,
                    hit[0],
                    hit[1],
                    committed or began,
                    "committed" if committed else "transaction began",
                    deleted,
                    f"xid {xid}",
                ),
            )
    return history, reach


def read_logical(
    conn: psycopg.Connection[Any], mapper: Mapper, tables: list[TableName], key: str
) -> tuple[History, Reach]:
    reach = _reach(conn, Q.EXPLAIN_REACH_LOGICAL)
    history = History()
    decoder = RowDecoder()
    wanted = set(tables)
    for rows in _chunks(conn, Q.EXPLAIN_LOGICAL, {}):
        for position, at, text in rows:
            transactions: list[Transaction | None] = []
            decoded = decoder.history_row(position, text, transactions)
            history.skipped += len(decoded.dead)
            for event, txn in zip(decoded.events, transactions, strict=True):
                if event.table not in wanted:
                    continue
                hit = invalidated_by(event, mapper.tables[event.table], key)
                if hit is None:
                    continue
                committed = None if txn is None else PG_EPOCH + timedelta(microseconds=txn[2])
                # `at` is when the batch's history was written, which gathers batches
                # (capture/history_writer.py): later than the deletes, by up to a second.
                lag = f" (at most {_ms(at - committed)} after the commit)" if committed else ""
                _add(
                    history,
                    Found(
                        event.table,
                        event.op,
                        hit[0],
                        hit[1],
                        committed,
                        "committed",
                        f"deleted by {_when(at)}{lag}",
                        "transaction not recorded (written by an older version)"
                        if txn is None
                        else f"xid {txn[0]}, commit LSN {format_lsn(txn[1])}",
                    ),
                )
    return history, reach


def _add(history: History, found: Found) -> None:
    history.matched += 1
    history.found.append(found)
    del history.found[:-SHOWN]


def _reach(conn: psycopg.Connection[Any], query: Q) -> Reach:
    row = conn.execute(query.sql).fetchone()
    assert row is not None  # noqa: S101 - an aggregate always returns its row
    oldest, count, last, track, now = row
    return Reach(oldest, int(count), last, bool(track), now)


def _chunks(
    conn: psycopg.Connection[Any], query: Q, params: dict[str, Any], size: int = CHUNK
) -> Iterator[list[tuple[Any, ...]]]:
    """A server-side cursor: the history may hold millions of rows."""
    with conn.transaction(), conn.cursor(name="cdc_invalidator_explain") as cur:
        cur.execute(query.sql, params)
        while rows := cur.fetchmany(size):
            yield rows


# --- in words -------------------------------------------------------------------------


def _when(at: datetime | None) -> str:
    if at is None:
        return "at an unknown time"
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _ms(delta: timedelta) -> str:
    return f"{max(0.0, delta.total_seconds()) * 1000:.0f} ms"


def _age(reach: Reach, at: datetime) -> str:
    seconds = max(0, round((reach.now - at).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    parts += [f"{minutes}m"] if minutes or hours else []
    return "".join([*parts, f"{secs}s"]) + " ago"


def candidate_lines(key: str, found: list[Candidate]) -> list[str]:
    if not found:
        return [
            f"no configured template can produce {key!r}: it is not a key the listener "
            "invalidates (`keys TABLE COLUMN=VALUE` shows the keys a row maps to)"
        ]
    lines = [f"{key!r} can be produced by:"]
    for c in found:
        values = ", ".join(f"{f.column} = {f.meaning}" for f in c.match.fields) or "(no fields)"
        where = f" (redis_db {c.db})" if c.db is not None else ""
        lines.append(f"  {c.table}{where}: template {c.match.template.source!r} with {values}")
    return lines


def redis_line(state: KeyState | None, error: str | None, db: int | None) -> str:
    where = "" if db is None else f" (database {db})"
    if state is None:
        return f"in Redis now{where}: unknown ({error})"
    if not state.exists:
        return f"in Redis now{where}: no"
    ttl = "no expiry" if state.ttl_s is None else f"expires in {state.ttl_s:.0f} s"
    return f"in Redis now{where}: yes, {ttl}"


def history_lines(history: History, reach: Reach, mode: str, history_setting: str) -> list[str]:
    kept = (
        "trigger mode: the queue's rows, kept for replay_history once processed"
        if mode == "trigger"
        else "logical mode: history_v1, the acknowledged batches kept for replay_history"
    )
    if reach.oldest is None:
        span = f"the history is empty (replay_history = {history_setting})"
    else:
        unit = "queue rows" if mode == "trigger" else "rows"
        span = (
            f"the history reaches back to {_when(reach.oldest)} ({_age(reach, reach.oldest)}; "
            f"{reach.rows} {unit}; replay_history = {history_setting})"
        )
    lines: list[str] = []
    if not history.matched:
        lines.append(f"nothing in the history invalidated this key: {span}")
    else:
        lines.append(f"{history.matched} change(s) in the history invalidated it ({kept}); {span}:")
        if history.matched > len(history.found):
            lines.append(f"  ({history.matched - len(history.found)} earlier ones not shown)")
        for f in history.found:
            values = sorted((f.row or {}).items())
            row = "".join(f"{', ' if i else ' '}{k}={v!r}" for i, (k, v) in enumerate(values))
            lines.append(
                f"  {f.committed_is} {_when(f.committed)}: {_OPS[f.op]} of {f.table} "
                f"({f.side}{row}); {f.deleted}; {f.transaction}"
            )
    if mode == "trigger" and history.matched and not reach.track_commit_timestamp:
        lines.append(
            "  (commit times are not recorded: track_commit_timestamp is off, so the start "
            "of the writer's transaction is shown)"
        )
    if history.skipped:
        lines.append(f"  ({history.skipped} history rows could not be decoded and were skipped)")
    return lines
