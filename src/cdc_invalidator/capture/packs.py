"""A streamed transaction's changes gathered column-wise, as trigger packs are.

A bulk statement streams a million INSERT, UPDATE or DELETE messages of one relation.
Decoded one by one, each costs a dict of its values, a ChangeEvent, and a row per
template to render; profiled on a 1M-row DELETE, that was most of the listener's seconds
after COMMIT (it falls behind the writer while the statement runs). Here the C walk
(capture/_walk.c, Walker.collect) appends each message's key-column values to one list
per column, and the open chunk maps them with Mapper.map_pack, a template a column at a
time: the same keys, without an object per change.

What collect() does not take (a value not text, a relation without the C walk or with a
column filter, a message that is not a change) goes the way it always went: decoded into
a ChangeEvent by the Decoder. A pack the mapper cannot render exactly is turned back into
events (events()), which map_all() maps or dead-letters one by one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cdc_invalidator.capture.rows import column_rows
from cdc_invalidator.events import ChangeEvent, Op, Pack

if TYPE_CHECKING:
    from cdc_invalidator.capture.pgoutput import Collect, Decoder, Relation

# A streamed change: type byte, (sub)transaction xid, relation OID, then its tuples.
_XID_RELID = struct.Struct("!II")
_TUPLES_AT = 9  # the first tuple's tag, after the type byte, xid and relation OID
_OPS = {0x49: Op.INSERT, 0x55: Op.UPDATE, 0x44: Op.DELETE}  # 'I', 'U', 'D'

Side = tuple[list[object], ...]  # one list per wanted column, in column order


@dataclass(slots=True, eq=False)
class ColumnPack:
    """One relation's changes of one kind, in a chunk: each wanted column's values, an
    UPDATE's old and new paired by index (the same str object where unchanged)."""

    relation: Relation
    op: Op
    names: tuple[str, ...]  # the wanted columns, as the lists are ordered
    old: Side | None
    new: Side | None
    collect: Collect
    keyed: bool  # a 'K' old tuple holds every wanted column
    positions: list[int] = field(default_factory=list)
    differs: bool = False  # an UPDATE whose wanted values changed in some row

    def __len__(self) -> int:
        return len(self.positions)

    def as_pack(self) -> Pack:
        """The mapper's Pack: `new is old` when no row's wanted values changed."""
        old = None if self.old is None else dict(zip(self.names, self.old, strict=True))
        new = None if self.new is None else dict(zip(self.names, self.new, strict=True))
        if self.op is Op.UPDATE and not self.differs:
            new = old
        return Pack(self.relation.table, self.op, old, new, len(self))

    def events(self) -> list[ChangeEvent]:
        """Its changes as the Decoder makes them: for the mapper, one by one."""
        table, op, count = self.relation.table, self.op, len(self)
        olds = news = None
        if self.old is not None:
            olds = column_rows((list(self.names), list(self.old)), count)
        if self.new is not None:
            news = column_rows((list(self.names), list(self.new)), count)
        events = []
        for i, position in enumerate(self.positions):
            old = None if olds is None else olds[i]
            new = None if news is None else news[i]
            if op is Op.UPDATE and old == new:
                new = old  # one row for both, which the mapper renders once
            events.append(ChangeEvent(table, op, old, new, position))
        return events


class Collector:
    """The open chunk's changes that Walker.collect takes, a ColumnPack per relation
    and kind. `decoder` numbers them (its position) and warns of old values not sent."""

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self._relations = decoder.relations
        self._open: dict[tuple[int, int], ColumnPack] = {}
        self._done: list[ColumnPack] = []
        self.size = 0  # changes taken since drain()

    def take(self, msg: bytes, subxid: int) -> bool:
        """Whether the streamed change `msg` of (sub)transaction `subxid` was taken."""
        kind = msg[0] if msg else 0
        if kind not in _OPS or len(msg) < _TUPLES_AT + 1:
            return False
        xid, relid = _XID_RELID.unpack_from(msg, 1)
        if xid != subxid:
            return False
        relation = self._relations.get(relid)
        pack = self._open.get((relid, kind))
        if pack is None or pack.relation is not relation:
            if relation is None or relation.collect is None:
                return False
            pack = self._start(relation, relid, kind)
        taken = pack.collect(msg, _TUPLES_AT, pack.old, pack.new, pack.keyed)
        if not taken:
            return False
        decoder = self._decoder
        decoder.position += 1
        pack.positions.append(decoder.position)
        self.size += 1
        if taken == 2:  # noqa: PLR2004 - Walker.collect's "values changed"
            pack.differs = True
        elif taken == 3:  # noqa: PLR2004 - Walker.collect's "no old tuple"
            decoder.missing_old(pack.relation)
        return True

    def _start(self, relation: Relation, relid: int, kind: int) -> ColumnPack:
        """A new pack for `relation`'s changes of `kind` (a Relation message since the
        last one closes it: its columns may differ)."""
        replaced = self._open.pop((relid, kind), None)
        if replaced is not None:
            self._done.append(replaced)
        op = _OPS[kind]
        names = tuple(relation.wanted_at[i] for i in sorted(relation.wanted_at))
        width = len(names)
        pack = ColumnPack(
            relation,
            op,
            names,
            None if op is Op.INSERT else tuple([] for _ in range(width)),
            None if op is Op.DELETE else tuple([] for _ in range(width)),
            relation.collect,  # type: ignore[arg-type] # (checked by the caller)
            not relation.not_in_key,
        )
        self._open[relid, kind] = pack
        return pack

    def drain(self) -> list[ColumnPack]:
        """The packs gathered since the last drain, and a fresh start."""
        packs = self._done + list(self._open.values())
        self._done, self._open, self.size = [], {}, 0
        return [p for p in packs if len(p)]
