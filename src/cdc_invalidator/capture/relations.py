"""Logical mode: which relation of the stream is which configured table.

Tables are followed by relation, not by name: the configured names are resolved once
per connection through what install recorded (published_v1: the relid and the key
columns' numbers), so a table or key column renamed later keeps its templates. A
partition resolves through its configured ancestor. The Decoder asks once per Relation
message (capture/pgoutput.py's Resolve), and tells what cannot be rendered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import structlog

from cdc_invalidator.capture.pgoutput import Relation, Resolved
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping.columns import ColumnFilter
from cdc_invalidator.mapping.mapper import RetiredLookup
from cdc_invalidator.pg.queries import Q

# (the stream's logger: its lines are one capture's, whichever module says them)
log = structlog.get_logger("cdc_invalidator.capture.logical")

# A relid's configured table, its key columns as configured and their numbers (None: a
# column the table did not have when it was recorded).
Known = dict[int, tuple[TableName, tuple[str, ...], list[int | None]]]


class Relations:
    """The configured tables by relid, read on the bookkeeping connection."""

    def __init__(
        self,
        side: psycopg.Connection[Any],
        columns: Mapping[TableName, Sequence[str]],
        filters: Mapping[TableName, ColumnFilter],
        retired: RetiredLookup | None = None,
        earlier: Mapping[TableName, Sequence[str]] | None = None,
    ) -> None:
        self._side = side
        self._columns = columns
        self._filters = filters
        # Columns only an earlier mapping's templates of a table use (the captures'
        # eras): decoded where a change has them, never a missing key column.
        self._earlier = earlier or {}
        # The listener's lookup of a table its configuration lacks (listener.py), the
        # one its mappers ask: once per table for both.
        self._retired_lookup = retired
        # Relids resolved to a table (each seen committed in the catalog then), and of
        # those the ones dropped since, by a position past their drop: once the stream is
        # read past it, no change of theirs is left to decode (forget_passed()).
        self._resolved: set[int] = set()
        self._dropped: dict[int, int] = {}
        self._known = self._configured()

    def _configured(self) -> Known:
        """Configured table -> its relid and key columns' numbers."""
        recorded = self._side.execute(Q.PUBLISHED_RECORDED.sql).fetchone()
        query = Q.LOGICAL_RESOLVE.sql if recorded and recorded[0] else Q.LOGICAL_RESOLVE_BY_NAME.sql
        known: Known = {}
        for table, configured in self._columns.items():
            columns = [*configured, *self._earlier.get(table, ())]
            row = self._side.execute(
                query,
                {
                    "qualified": table.qualified,
                    "schema": table.schema,
                    "name": table.name,
                    "columns": list(columns),
                },
            ).fetchone()
            if row is None or row[0] is None:
                continue  # `check` says why; its changes cannot reach us under another id
            known[int(row[0])] = (table, tuple(columns), list(row[1]))
        if recorded and recorded[0]:
            # Published by an earlier install but no longer configured: its changes are
            # dead letters ("not in the configuration"), holding its key columns as that
            # install recorded them, never the whole row.
            for relid, schema, name, columns, attnums in self._side.execute(Q.PUBLISHED_TABLES.sql):
                known.setdefault(int(relid), (TableName(schema, name), tuple(columns), attnums))
        return known

    def _note_dropped(self) -> None:
        """Which relations resolved so far have been dropped since, and a position past
        their drops (relations_gone.sql). Asked at each Relation message (one per
        relation a walsender session meets, and again after its DDL): a table dropped and
        made again under its name, or a partition dropped as another is made, brings one.
        Not published_v1's drop marks: the guard prunes a row once every slot confirmed
        past it, maybe before this listener read the mark."""
        relids = sorted(self._resolved.difference(self._dropped))
        if not relids:
            return
        row = self._side.execute(Q.RELATIONS_GONE.sql, {"relids": relids}).fetchone()
        gone, past = row if row is not None else ((), 0)  # (one row: an aggregate's)
        for relid in gone:
            self._dropped[int(relid)] = int(past)

    def resolve(self, relid: int, _name: TableName, columns: tuple[str, ...]) -> Resolved | None:
        """A Relation message: which configured table, and each key column's name in it.

        A column is looked for under its configured name, then under the name its
        number has now (renamed since install, the configuration not yet following). The
        configured name first: the application's queries, and trigger mode's capture,
        name columns, so a column that took a key column's name (expand/contract's new
        column renamed into place, or two names swapped) is the key's now. A change made
        before a rename, decoded after it, still carries the old name. A partition's
        columns have its parent's names, so a partition resolves through its configured
        ancestor.

        Both names in the message, and different, and the message's column names not
        the relation's now: names were swapped after the change was made (email and
        name, say), and either could be the key column's. Resolved.unsure: swept.
        """
        self._note_dropped()
        found = self._known_or_ancestor(relid)
        if found is None:
            # A table published since this connection began (or a partition of one): the
            # rebuild guard publishes one that took a configured table's name
            # (sql/rebuild_guard.sql).
            self._known = self._configured()
            found = self._known_or_ancestor(relid)
            if found is None:
                return self._retired(relid, _name, columns)
        self._resolved.add(relid)
        target, (table, wanted, attnums) = found
        now = dict(
            self._side.execute(
                Q.RELATION_COLUMNS.sql,
                {"relid": target, "attnums": [a for a in attnums if a is not None]},
            ).fetchall()
        )
        present = set(columns)
        names: dict[str, str] = {}
        twice = False
        for column, attnum in zip(wanted, attnums, strict=True):
            renamed = now.get(attnum)
            twice |= renamed is not None and renamed != column and {renamed, column} <= present
            for candidate in (column, renamed):
                if candidate is not None and candidate in present:
                    names[column] = candidate
                    break
        unsure = twice and [
            name
            for (name,) in self._side.execute(Q.RELATION_NAMES.sql, {"relid": relid})
            if name in present
        ] != list(columns)
        optional = self._optional(table)
        return Resolved(
            table,
            wanted,
            names,
            self._filters.get(table),
            unsure,
            optional,
            self._unsent(target, [c for c in optional if c not in names]),
        )

    def _optional(self, table: TableName) -> frozenset[str]:
        return frozenset(self._earlier.get(table, ()))

    def _unsent(self, relid: int, absent: list[str]) -> frozenset[str]:
        """Of the optional columns a Relation message lacks, those generated (never
        published before PostgreSQL 18), or no live column now (a generated column
        dropped since: the catalog keeps neither its name nor that it was generated):
        a change committed under the earlier templates that use one could not render
        them then either, and swept them. (Before, a generated column dropped after the
        install that replaced its template left a:c1 of a:{code} cached, unswept.)"""
        if not absent:
            return frozenset()
        rows = self._side.execute(Q.UNSENT_COLUMNS.sql, {"relid": relid, "names": absent})
        return frozenset(name for (name,) in rows)

    def _retired(self, relid: int, table: TableName, columns: tuple[str, ...]) -> Resolved | None:
        """A relation neither configured nor recorded as published: a table an `install`
        stopped watching, its changes streamed before that install committed, or a
        partition of one (publish_via_partition_root is off: its changes come under the
        partition's name, and were dead letters, "public.events_1 is not in the
        configuration", their keys left cached). The columns the templates of the last
        installed mapping that named it use (the listener's lookup, `retired`, whose
        answer the mapper renders them with, under that table's name), never the whole
        row; None if no mapping recorded it, or no lookup was given (its changes are dead
        letters). Without this its rows came with no column at all, "lacked" every key
        column, and each batch of them swept the table's templates (all its cached keys)
        instead."""
        if self._retired_lookup is None:
            return None
        retired = self._retired_lookup(table)
        if retired is None:
            for schema, name in self._side.execute(
                Q.RETIRED_ANCESTORS.sql, {"relid": relid}
            ).fetchall():
                retired = self._retired_lookup(TableName(schema, name))
                if retired is not None:
                    table = TableName(schema, name)
                    break
        if retired is None:
            return None
        every = retired.templates + tuple(t for ts, _db in retired.earlier for t in ts)
        wanted = tuple(dict.fromkeys(f for t in every for f in t.fields))
        present = set(columns)
        return Resolved(table, wanted, {c: c for c in wanted if c in present})

    def forget_passed(self, read_upto: int) -> list[int]:
        """The dropped relids the stream has been read past (every change of theirs was
        committed before the position recorded past their drop): forgotten here, for the
        Decoder to forget too. A table dropped and made again under its name, over and
        over, would otherwise leave a Relation per cycle in each cache."""
        passed = [relid for relid, lsn in self._dropped.items() if lsn <= read_upto]
        for relid in passed:
            del self._dropped[relid]
            self._resolved.discard(relid)
            self._known.pop(relid, None)
        return passed

    def bases(self, types: set[int]) -> dict[int, int]:
        """The base type of each type (a domain's; any other type's its own)."""
        rows = self._side.execute(Q.BASE_TYPES.sql, {"types": sorted(types)}).fetchall()
        return {int(oid): int(base) for oid, base in rows}

    def _known_or_ancestor(
        self, relid: int
    ) -> tuple[int, tuple[TableName, tuple[str, ...], list[int | None]]] | None:
        """The configured table a relation is, or the nearest one it is a partition of,
        with that table's relid; None if neither."""
        entry = self._known.get(relid)
        if entry is not None:
            return relid, entry
        for (ancestor,) in self._side.execute(Q.PARTITION_ANCESTORS.sql, {"relid": relid}):
            entry = self._known.get(int(ancestor))
            if entry is not None:
                return int(ancestor), entry
        return None

    @staticmethod
    def unrenderable(relation: Relation) -> None:
        if relation.unsure:
            log.warning(
                "key_columns_renamed_behind",
                table=str(relation.table),
                columns=list(relation.missing),
                action="changes made before key columns swapped names, decoded after: "
                "each sweeps the table's key templates (SCAN + UNLINK); later changes "
                "get exact keys",
            )
            return
        log.warning(
            "key_columns_missing",
            table=str(relation.table),
            columns=list(relation.missing),
            action="each change of the table made while they were missing sweeps its key "
            "templates (SCAN + UNLINK): edit the templates to the table's columns, then run "
            "`cdc-invalidator install` (nothing to do if the columns have their names again, "
            "as after a rename undone in the same transaction; a key column of a type cast "
            "to text by a function of the database's own is never rendered in logical mode: "
            "drop that cast, or key the template on another column)",
        )

    @staticmethod
    def old_values_not_sent(relation: Relation, columns: list[str]) -> None:
        log.warning(
            "old_values_not_sent",
            table=str(relation.table),
            columns=columns,
            detail="the replica identity does not cover these columns: keys built from their "
            'old values cannot be deleted (set replica_identity to "full" and run install)',
        )
