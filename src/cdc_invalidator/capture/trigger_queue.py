"""Trigger-queue capture: consume cdc_invalidator.queue_v1, woken by NOTIFY.

One autocommit connection LISTENs and runs each batch in its own transaction. A batch
deletes its rows up front (DELETE ... RETURNING) and commits only when the runner has
had Redis confirm the deletes; any exception rolls back and the rows come back.
"""

from __future__ import annotations

import json
import select
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from cdc_invalidator import sqlfiles
from cdc_invalidator.capture.trigger_sql import CHANNEL, SCHEMA_VERSION, installed_version
from cdc_invalidator.events import ChangeEvent, InvalidEvent, Op, Row, TableName


class NotInstalled(Exception):
    """Our SQL is missing or from another version: the DBA must run `install`."""


# id, enqueued_at, schema_name, table_name, op, old_row and new_row as jsonb text
QueueRow = tuple[int, datetime, str, str, str, str | None, str | None]


@dataclass(slots=True)
class QueueBatch:
    # How many queue rows the batch took: its events plus those that failed to decode.
    size: int
    events: list[ChangeEvent]
    # Events that failed to decode or map, by queue id, with the reason.
    dead: dict[int, str] = field(default_factory=dict)

    def dead_letter(self, position: int, error: str) -> None:
        self.dead[position] = error


class TriggerQueue:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    @classmethod
    def connect(
        cls, database_url: str, *, application_name: str, connect_timeout_s: float
    ) -> TriggerQueue:
        conn = psycopg.connect(
            database_url,
            autocommit=True,
            application_name=application_name,
            connect_timeout=max(1, round(connect_timeout_s)),
        )
        try:
            _prepare(conn)
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    @property
    def connection(self) -> psycopg.Connection[Any]:
        return self._conn

    @contextmanager
    def batch(self, limit: int) -> Iterator[QueueBatch]:
        """Take up to `limit` events; commit on clean exit, roll back on exception."""
        with self._conn.transaction():
            cur = self._conn.cursor(row_factory=tuple_row)
            rows: list[QueueRow] = cur.execute(
                sqlfiles.query("fetch_batch.sql"), {"limit": limit}
            ).fetchall()
            batch = QueueBatch(size=len(rows), events=[])
            for row in rows:
                try:
                    batch.events.append(decode(row))
                except InvalidEvent as exc:
                    batch.dead[row[0]] = str(exc)
            yield batch
            if batch.dead:
                raw = {row[0]: row for row in rows}
                cur.executemany(
                    sqlfiles.query("dead_letter.sql"),
                    [_dead_letter_params(raw[pos], err) for pos, err in batch.dead.items()],
                )

    def wait(self, timeout_s: float, wakeup_fd: int | None = None) -> None:
        """Return on a NOTIFY, a byte on `wakeup_fd` (shutdown) or after timeout_s."""
        # Notifications that arrived with the last batch's results are buffered by
        # psycopg, not left on the socket: look there first.
        if any(True for _ in self._conn.notifies(timeout=0)):
            return
        fds = [self._conn.fileno()] if wakeup_fd is None else [self._conn.fileno(), wakeup_fd]
        readable, _, _ = select.select(fds, [], [], timeout_s)
        if self._conn.fileno() in readable:
            # Read them off the socket (raises OperationalError if the server is gone).
            for _ in self._conn.notifies(timeout=0):
                pass

    def close(self) -> None:
        self._conn.close()


def _prepare(conn: psycopg.Connection[Any]) -> None:
    version = installed_version(conn)
    if version != SCHEMA_VERSION:
        found = "no cdc_invalidator schema" if version is None else f"schema v{version}"
        raise NotInstalled(
            f"database {conn.info.dbname!r} has {found}; this listener needs "
            f"v{SCHEMA_VERSION}: run `cdc-invalidator install`"
        )
    # Losing our own commit in a server crash only re-delivers events (their keys are
    # deleted twice), so the listener does not wait for WAL fsync and takes no fsync
    # bandwidth from the writers.
    conn.execute("SET synchronous_commit = off")
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))


def decode(row: QueueRow) -> ChangeEvent:
    """A queue row as a ChangeEvent; InvalidEvent if a hand-written row is malformed."""
    position, _enqueued_at, schema_name, table_name, op, old_row, new_row = row
    try:
        kind = Op(op)
    except ValueError:
        raise InvalidEvent(f"unknown operation {op!r}") from None
    return ChangeEvent(
        table=TableName(schema_name, table_name),
        op=kind,
        old=_row(old_row, "old_row"),
        new=_row(new_row, "new_row"),
        position=position,
    )


def _row(text: str | None, name: str) -> Row | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        # e.g. a number too long for Python's int conversion limit
        raise InvalidEvent(f"{name} cannot be parsed: {exc}") from None
    if not isinstance(value, Mapping):
        raise InvalidEvent(f"{name} is {type(value).__name__}, expected a JSON object")
    return value


def _dead_letter_params(row: QueueRow, error: str) -> dict[str, object]:
    position, enqueued_at, schema_name, table_name, op, old_row, new_row = row
    return {
        "id": position,
        "enqueued_at": enqueued_at,
        "schema_name": schema_name,
        "table_name": table_name,
        "op": op,
        # The text as it was queued, not a re-encoding of what Python made of it.
        "old_row": old_row,
        "new_row": new_row,
        "error": error,
    }
