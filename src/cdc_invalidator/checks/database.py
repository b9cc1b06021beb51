"""`check` against the database, in either capture mode: the configured tables and their
key columns, the tables not configured, the rebuild guard, asynchronous commits and the
server's lineage. Each mode adds its own through ModeChecks (checks/trigger.py,
checks/logical.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import psycopg

from cdc_invalidator.capture.errors import returned
from cdc_invalidator.capture.lineage import CrashSetting, another_system, async_commit_places
from cdc_invalidator.capture.trigger_sql import (
    SCHEMA_REVISION,
    SCHEMA_VERSION,
    MappingStamp,
    installed_mismatch,
    installed_version,
    mapping_state,
    nested_tables,
)
from cdc_invalidator.checks.report import Report
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping import KeyTemplate, Mapper
from cdc_invalidator.mapping.columns import ColumnFilter, Judge
from cdc_invalidator.pg import versions
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.settings import Settings


@dataclass(frozen=True, slots=True)
class TableFacts:
    """One configured table, as `check` hands it to the mode: where the configuration
    names it, its key columns, and `present()`, which reports a missing table or key
    column and says whether it found none."""

    where: str
    table: TableName
    wanted: list[str]
    present: Callable[[], bool]


class ModeChecks(Protocol):
    """The checks of one capture mode (modes/), run when our SQL is installed."""

    @property
    def name(self) -> str:
        """Which mode: what the server's version is judged for."""
        ...

    def check_table(self, conn: psycopg.Connection[Any], report: Report, facts: TableFacts) -> None:
        """Report on one configured table. The mode runs `facts.present()` after its
        drift checks (a renamed table or column explains a missing one), and only then
        its own."""
        ...

    def check_server(
        self, conn: psycopg.Connection[Any], report: Report, config_name: str
    ) -> None: ...


def check_database(
    conn: psycopg.Connection[Any], settings: Settings, mode: ModeChecks, config_name: str
) -> Report:
    report = Report()
    server = conn.info.server_version
    too_old = versions.refusal(server, mode.name)
    if too_old:  # nothing else can be read: our SQL uses what the server lacks
        report.errors.append(f"database {conn.info.dbname!r}: {too_old}")
        return report
    report.ok.append(
        f"server: PostgreSQL {versions.format_version(server)} (server_version_num {server}); "
        f"{mode.name} capture needs {versions.oldest_for(mode.name)} or later"
    )
    standby = conn.execute(Q.IN_RECOVERY.sql).fetchone()
    if standby and standby[0]:
        # (what else could be read here would mislead: a lineage withheld, a slot gone)
        report.errors.append(
            f"database {conn.info.dbname!r}: the server ({conn.info.host}:{conn.info.port}) "
            "is a standby, in recovery: it takes no writes, and a listener pointed at it "
            "invalidates nothing until it is promoted (postgres_unavailable); point "
            "database_url at the primary (with several hosts, "
            "target_session_attrs=read-write). Nothing else was checked against it"
        )
        return report
    mapper = settings.mapper()
    names = {TableName.parse(name): name for name in settings.tables}
    found = installed_version(conn)
    wrong = installed_mismatch(found)
    installed = wrong is None
    if found is None:
        report.errors.append(
            f"database {conn.info.dbname!r}: cdc_invalidator is not installed "
            "(run `cdc-invalidator install`, or have a DBA apply `cdc-invalidator sql`)"
        )
    elif wrong:
        report.errors.append(
            f"database {conn.info.dbname!r}: {wrong}: run `cdc-invalidator install`"
        )
    else:
        report.ok.append(
            f"database {conn.info.dbname!r}: cdc_invalidator v{SCHEMA_VERSION} "
            f"(revision {SCHEMA_REVISION}) installed"
        )
        _check_mapping(conn, settings, report, config_name)

    _check_nested(conn, settings, report, config_name)
    filters = settings.column_filters()
    for table, templates in sorted(mapper.tables.items()):
        where = f"{config_name}: [tables.{names[table]!r}]"
        column_filter = filters.get(table)
        if column_filter is not None:
            _warn_ignored_template_columns(report, where, templates, column_filter)
        present = partial(
            _present, conn, report, where, table, templates, column_filter=column_filter
        )
        if installed:
            mode.check_table(conn, report, TableFacts(where, table, mapper.columns(table), present))
        else:
            present()
    check_async_commits(conn, report, settings.sweep_after_crash)
    if installed:
        mode.check_server(conn, report, config_name)
    return report


def _check_nested(
    conn: psycopg.Connection[Any], settings: Settings, report: Report, config_name: str
) -> None:
    """A configured table inside another configured one (check_nested.sql): each
    change of its rows deletes the keys of one of the two."""
    tables = [TableName.parse(name) for name in settings.tables]
    for child, parent in conn.execute(nested_tables(tables)):
        report.errors.append(
            f"{config_name}: table {child} is a partition or an inheritance child of "
            f"{parent}, and both are configured: a row of {child} is a row of {parent}, "
            "but each change is captured under one of the two names (trigger mode: the "
            f"table the statement names; logical mode: {child}), and the other's keys "
            f"stay cached. Configure one of them ({parent}'s templates may use any column "
            f"{child} shares with it), then run `cdc-invalidator install`"
        )


def _check_mapping(
    conn: psycopg.Connection[Any], settings: Settings, report: Report, config_name: str
) -> None:
    """Whether `install` last ran with this file's mapping (sql/schema.sql, mapping_v1)."""
    state = mapping_state(conn, MappingStamp(settings.mapping_fingerprint(), settings.written_at))
    if state == "current":
        report.ok.append(f"{config_name}: its mapping is the one installed last")
    elif state in ("superseded", "behind"):
        report.errors.append(
            f"{config_name}: a later `install` replaced this file's mapping, or ran with "
            "another one after this file was written: a listener running it stops "
            "(`configuration_superseded`); give it the file `install` last ran with, or run "
            "`install` with this one"
        )
    else:
        report.warnings.append(
            f"{config_name}: its mapping is not installed yet (the file was edited since "
            "`install`?): run `cdc-invalidator install` with it; until then, changes are "
            "captured for the mapping installed"
        )


def _warn_ignored_template_columns(
    report: Report, where: str, templates: Sequence[KeyTemplate], column_filter: ColumnFilter
) -> None:
    for column in column_filter.ignored_template_columns:
        source = next(t.source for t in templates if column in t.fields)
        report.warnings.append(
            f"{where}: ignore_columns lists {column!r}, which template {source!r} uses: it "
            "counts all the same (a changed key column must delete the old key); take it "
            "out of ignore_columns"
        )


def _present(  # noqa: PLR0913 - the table's facts
    conn: psycopg.Connection[Any],
    report: Report,
    where: str,
    table: TableName,
    templates: Sequence[KeyTemplate],
    *,
    column_filter: ColumnFilter | None = None,
) -> bool:
    """The table exists and has every column its templates use and its column filter
    lists; otherwise reported."""
    exists, columns = returned(
        conn.execute(Q.CHECK_TABLE.sql, {"table": table.qualified}).fetchone(),
        f"row describing table {table}",
    )
    if not exists:
        report.errors.append(f"{where}: table {table} does not exist")
        return False
    fine = True
    for template in templates:
        for column in template.fields:
            if column not in columns:
                fine = False
                report.errors.append(
                    f"{where}: template {template.source!r} uses column {column!r}, "
                    f"which table {table} does not have"
                )
    if column_filter is not None:
        setting = "ignore_columns" if column_filter.judge is Judge.IGNORE else "columns"
        for column in column_filter.listed:
            if column not in columns:
                fine = False
                report.errors.append(
                    f"{where}: {setting} lists column {column!r}, which table {table} does "
                    "not have (names are matched as the catalog stores them: case matters)"
                )
    return fine


def check_unconfigured(
    conn: psycopg.Connection[Any], report: Report, mapper: Mapper, config_name: str
) -> None:
    """Trigger mode: tables watched by an earlier install but no longer configured: gone,
    renamed away from a configured name that another table took, or dropped from the
    configuration."""
    tables = sorted(mapper.tables)
    params = {
        "tables": [t.qualified for t in tables],
        "schemas": [t.schema for t in tables],
        "names": [t.name for t in tables],
    }
    rows = conn.execute(Q.CHECK_UNCONFIGURED.sql, params)
    for live_name, events_name, name_configured, name_taken in rows:
        if live_name is None:
            report.warnings.append(
                f"table {events_name} was dropped since install; its record stays until "
                "you run `cdc-invalidator install`"
            )
        elif name_configured and not name_taken:
            continue  # renamed, the file not yet: reported as missing, with its new name
        elif name_configured:
            report.warnings.append(
                f"table {live_name} was renamed from {events_name}, a name another table "
                f"took since: its changes still invalidate {events_name}'s keys until you "
                "run `cdc-invalidator install`, which removes its triggers"
            )
        else:
            report.warnings.append(
                f"table {live_name} is watched but not in {config_name}: its events will go "
                "to the dead letters (run `cdc-invalidator install` to remove its triggers)"
            )


def check_all_tables(conn: psycopg.Connection[Any], report: Report) -> None:
    """Trigger mode: a publication FOR ALL TABLES made after install, which takes our
    queue too, and makes the listener's pruning fail."""
    row = conn.execute(Q.CHECK_ALL_TABLES.sql).fetchone()
    if row and row[0]:
        report.errors.append(
            f"publication {row[0]} is FOR ALL TABLES and publishes deletes or updates: it takes "
            "cdc_invalidator.queue_v1 and progress_v1 too, which have no replica identity "
            "for it, so the listener's pruning of them fails: run `cdc-invalidator install` "
            "(it gives them REPLICA IDENTITY FULL)"
        )


def check_rebuild_guard(
    conn: psycopg.Connection[Any], report: Report, tables: Iterable[TableName]
) -> None:
    """The event triggers that keep a rebuilt watched table captured, and sweep for its
    partitions (both modes); partitions of the configured `tables` they do not know of; a
    partition whose detach stopped half-way."""
    row = conn.execute(Q.CHECK_REBUILD_GUARD.sql).fetchone()
    if row and row[0]:
        names = [t.qualified for t in tables]
        for root, count, parts in conn.execute(Q.CHECK_UNRECORDED_PARTS.sql, {"tables": names}):
            more = f" and {count - len(parts)} more" if count > len(parts) else ""
            report.warnings.append(
                f"partitions {', '.join(parts)}{more} of watched table {root} were made while "
                "the rebuild guard was disabled or missing, and it does not know them: their "
                "DROP or DETACH would leave their rows' keys cached. Run "
                "`cdc-invalidator install` to record them"
            )
        if conn.info.server_version // 10000 >= versions.DETACH_CONCURRENTLY:
            for part, parent, root in conn.execute(Q.CHECK_DETACH_PENDING.sql):
                report.warnings.append(
                    f"partition {part} of watched table {root} is being detached "
                    "concurrently and the detach stopped: its rows are no longer read "
                    "through the table, and their keys are swept only when it completes: "
                    f"ALTER TABLE {parent} DETACH PARTITION {part} FINALIZE"
                )
    else:
        report.warnings.append(
            "the rebuild guard (event triggers cdc_invalidator_rebuilt, cdc_invalidator_dropped, "
            "cdc_invalidator_parts_moved, cdc_invalidator_parts_dropped and "
            "cdc_invalidator_rewritten) is not installed, or does not fire ALWAYS: a watched "
            "table dropped, or replaced by another that takes its name, leaves its keys cached "
            "and its new writes uncaptured until install runs again, a partition dropped or "
            "detached leaves its rows' keys cached, and a column rewritten in place (ALTER "
            "COLUMN ... SET EXPRESSION, TYPE ... USING) leaves every row's keys cached "
            '(docs/DBA.md, "Schema migrations"); run `cdc-invalidator install` as a superuser '
            "to add it"
        )


def stand_in_of(conn: psycopg.Connection[Any], table: TableName) -> bool:
    """Whether the table carries the rebuild guard's stand-in triggers."""
    row = conn.execute(Q.CHECK_STAND_IN.sql, {"table": table.qualified}).fetchone()
    return bool(row and row[0])


def check_async_commits(
    conn: psycopg.Connection[Any], report: Report, setting: CrashSetting
) -> None:
    """Both modes: where writers commit asynchronously, a crash loses commits that readers
    may have cached, which no capture sees: the listener sweeps every watched table after
    one (sweep_after_crash), which costs a cold cache, unless told never to."""
    places = async_commit_places(conn)
    if not places:
        return
    said = (
        f"synchronous_commit = off ({'; '.join(places)}): such a commit is visible before "
        "it is durable, and a crash of PostgreSQL loses it after readers may have cached "
        "its row, which no capture sees"
    )
    if setting == "never":
        report.warnings.append(
            f"{said}; sweep_after_crash = never: nothing is swept after a crash: sweep "
            'every watched table by hand after one (docs/DBA.md, "After restoring the '
            'database"), or leave synchronous_commit on for the writers of watched tables'
        )
    else:
        report.warnings.append(
            f"{said}: the listener sweeps every watched table after PostgreSQL comes up "
            "from a crash (sweep_after_crash), a cold cache; to keep it warm, leave "
            "synchronous_commit on for the writers of watched tables"
            + ("" if setting == "auto" else ' and set sweep_after_crash = "auto"')
        )


def restored_reason(table: str, who: str) -> str:
    """A restore from a dump, or a copy of another database, found by `table`'s marks
    (recorded_in, recorded_in_database), swept for by `who`."""
    return (
        "this database was restored from a dump, or copied from another, since the "  # noqa: S608 - advice printed for a DBA, never run
        f"listener last noted it (cdc_invalidator.{table} was made again, or is another "
        f"database's): {who} sweeps every watched table once (what was committed after "
        "the dump or copy is gone, and may be cached). Where Redis was flushed or restored "
        "with it, record it first to keep the cache warm, as the installing role: UPDATE "
        f"cdc_invalidator.{table} SET recorded_in = 'cdc_invalidator.{table}'::regclass, "
        "recorded_in_database = cdc_invalidator.database_oid_v1()"
    )


def check_lineage(conn: psycopg.Connection[Any], report: Report, *, sweep: bool) -> None:
    """Trigger mode: whether the listener's next start finds another server than the one
    it last ran on, or a database restored from a dump or copied from another, and sweeps
    every watched table (capture/lineage.py): said before it happens, when a DBA can still
    keep the cache warm where nothing was lost."""
    row = conn.execute(Q.CHECK_LINEAGE.sql).fetchone()
    if row is None:
        return
    current, recorded, restored = row
    if restored:
        report.warnings.append(restored_reason("listener_state_v1", "its next start"))
    if current is None:
        report.warnings.append(
            "the server withholds its system identifier or WAL timeline "
            "(cdc_invalidator.server_lineage_v1() is NULL): a failover or a restore cannot "
            'be told, and is not swept for (docs/DBA.md, "After restoring the database")'
        )
    elif recorded is None or current == recorded:
        report.ok.append(f"server lineage: {current}, the one the listener last ran on")
    elif sweep or another_system(current, recorded):  # (swept whatever the setting)
        report.warnings.append(
            f"this server ({current}) is not the one the listener last ran on ({recorded}): "  # noqa: S608 - advice printed for a DBA, never run
            "a promoted standby, a restore or pg_upgrade; its next start sweeps every "
            "watched table once (transactions of the old one may be lost, and cached). "
            "Where nothing was lost (pg_upgrade, a planned switchover), record it first to "
            "keep the cache warm, as the installing role: UPDATE "
            "cdc_invalidator.listener_state_v1 SET server_lineage = "
            "cdc_invalidator.server_lineage_v1()"
        )
    else:
        report.ok.append(
            f"server lineage: {current}, not the one the listener last ran on ({recorded}); "
            "sweep_after_failover = false: nothing will be swept"
        )


def drifted(conn: psycopg.Connection[Any], report: Report, where: str, table: TableName) -> bool:
    """Report a configured table renamed, or key columns renamed or dropped, since install
    recorded them (logical mode follows them by relation and column number, but the
    configuration should say what the database says). True if anything drifted."""
    row = conn.execute(
        Q.CHECK_DRIFT.sql,
        {"qualified": table.qualified, "schema": table.schema, "name": table.name},
    ).fetchone()
    if row is None or row[0] is None:
        return False  # not recorded, or dropped: the usual checks say what is wrong
    now, same, name_taken, columns = row
    todo = "edit the configuration to the new names, then run `cdc-invalidator install`"
    drifted = False
    if not same and name_taken:
        # Renamed away, and a table made under the configured name since (a rebuild by
        # swap): the configuration is right, and names the newcomer.
        report.errors.append(
            f"{where}: table {table} is another table than install recorded (that one was "
            f"renamed to {now}): run `cdc-invalidator install` to watch the table that has "
            "the configured name now"
        )
        return True
    if not same:
        drifted = True
        report.errors.append(
            f"{where}: table {table} was renamed to {now}: its changes still invalidate "
            f"these templates (followed by relation), but {todo}"
        )
    for configured, current, taken in columns:
        if taken is not None:
            drifted = True
            report.errors.append(
                f"{where}: column {configured!r} of {now} is another column than install "
                f"recorded (that one is {current or 'dropped'!r} now): keys are rendered "
                f"from the column named {configured!r}, as the application's queries do; "
                "run `cdc-invalidator install` to record it"
            )
        elif current is None:
            drifted = True
            report.errors.append(
                f"{where}: column {configured!r} of {now} was dropped: the templates using it "
                "cannot be rendered, so each change of the table is swept (SCAN + UNLINK of "
                "its templates): edit the templates, then run `cdc-invalidator install`"
            )
        elif current != configured:
            drifted = True
            report.errors.append(
                f"{where}: column {configured!r} of {now} was renamed to {current!r}: keys "
                f"are still invalidated (followed by column number), but {todo}"
            )
    return drifted
