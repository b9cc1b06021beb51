"""Logical mode's eras: the templates earlier mappings gave tables that the listener's
mapping renders otherwise (an `install` replaced `a:{id}` by `b:{id}`), with the commit
positions captured under each (trigger_sql.mapping_eras_of). A change committed under
one is rendered with its templates too: `a:1` was the app's key when it committed.

Which changes: a committed transaction's by its commit position; a streamed block's
(its commit position not known yet) by the WAL position of its first change, a
superset. What else they need: the columns only their templates use, decoded too
(Resolved.optional); their tables' UPDATEs in such a transaction not judged by the new
file's column filters (Decoder.unjudged); and a column they use that cannot be decoded
(Decoder.unprintable) makes those templates swept instead. Empty (no template ever
replaced, or no `mapping_eras_v1()` to ask): nothing is done.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import structlog

from cdc_invalidator.capture.packs import ColumnPack
from cdc_invalidator.capture.trigger_sql import (
    ERAS_ASK_EVERY_S,
    MappingStamp,
    eras_again,
    mapping_eras_of,
)
from cdc_invalidator.events import ChangeEvent, TableName
from cdc_invalidator.mapping.mapper import Era, Routed, merge

log = structlog.get_logger("cdc_invalidator.capture.logical")


class LogicalEras:
    """The eras of one stream's connection (`side`: where they are asked)."""

    def __init__(
        self, side: psycopg.Connection[Any], mapping: MappingStamp | None, *, asked: bool
    ) -> None:
        self._side = side
        self._mapping = mapping
        self.eras: list[Era] = mapping_eras_of(side, mapping, "logical") if asked else []
        self._asked_at = time.monotonic()
        self._told_unprintable: set[tuple[TableName, frozenset[str]]] = set()

    def __bool__(self) -> bool:
        return bool(self.eras)

    def columns(self, have: Mapping[TableName, Sequence[str]]) -> dict[TableName, list[str]]:
        """The columns the eras' templates of each table use and the listener's (`have`)
        do not: a change committed under `a:{code}`, read by a listener of `b:{id}`,
        needs its code (before, it was not decoded, and `a:{code}` went unrendered)."""
        earlier: dict[TableName, list[str]] = {}
        for era in self.eras:
            for table in era.tables:
                known = {*have.get(table, ()), *earlier.get(table, ())}
                more = [c for c in era.mapper.columns(table) if c not in known]
                if more:
                    earlier.setdefault(table, []).extend(more)
        return earlier

    def ask_if_due(self) -> bool:
        """While an era is open (this listener's mapping not installed yet, or its
        boundary not recorded yet: every change is rendered with the earlier templates
        too), whether `install` recorded its boundary, every ERAS_ASK_EVERY_S. True when
        no era is left."""
        now = time.monotonic()
        if now < self._asked_at + ERAS_ASK_EVERY_S:
            return False
        self._asked_at = now
        if not any(era.below is None for era in self.eras):
            return False
        self.eras = eras_again(self._side, self._mapping, "logical", self.eras)
        return not self.eras

    def committed_in(self, commit: int) -> list[Era]:
        """The eras a transaction committed at `commit` was captured under: its changes of
        their tables are rendered with their templates too, and its UPDATEs of them not
        judged by this mapping's column filters."""
        return [
            era
            for era in self.eras
            if (era.start or 0) <= commit < (era.below if era.below is not None else 1 << 64)
        ]

    def begun_before(self, block: int) -> list[Era]:
        """The eras a streamed block whose first change is at `block` may have been
        captured under, its commit position not known yet: each whose boundary is past
        it, whatever its own start. Its commit comes after its changes, so every change
        committed under an earlier mapping is covered, and some committed after its
        boundary are too (begun before an install, committed after it: a key deleted in
        vain). Before, such a transaction committed before a template-replacing install
        and streamed afterwards kept every `a:N` of the old templates cached."""
        return [era for era in self.eras if era.below is None or block < era.below]

    @staticmethod
    def tables(eras: list[Era]) -> frozenset[TableName]:
        return frozenset().union(*(era.tables for era in eras))

    def add_committed(
        self,
        events: list[ChangeEvent],
        transactions: Sequence[tuple[int, int, int, int]],
        into: Routed,
        unprintable: Mapping[TableName, frozenset[str]],
    ) -> None:
        """The keys of a batch's `events` committed under an earlier mapping (each
        transaction: its first position, xid, commit position, commit time), rendered
        with its templates too, added to `into`."""
        starts = [t[0] for t in transactions]
        commits = [t[2] for t in transactions]
        if not starts:
            return
        for era in self.eras:
            below = era.below if era.below is not None else 1 << 64
            start = era.start or 0
            tables = era.tables
            theirs = []
            for event in events:
                if event.table not in tables:
                    continue
                i = bisect.bisect_right(starts, event.position) - 1
                if i >= 0 and start <= commits[i] < below:
                    theirs.append(event)
            self.render(era, theirs, [], into, unprintable)

    def render(
        self,
        era: Era,
        events: list[ChangeEvent],
        packs: list[ColumnPack],
        into: Routed,
        unprintable: Mapping[TableName, frozenset[str]],
    ) -> None:
        """The keys of `events` and `packs` of `era`'s tables rendered with its templates,
        added to `into` (no stand-ins: the listener's mapping counts those already). Its
        templates of a column the stream named with a type that cannot be printed, or
        lacked for good (`unprintable`: a domain dropped since; a generated column
        before PostgreSQL 18) are swept for a change of the table instead, as a listener
        of that mapping swept them: before, such a change rendered nothing with them,
        and `a:c1` of `a:{code}` stayed cached, without a word."""
        routed: Routed = {}
        era.add_keys(events, routed)
        tables = {e.table for e in events if e.table in era.tables}
        for column_pack in packs:
            one = column_pack.as_pack()
            if one.table in era.tables:
                tables.add(one.table)
                if not era.mapper.map_pack(one, routed):
                    merge(routed, era.mapper.map_all(column_pack.events())[0], stand_ins=False)
        for table in tables:
            if (columns := unprintable.get(table)) and (swept := era.sweeps(table, columns)):
                merge(routed, swept, stand_ins=False)
                self._tell_unprintable(table, columns, swept)
        merge(into, routed, stand_ins=False)

    def _tell_unprintable(self, table: TableName, columns: frozenset[str], swept: Routed) -> None:
        """Logged once per table and columns (a connection's life)."""
        if (table, columns) in self._told_unprintable:
            return
        self._told_unprintable.add((table, columns))
        log.warning(
            "earlier_key_columns_unprintable",
            table=str(table),
            columns=sorted(columns),
            patterns=sorted(p for work in swept.values() for p in work.patterns),
            action="changes committed under an earlier mapping whose templates use these "
            "columns, of a type dropped since (or cast to text by a function of the "
            "database's own), or generated columns (not sent before PostgreSQL 18), sweep "
            "those templates (SCAN + UNLINK): their keys cannot be rendered",
        )
