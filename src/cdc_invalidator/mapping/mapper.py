"""Turn a ChangeEvent into the keys to delete: pure, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cdc_invalidator.events import UNRENDERABLE, ChangeEvent, InvalidEvent, Op, Row, TableName
from cdc_invalidator.mapping.templates import KeyTemplate


@dataclass(slots=True)
class Invalidation:
    """What one batch must delete: exact keys, and glob patterns to sweep (TRUNCATE)."""

    keys: set[str] = field(default_factory=set)
    patterns: set[str] = field(default_factory=set)
    # Tables swept because a change of theirs could not be rendered (a key column was
    # dropped or a partition lacks triggers), with the capture's reason: logged, counted.
    unrenderable: dict[TableName, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys) + len(self.patterns)


# Invalidations by Redis logical database: None is the one redis_url names.
Routed = dict[int | None, Invalidation]


def merge(into: Routed, other: Routed) -> None:
    for db, work in other.items():
        target = into.setdefault(db, Invalidation())
        target.keys.update(work.keys)
        target.patterns.update(work.patterns)


class Mapper:
    def __init__(
        self,
        tables: Mapping[TableName, Iterable[KeyTemplate]],
        dbs: Mapping[TableName, int] | None = None,
    ) -> None:
        self._templates = {table: tuple(ts) for table, ts in tables.items()}
        # Tables whose keys live in another Redis logical database (redis_db).
        self._dbs = dict(dbs or {})
        # (prefix, column, suffix) per template, for tables whose templates all have
        # exactly one field: the fast path of add_all().
        self._simple = {
            table: tuple((t.literals[0], t.fields[0], t.literals[1]) for t in ts)
            for table, ts in self._templates.items()
            if all(t.single_field is not None for t in ts)
        }

    @property
    def tables(self) -> Mapping[TableName, tuple[KeyTemplate, ...]]:
        return self._templates

    def columns(self, table: TableName) -> list[str]:
        """The columns a table's templates use: what its trigger must copy."""
        return sorted({f for t in self._templates[table] for f in t.fields})

    def map_all(
        self, events: list[ChangeEvent]
    ) -> tuple[Routed, list[tuple[ChangeEvent, InvalidEvent]]]:
        """add_all() into one Invalidation per Redis database the events' tables use."""
        if not self._dbs:
            work = Invalidation()
            return {None: work}, self.add_all(events, work)
        groups: dict[int | None, list[ChangeEvent]] = {}
        for event in events:
            groups.setdefault(self._dbs.get(event.table), []).append(event)
        routed: Routed = {}
        failed: list[tuple[ChangeEvent, InvalidEvent]] = []
        for db, group in groups.items():
            failed += self.add_all(group, routed.setdefault(db, Invalidation()))
        return routed, failed

    def add_all(
        self, events: Iterable[ChangeEvent], into: Invalidation
    ) -> list[tuple[ChangeEvent, InvalidEvent]]:
        """add() for many events; returns those that failed, with why, instead of raising.

        The same keys as add(), with the common case inlined: a backlog spends its time
        here. Whatever the fast path does not cover (TRUNCATE, several fields in one
        template, NULLs, anything invalid) goes through add(), which explains failures.
        """
        keys = into.keys
        simple = self._simple
        failed: list[tuple[ChangeEvent, InvalidEvent]] = []
        for event in events:
            parts = simple.get(event.table)
            op = event.op
            old, new = event.old, event.new
            if parts is not None and op is not Op.TRUNCATE:
                rows = (
                    (new,)
                    if op is Op.INSERT
                    else (old,)
                    if op is Op.DELETE or new is old
                    else (old, new)
                )
                rendered = []
                for row in rows:
                    if row is None:
                        break
                    for prefix, column, suffix in parts:
                        value = row.get(column)
                        if value.__class__ is not str:
                            break  # NULL, missing or not text: the careful path
                        rendered.append(prefix + value + suffix)
                    else:
                        continue
                    break
                else:
                    keys.update(rendered)
                    continue
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
        becomes a pattern.
        """
        templates = self._templates.get(event.table)
        if templates is None:
            raise InvalidEvent(f"table {event.table} is not in the configuration")
        if event.op is Op.TRUNCATE:
            into.patterns.update(t.glob() for t in templates)
            reason = event.new.get(UNRENDERABLE) if event.new else None
            if reason is not None:
                into.unrenderable[event.table] = str(reason)
            return
        keys: list[str] = []
        op = event.op
        if op is Op.UPDATE or op is Op.DELETE:
            _render(templates, event.old, "old", event, keys)
        # (An UPDATE that left the key columns alone carries one row for both.)
        if op is Op.INSERT or (op is Op.UPDATE and event.new is not event.old):
            _render(templates, event.new, "new", event, keys)
        into.keys.update(keys)


def _render(
    templates: tuple[KeyTemplate, ...],
    row: Row | None,
    which: str,
    event: ChangeEvent,
    out: list[str],
) -> None:
    if row is None:
        raise InvalidEvent(f"{event.op.name} on {event.table} carries no {which} row")
    template = templates[0]
    try:
        for template in templates:
            field = template.single_field
            if field is not None:  # inlined KeyTemplate.render: a backlog's hot loop
                value = row[field]
                if value.__class__ is str:
                    out.append(template.literals[0] + value + template.literals[1])
                    continue
                if value is None:
                    continue
            key = template.render(row)
            if key is not None:
                out.append(key)
    except KeyError as exc:
        raise InvalidEvent(
            f"{which} row of {event.table} lacks column {exc.args[0]!r} "
            f"used by template {template.source!r}"
        ) from None
    except TypeError as exc:
        raise InvalidEvent(
            f"{which} row of {event.table}: template {template.source!r}: {exc}"
        ) from None
