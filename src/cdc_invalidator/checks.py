"""`check`: the configuration against the live database and Redis."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import permutations
from typing import Any, Protocol

import psycopg
import redis

from cdc_invalidator.capture import logical_sql
from cdc_invalidator.capture.errors import Fatal, returned
from cdc_invalidator.capture.lineage import CrashSetting, another_system, async_commit_places
from cdc_invalidator.capture.pgoutput import NATIVE_WALKS
from cdc_invalidator.capture.slot import SlotClass, SlotState
from cdc_invalidator.capture.trigger_sql import (
    SCHEMA_REVISION,
    SCHEMA_VERSION,
    MappingStamp,
    installed_mismatch,
    installed_version,
    mapping_state,
    nested_tables,
)
from cdc_invalidator.durations import format_duration
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping import Invalidation, KeyTemplate, Mapper
from cdc_invalidator.mapping.columns import ColumnFilter, Judge
from cdc_invalidator.pg import versions
from cdc_invalidator.pg.connect import REPLICATION, PgConnector, PoolerInTheWay
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.pg.standbys import names_standby
from cdc_invalidator.redact import redact_url
from cdc_invalidator.redis_guard.source import KEY_PREFIX as SOURCE_KEY_PREFIX
from cdc_invalidator.redis_guard.source import Source, lost_since, read_source
from cdc_invalidator.redis_guard.window import MARGIN_S, persistence_window
from cdc_invalidator.settings import Settings
from cdc_invalidator.sink import REDIS_ERRORS, REDIS_REFUSED, Sink, url_db
from cdc_invalidator.sink.slots import NATIVE_SLOTS


@dataclass(slots=True)
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors


def check_templates(settings: Settings, config_name: str) -> Report:
    """Warn where one table's TRUNCATE sweep would delete another table's keys.

    Each template's sweep is matched, as Redis matches it, against a sample key of every
    template of the other tables (every field "1"): a match means a TRUNCATE of the one
    table empties part of the other's cache. Harmless for correctness (cache misses),
    rarely what was meant. Tables whose keys live in different Redis databases never
    meet."""
    report = Report()
    mapper = settings.mapper()
    names = {TableName.parse(name): name for name in settings.tables}
    url_db = _url_db(settings.redis_url)
    dbs: dict[TableName, int | None] = {}
    for table in mapper.tables:
        db = settings.tables[names[table]].redis_db
        dbs[table] = url_db if db is None else db
    for table, templates in sorted(mapper.tables.items()):
        for template in templates:
            _warn_literal_field(report, config_name, names[table], template)
    for a, b in permutations(sorted(mapper.tables), 2):
        if dbs[a] is not None and dbs[b] is not None and dbs[a] != dbs[b]:
            continue
        for ta in mapper.tables[a]:
            for tb in mapper.tables[b]:
                key = tb.sample()
                if ta.sweeps(key):
                    report.warnings.append(
                        f"{config_name}: a TRUNCATE of table {names[a]!r} sweeps "
                        f"{ta.glob()!r} (template {ta.source!r}), which also matches keys of "
                        f"table {names[b]!r} (template {tb.source!r}, such as {key!r}): "
                        "they are deleted too. Give each table's templates a prefix of "
                        "their own if that is not meant"
                    )
    return report


# Literal text that reads as a field: "{{id}}" (doubled braces are literal) where a
# Redis Cluster hash tag around the value, "{{{id}}}", was meant.
_LITERAL_FIELD = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?:\|[^{}]*)?\}")


def _warn_literal_field(
    report: Report, config_name: str, table: str, template: KeyTemplate
) -> None:
    for literal in template.literals:
        if (found := _LITERAL_FIELD.search(literal)) is not None:
            text = found.group(0)
            tagged = template.source.replace("{" + text + "}", "{{" + text + "}}")
            report.warnings.append(
                f"{config_name}: template {template.source!r} of table {table!r} has the "
                f"literal text {text!r} in every key (doubled braces are literal): for a "
                f"Redis Cluster hash tag around the value, write {tagged!r}"
            )


def _url_db(url: str) -> int | None:
    """The logical database redis_url names, or None when it cannot be told."""
    try:
        return url_db(url)
    except ValueError:
        return None


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
            "cdc_invalidator_parts_moved and cdc_invalidator_parts_dropped) is not installed, or "
            "does not fire ALWAYS: a watched table dropped, or replaced by another that takes "
            "its name, leaves its keys cached and its new writes uncaptured until install runs "
            "again, and a partition dropped or detached leaves its rows' keys cached "
            '(docs/DBA.md, "Schema migrations"); run `cdc-invalidator install` as a superuser '
            "to add it"
        )


def stand_in_of(conn: psycopg.Connection[Any], table: TableName) -> bool:
    """Whether the table carries the rebuild guard's stand-in triggers."""
    row = conn.execute(Q.CHECK_STAND_IN.sql, {"table": table.qualified}).fetchone()
    return bool(row and row[0])


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


def _restored(table: str, who: str) -> str:
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
        report.warnings.append(_restored("listener_state_v1", "its next start"))
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
    elif configured:
        report.ok.append(
            f"{where}: a one-row change of {table} is sent in its NOTIFY payload "
            "(notify_payload = true: any role that can connect can LISTEN and read its "
            "key columns)"
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
    if published[1]:
        fine = False
        report.errors.append(
            f"{where}: the column list of {table} in publication "
            f"{settings.publication_name!r} leaves out key columns {published[1]}, whose "
            "values the templates need: run `cdc-invalidator install`"
        )
    if fine:
        report.ok.append(f"{where}: published, old values of {wanted} sent")


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


def check_slots(report: Report, *, native: bool) -> None:
    """Whether UNLINKs are packed, and a cluster's hash slots found, in C (an optional
    extension)."""
    if native:
        report.ok.append("UNLINKs are packed and hash slots found in C (sink/_slots.c)")
    else:
        report.warnings.append(
            "UNLINKs are packed and hash slots found in Python: sink/_slots.c was not built "
            "(no C compiler when the package was installed), and a Redis Cluster's deletes "
            "take about a third more of the listener's time; reinstall the package where "
            "gcc is"
        )


def _check_streaming(user: str, can_replicate: bool, pg: PgConnector, report: Report) -> None:
    """The role may stream, and a replication connection opens: ordinary sessions got
    in, so check said ok, while the stream's connection could not (a pooler in front
    refuses it, PgBouncer; pg_hba.conf has no `replication` line for the role), and the
    listener retried it (a review)."""
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
    wal_level, can_replicate, user, publication_exists, keep_size, sync_names = row
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
    _check_streaming(user, can_replicate, PgConnector.from_settings(settings), report)
    check_walks(report, native=NATIVE_WALKS)
    guard = conn.execute(Q.CHECK_DDL_GUARD.sql).fetchone()
    if publication_exists and not (guard and guard[0]):
        report.warnings.append(
            "the DDL guard (event triggers cdc_invalidator_guard and "
            "cdc_invalidator_guard_drops) is not installed, is "
            "disabled, or was made by an earlier release: a new partition or a dropped "
            "primary key can make writes to a published table fail, and a change to the "
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
            f"{state.where} was invalidated (wal_status {state.wal_status}): changes were "
            f"missed; {sweeps}"
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
    check_leftover_slots(conn, settings.slot_name, report)


def _sweeps_owed(state: SlotState, report: Report) -> None:
    """Logical mode: the sweep the slot owes, and one its next start, or install, owes a
    restore or a copy (slot_state_v1 made again, or another database's, since its rows
    were recorded)."""
    if state.resync_reason:
        report.warnings.append(f"a sweep of every watched table is owed: {state.resync_reason}")
    if state.restored:
        report.warnings.append(_restored("slot_state_v1", "its next start, or install,"))


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


# What `check` reports as Redis failing (Fatal: redis_url selects a database on a cluster).
_REDIS_FAILED: tuple[type[Exception], ...] = (*REDIS_ERRORS, Fatal)


def source_of(conn: psycopg.Connection[Any], settings: Settings) -> Source | None:
    """The database as the listener's source mark names it (redis_guard/source.py); None
    with source_mark = false, or where it cannot be read (check_database says why)."""
    if not settings.source_mark:
        return None
    try:
        return read_source(conn, settings.mapping_fingerprint())
    except psycopg.Error:
        return None


def check_redis(sink: Sink, url: str, settings: Settings, source: Source | None = None) -> Report:
    """Reachable; for a cluster, every primary (the listener talks to each); and what
    the source mark says of `source`, the database."""
    report = Report()
    try:
        what = sink.ping()
        replicas = [s for s in sink.states() if not s.master]
    except _REDIS_FAILED as exc:
        report.errors.append(f"redis at {redact_url(url)}: {exc}")
        return report
    if replicas:
        report.errors.append(
            f"redis at {redact_url(url)}: {what}, but a replica: its deletes fail "
            "(READONLY) or, on a writable replica, reach no other server. Point redis_url "
            "at the master, or use redis_sentinels"
        )
        return report
    report.ok.append(f"redis at {redact_url(url)}: {what}")
    check_slots(report, native=NATIVE_SLOTS)
    _check_may_delete(sink, settings, report)
    if settings.source_mark:
        _check_source_mark(sink, report, source)
    _check_replay(sink, settings, report)
    return report


def _check_source_mark(sink: Sink, report: Report, source: Source | None) -> None:
    """Whether Redis lets the listener read and write its source mark
    (redis_guard/source.py), on a key of its shape taken away after: refused, what only
    the mark tells is not swept for. And whether the mark owes `source` a sweep at the
    listener's next start: said before it happens, when a DBA can still keep the cache
    warm where nothing was lost."""
    probe = f"{SOURCE_KEY_PREFIX}check"
    try:
        sink.read_mark(probe)
        sink.write_mark(probe, "check")
        sink.delete_routed({None: Invalidation(keys={probe})})
        if source is not None:
            _say_owed(sink.read_mark(source.key), source, report)
    except redis.exceptions.ResponseError as exc:  # NOPERM; OOM under noeviction
        report.warnings.append(
            f"redis: the listener's source mark is refused ({type(exc).__name__}: {exc}): "
            "a primary gone back to after a failover, or a database renamed back into "
            f"place, is not swept for. Give the user GET and SET on the keys "
            f"'{SOURCE_KEY_PREFIX}*' (docs/redis.md), or set source_mark = false"
        )
    except _REDIS_FAILED:
        return  # (said by the checks above, or by the listener)


# A key no application holds, in each template's shape: what `check` deletes to learn
# whether the Redis user may (ACL key patterns, ~user:*): a NUL no PostgreSQL text holds.
_PROBE_VALUE = "\0cdc-invalidator-check"


def _check_may_delete(sink: Sink, settings: Settings, report: Report) -> None:
    """That the Redis user may UNLINK keys of every template: one it may not (an ACL
    whose key patterns leave a table out) holds every later change until it may."""
    for name, table in settings.tables.items():
        for source in table.keys:
            template = KeyTemplate.parse(table.key_prefix + source)
            probe = _PROBE_VALUE.join(template.literals)
            try:
                sink.delete_routed({table.redis_db: Invalidation(keys={probe})})
            except REDIS_REFUSED as exc:  # NOPERM
                # (Redis names the command it refused: SELECT for a db other than 0)
                fix = (
                    "+select in its ACL (a database other than 0)"
                    if "'select'" in str(exc)
                    else "those keys in its ACL"
                )
                report.errors.append(
                    f"redis: this user may not delete keys of table {name}'s template "
                    f"{source!r} ({exc}): the listener would wait at its first change, and "
                    f"every change after it with it. Give the user {fix} (docs/redis.md)"
                )
                break
            except _REDIS_FAILED:
                return  # (said by the checks above, or by the listener)


def _say_owed(recorded: str | None, source: Source, report: Report) -> None:
    """The sweep the source mark `recorded` owes `source` at the listener's next start."""
    if recorded is not None and (reason := lost_since(recorded, source)):
        report.warnings.append(
            f"the listener's next start sweeps every watched table once: {reason}. Where "
            "Redis was flushed or restored with the database, record this one first to keep "
            f"the cache warm: SET {source.key} '{source.mark}'"
        )


def _check_replay(sink: Sink, settings: Settings, report: Report) -> None:
    """What a restart of this Redis could bring back, and whether history covers it."""
    if settings.replay_window == 0:
        report.warnings.append(
            "replay_window is 0s: keys a Redis restart or failover brings back stay stale"
        )
        return
    if settings.replay_window is None:
        window, why = persistence_window(sink.persistence())
    else:
        window, why = settings.replay_window, "replay_window"
    line = f"replay after a Redis restart reaches back {format_duration(window)} ({why})"
    if window + MARGIN_S > settings.history_s:
        report.warnings.append(
            f"{line}, but replay_history keeps only {format_duration(settings.history_s)}: "
            "raise replay_history"
        )
    else:
        report.ok.append(line)
