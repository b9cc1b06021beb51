"""Turn a ChangeEvent into the keys to delete: pure, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cdc_invalidator.events import UNRENDERABLE, ChangeEvent, InvalidEvent, Op, Row, TableName
from cdc_invalidator.mapping.templates import KeyTemplate, Render, RenderError


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
        # Each table's compiled renderers, in template order: the hot loop of add_all().
        self._renders = {
            table: tuple(t.render for t in ts) for table, ts in self._templates.items()
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

        The same keys as add(), through the same renderers, with add()'s bookkeeping
        inlined: a backlog spends its time here. TRUNCATE and anything that fails go
        through add(), which explains failures.
        """
        keys = into.keys
        renders_of = self._renders
        insert, update, truncate = Op.INSERT, Op.UPDATE, Op.TRUNCATE
        failed: list[tuple[ChangeEvent, InvalidEvent]] = []
        for event in events:
            renders = renders_of.get(event.table)
            op = event.op
            if renders is not None and op is not truncate:
                # INSERT: the new row; DELETE: the old; UPDATE: both, or one for both when
                # the key columns did not change.
                row = event.new if op is insert else event.old
                other = event.new if op is update else row
                if row is not None and other is not None:
                    rendered: list[str] = []
                    try:
                        for render in renders:
                            if (key := render(row)) is not None:
                                rendered.append(key)
                        if other is not row:
                            for render in renders:
                                if (key := render(other)) is not None:
                                    rendered.append(key)
                    except RenderError:
                        pass  # add() says which row
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
        renders = self._renders.get(event.table)
        if renders is None:
            raise InvalidEvent(f"table {event.table} is not in the configuration")
        if event.op is Op.TRUNCATE:
            into.patterns.update(t.glob() for t in self._templates[event.table])
            reason = event.new.get(UNRENDERABLE) if event.new else None
            if reason is not None:
                into.unrenderable[event.table] = str(reason)
            return
        keys: list[str] = []
        op = event.op
        if op is Op.UPDATE or op is Op.DELETE:
            _render(renders, event.old, "old", event, keys)
        # (An UPDATE that left the key columns alone carries one row for both.)
        if op is Op.INSERT or (op is Op.UPDATE and event.new is not event.old):
            _render(renders, event.new, "new", event, keys)
        into.keys.update(keys)


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
        raise InvalidEvent(exc.within(f"{which} row of {event.table}")) from None
