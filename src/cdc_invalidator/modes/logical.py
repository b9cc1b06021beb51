"""Logical mode: pgoutput over a replication slot, no triggers (capture/logical.py,
capture/logical_sql.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from psycopg import sql

from cdc_invalidator import checks
from cdc_invalidator.capture import logical_sql, trigger_sql
from cdc_invalidator.capture.logical import LogicalConfig
from cdc_invalidator.capture.logical_open import LogicalCapture
from cdc_invalidator.capture.rows import Decoded, MapPack, RowDecoder
from cdc_invalidator.capture.slot import SlotState
from cdc_invalidator.checks import Report
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping.mapper import Era, RetiredLookup
from cdc_invalidator.metrics import Figures
from cdc_invalidator.modes.base import (
    HISTORY_BATCH_ROWS,
    HISTORY_CHUNK,
    eras_of,
    history_rows,
    mapping_stamp,
    seconds_ago,
)
from cdc_invalidator.pg.connect import PgConnector
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.runner import Source
from cdc_invalidator.settings import Settings
from cdc_invalidator.status import LogicalStatus, read_logical_status


class LogicalMode:
    name = "logical"
    history_table = "history_v1"
    delivery = "The WAL sender streams each transaction to the listener as it commits."

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    @property
    def installs(self) -> str:
        tables = ", ".join(sorted(str(t) for t in self._settings.mapper().tables))
        return (
            f"Installed our SQL (schema cdc_invalidator, a publication for {tables}, "
            "REPLICA IDENTITY FULL\nwhere a key column's old value needs it, a replication "
            "slot): no triggers."
        )

    def _keeps(self, table: TableName) -> bool:
        """replica_identity = "keep": install leaves the table's identity alone."""
        return self._settings.table_settings()[table].replica_identity == "keep"

    def install_script(self) -> sql.Composed:
        s = self._settings
        mapper = s.mapper()
        keep = {t: self._keeps(t) for t in mapper.tables}
        script = logical_sql.install_script(
            mapper, keep, s.publication_name, s.slot_name, s.column_filters()
        )
        return script + trigger_sql.record_mapping(s.mapping_fingerprint(), s.mapping_record())

    def finish_install(self, conn: psycopg.Connection[Any]) -> str:
        """The slot, created once the script has committed (PostgreSQL refuses to create
        one in a transaction that has written)."""
        s = self._settings
        # First, right after the commit: where this mapping's capture begins (the WAL
        # insert position: a change committed before it is rendered with the earlier
        # mapping's templates too, where they differ: mapping_eras_v1()).
        conn.execute(
            Q.RECORD_BOUNDARY.sql, {"fingerprint": s.mapping_fingerprint(), "capture": "logical"}
        )
        slot = s.slot_name
        tables = ", ".join(sorted(str(t) for t in s.mapper().tables))
        try:
            new = logical_sql.create_slot(conn, slot)
        except psycopg.errors.InsufficientPrivilege as exc:  # a role without REPLICATION
            raise logical_sql.SlotLeftToListener(
                f"the replication slot was not made ({exc.diag.message_primary}): the "
                "listener makes it on its first start (its role needs REPLICATION) and then "
                "sweeps every watched table once, since what is written until then is in no "
                "slot. Start it soon, or run install again as a role with REPLICATION"
            ) from None
        if new:
            made, owed = f"created slot {slot!r} at {new.lsn}", new.owed
        else:  # (a sweep the script owed it: a restore)
            made, owed = f"slot {slot!r} exists", SlotState.read(conn, slot).resync_reason
        if owed:
            made += f" (the listener sweeps every watched table first: {owed})"
        # Slots of an earlier slot_name keep WAL forever, consumed by nothing: ours go.
        # What they had not handed out (or held before someone dropped them by hand) is
        # swept first, through the configured slot, there now.
        leftovers = logical_sql.leftover_slots(conn, slot)
        made += logical_sql.sweep_before_drops(
            conn, Q.SWEEP_ALL_LOGICAL, leftovers, logical_sql.unswept(conn, slot)
        )
        said, dropped = logical_sql.drop_swept_leftovers(conn, slot, leftovers)
        logical_sql.forget_swept(conn, dropped)
        made += said
        return (
            f"installed cdc_invalidator v{trigger_sql.SCHEMA_VERSION} (logical); {made}; "
            f"publication {s.publication_name!r} holds {tables}"
        )

    def uninstall_script(self) -> sql.Composed:
        return trigger_sql.uninstall_script(self._settings.publication_name)

    def source(self, retired: RetiredLookup | None) -> Callable[[], Source]:
        return self.capture(retired).connect

    def capture(self, retired: RetiredLookup | None) -> LogicalCapture:
        """`retired` (listener.retired_lookup): the tables the configuration lacks whose
        changes the capture maps itself (a streamed transaction's, the sweep after a
        lost slot) and decodes the template columns of (Relations)."""
        s = self._settings
        mapper = s.mapper(retired)
        return LogicalCapture(
            PgConnector.from_settings(s),
            LogicalConfig(
                slot=s.slot_name,
                publication=s.publication_name,
                columns={table: mapper.columns(table) for table in mapper.tables},
                filters=s.column_filters(),
                status_interval_s=s.status_interval_ms / 1000,
                heartbeat_s=s.heartbeat_interval_ms / 1000,
                history_s=s.history_s,
                prune_every_s=s.prune_every_ms / 1000,
                mapper=mapper,
                retired=retired,
                mapping=mapping_stamp(s),
                sweep_after_crash=s.sweep_after_crash,
            ),
        )

    def status(self, conn: psycopg.Connection[Any]) -> LogicalStatus:
        return read_logical_status(conn, self._settings.slot_name)

    def figures(self, conn: psycopg.Connection[Any]) -> Figures:
        s = read_logical_status(conn, self._settings.slot_name)
        out = [
            (
                "slot_lag_bytes",
                "WAL written since the position the listener confirmed, in bytes",
                float(s.slot_lag_bytes or 0),
            ),
            (
                "slot_held_wal_bytes",
                "WAL the server keeps for the slot, from its restart_lsn, in bytes (more "
                "than the lag while a long transaction holds decoding back)",
                float(s.slot_held_wal_bytes or 0),
            ),
            (
                "slot_active",
                "1 while a listener streams the slot",
                float(s.slot_active_pid is not None),
            ),
        ]
        if s.safe_wal_size_bytes is not None:
            out.append(
                (
                    "slot_safe_wal_bytes",
                    "WAL left before max_slot_wal_keep_size invalidates the slot",
                    float(s.safe_wal_size_bytes),
                )
            )
        return out

    def check_table(
        self, conn: psycopg.Connection[Any], report: Report, facts: checks.TableFacts
    ) -> None:
        where, table = facts.where, facts.table
        if checks.drifted(conn, report, where, table):
            return
        if facts.present():
            checks.check_logical_table(
                conn,
                self._settings,
                report,
                where=where,
                table=table,
                wanted=facts.wanted,
                keep=self._keeps(table),
            )
            if table in self._settings.column_filters():
                checks.check_logical_filter(conn, report, where, table, keep=self._keeps(table))

    def check_server(self, conn: psycopg.Connection[Any], report: Report, config_name: str) -> None:
        checks.check_logical_server(conn, self._settings, report)
        checks.check_rebuild_guard(conn, report, self._settings.mapper().tables)

    def history(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]:
        """The batches acknowledged in the window (history_v1), decoded as the listener
        encoded them; a row's events and failures take its id as position."""
        decoder = RowDecoder()
        chunk = Decoded()
        for rows in history_rows(conn, Q.HISTORY_LOGICAL, since_s, HISTORY_BATCH_ROWS):
            for position, text in rows:
                decoded = decoder.history_row(position, text, map_pack=map_pack)
                chunk.extend(decoded)
            if len(chunk.events) + chunk.mapped_changes >= HISTORY_CHUNK:
                yield chunk
                chunk = Decoded()
        if chunk.events or chunk.dead or chunk.mapped_changes:
            yield chunk

    def acknowledged(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]:
        """history(): only acknowledged batches are written to it."""
        return self.history(conn, since_s, map_pack)

    def last_acknowledged_s(self, conn: psycopg.Connection[Any]) -> float | None:
        return seconds_ago(conn, Q.LAST_ACKNOWLEDGED_LOGICAL)

    def eras(self, conn: psycopg.Connection[Any]) -> list[Era]:
        return eras_of(conn, self._settings)
