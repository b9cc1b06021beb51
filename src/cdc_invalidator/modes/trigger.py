"""Trigger mode: statement triggers write cdc_invalidator.queue_v1, NOTIFY wakes the
listener (capture/trigger_queue.py, capture/trigger_sql.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg
from psycopg import sql

from cdc_invalidator import checks
from cdc_invalidator.capture import logical_sql, trigger_sql
from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.capture.rows import Decoded, MapPack, RowDecoder, by_events
from cdc_invalidator.capture.trigger_queue import Renames, TriggerCapture
from cdc_invalidator.checks import Report
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping.mapper import Era, RetiredLookup
from cdc_invalidator.metrics import Figures
from cdc_invalidator.modes.base import (
    HISTORY_CHUNK,
    eras_of,
    history_rows,
    mapping_stamp,
    seconds_ago,
)
from cdc_invalidator.pg import raw_text
from cdc_invalidator.pg.connect import PgConnector
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.runner import Source
from cdc_invalidator.settings import Settings
from cdc_invalidator.status import Status, read_status


class TriggerMode:
    name = "trigger"
    history_table = "queue_v1"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @property
    def installs(self) -> str:
        tables = ", ".join(sorted(str(t) for t in self._settings.mapper().tables))
        return f"Installed our SQL (schema cdc_invalidator, triggers on {tables})."

    @property
    def delivery(self) -> str:
        return (
            "NOTIFY wakes the quiet listener at once (it would otherwise poll every "
            f"{self._settings.poll_interval_ms} ms); busy, it reads on its own."
        )

    def install_script(self) -> sql.Composed:
        # With the publication: logical mode's objects go (a switch from logical mode).
        s = self._settings
        script = trigger_sql.install_script(
            s.mapper(),
            s.publication_name,
            s.column_filters(),
            notify_payload=s.notify_payload,
            bulk_sweep_rows=s.bulk_sweep_rows,
        )
        return script + trigger_sql.record_mapping(s.mapping_fingerprint(), s.mapping_record())

    def finish_install(self, conn: psycopg.Connection[Any]) -> str:
        """Slots left from logical mode are dropped (an abandoned slot keeps WAL forever),
        after a sweep of every watched table for what they, or a slot of ours gone or
        never made, did not hand out."""
        # First, right after the commit that replaced the capture functions: where this
        # mapping's queue ids begin (a row queued below it is rendered with the earlier
        # mapping's templates too, where they differ: mapping_eras_v1()).
        conn.execute(
            Q.RECORD_BOUNDARY.sql,
            {"fingerprint": self._settings.mapping_fingerprint(), "capture": "trigger"},
        )
        tables = ", ".join(sorted(str(t) for t in self._settings.mapper().tables))
        done = f"installed cdc_invalidator v{trigger_sql.SCHEMA_VERSION}; watching {tables}"
        slot = self._settings.slot_name
        registered = logical_sql.has_slot_state(conn)  # (logical capture was installed)
        ours = logical_sql.our_slot(conn, slot)
        leftovers = logical_sql.leftover_slots(conn, slot) if registered else []
        # What a slot of logical capture had not handed out, or what was written while
        # it was missing, is captured nowhere: swept, before any drop. The triggers are
        # in place.
        swept = logical_sql.sweep_before_drops(
            conn,
            Q.SWEEP_ALL_TRIGGER,
            leftovers,
            logical_sql.unswept(conn, None) if registered else [],
            dropping=ours,
        )
        if swept:
            # (after the sweep is queued: a restore's mark, which logical mode left as the
            # dump did, needs no second sweep)
            conn.execute(Q.RECORD_STATE_TABLE.sql)
        done += swept
        if ours:
            try:
                logical_sql.drop_slot(conn, slot)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise Fatal(
                    f"replication slot {slot!r} left from logical capture could not be dropped "
                    f"({exc.diag.message_primary}): what it held is swept, but it keeps WAL "
                    "until a role with REPLICATION drops it: "
                    f"{logical_sql.drop_by_hand(slot)}"
                ) from None
            done += f"; dropped replication slot {slot!r} left from logical capture"
        said, dropped = logical_sql.drop_swept_leftovers(conn, slot, leftovers)
        if registered:
            logical_sql.forget_swept(conn, [slot, *dropped] if ours else dropped)
        return done + said

    def uninstall_script(self) -> sql.Composed:
        return trigger_sql.uninstall_script(self._settings.publication_name)

    def source(self, retired: RetiredLookup | None) -> Callable[[], Source]:
        """`retired` is not used: the queue's mapper only maps packs of configured tables
        column-wise (Mapper.map_pack); a retired table's changes go to the runner's."""
        s = self._settings
        return TriggerCapture(
            PgConnector.from_settings(s),
            prune_every_s=s.prune_every_ms / 1000,
            history_s=s.history_s,
            mapper=s.mapper(),
            mapping=mapping_stamp(s),
            payloads=s.notify_payload,
            sweep_after_failover=s.sweep_after_failover,
            sweep_after_crash=s.sweep_after_crash,
        ).connect

    def status(self, conn: psycopg.Connection[Any]) -> Status:
        return read_status(conn)

    def figures(self, conn: psycopg.Connection[Any]) -> Figures:
        t = read_status(conn)
        return [
            ("dead_letters_stored", "Rows in dead_letter_v1", float(t.dead_letters)),
            ("backlog_events", "Queued changes not acknowledged yet", float(t.backlog)),
            (
                "oldest_pending_seconds",
                "Age of the oldest change not acknowledged yet",
                float(t.oldest_pending_age_s or 0.0),
            ),
            (
                "notify_queue_usage",
                "pg_notification_queue_usage(): 1.0 blocks commits",
                float(t.notify_queue_usage),
            ),
        ]

    def check_table(
        self, conn: psycopg.Connection[Any], report: Report, facts: checks.TableFacts
    ) -> None:
        where, table = facts.where, facts.table
        # Drift first: a renamed table or key column explains a missing one.
        watch = checks.watch_of(conn, table)
        if watch is not None and checks.report_drift(report, where, table, watch):
            return
        if facts.present():
            stand_in = watch is None and checks.stand_in_of(conn, table)
            checks.check_triggers(report, where, table, watch, facts.wanted, stand_in=stand_in)
            column_filter = self._settings.column_filters().get(table)
            checks.check_trigger_filter(report, where, table, watch, column_filter)
            payload = self._settings.notify_payload
            checks.check_notify_payload(report, where, table, watch, payload)
            bulk = self._settings.bulk_sweep_rows
            checks.check_bulk_sweep_rows(report, where, table, watch, bulk)

    def check_server(self, conn: psycopg.Connection[Any], report: Report, config_name: str) -> None:
        checks.check_unconfigured(conn, report, self._settings.mapper(), config_name)
        checks.check_subscribed(conn, report, self._settings.mapper().tables)
        checks.check_two_phase(conn, report)
        checks.check_wake_locks(conn, report)
        checks.check_lineage(conn, report, sweep=self._settings.sweep_after_failover)
        checks.check_all_tables(conn, report)
        if logical_sql.has_slot_state(conn):  # slots left from logical capture
            checks.check_leftover_slots(conn, None, report)
        checks.check_rebuild_guard(conn, report, self._settings.mapper().tables)

    def history(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]:
        """The queue rows whose keys were deleted in the window, or not yet (processed
        rows are kept for replay_history; sql/history_trigger.sql says how they are
        found), decoded as the listener decodes them."""
        return _queue_history(conn, Q.HISTORY_TRIGGER, since_s, map_pack, self._tables())

    def acknowledged(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]:
        """history() less the rows not processed yet (sql/redo_trigger.sql)."""
        return _queue_history(conn, Q.REDO_TRIGGER, since_s, map_pack, self._tables())

    def last_acknowledged_s(self, conn: psycopg.Connection[Any]) -> float | None:
        return seconds_ago(conn, Q.LAST_ACKNOWLEDGED_TRIGGER)

    def eras(self, conn: psycopg.Connection[Any]) -> list[Era]:
        return eras_of(conn, self._settings)

    def _tables(self) -> Mapping[TableName, object]:
        """The configured tables, as the mapper names them."""
        return {TableName.parse(name): None for name in self._settings.tables}


def _queue_history(
    conn: psycopg.Connection[Any],
    query: Q,
    since_s: float,
    map_pack: MapPack | None,
    tables: Mapping[TableName, object],
) -> Iterator[Decoded]:
    """The queue rows of history query `query`, decoded as the listener decodes them
    (`map_pack`: RowDecoder.queue_rows'), a row under a table's name from before a
    rename mapped as the listener maps it (Renames: `tables` are the mapping's)."""
    decoder = RowDecoder(raw=raw_text.reads_raw(conn))
    renames = Renames(conn, tables, at=0)
    # About HISTORY_CHUNK events a fetch, however many packs (a thousand events a row)
    # and single changes the window mixes; decoded a slice at a time.
    for rows in history_rows(conn, query, since_s, HISTORY_CHUNK, count_at=6):
        for part in by_events(rows, 6, HISTORY_CHUNK):
            yield decoder.queue_rows(renames.apply(list(part)), count_at=6, map_pack=map_pack)
