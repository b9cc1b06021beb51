"""`check` in logical mode: each watched table's publication and replica identity, the
server's settings for logical decoding and streaming, the slot and the sweeps it owes,
slots left behind."""

from __future__ import annotations

from typing import Any

import psycopg

from cdc_invalidator.capture import logical_sql
from cdc_invalidator.capture.errors import returned
from cdc_invalidator.capture.pgoutput import NATIVE_WALKS
from cdc_invalidator.capture.slot import SlotClass, SlotState
from cdc_invalidator.checks.database import restored_reason
from cdc_invalidator.checks.report import Report
from cdc_invalidator.events import TableName
from cdc_invalidator.pg import versions
from cdc_invalidator.pg.connect import REPLICATION, PgConnector, PoolerInTheWay
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.pg.standbys import names_standby
from cdc_invalidator.settings import Settings


def check_logical_filter(
    conn: psycopg.Connection[Any],
    report: Report,
    where: str,
    table: TableName,
    *,
    keep: bool,
) -> bool:
    """A table with a column filter: its UPDATEs are judged from the whole old row, which
    only REPLICA IDENTITY FULL (or an identity index covering every column) sends."""
    row = conn.execute(Q.CHECK_TABLE.sql, {"table": table.qualified}).fetchone()
    columns = set(row[1]) if row else set()
    short = [
        rel
        for rel, identity, covered in conn.execute(Q.CHECK_IDENTITY.sql, {"table": table.qualified})
        if identity != "f" and not columns <= set(covered)
    ]
    if not short:
        report.ok.append(
            f"{where}: UPDATEs judged row by row against their old values: REPLICA IDENTITY "
            "FULL makes every UPDATE and DELETE of the table write its whole old row to WAL "
            "(more WAL, and more for the listener to read)"
        )
        return True
    if keep:
        report.warnings.append(
            f"{where}: the column filter needs each UPDATE's whole old row, which "
            f'{", ".join(short)} does not send (replica_identity = "keep"): the filter '
            'is off. Give it REPLICA IDENTITY FULL, or replica_identity = "full"'
        )
    else:
        report.errors.append(
            f"{where}: the column filter needs each UPDATE's whole old row, which "
            f"{', '.join(short)} does not send (no REPLICA IDENTITY FULL): every UPDATE "
            "invalidates. Run `cdc-invalidator install`"
        )
    return False


def _own_casts(
    conn: psycopg.Connection[Any], report: Report, where: str, table: TableName, wanted: list[str]
) -> bool:
    """Warn of key columns whose type is cast to text by a function of the database's own
    (capture/text_casts.py: their changes are swept); whether there were any."""
    found = False
    for column, type_name, function in conn.execute(
        Q.KEYS_CASTS.sql, {"table": table.qualified, "columns": wanted}
    ):
        found = True
        report.warnings.append(
            f"{where}: key column {column} of {table} is of type {type_name}, which "
            f"{function} casts to text: logical mode receives the type's output text, not "
            "its `::text`, and cannot run that function: each change of the table sweeps "
            "all of its templates (SCAN) instead of deleting its keys. Drop the cast, or key "
            "by another column"
        )
    return found


def check_logical_table(  # noqa: PLR0913 - the table's facts are keyword-only
    conn: psycopg.Connection[Any],
    settings: Settings,
    report: Report,
    *,
    where: str,
    table: TableName,
    wanted: list[str],
    keep: bool,
) -> None:
    published = conn.execute(
        Q.CHECK_PUBLISHED.sql,
        {"publication": settings.publication_name, "table": table.qualified, "columns": wanted},
    ).fetchone()
    if not published or not published[0]:
        report.errors.append(
            f"{where}: table {table} is not in publication {settings.publication_name!r}: "
            "run `cdc-invalidator install`"
        )
        return
    fine = True
    heirs = [
        name
        for (name,) in conn.execute(
            Q.CHECK_UNPUBLISHED_HEIRS.sql,
            {
                "table": table.qualified,
                "tables": [TableName.parse(t).qualified for t in settings.tables],
                "publication": settings.publication_name,
            },
        )
    ]
    if heirs:
        fine = False
        report.errors.append(
            f"{where}: inheritance children {', '.join(heirs)} of {table} are not in "
            f"publication {settings.publication_name!r} (created, or made to inherit from "
            f"it, after install): their changes, whether a statement names them or {table}, "
            "are not invalidated until you run `cdc-invalidator install`"
        )
    for rel, identity, covered in conn.execute(Q.CHECK_IDENTITY.sql, {"table": table.qualified}):
        if identity == "f":
            continue
        if identity == "n" or not covered:
            # Trap: a publication that publishes UPDATE and DELETE makes them fail on a
            # member table without a replica identity.
            fine = False
            report.errors.append(
                f"{where}: table {rel} has no replica identity (REPLICA IDENTITY NOTHING, "
                "or DEFAULT without a primary key): once it is published, updates and deletes "
                'of its rows fail. Set replica_identity = "full" (install then sets REPLICA '
                "IDENTITY FULL) or give it a primary key"
            )
            continue
        missing = [c for c in wanted if c not in covered]
        if not missing:
            continue
        fine = False
        if keep:
            report.warnings.append(
                f"{where}: old values of columns {missing} of {rel} are not sent "
                '(replica_identity = "keep"): keys built from them are not deleted when '
                "they change or the row is deleted"
            )
        else:
            report.errors.append(
                f"{where}: the replica identity of {rel} does not cover columns {missing}, "
                "whose old values the templates need: run `cdc-invalidator install`"
            )
    if conn.info.server_version // 10000 < versions.PUBLISHED_GENERATED:
        row = conn.execute(
            Q.CHECK_GENERATED.sql, {"table": table.qualified, "columns": wanted}
        ).fetchone()
        if row and row[0]:
            fine = False
            report.warnings.append(
                f"{where}: key columns {row[0]} of {table} are generated columns, which "
                "PostgreSQL sends in logical replication only from version 18: each change "
                "of the table sweeps all of its templates (SCAN) instead of deleting its keys. "
                "Key by the columns they are computed from, or use trigger mode for it"
            )
    fine = not _own_casts(conn, report, where, table, wanted) and fine
    if published[1]:
        fine = False
        report.errors.append(
            f"{where}: the column list of {table} in publication "
            f"{settings.publication_name!r} leaves out key columns {published[1]}, whose "
            "values the templates need: run `cdc-invalidator install`"
        )
    if fine:
        report.ok.append(f"{where}: published, old values of {wanted} sent")


def check_walks(report: Report, *, native: bool) -> None:
    """Whether logical mode decodes with the C tuple walks (an optional extension)."""
    if native:
        report.ok.append("pgoutput's tuples are walked in C (capture/_walk.c)")
    else:
        report.warnings.append(
            "pgoutput's tuples are walked in Python: capture/_walk.c was not built (no C "
            "compiler when the package was installed), and decoding takes about twice the "
            "time; reinstall the package where gcc is"
        )


def _check_streaming(
    user: str, can_replicate: bool, senders: int, pg: PgConnector, report: Report
) -> None:
    """The role may stream, and a replication connection opens: ordinary sessions got
    in, so check said ok, while the stream's connection could not (a pooler in front
    refuses it, PgBouncer; pg_hba.conf has no `replication` line for the role), and the
    listener retried it (a review). No walsender may start at all with max_wal_senders
    = 0: check said "every walsender is in use" as a warning, exit 0, while the listener
    could never stream (install makes the slot by a function, and succeeds)."""
    if senders == 0:
        report.errors.append(
            "max_wal_senders is 0: the listener streams the slot through a walsender, and "
            "none may start; raise it (a server restart)"
        )
        return
    if not can_replicate:
        report.errors.append(
            f"role {user!r} lacks the REPLICATION attribute the listener needs to stream "
            f"(ALTER ROLE {user} REPLICATION; on Amazon RDS: GRANT rds_replication TO {user}), "
            "or use a role that has it"
        )
        return
    try:
        pg.connect(REPLICATION).close()
    except PoolerInTheWay as exc:
        report.errors.append(str(exc))
    except psycopg.OperationalError as exc:
        said = " ".join(str(exc).split())
        if "max_wal_senders" in said:
            # (every walsender taken, the listener's own stream among them: nothing wrong
            # with the role; a second listener or a replica would find none either)
            report.warnings.append(
                f"no replication connection could be opened to try one ({said}): every "
                "walsender is in use; a standby listener taking over, or a replica, needs "
                "one free: raise max_wal_senders"
            )
            return
        hba = " (pg_hba.conf needs a `replication` line for the role)" if "pg_hba" in said else ""
        report.errors.append(
            f"a replication connection, which the listener streams through, was refused: "
            f"{said}{hba}"
        )
    else:
        report.ok.append("a replication connection opens, as the listener's stream does")


def _publication_drift(conn: psycopg.Connection[Any]) -> str | None:
    """publication_drift_v1(), or None where an earlier release installed (without it:
    `check` then says to run install anyway)."""
    try:
        with conn.transaction():
            row = conn.execute(Q.CHECK_PUBLICATION_DRIFT.sql).fetchone()
    except psycopg.errors.UndefinedFunction:
        return None
    return row[0] if row else None


def check_logical_server(conn: psycopg.Connection[Any], settings: Settings, report: Report) -> None:
    """The server's side of logical capture: wal_level, the role, the walks, the guard;
    a replication connection opened as the listener's stream opens one."""
    row = returned(
        conn.execute(
            Q.CHECK_LOGICAL_SERVER.sql, {"publication": settings.publication_name}
        ).fetchone(),
        "row of logical replication settings",
    )
    wal_level, can_replicate, user, publication_exists, keep_size, sync_names, senders = row
    if wal_level != "logical":
        report.errors.append(
            f"wal_level is {wal_level!r}: logical capture needs wal_level = logical "
            "(a server restart)"
        )
    if names_standby(sync_names, settings.application_name):
        report.errors.append(
            f"synchronous_standby_names ({sync_names!r}) names the listener's stream "
            f"(application_name {settings.application_name!r}): PostgreSQL may then make "
            "it a synchronous standby, and every commit of the server would wait for the "
            "listener to delete its keys, or hang while nothing moves the slot. Name the "
            'standbys themselves there instead of "*" (docs/logical.md, "What it needs")'
        )
    _check_streaming(user, can_replicate, senders, PgConnector.from_settings(settings), report)
    check_walks(report, native=NATIVE_WALKS)
    guard = conn.execute(Q.CHECK_DDL_GUARD.sql).fetchone()
    if publication_exists and not (guard and guard[0]):
        report.warnings.append(
            "the DDL guard (event triggers cdc_invalidator_guard, cdc_invalidator_guard_drops "
            "and cdc_invalidator_guard_index) is not installed, is "
            "disabled, or was made by an earlier release: a new partition, a dropped "
            "primary key or replica identity index can make writes to a published table "
            "fail, and a change to the "
            'publication can stop changes from being captured (docs/DBA.md, "Schema '
            'migrations"); run `cdc-invalidator install` as a superuser to add it'
        )
    drift = _publication_drift(conn) if publication_exists else None
    if drift:
        report.errors.append(
            f"{drift}: the changes it does not publish are not invalidated. The publication "
            "follows the configuration: run `cdc-invalidator install`, which puts it right "
            "and sweeps its tables"
        )
    if not publication_exists:
        report.errors.append(
            f"publication {settings.publication_name!r} does not exist: run "
            "`cdc-invalidator install`"
        )
    state = SlotState.read(conn, settings.slot_name)
    verdict = state.classify()
    kind, reason = verdict.kind, verdict.reason
    sweeps = "the listener re-creates it and sweeps every watched table"
    if kind is SlotClass.MISSING_FIRST_USE:
        report.warnings.append(
            f"{reason}: the listener creates it on its first start (its role needs "
            "REPLICATION), and then sweeps every watched table once: what is written until "
            "then is in no slot"
        )
    elif kind is SlotClass.GONE:
        report.errors.append(f"{reason}: changes since may have been missed; {sweeps}")
    elif kind is SlotClass.FOREIGN:
        report.errors.append(f"{reason}: set slot_name to another name")
    elif kind is SlotClass.LOST:
        report.errors.append(
            f"{state.where} was invalidated (wal_status {state.wal_status}): "
            f"{state.invalidated_by}; changes were missed; {sweeps}"
        )
    else:
        # IN_USE, OK, and AHEAD: the listener finds a slot moved past its position when
        # it next starts, sweeps, and the sweep owed is reported below until it is done.
        by = f"streamed by pid {state.active_pid}" if state.active_pid else "not streamed right now"
        report.ok.append(f"{state.where}: wal_status {state.wal_status}, {by}")
    if keep_size == "-1" and kind is not SlotClass.FOREIGN:
        # (the slot there or to come: a slot the listener makes is bounded the same way)
        report.warnings.append(
            "max_slot_wal_keep_size is -1: a listener that stays down keeps WAL on the "
            "server without limit; consider a limit (the slot is then lost instead, "
            "and the listener sweeps when it comes back)"
        )
    _sweeps_owed(state, report)
    _lineage_changed(conn, state, report)
    check_leftover_slots(conn, settings.slot_name, report)


def _lineage_changed(conn: psycopg.Connection[Any], state: SlotState, report: Report) -> None:
    """Logical mode: a slot that is there on a server of another lineage than the one
    recorded for it (a failover slot on a promoted standby), which the listener's next
    start sweeps for: said before it happens, when a DBA can still keep the cache warm
    where nothing was lost."""
    row = conn.execute(Q.CHECK_SLOT_LINEAGE.sql).fetchone()
    current, recorded = (row[0] if row else None), state.server_lineage
    if not state.slot_exists or current is None or recorded is None or current == recorded:
        return
    report.warnings.append(
        f"this server ({current}) is not the one the listener last ran on ({recorded}), "  # noqa: S608 - advice printed for a DBA, never run
        "and the slot is here (a failover slot on a promoted standby, a point-in-time "
        "recovery or pg_upgrade): its next start sweeps every watched table once "
        "(transactions of the old one may be lost, and cached). Where nothing was lost (a "
        "planned switchover), record it first to keep the cache warm, as the installing "
        "role: UPDATE cdc_invalidator.slot_state_v1 SET server_lineage = "
        "cdc_invalidator.server_lineage_v1()"
    )


def _sweeps_owed(state: SlotState, report: Report) -> None:
    """Logical mode: the sweep the slot owes, and one its next start, or install, owes a
    restore or a copy (slot_state_v1 made again, or another database's, since its rows
    were recorded)."""
    if state.resync_reason:
        report.warnings.append(f"a sweep of every watched table is owed: {state.resync_reason}")
    if state.restored:
        report.warnings.append(restored_reason("slot_state_v1", "its next start, or install,"))


def check_leftover_slots(conn: psycopg.Connection[Any], slot: str | None, report: Report) -> None:
    """Slots recorded as ours that are not the configured one (slot_name changed; in trigger
    mode, `slot` None, any): nothing of ours consumes them, and each keeps WAL until the
    disk is full. Dropped by hand, what they held is swept by the next `install`."""
    which = f"not the configured slot_name {slot!r}" if slot else "trigger capture uses none"
    swept = "; then run `cdc-invalidator install`, which sweeps what it held"
    for left in logical_sql.leftover_slots(conn, slot):
        drop = logical_sql.drop_by_hand(left.slot_name)
        if left.active_pid is not None:
            report.warnings.append(
                f"{left.describe()} is recorded as ours (slot_state_v1), {which}: a listener "
                f"with an older configuration still streams it? Stop it, then drop the slot: "
                f"{drop}{swept}"
            )
        elif left.wal_status == "lost":
            report.warnings.append(
                f"{left.describe()} is recorded as ours (slot_state_v1), {which}: it keeps no "
                f"WAL, but nothing uses it: {drop}{swept}"
            )
        else:
            report.errors.append(
                f"{left.describe()} is recorded as ours (slot_state_v1), {which} (left when "
                "slot_name or capture changed?): nothing consumes it, and it keeps WAL until "
                "the disk is full. `cdc-invalidator install` drops it, sweeping what it held, "
                "if nobody else moved it; or drop it (as a superuser or a role with "
                f"REPLICATION): {drop}{swept}"
            )
