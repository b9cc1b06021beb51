"""`check` in trigger mode: each watched table's capture triggers as install made them
(and their column filter, payload and bulk settings), prepared transactions, and the
wake-up's locks held by others."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cdc_invalidator.capture.trigger_sql import CHANNEL, subscribed
from cdc_invalidator.checks.report import Report
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping.columns import ColumnFilter, Judge
from cdc_invalidator.pg.queries import Q


def check_two_phase(conn: psycopg.Connection[Any], report: Report) -> None:
    """Trigger mode: prepared transactions allowed, which PostgreSQL refuses to prepare
    once they sent a NOTIFY (a capture function's wake-up, sent while the listener is
    quiet); capture functions that ignore cdc_invalidator.notify, which turns that
    wake-up off."""
    row = conn.execute(Q.CHECK_TWO_PHASE.sql).fetchone()
    if not row:
        return
    if row[0] > 0:
        report.warnings.append(
            f"max_prepared_transactions is {row[0]}: a transaction that writes a watched "
            "table fails at PREPARE TRANSACTION (XA) whenever the listener is quiet or "
            "stopped, unless its session sets cdc_invalidator.notify = 'off' (docs/DBA.md, "
            '"Trigger mode: two-phase commit")'
        )
    if row[1]:
        report.warnings.append(
            f"{row[1]} capture function(s) were compiled by an earlier release and ignore "
            "cdc_invalidator.notify: run `cdc-invalidator install`"
        )


def check_wake_locks(conn: psycopg.Connection[Any], report: Report) -> None:
    """Trigger mode: the wake-up's locks held where no listener of ours holds them
    (check_wake_locks.sql): by any role that can connect, or a prepared transaction."""
    effect = {
        1: "capture functions send no wake-up: changes are read within poll_interval_ms "
        "instead of at once",
        2: "capture functions that find the listener busy send the wake-up, whose commits "
        "PostgreSQL serializes",
    }
    for pid, role, app, gid, lock, mode in conn.execute(Q.CHECK_WAKE_LOCKS.sql):
        who = (
            f"prepared transaction {gid!r} (role {role})"
            if gid is not None
            else f"session pid {pid} (role {role}, application_name {app!r})"
        )
        what = (
            "keeps the listener looking for it five times a second until COMMIT or "
            "ROLLBACK PREPARED"
            if gid is not None
            else effect[lock]
        )
        report.warnings.append(
            f"{who} holds the wake-up's lock {lock} ({mode}), which no listener of ours "
            f'does: {what} (docs/DBA.md, "Trigger mode: the wake-up and concurrent commits")'
        )


def check_subscribed(
    conn: psycopg.Connection[Any], report: Report, tables: Iterable[TableName]
) -> None:
    """Trigger mode: configured tables that a logical-replication subscription writes
    into, whose apply worker fires no statement trigger: an error while it is enabled
    (install refuses it), a warning while it is disabled."""
    for found in subscribed(conn, tables):
        (report.errors if found.enabled else report.warnings).append(found.said)


@dataclass(frozen=True, slots=True)
class Watch:
    """What install recorded for a table, against the live catalog (check_watch.sql)."""

    live_name: str | None  # the table's name now (None: dropped)
    columns: list[str]  # the key columns its capture function copies, as configured
    live_columns: list[str]  # what those columns are called now ('' once dropped)
    untriggered_partitions: list[str]
    trigger_problems: list[str]
    # Tables it is now a partition or an inheritance child of that are not watched: their
    # writes of it go unseen.
    unwatched_parents: list[str] = field(default_factory=list)
    # Its partitions that are foreign tables (attached after install, which refuses them).
    foreign_partitions: list[str] = field(default_factory=list)
    # Its inheritance children without our triggers (made after install).
    untriggered_children: list[str] = field(default_factory=list)
    judge: str | None = None  # the column filter compiled in: 'ignore', 'columns', None
    filter_columns: list[str] | None = None
    judged: bool = False  # False: no primary key to pair rows by, every UPDATE queued
    columns_added: bool = False  # ignore_columns, a column added since: judging is off
    # The capture function sends a one-row change in its NOTIFY payload (None: no function).
    notify_payload: bool | None = None
    # The statement size from which it queues a sweep instead of packs (None: off).
    bulk_sweep_rows: int | None = None
    # The name its events carry: the table's at install (None: not recorded).
    events_name: str | None = None
    # Its inheritance children that another, unwatched, table is a parent of too.
    shared_children: list[str] = field(default_factory=list)
    # It sends the payload on the wake-up's channel, which any role may LISTEN on.
    payload_on_wake_up: bool = False


def watch_of(conn: psycopg.Connection[Any], table: TableName) -> Watch | None:
    row = conn.execute(
        Q.CHECK_WATCH.sql,
        {"table": table.qualified, "schema": table.schema, "name": table.name},
    ).fetchone()
    if row is None:
        return None
    (
        live_name,
        columns,
        live_columns,
        has_attnums,
        judge,
        filter_columns,
        judged,
        columns_added,
        untriggered,
        untriggered_children,
        foreign_partitions,
        unwatched_parents,
        problems,
        notify_payload,
        bulk_sweep_rows,
        events_name,
        shared_children,
        payload_on_wake_up,
    ) = row
    # Installed by an older release, which did not record attnums: no drift to tell.
    return Watch(
        live_name,
        columns,
        live_columns if has_attnums else columns,
        untriggered,
        problems,
        unwatched_parents,
        foreign_partitions,
        untriggered_children,
        judge,
        filter_columns,
        bool(judged),
        bool(columns_added),
        notify_payload,
        bulk_sweep_rows,
        events_name,
        shared_children,
        bool(payload_on_wake_up),
    )


def report_drift(report: Report, where: str, table: TableName, watch: Watch) -> bool:
    """A renamed table or key column: the configuration no longer names the live schema.
    True when it was reported (nothing more can be checked by the configured names)."""
    if watch.live_name is None:
        # (check_unconfigured warns that it was dropped since install, by its events' name)
        report.errors.append(f"{where}: table {table} does not exist")
        return True
    drifted = False
    if watch.live_name != table.qualified:
        drifted = True
        report.errors.append(
            f"{where}: table {table} was renamed to {watch.live_name}; its changes are still "
            "captured and invalidated under the configured name. Rename the table in the "
            f"configuration to {watch.live_name!r} and run `cdc-invalidator install`, in "
            "either order: changes queued under the old name, before or after, and dead "
            "letters of it requeued, are invalidated under the new one"
        )
    elif watch.events_name is not None and watch.events_name != table.qualified:
        # Configured by its new name, not installed since: nothing is lost (the listener
        # maps the old name's rows by the table's name now), but install is owed.
        report.errors.append(
            f"{where}: table {table} was renamed from {watch.events_name} since install, "
            "and its changes are still queued under that name (the listener invalidates "
            f"them under {table}): run `cdc-invalidator install`"
        )
    for column, live in zip(watch.columns, watch.live_columns, strict=True):
        if live == column:
            continue
        drifted = True
        if live:
            report.errors.append(
                f"{where}: key column {column!r} of {watch.live_name} is now named {live!r}; "
                "keys are still rendered from it (a slower path per statement). Change the "
                f"templates to use {{{live}}}, then run `cdc-invalidator install`"
            )
        else:
            report.errors.append(
                f"{where}: key column {column!r} of {watch.live_name} was dropped; every "
                "change of the table now sweeps all its key templates (SCAN). Change the "
                "templates, then run `cdc-invalidator install`"
            )
    return drifted


def check_triggers(  # noqa: PLR0913 - the table's facts
    report: Report,
    where: str,
    table: TableName,
    watch: Watch | None,
    wanted: list[str],
    *,
    stand_in: bool = False,
) -> None:
    """Our triggers on the table and its partitions: present, ours, firing ALWAYS; or
    the rebuild guard's stand-in (`stand_in`), on a table that took the watched name."""
    if watch is None and stand_in:
        report.errors.append(
            f"{where}: table {table} was created, or renamed to this name, after install: "
            "it has no capture triggers, only the rebuild guard's stand-in, which sweeps all "
            "of the table's key templates for every transaction that writes it: run "
            "`cdc-invalidator install`"
        )
        return
    if watch is None:
        report.errors.append(
            f"{where}: table {table} is not watched (no triggers): run `cdc-invalidator install`"
        )
        return
    fine = True
    for problem in watch.trigger_problems:
        fine = False
        report.errors.append(f"{where}: {problem}: run `cdc-invalidator install`")
    if watch.untriggered_partitions:
        fine = False
        report.errors.append(
            f"{where}: partitions {', '.join(watch.untriggered_partitions)} were created or "
            "attached after install and have no capture triggers: their writes sweep all of "
            "the table's key templates until you run `cdc-invalidator install`"
        )
    if watch.untriggered_children:
        fine = False
        report.errors.append(
            f"{where}: inheritance children {', '.join(watch.untriggered_children)} of "
            f"{table} were created, or made to inherit from it, after install and have no "
            f"capture triggers: a statement that names one of them is not captured (one "
            f"that names {table} is) until you run `cdc-invalidator install`"
        )
    if watch.shared_children:
        fine = False
        report.errors.append(
            f"{where}: inheritance children {', '.join(watch.shared_children)} of {table} "
            "inherit from a table that is not watched: a statement that names that table "
            "changes their rows without firing their triggers (statement triggers fire on "
            f"the table a statement names), and those changes are not invalidated. Write "
            f"them through {table} or the children themselves; logical mode sees writes "
            "through either"
        )
    if watch.foreign_partitions:
        fine = False
        report.errors.append(
            f"{where}: partitions {', '.join(watch.foreign_partitions)} are foreign tables, "
            f"which cannot have the transition tables our triggers on {table} use: an INSERT "
            'through the table that lands in one fails ("cannot collect transition tuples '
            'from child foreign tables"), and what is written to their foreign server '
            "is not captured here. Detach them, or use logical mode for this table"
        )
    if watch.unwatched_parents:
        fine = False
        parent = watch.unwatched_parents[0]
        report.errors.append(
            f"{where}: table {table} is now a partition or an inheritance child of "
            f"{', '.join(watch.unwatched_parents)}, "
            f"which is not watched: a statement that names {parent} changes the table's rows "
            "without firing its triggers (statement triggers fire on the table a statement "
            f"names), and those changes are not invalidated. Configure {parent} instead (its "
            "partitions and inheritance children are watched with it), then run "
            "`cdc-invalidator install`; logical mode sees writes through either"
        )
    if sorted(watch.columns) != wanted:
        fine = False
        report.errors.append(
            f"{where}: triggers copy columns {sorted(watch.columns)} but the templates "
            f"need {wanted}: run `cdc-invalidator install` to bring them in line"
        )
    if fine:
        report.ok.append(f"{where}: watched, columns {wanted}, triggers fire ALWAYS")


def check_notify_payload(
    report: Report, where: str, table: TableName, watch: Watch | None, configured: bool
) -> None:
    """Whether the capture function sends a one-row change in its NOTIFY payload, as
    install compiled it, against notify_payload."""
    if watch is None or watch.notify_payload is None:
        return
    if watch.notify_payload != configured:
        report.warnings.append(
            f"{where}: the capture function of {table} was installed with notify_payload = "
            f"{str(watch.notify_payload).lower()}, but it is {str(configured).lower()} in the "
            "configuration: run `cdc-invalidator install` to compile it in line"
        )
    elif watch.payload_on_wake_up:
        report.warnings.append(
            f"{where}: the capture function of {table} sends its NOTIFY payload on channel "
            f"{CHANNEL}, where any role that can connect may LISTEN and read its key "
            "columns (an earlier release's install): run `cdc-invalidator install`"
        )
    elif configured:
        report.ok.append(
            f"{where}: a one-row change of {table} is sent in its NOTIFY payload, on a "
            "channel only the installing role knows"
        )


def check_bulk_sweep_rows(
    report: Report, where: str, table: TableName, watch: Watch | None, configured: int
) -> None:
    """The statement size from which the capture function queues a sweep instead of
    packs, as install compiled it, against bulk_sweep_rows (0: off)."""
    if watch is None or watch.notify_payload is None:  # no capture function
        return
    installed = watch.bulk_sweep_rows or 0
    if installed != configured:
        report.warnings.append(
            f"{where}: the capture function of {table} was installed with bulk_sweep_rows = "
            f"{installed}, but it is {configured} in the configuration: run "
            "`cdc-invalidator install` to compile it in line"
        )
    elif configured:
        which = "an INSERT or DELETE" if watch.judged else "a statement"
        judged = " (its UPDATEs are judged by its column filter)" if watch.judged else ""
        report.ok.append(
            f"{where}: {which} of {configured} rows or more of {table} sweeps the table's "
            f"templates instead of queueing its rows (bulk_sweep_rows){judged}"
        )


def check_trigger_filter(
    report: Report,
    where: str,
    table: TableName,
    watch: Watch | None,
    column_filter: ColumnFilter | None,
) -> None:
    """The column filter watch() compiled into the table's capture function."""
    if watch is None:
        return
    want = (column_filter.judge.value, sorted(column_filter.listed)) if column_filter else None
    have = (watch.judge, sorted(watch.filter_columns or [])) if watch.judge else None
    if want != have:
        report.errors.append(
            f"{where}: the triggers of {table} were installed with another column filter "
            f"({_describe_filter(have)}, configured: {_describe_filter(want)}): run "
            "`cdc-invalidator install`"
        )
        return
    if column_filter is None:
        return
    if not watch.judged:
        report.warnings.append(
            f"{where}: table {table} has no primary key (or one whose type cannot be "
            "joined on): old and new rows of an UPDATE cannot be paired, so its column "
            "filter is off and every UPDATE invalidates (give it a primary key, then run "
            "`cdc-invalidator install`)"
        )
    elif watch.columns_added:
        report.warnings.append(
            f"{where}: columns were added to {table} since install: ignore_columns would "
            "not judge their changes, so its column filter is off and every UPDATE "
            "invalidates until you run `cdc-invalidator install`"
        )
    else:
        report.ok.append(
            f"{where}: UPDATEs judged row by row ({_describe_filter(want)}), old and new "
            "rows paired by primary key"
        )


def _describe_filter(column_filter: tuple[str | None, list[str]] | None) -> str:
    if column_filter is None:
        return "none"
    judge, listed = column_filter
    return f"{'ignore_columns' if judge == Judge.IGNORE.value else 'columns'} = {listed}"
