"""Turn a ChangeEvent into the keys to delete: pure, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cdc_invalidator.events import ChangeEvent, InvalidEvent, Op, Row, TableName
from cdc_invalidator.mapping.templates import KeyTemplate


@dataclass(slots=True)
class Invalidation:
    """What one batch must delete: exact keys, and glob patterns to sweep (TRUNCATE)."""

    keys: set[str] = field(default_factory=set)
    patterns: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.keys) + len(self.patterns)


class Mapper:
    def __init__(self, tables: Mapping[TableName, Iterable[KeyTemplate]]) -> None:
        self._templates = {table: tuple(ts) for table, ts in tables.items()}

    @property
    def tables(self) -> Mapping[TableName, tuple[KeyTemplate, ...]]:
        return self._templates

    def columns(self, table: TableName) -> list[str]:
        """The columns a table's templates use: what its trigger must copy."""
        return sorted({f for t in self._templates[table] for f in t.fields})

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
    for template in templates:
        try:
            key = template.render(row)
        except KeyError as exc:
            raise InvalidEvent(
                f"{which} row of {event.table} lacks column {exc.args[0]!r} "
                f"used by template {template.source!r}"
            ) from None
        except TypeError as exc:
            raise InvalidEvent(
                f"{which} row of {event.table}: template {template.source!r}: {exc}"
            ) from None
        if key is not None:
            out.append(key)
