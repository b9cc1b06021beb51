"""Turn a ChangeEvent into the keys to delete: pure, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from cdc_invalidator.events import (
    ChangeEvent,
    InvalidEvent,
    Op,
    Pack,
    Row,
    StandInKind,
    TableName,
    stand_in,
)
from cdc_invalidator.mapping.templates import KeyTemplate, Render, RenderError, TemplateError


class NotConfigured(InvalidEvent):
    """An event of a table the configuration does not name."""


class MissingColumn(InvalidEvent):
    """A row that lacks a column one of its table's templates uses (Mapper.add sweeps the
    templates it cannot render instead: _add_lacking)."""


class StoodIn(NamedTuple):
    """A table's stand-ins of one kind in a batch: the last one's detail, how many."""

    detail: str
    times: int


@dataclass(slots=True)
class Invalidation:
    """What one batch must delete: exact keys, and glob patterns to sweep (TRUNCATE)."""

    keys: set[str] = field(default_factory=set)
    patterns: set[str] = field(default_factory=set)
    # Tables swept for TRUNCATE events that stand for something else (events.stand_in,
    # StandInKind), for the runner to log and count: by table and kind, the last one's
    # detail and how many there were (a streamed transaction may hold a million of one
    # table's, so not one entry each).
    stood_in: dict[tuple[TableName, StandInKind], StoodIn] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys) + len(self.patterns)

    def add_stand_in(
        self, table: TableName, kind: StandInKind, detail: str, times: int = 1
    ) -> None:
        """Note `times` stand-ins of `kind` for `table`, the last with `detail`."""
        seen = self.stood_in.get((table, kind))
        self.stood_in[table, kind] = StoodIn(detail, times + (seen.times if seen else 0))


# Invalidations by Redis logical database: None is the one redis_url names.
Routed = dict[int | None, Invalidation]


# A key set held compactly (a streamed transaction's chunks, second deletes owed): its
# keys joined into one string by NUL, which PostgreSQL text cannot hold, instead of a
# str object per key in a set (~90 bytes a key in all).
KEYS_SEP = "\0"
PackedKeys = str | tuple[str, ...]  # a tuple where a template's literal held KEYS_SEP


def pack_keys(keys: Collection[str]) -> PackedKeys:
    """`keys` as one string, or as a tuple if a key held the separator."""
    joined = KEYS_SEP.join(keys)
    if keys and joined.count(KEYS_SEP) != len(keys) - 1:
        return tuple(keys)
    return joined


def unpack_keys(packed: PackedKeys) -> Sequence[str]:
    """The keys pack_keys packed, in the same order."""
    if isinstance(packed, tuple):
        return packed
    return packed.split(KEYS_SEP) if packed else ()


def merge(into: Routed, other: Routed, *, stand_ins: bool = True) -> None:
    """`other`'s keys and patterns added to `into`, and its stand-ins unless `stand_ins`
    is False (an earlier mapping's rendering of changes the listener's mapping counts
    already: Mapper._add_earlier, the captures' eras)."""
    for db, work in other.items():
        target = into.setdefault(db, Invalidation())
        target.keys.update(work.keys)
        target.patterns.update(work.patterns)
        if not stand_ins:
            continue
        # (a streamed transaction's stand-ins reach the runner this way: it counts and
        # logs their sweeps as it does a batch's own)
        for (table, kind), seen in work.stood_in.items():
            target.add_stand_in(table, kind, seen.detail, seen.times)


class Retired(NamedTuple):
    """A table an earlier `install` watched and the configuration no longer names: the
    templates (with their key prefix) and the Redis database of the last mapping that
    named it, as that install recorded them; `earlier`: the other templates and
    databases earlier mappings gave it (removed, added again otherwise, removed again:
    a change committed under one of those is rendered with each, for its keys)."""

    templates: tuple[KeyTemplate, ...]
    db: int | None
    earlier: tuple[tuple[tuple[KeyTemplate, ...], int | None], ...] = ()


def _entry(entry: object) -> tuple[tuple[KeyTemplate, ...], int | None] | None:
    """One mapping_v1.tables entry's templates and Redis database; None when it is not
    what install records."""
    if not isinstance(entry, dict):
        return None
    keys, db = entry.get("keys"), entry.get("redis_db")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return None
    try:
        templates = tuple(KeyTemplate.parse(k) for k in keys)
    except TemplateError:
        return None
    return templates, db if isinstance(db, int) and not isinstance(db, bool) else None


def retired_table(entry: object) -> Retired | None:
    """A mapping_v1.tables entry (retired_table_v1()) as the mapper's Retired; None when
    it is missing or not what install records. Its "earlier" entries that are not so
    are left out."""
    last = _entry(entry)
    if last is None:
        return None
    earlier = entry.get("earlier") if isinstance(entry, dict) else None
    found = [_entry(e) for e in earlier] if isinstance(earlier, list) else []
    return Retired(*last, tuple(e for e in found if e is not None and e[0]))


class Era(NamedTuple):
    """An earlier mapping's templates of tables the listener's mapping gives others (or
    another redis_db), and the changes captured under it: trigger mode's queue ids from
    `start` (None: from the first) to `below` (None: its capture still runs, the
    listener's mapping not installed yet; sql/schema.sql, mapping_eras_v1()). Such a
    change is rendered with `mapper` too: its keys were the app's when it committed."""

    start: int | None
    below: int | None
    tables: frozenset[TableName]
    mapper: Mapper

    def sweeps(self, table: TableName, columns: Collection[str]) -> Routed:
        """Its templates of `table` that use any of `columns`, as patterns under the
        table's Redis database (empty if none do)."""
        return self.mapper.sweep_using(table, columns)

    def add_keys(self, events: Sequence[ChangeEvent], into: Routed) -> None:
        """The keys of `events` of its tables, rendered with its templates, added to
        `into` (not its stand-ins: the listener's mapping counts those already)."""
        theirs = [event for event in events if event.table in self.tables]
        if theirs:
            merge(into, self.mapper.map_all(theirs)[0], stand_ins=False)


def mapping_eras(found: object) -> list[Era]:
    """mapping_eras_v1()'s answer as Eras; what is not what install records is left out."""
    eras: list[Era] = []
    for era in found if isinstance(found, list) else []:
        if not isinstance(era, dict):
            continue
        start, below, tables = era.get("from"), era.get("below"), era.get("tables")
        if not (below is None or isinstance(below, int)) or not isinstance(tables, dict):
            continue
        templates: dict[TableName, tuple[KeyTemplate, ...]] = {}
        dbs: dict[TableName, int] = {}
        for qualified, entry in tables.items():
            parsed = _entry(entry)
            if parsed is None or not parsed[0]:
                continue
            table = TableName.parse(qualified)
            templates[table] = parsed[0]
            if parsed[1] is not None:
                dbs[table] = parsed[1]
        if templates:
            eras.append(
                Era(
                    start if isinstance(start, int) else None,
                    below,
                    frozenset(templates),
                    Mapper(templates, dbs, sweep_lacking=False),
                )
            )
    return eras


# Asked for a table the configuration does not name (the listener's: one query of
# cdc_invalidator.retired_table_v1(), listener.retired_lookup); None: no installed
# mapping named it.
RetiredLookup = Callable[[TableName], Retired | None]

_TABLE = attrgetter("table")  # (a ChangeEvent's)


class Mapper:
    def __init__(
        self,
        tables: Mapping[TableName, Iterable[KeyTemplate]],
        dbs: Mapping[TableName, int] | None = None,
        retired: RetiredLookup | None = None,
        sweep_lacking: bool = True,
    ) -> None:
        self._templates = {table: tuple(ts) for table, ts in tables.items()}
        # The configured tables: what is watched, swept and checked. A change of another
        # table is rendered with the templates of the last installed mapping that named
        # it (`retired`), once per table: one queued or streamed before an `install`
        # that removed the table committed (docs/DBA.md), which its keys must follow.
        self._configured = dict(self._templates)
        self._retired = retired
        self._looked_up: set[TableName] = set()
        # An adopted table's earlier templates (Retired.earlier), each a mapper of its
        # own under its Redis database: map_all() adds their keys too.
        self._earlier: dict[TableName, tuple[Mapper, ...]] = {}
        # False for those: a row that lacks a column of a template was not captured
        # under it (each capture copies the columns of its mapping's templates), so
        # that template has no key of it to delete, and nothing is swept.
        self._sweep_lacking = sweep_lacking
        # Tables whose keys live in another Redis logical database (redis_db).
        self._dbs = dict(dbs or {})
        # Each table's compiled renderers, in template order: the hot loop of add_all().
        self._renders = {
            table: tuple(t.render for t in ts) for table, ts in self._templates.items()
        }
        self._render_alls = {
            table: tuple(t.render_all for t in ts) for table, ts in self._templates.items()
        }
        self._render_columns = {
            table: tuple((t.render_columns, t.fields) for t in ts)
            for table, ts in self._templates.items()
        }

    @property
    def tables(self) -> Mapping[TableName, tuple[KeyTemplate, ...]]:
        return self._configured

    def _adopt(self, table: TableName) -> bool:
        """Whether `table` can be rendered: configured, or retired and now adopted (its
        last installed templates looked up once)."""
        if table in self._renders:
            return True
        if self._retired is None or table in self._looked_up:
            return False
        found = self._retired(table)  # (an OperationalError: the batch comes again)
        self._looked_up.add(table)
        if found is None or not found.templates:
            return False
        ts = self._templates[table] = found.templates
        if found.earlier:
            self._earlier[table] = tuple(
                Mapper({table: t}, None if db is None else {table: db}, sweep_lacking=False)
                for t, db in found.earlier
            )
        if found.db is not None:
            self._dbs[table] = found.db
        self._renders[table] = tuple(t.render for t in ts)
        self._render_alls[table] = tuple(t.render_all for t in ts)
        self._render_columns[table] = tuple((t.render_columns, t.fields) for t in ts)
        return True

    def renders(self, table: TableName) -> bool:
        """Whether a change of `table` can be rendered: configured, or a table the
        configuration lacks that an earlier install named (looked up once, _adopt)."""
        return self._adopt(table)

    def sweep_all(self) -> Routed:
        """Every template of every table as a pattern, under its table's Redis database:
        what a sweep of every watched table deletes (as their TRUNCATEs would)."""
        routed: Routed = {}
        for table, templates in self._configured.items():
            work = routed.setdefault(self._dbs.get(table), Invalidation())
            work.patterns.update(t.glob() for t in templates)
        return routed

    def sweep_using(self, table: TableName, columns: Collection[str]) -> Routed:
        """The templates of `table` that use any of `columns`, as patterns under its
        Redis database; empty if none does."""
        globs = {t.glob() for t in self._templates.get(table, ()) if set(t.fields) & set(columns)}
        return {self._dbs.get(table): Invalidation(patterns=globs)} if globs else {}

    def columns(self, table: TableName) -> list[str]:
        """The columns a table's templates use: what its trigger must copy."""
        return sorted({f for t in self._templates[table] for f in t.fields})

    def map_all(
        self, events: list[ChangeEvent]
    ) -> tuple[Routed, list[tuple[ChangeEvent, InvalidEvent]]]:
        """add_all() into one Invalidation per Redis database the events' tables use."""
        if self._retired is not None:
            # The batch's tables resolved before it is mapped: one the configuration
            # lacks is adopted (_adopt) first, so that its events are grouped under its
            # own Redis database, if it has one, in the one pass below.
            for table in dict.fromkeys(map(_TABLE, events)):
                self._adopt(table)
        routed: Routed = {}
        failed: list[tuple[ChangeEvent, InvalidEvent]] = []
        if not self._dbs:
            failed = self.add_all(events, routed.setdefault(None, Invalidation()))
        else:
            groups: dict[int | None, list[ChangeEvent]] = {}
            for event in events:
                groups.setdefault(self._dbs.get(event.table), []).append(event)
            for db, group in groups.items():
                failed += self.add_all(group, routed.setdefault(db, Invalidation()))
        if self._earlier:
            self._add_earlier(events, routed)
        return routed, failed

    def _add_earlier(self, events: list[ChangeEvent], routed: Routed) -> None:
        """The keys of the earlier templates of the adopted tables among `events` (a
        change of one may have been committed under any of them), added to `routed`
        under their Redis databases. Their failures are the last templates' already."""
        for table, mappers in self._earlier.items():
            theirs = [e for e in events if e.table == table]
            if not theirs:
                continue
            for mapper in mappers:
                merge(routed, mapper.map_all(theirs)[0], stand_ins=False)

    def map_pack(self, pack: Pack, into: Routed) -> bool:
        """The keys of a pack's changes (given column-wise), added to `into` under the
        table's Redis database: the same keys as map_all() of their events, without an
        event or a row per change (KeyTemplate.render_columns).

        False, and nothing added, when that cannot be done exactly: an unknown table, a
        missing row side, a missing column or a value not text. Their events then go
        through map_all(), which sweeps or dead-letters exactly the changes it cannot map."""
        table, op, old, new, count = pack
        templates = self._render_columns.get(table)
        if templates is None or op is Op.TRUNCATE or table in self._earlier:
            return False
        first, second = (new, None) if op is Op.INSERT else (old, new)
        if first is None or (op is Op.UPDATE and second is None):
            return False
        keys: list[str] = []
        for render_columns, fields in templates:
            rendered = render_columns(first, count)
            if rendered is None:
                return False
            keys += rendered
            if second is None or second is first:
                continue
            if all(second.get(f) == first.get(f) for f in fields):
                continue  # this template's columns unchanged: rendered once, as add_all()
            rendered = render_columns(second, count)
            if rendered is None:
                return False
            keys += rendered
        work = into.get(self._dbs.get(table))
        if work is None:
            work = into[self._dbs.get(table)] = Invalidation()
        work.keys.update(keys)
        return True

    def add_all(
        self, events: Iterable[ChangeEvent], into: Invalidation
    ) -> list[tuple[ChangeEvent, InvalidEvent]]:
        """add() for many events; returns those that failed, with why, instead of raising.

        The same keys as add(), through the same rule: each table's rows (INSERT the
        new row; DELETE the old; UPDATE both, or one for both when the key columns did
        not change) gathered, then rendered a template at a time (KeyTemplate.render_all:
        a backlog and a bulk statement spend their time here). TRUNCATE, and a table
        whose rows do not all render, go through add() event by event, which explains
        failures.
        """
        events = events if isinstance(events, list) else list(events)
        insert, update, truncate = Op.INSERT, Op.UPDATE, Op.TRUNCATE
        rows_of: dict[TableName, list[Row]] = {}
        one_by_one: list[ChangeEvent] = []
        for event in events:
            op = event.op
            if op is truncate:
                one_by_one.append(event)
                continue
            row = event.new if op is insert else event.old
            other = event.new if op is update else row
            if row is None or other is None:
                one_by_one.append(event)
                continue
            rows = rows_of.get(event.table)
            if rows is None:
                rows = rows_of[event.table] = []
            rows.append(row)
            if other is not row:
                rows.append(other)
        keys = into.keys
        for table, rows in rows_of.items():
            renders = self._render_alls.get(table)
            if renders is not None:
                try:
                    rendered = [render_all(rows) for render_all in renders]
                except RenderError:
                    pass  # add() says which row
                else:
                    for some in rendered:
                        keys.update(some)
                    continue
            # (the events gathered above: those of the table not already one by one)
            one_by_one += [e for e in events if e.table == table and _gathered(e)]
        return self._add_each(one_by_one, events, into)

    def _add_each(
        self, some: list[ChangeEvent], events: list[ChangeEvent], into: Invalidation
    ) -> list[tuple[ChangeEvent, InvalidEvent]]:
        """add() for each of `some` (of `events`), in the events' order as add() would
        have met them; the failures."""
        if len(some) > 1:
            order = {id(e): i for i, e in enumerate(events)}
            some.sort(key=lambda e: order[id(e)])
        failed: list[tuple[ChangeEvent, InvalidEvent]] = []
        for event in some:
            try:
                self.add(event, into)
            except InvalidEvent as exc:
                failed.append((event, exc))
        return failed

    def add(self, event: ChangeEvent, into: Invalidation) -> None:
        """Add the event's keys to `into`, or raise InvalidEvent saying why not.

        INSERT deletes the new row's keys (a cached "not found" is stale now), DELETE the
        old row's, UPDATE both (a changed email or primary key must drop the old key
        too). A NULL field skips that one key. TRUNCATE has no rows: every template
        becomes a pattern; so does each template a row lacks a column of (_add_lacking).
        """
        renders = self._renders.get(event.table)
        if renders is None and self._adopt(event.table):
            renders = self._renders[event.table]
        if renders is None:
            raise NotConfigured(f"table {event.table} is not in the configuration")
        if event.op is Op.TRUNCATE:
            into.patterns.update(t.glob() for t in self._templates[event.table])
            stands_for = stand_in(event)
            if stands_for is not None:
                into.add_stand_in(event.table, *stands_for)
            return
        keys: list[str] = []
        op = event.op
        try:
            if op is Op.UPDATE or op is Op.DELETE:
                _render(renders, event.old, "old", event, keys)
            # (An UPDATE that left the key columns alone carries one row for both.)
            if op is Op.INSERT or (op is Op.UPDATE and event.new is not event.old):
                _render(renders, event.new, "new", event, keys)
        except MissingColumn as exc:
            self._add_lacking(event, into, str(exc))
            return
        into.keys.update(keys)

    def _add_lacking(self, event: ChangeEvent, into: Invalidation, reason: str) -> None:
        """add() for a change whose rows lack a column some templates use: captured before
        `install` gave the table a template of another column (its capture function
        copied the columns of the templates it had then), or written by hand. The keys
        of the templates its rows render are deleted; each template they cannot render
        (a column lacking, or a value written by hand that is not text) is swept (SCAN +
        UNLINK of its glob), since its keys cannot be known. A dead letter would leave
        them cached; sweeping the templates it renders too would empty the table's cache
        for nothing."""
        sides = [event.old] if event.op is Op.DELETE else [event.new]
        if event.op is Op.UPDATE and event.new is not event.old:
            sides.append(event.old)
        rows: list[Row] = []
        for row in sides:
            if row is None:
                raise InvalidEvent(f"{event.op.name} on {event.table} carries no row to render")
            rows.append(row)
        keys: list[str] = []
        patterns: list[str] = []
        for template in self._templates[event.table]:
            try:
                rendered = [template.render(row) for row in rows]
            except RenderError:  # (lacking, or, written by hand, a value not text)
                patterns.append(template.glob())
                continue
            keys += [key for key in rendered if key is not None]
        into.keys.update(keys)
        if not self._sweep_lacking:
            return
        into.patterns.update(patterns)
        into.add_stand_in(event.table, StandInKind.UNRENDERABLE, reason)


def _gathered(event: ChangeEvent) -> bool:
    """Whether add_all() gathered the event's rows (else it went one by one)."""
    if event.op is Op.TRUNCATE:
        return False
    if event.op is Op.INSERT:
        return event.new is not None
    return event.old is not None and (event.op is not Op.UPDATE or event.new is not None)


def _render(
    renders: tuple[Render, ...], row: Row | None, which: str, event: ChangeEvent, out: list[str]
) -> None:
    if row is None:
        raise InvalidEvent(f"{event.op.name} on {event.table} carries no {which} row")
    try:
        for render in renders:
            key = render(row)
            if key is not None:
                out.append(key)
    except RenderError as exc:
        error = MissingColumn if exc.missing else InvalidEvent
        raise error(exc.within(f"{which} row of {event.table}")) from None
