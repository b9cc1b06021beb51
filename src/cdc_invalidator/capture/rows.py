"""Queue and history rows, read back from PostgreSQL: ChangeEvents, or why not.

Every reader of cdc_invalidator.queue_v1 (the trigger listener, replay) and of
history_v1 (logical replay) decodes through here, so that a row the listener would
dead-letter is a dead letter or a logged skip for every reader, never an exception.
What such a row can hold: anyone with INSERT on the tables can write one by hand, a
json column accepts numbers longer than Python's int conversion allows and nesting
deeper than its recursion limit, and a history row outlives the configuration that
wrote it.

A queue row may be a pack (queue_v1.rows set): the changes of up to a thousand rows of
one statement, each key column an array ({"id": ["1", "2"]}, an UPDATE's old and new
arrays paired by index). Its events take pack positions (pack_position): distinct from
every queue id, and each says which row and which element it came from.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

import orjson

from cdc_invalidator.events import ChangeEvent, Columns, InvalidEvent, Op, Pack, Row, TableName

if TYPE_CHECKING:
    from cdc_invalidator.capture.packs import ColumnPack

_OPS = {op.value: op for op in Op}
# [schema, table, op, old, new], and on the first event of each transaction of a
# batch a sixth: [xid, commit LSN, commit time] (`explain`; replay reads the five).
# A streamed transaction's changes gathered column-wise (capture/packs.py) are one item
# of seven: [schema, table, op, old, new, transaction or null, count], old and new
# objects of `count`-long arrays, one per key column (as a trigger pack's rows), new
# null for an UPDATE whose key columns are the same in both.
_HISTORY_ITEM_LENGTHS = (5, 6, 7)
_HISTORY_PACK_LENGTH = 7
_TRANSACTION_LENGTH = 3
# A pack's element index takes the low bits of its position: a pack may hold this many.
PACK_BITS = 20
MAX_PACK = 1 << PACK_BITS
# A byte that is not UTF-8, as raw text carries it (pg/raw_text.py: U+DC80 to U+DCFF).
_RAW_BYTE = re.compile("[\udc80-\udcff]")

# A history event's transaction: (xid, commit LSN, commit time in microseconds since
# 2000-01-01 by the server's clock), as pgoutput's Begin message gives them.
Transaction = tuple[int, int, int]
# A pack's old_row or new_row: its labels, and an array of values for each.
_Columns = tuple[list[str], list[list[Any]]]
# A pack's table, operation and key columns (old, new): _pack_parts().
_PackParts = tuple[TableName, Op, _Columns | None, _Columns | None]


# Maps a pack's changes column-wise (Mapper.map_pack, its `into` bound); False when it
# cannot do so exactly.
MapPack = Callable[[Pack], bool]


@dataclass(slots=True)
class Decoded:
    events: list[ChangeEvent] = field(default_factory=list)
    # (position, reason) for each row, or event of a history row, that is no event.
    dead: list[tuple[int, str]] = field(default_factory=list)
    # Packs whose changes were mapped column-wise (queue_rows' and history_row's
    # map_pack): no events; and how many changes they held.
    mapped_packs: int = 0
    mapped_changes: int = 0

    def extend(self, other: Decoded) -> None:
        self.events += other.events
        self.dead += other.dead
        self.mapped_packs += other.mapped_packs
        self.mapped_changes += other.mapped_changes


def pack_position(queue_id: int, element: int) -> int:
    """The position of element `element` (0 is the first) of the pack in queue row
    `queue_id`: negative, so never a queue id (the position of a row's one change)."""
    return -((queue_id << PACK_BITS) | element) - 1


def queue_id(position: int) -> int:
    """The queue row an event's position comes from (its own id for a single change)."""
    return position if position >= 0 else (-position - 1) >> PACK_BITS


def pack_element(position: int) -> int | None:
    """The element of its pack an event's position names; None for a single change."""
    return None if position >= 0 else (-position - 1) & (MAX_PACK - 1)


def by_events(rows: Sequence[Sequence[Any]], count_at: int, events: int) -> Iterator[Sequence[Any]]:
    """`rows` in consecutive slices of about `events` events each (a pack weighs its
    rows; a slice holds at least one row): a reader decodes a slice at a time."""
    start = weight = 0
    for i, row in enumerate(rows):
        weight += max(row[count_at] or 1, 1)
        if weight >= events:
            yield rows[start : i + 1]
            start, weight = i + 1, 0
    if start < len(rows):
        yield rows[start:]


_POSITION = attrgetter("position")


def encode_history(
    events: list[ChangeEvent],
    transactions: Sequence[tuple[int, int, int, int]] = (),
    packs: Sequence[ColumnPack] = (),
    transaction: Transaction | None = None,
) -> str:
    """A batch's events as history_v1 stores them (key columns only, as decoded).

    `transactions`: (first position, xid, commit LSN, commit time) of each transaction
    the events belong to, in position order: the first event of each carries the other
    three, and the events after it belong to it too (one small list per transaction).
    `packs`: changes of one transaction gathered column-wise, written after the events
    as the events they stand for; `transaction` (xid, commit LSN, commit time), if
    given, on each of their items (else with_transaction() puts it on the first)."""
    # Each event unpacked by the comprehension, not read field by field (a NamedTuple's
    # field is a Python-level descriptor): e.op, not e.op.value, since an Op is a str
    # ("U"), written as such by orjson and json alike (Enum's value property is a Python
    # call per event: profiled at 0.5 s of a 1M-row statement's history).
    items: list[list[object]] = [
        [schema, name, op, old, new] for (schema, name), op, old, new, _ in events
    ]
    # Each transaction goes on the first event at or after its first position; of
    # transactions that share that event (those before it had no event here), the last.
    marks: dict[int, list[int]] = {}
    for first, *rest in transactions:
        marks[bisect.bisect_left(events, first, key=_POSITION)] = rest
    for i, rest in marks.items():
        if i < len(items):
            items[i].append(rest)
    pack_transaction = None if transaction is None else list(transaction)
    for column_pack in packs:
        (schema, name), op, old, new, count = column_pack.as_pack()
        if op is Op.UPDATE and new is old:
            new = None  # (the key columns the same in both: written once)
        items.append([schema, name, op, old, new, pack_transaction, count])
    return _dumps(items)


def with_transaction(history: str, transaction: Transaction) -> str:
    """encode_history's text with `transaction` (xid, commit LSN, commit time) on its
    first item, as encode_history() puts a batch's."""
    items = json.loads(history)
    if items:
        if len(items[0]) == _HISTORY_PACK_LENGTH:
            items[0][5] = list(transaction)
        else:
            items[0].append(list(transaction))
    return json.dumps(items, separators=(",", ":"))


def _dumps(items: list[list[object]]) -> str:
    try:
        return orjson.dumps(items).decode()
    except orjson.JSONEncodeError:
        # An integer past 64 bits or a lone surrogate: json writes what orjson refuses.
        return json.dumps(items, separators=(",", ":"))


class RowDecoder:
    """Decodes the rows of one reader. Table names are interned: a backlog is a million
    rows of a few tables. `raw`: the reader's session reads raw text (pg/raw_text.py), in
    which a SQL_ASCII database's byte that is not UTF-8 shows (as a lone surrogate): a
    value holding one is left out of its row (_without_raw). (Other sessions' text holds
    none: PostgreSQL sends them UTF-8 only, and they are not searched for it.)"""

    def __init__(self, *, raw: bool = False) -> None:
        self._tables: dict[tuple[str, str], TableName] = {}
        self._raw = raw

    def queue_rows(
        self,
        rows: Sequence[Sequence[Any]],
        at: int = 0,
        count_at: int | None = None,
        map_pack: MapPack | None = None,
    ) -> Decoded:
        """queue_v1 rows whose columns from `at` on are id, schema_name, table_name, op,
        old_row::text, new_row::text (as text: a value the driver could not parse would
        fail the whole read), and at `count_at` (if given) rows: a pack's size, None for
        one change. Events keep the rows' order (a pack's in its arrays' order); a single
        change's position is the queue id, a pack's elements' are pack_position()s.

        `map_pack`, if given, is offered each well-formed pack first: a pack it maps
        gives no events (counted in mapped_packs), one it refuses gives its events as
        without it (a bulk statement's drain builds no row and no event per change)."""
        if count_at is None or all(row[count_at] is None for row in rows):
            return self._single_rows(rows, at)
        out = Decoded()
        singles: list[Sequence[Any]] = []
        for row in rows:
            if row[count_at] is None:
                singles.append(row)
                continue
            if singles:
                out.extend(self._single_rows(singles, at))
                singles = []
            self._pack(row, at, row[count_at], out, map_pack)
        if singles:
            out.extend(self._single_rows(singles, at))
        return out

    def _pack(
        self, row: Sequence[Any], at: int, count: object, out: Decoded, map_pack: MapPack | None
    ) -> None:
        """A pack's events, or one dead letter for the whole pack when it is malformed
        (its elements cannot be told apart then). An element whose values cannot render
        is the mapper's to find: it dead-letters that element alone. A pack `map_pack`
        maps gives no events."""
        queue_id = row[at]
        try:
            name, kind, old, new = self._pack_parts(row, at, count)
        except InvalidEvent as exc:
            out.dead.append((queue_id, f"pack of {count!r} rows: {exc}"))
            return
        size = cast(int, count)  # checked by _pack_parts
        base = -(queue_id << PACK_BITS) - 1  # pack_position(queue_id, i) == base - i
        if self._raw and (_holds_raw_byte(row[at + 4]) or _holds_raw_byte(row[at + 5])):
            # Some element holds a SQL_ASCII database's byte that is not UTF-8: each
            # element an event of its own, without such values (_without_raw).
            _raw_elements((name, kind, old, new), size, base, out)
            return
        if map_pack is not None:
            old_columns = None if old is None else dict(zip(*old, strict=True))
            new_columns = old_columns if new is old else None
            if new is not None and new is not old:
                new_columns = dict(zip(*new, strict=True))
            if map_pack(Pack(name, kind, old_columns, new_columns, size)):
                out.mapped_packs += 1
                out.mapped_changes += size
                return
        make = tuple.__new__  # as in _single_rows: no Python-level __new__ per event
        # The drain's hot path: one comprehension per pack, each element's row built
        # from the column arrays (_rows), no Python call per element.
        if old is not None and (new is None or new is old):
            # A DELETE, or an UPDATE that left the key columns alone: one row for both.
            olds = column_rows(old, size)
            if new is None:
                out.events += [
                    make(ChangeEvent, (name, kind, o, None, base - i)) for i, o in enumerate(olds)
                ]
            else:
                out.events += [
                    make(ChangeEvent, (name, kind, o, o, base - i)) for i, o in enumerate(olds)
                ]
        elif new is not None and old is None:
            news = column_rows(new, size)
            out.events += [
                make(ChangeEvent, (name, kind, None, n, base - i)) for i, n in enumerate(news)
            ]
        elif new is not None and old is not None:
            # Some rows' key columns changed: each element's old and new row, one row
            # for both where its values are the same (rendered once).
            pairs = zip(column_rows(old, size), column_rows(new, size), strict=True)
            out.events += [
                make(ChangeEvent, (name, kind, o, o if o == n else n, base - i))
                for i, (o, n) in enumerate(pairs)
            ]

    def _pack_parts(self, row: Sequence[Any], at: int, count: object) -> _PackParts:
        """A pack's table, operation and key columns (old, new: the same object when their
        text is the same); InvalidEvent saying what is wrong with them."""
        if not isinstance(count, int) or not 0 < count <= MAX_PACK:
            raise InvalidEvent(f"rows is {count!r}, expected 1 to {MAX_PACK}")
        schema, table, op, old_text, new_text = row[at + 1 : at + 6]
        name = self.event(row[at], (schema, table, op, None, None)).table
        kind = _OPS[op]
        if kind is Op.TRUNCATE:
            raise InvalidEvent("a TRUNCATE is never packed")
        old = None if kind is Op.INSERT else _pack_columns(old_text, "old_row", count)
        if kind is Op.DELETE:
            return name, kind, old, None
        if old is not None and old_text == new_text:
            return name, kind, old, old
        return name, kind, old, _pack_columns(new_text, "new_row", count)

    def _single_rows(self, rows: Sequence[Sequence[Any]], at: int) -> Decoded:
        out = Decoded()
        events, tables = out.events, self._tables
        a_id, a_schema, a_table, a_op, a_old, a_new = range(at, at + 6)
        olds = [row[a_old] for row in rows]
        news = [row[a_new] for row in rows]
        # An UPDATE that left the key columns alone carries the same text twice: parsed
        # once, and one row for both, so that the mapper renders it once.
        sames = [o == n for o, n in zip(olds, news, strict=True)]
        parsed = _parse_all(
            olds + [n for n, same in zip(news, sames, strict=True) if not same], raw=self._raw
        )
        if parsed is None:
            for row, same in zip(rows, sames, strict=True):
                self._queue_row(row, at, same, out)
            return out
        new_at = len(rows)  # the distinct new rows follow the old ones in `parsed`
        make = tuple.__new__  # a NamedTuple's own __new__ is a Python call: this is not
        for i, row in enumerate(rows):
            old = parsed[i]
            if sames[i]:
                new = old
            else:
                new = parsed[new_at]
                new_at += 1
            # The common case inlined (a backlog spends its time here): exactly the rows
            # event() accepts; anything else goes there to be told why not.
            kind = _OPS.get(row[a_op])
            table = tables.get((row[a_schema], row[a_table]))
            if (
                kind is not None
                and table is not None
                and (old is None or old.__class__ is dict)
                and (new is None or new.__class__ is dict)
            ):
                events.append(make(ChangeEvent, (table, kind, old, new, row[a_id])))
                continue
            try:
                values = (row[a_schema], row[a_table], row[a_op], old, new)
                events.append(self.event(row[a_id], values, same=sames[i]))
            except InvalidEvent as exc:
                out.dead.append((row[a_id], str(exc)))
        return out

    def _queue_row(self, row: Sequence[Any], at: int, same: bool, out: Decoded) -> None:
        """One row parsed on its own (its batch held a malformed one): its event, or
        why not."""
        position = row[at]
        try:
            old = _parse(row[at + 4], "old_row", raw=self._raw)
            new = _parse(row[at + 5], "new_row", raw=self._raw)
            values = (row[at + 1], row[at + 2], row[at + 3], old, new)
            out.events.append(self.event(position, values, same=same))
        except InvalidEvent as exc:
            out.dead.append((position, str(exc)))

    def history_row(
        self,
        position: int,
        text: str,
        transactions: list[Transaction | None] | None = None,
        map_pack: MapPack | None = None,
    ) -> Decoded:
        """A history_v1 row: a JSON array of [schema, table, op, old, new] (what
        encode_history wrote). Its events, and its failures, take the row's id as
        position. `transactions`, if given, gets each event's transaction (None where
        the row does not say: written before transactions were recorded). `map_pack`
        (not with `transactions`) as in queue_rows: an item of changes gathered
        column-wise that it maps gives no events."""
        out = Decoded()
        try:
            items = _history_items(text)
        except InvalidEvent as exc:
            out.dead.append((position, str(exc)))
            return out
        current: Transaction | None = None
        for n, item in enumerate(items):
            try:
                values = _history_item(item)
                if len(values) == _HISTORY_PACK_LENGTH:
                    pack = self._history_pack(values)
                    if map_pack is not None and transactions is None and map_pack(pack):
                        out.mapped_packs += 1
                        out.mapped_changes += pack.size
                        continue
                    events = self._pack_events(position, pack)
                else:
                    events = [self.event(position, values[:5])]
            except InvalidEvent as exc:
                out.dead.append((position, f"event {n}: {exc}"))
                continue
            out.events += events
            if transactions is not None:
                if len(values) > _HISTORY_ITEM_LENGTHS[0] and (
                    len(values) < _HISTORY_PACK_LENGTH or values[5] is not None
                ):
                    current = _transaction(values[5])
                transactions += [current] * len(events)
        return out

    def _history_pack(self, values: list[object]) -> Pack:
        """A history item of changes gathered column-wise as the mapper's Pack (`new is
        old`: an UPDATE that left its key columns alone); InvalidEvent saying what is
        wrong with it."""
        schema, table, op, old, new, _, count = values
        if not isinstance(count, int) or count < 0:
            raise InvalidEvent(f"count is {_kind(count)}, expected a number of changes")
        kind = _OPS.get(op) if isinstance(op, str) else None
        if kind is None or kind is Op.TRUNCATE:
            raise InvalidEvent(f"unknown operation {op!r} for changes gathered column-wise")
        olds = None
        if kind is not Op.INSERT:
            olds = dict(zip(*_columns_of(old, "old", count), strict=True))
        news = olds if kind is Op.UPDATE and new is None else None
        if kind is Op.INSERT or (kind is Op.UPDATE and new is not None):
            news = dict(zip(*_columns_of(new, "new", count), strict=True))
        return Pack(self._table(schema, table), kind, olds, news, count)

    def _pack_events(self, position: int, pack: Pack) -> list[ChangeEvent]:
        """A history pack's changes as events, each with `position` (one row for both
        sides where `new is old`)."""
        table, op, old, new, count = pack
        olds = None if old is None else column_rows(_labelled(old), count)
        news = olds
        if new is not old:
            news = None if new is None else column_rows(_labelled(new), count)
        return [
            ChangeEvent(
                table,
                op,
                None if olds is None else olds[i],
                None if news is None else news[i],
                position,
            )
            for i in range(count)
        ]

    def event(self, position: int, values: Sequence[object], *, same: bool = False) -> ChangeEvent:
        """One change from parsed (schema, table, op, old, new); InvalidEvent saying what
        is wrong with them. (Whether the table is configured, and has the columns, is the
        mapper's to say.) `same`: new is old's text, one row for both."""
        schema, table, op, old, new = values
        kind = _OPS.get(op) if isinstance(op, str) else None
        if kind is None:
            raise InvalidEvent(f"unknown operation {op!r}")
        name = self._table(schema, table)
        old_row = _row(old, "old_row")
        new_row = old_row if same else _row(new, "new_row")
        return ChangeEvent(name, kind, old_row, new_row, position)

    def _table(self, schema: object, table: object) -> TableName:
        """The table named, interned; InvalidEvent if its name is not text."""
        if not isinstance(schema, str) or not isinstance(table, str):
            raise InvalidEvent(f"table name {schema!r}.{table!r} is not text")
        name = self._tables.get((schema, table))
        if name is None:
            name = self._tables[schema, table] = TableName(schema, table)
        return name


def _pack_columns(text: str | None, name: str, count: int) -> _Columns:
    """A pack's old_row or new_row: an object of `count`-long arrays, one per key column,
    as (labels, arrays); InvalidEvent saying what is wrong with it. (Bytes that are not
    UTF-8 are its elements' to answer for: _raw_elements().)"""
    return _columns_of(_parse(text, name), name, count)


def _holds_raw_byte(text: str | None) -> bool:
    """Whether raw text holds a byte that is not UTF-8 (pg/raw_text.py)."""
    return text is not None and not text.isascii() and _RAW_BYTE.search(text) is not None


def _raw_elements(parts: _PackParts, size: int, base: int, out: Decoded) -> None:
    """A pack some of whose elements hold a byte that is not UTF-8: each element an event,
    its rows without such values (_without_raw)."""
    name, kind, old, new = parts
    olds = [_without_raw(o) for o in column_rows(old, size)] if old is not None else [None] * size
    if new is old:
        news = olds
    else:
        news = (
            [_without_raw(n) for n in column_rows(new, size)] if new is not None else [None] * size
        )
    out.events += [
        ChangeEvent(name, kind, o, n, base - i)
        for i, (o, n) in enumerate(zip(olds, news, strict=True))
    ]


def _without_raw(row: Row) -> Row:
    """`row` less the values that hold a SQL_ASCII database's byte that is not UTF-8.
    Which key the application made of such a value depends on its own client encoding:
    none can be known, so the row lacks the column, and the mapper sweeps the templates
    that use it and deletes the others' keys (Mapper._add_lacking). A dead letter would
    leave them all cached."""
    return {
        column: value
        for column, value in row.items()
        if not (value.__class__ is str and _holds_raw_byte(value))
    }


def _columns_of(value: object, name: str, count: int) -> _Columns:
    """_pack_columns() of a parsed value."""
    if not isinstance(value, dict):
        raise InvalidEvent(f"{name} is {_kind(value)}, expected a JSON object of arrays")
    labels = list(value)
    columns = list(value.values())
    for label, column in zip(labels, columns, strict=True):
        if column.__class__ is not list or len(column) != count:
            raise InvalidEvent(
                f"{name}'s {label!r} is {_kind(column)}"
                + (f" of {len(column)}" if isinstance(column, list) else "")
                + f", expected an array of {count}"
            )
    return labels, columns


def column_rows(columns: _Columns, count: int) -> list[Row]:
    """A pack's elements as rows, from its key columns (every array `count` long). A dict
    display in a comprehension for the usual one or two columns: several times faster
    than dict(zip()) per element, which the rest take."""
    labels, arrays = columns
    if len(labels) == 1:
        (one,), (values,) = labels, arrays
        return [{one: v} for v in values]
    if len(labels) == 2:  # noqa: PLR2004 (one or two columns: the specialised shapes)
        (one, two), (firsts, seconds) = labels, arrays
        return [{one: a, two: b} for a, b in zip(firsts, seconds, strict=True)]
    if not labels:
        return [{} for _ in range(count)]
    return [dict(zip(labels, values, strict=True)) for values in zip(*arrays, strict=True)]


def _history_items(text: str) -> list[object]:
    items = _parse(text, "events", surrogates=True)
    if not isinstance(items, list):
        raise InvalidEvent(f"events is {_kind(items)}, expected a JSON array")
    return items


def _history_item(item: object) -> list[object]:
    if not isinstance(item, list) or len(item) not in _HISTORY_ITEM_LENGTHS:
        raise InvalidEvent(f"{_kind(item)} {item!r:.80}, expected [schema, table, op, old, new]")
    return item


def _transaction(value: object) -> Transaction | None:
    """[xid, commit LSN, commit time] as encode_history wrote it; None if it is not."""
    if (
        isinstance(value, list)
        and len(value) == _TRANSACTION_LENGTH
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return (value[0], value[1], value[2])
    return None


def _parse_all(texts: list[str | None], *, raw: bool = False) -> list[object] | None:
    """Every text with one json.loads, or None if one is malformed (or, `raw`, holds a
    byte that is not UTF-8).

    One call for a whole batch: for objects this small the per-call overhead is most of
    the cost. A json column holds exactly one JSON value, so joining them with commas
    makes one array of as many elements.
    """
    joined = "[" + ",".join(t if t is not None else "null" for t in texts) + "]"
    if _may_spell_surrogate(joined) or (raw and _holds_raw_byte(joined)):
        return None  # each row on its own: one spelling a lone surrogate is refused
    try:
        parsed = json.loads(joined)
    except (ValueError, RecursionError):
        return None  # each row is parsed on its own, to name the culprit
    return parsed if isinstance(parsed, list) and len(parsed) == len(texts) else None


def _may_spell_surrogate(text: str) -> bool:
    """Whether JSON text may spell a UTF-16 surrogate (a backslash, u, D800 to DFFF). The capture
    functions' JSON never does (PostgreSQL's text holds none, and its json escapes only
    control characters), but a row written by hand may; a lone one decodes to a str
    that no UTF-8 can carry, to Redis or back to PostgreSQL."""
    return "\\ud" in text or "\\uD" in text


def _parse(text: str | None, name: str, *, surrogates: bool = False, raw: bool = False) -> object:
    """A queue row's JSON value; InvalidEvent naming `name` if it is malformed, or spells
    a lone surrogate (unless `surrogates`: logical mode's history, whose text may hold
    the bytes a SQL_ASCII database sent, decoded leniently). `raw` text (RowDecoder's
    `raw`): an object's values holding a byte that is not UTF-8 are left out
    (_without_raw)."""
    if text is None:
        return None
    try:
        parsed = json.loads(text)
        if not surrogates and _may_spell_surrogate(text):
            # A lone surrogate cannot be encoded (a pair decoded as one character can).
            json.dumps(parsed, ensure_ascii=False).encode()
    except (ValueError, RecursionError) as exc:
        # e.g. a number too long for Python's int conversion limit; a lone surrogate
        # (UnicodeEncodeError, whose text names no value)
        raise InvalidEvent(f"{name} cannot be parsed: {exc}") from None
    if raw and parsed.__class__ is dict and _holds_raw_byte(text):
        return _without_raw(cast("Row", parsed))
    return parsed


def _row(value: object, name: str) -> Row | None:
    if value is None or value.__class__ is dict:
        return value  # a dict of JSON values: their types are checked when rendered
    raise InvalidEvent(f"{name} is {_kind(value)}, expected a JSON object")


def _labelled(columns: Columns) -> _Columns:
    """A pack side's labels and arrays, as _columns_of() gives them (its arrays: lists
    parsed from JSON, checked there)."""
    return list(columns), cast("list[list[Any]]", list(columns.values()))


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
