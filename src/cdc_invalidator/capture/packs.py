"""A large transaction's changes gathered column-wise, as trigger packs are.

A bulk statement streams a million INSERT, UPDATE or DELETE messages of one relation.
Decoded one by one, each costs a dict of its values, a ChangeEvent, and a row per
template to render; profiled on a 1M-row DELETE, that was most of the listener's seconds
after COMMIT (it falls behind the writer while the statement runs). Here the C walk
(capture/_walk.c, Walker.collect) appends each message's key-column values to one list
per column, and the open chunk maps them with Mapper.map_pack, a template a column at a
time: the same keys, without an object per change.

A transaction sent once committed (not streamed: below logical_decoding_work_mem) has
its changes past capture/logical.py's GATHER_AFTER gathered the same way, by a Collector
reading their 5-byte head (no xid), drained at its commit and at a batch's end.

What collect() does not take (a value not text, a relation without the C walk or with a
column filter, a message that is not a change) goes the way it always went: decoded into
a ChangeEvent by the Decoder. A pack the mapper cannot render exactly is turned back into
events (events()), which map_all() maps or dead-letters one by one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from cdc_invalidator.capture.rows import column_rows
from cdc_invalidator.events import ChangeEvent, Op, Pack

try:  # capture/_walk.c, where it was built (capture/pgoutput.py says the same of the walks)
    from cdc_invalidator.capture._walk import Gatherer, Walker
except ImportError:  # pragma: no cover - then the Decoder decodes every change
    Gatherer = Walker = None  # type: ignore[assignment,misc]

if TYPE_CHECKING:
    from cdc_invalidator.capture.pgoutput import Decoder, Relation
    from cdc_invalidator.mapping.mapper import Mapper, Routed

# A streamed change: type byte, (sub)transaction xid, relation OID, then its tuples; a
# change of a transaction sent once committed: type byte, relation OID, its tuples.
_XID_RELID = struct.Struct("!II")
_RELID = struct.Struct("!I")
STREAMED_HEAD, COMMITTED_HEAD = 9, 5
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


def map_packs(
    mapper: Mapper, packs: list[ColumnPack], into: Routed
) -> tuple[list[ColumnPack], list[ChangeEvent]]:
    """Each pack's keys added to `into` column-wise (Mapper.map_pack): the packs mapped,
    and the events of those that cannot be mapped exactly so, for map_all(), which maps
    or dead-letters them one by one (each with its own position and why)."""
    mapped: list[ColumnPack] = []
    back: list[ChangeEvent] = []
    for column_pack in packs:
        if mapper.map_pack(column_pack.as_pack(), into):
            mapped.append(column_pack)
        else:
            back += column_pack.events()
    return mapped, back


class Collector:
    """The open chunk's changes that the C walks take, a ColumnPack per kind,
    (sub)transaction and relation: the per-message loop is C's (_walk.c's Gatherer, which
    asks _start() about each new message head and appends with Walker.collect's walk).
    `decoder` numbers the changes (its position) and warns of old values not sent.
    Without the C walks nothing is taken: the Decoder decodes every change.

    take(msg) says whether a change was taken; `limit` how many until drain(). In a
    stream block (`streamed`) `subxid` is the open chunk's (sub)transaction, whose changes
    alone are taken; outside one, a message holds no xid, and the caller drains at each
    commit: the packs then hold one transaction's changes each."""

    def __init__(self, decoder: Decoder, limit: int, *, streamed: bool = True) -> None:
        self._decoder = decoder
        self._relations = decoder.relations
        self._done: list[ColumnPack] = []
        self._limit = limit
        self._streamed = streamed
        self.subxid = 0
        head = STREAMED_HEAD if streamed else COMMITTED_HEAD
        self._gatherer = None if Gatherer is None else Gatherer(self._start, decoder, limit, head)
        self.take: Callable[[bytes], bool] = (
            _take_nothing if self._gatherer is None else self._gatherer.take
        )

    @property
    def size(self) -> int:
        """Changes taken since the last drain()."""
        closed = sum(len(p) for p in self._done)
        return closed + (0 if self._gatherer is None else self._gatherer.size)

    def _start(self, msg: bytes) -> tuple[object, ...] | None:
        """The parts of a pack for the changes whose head `msg` has (type, xid if
        streamed, relation OID), or None: not taken (another (sub)transaction's, a
        relation not described, without the C walk or whose UPDATEs a column filter
        judges)."""
        if self._streamed:
            xid, relid = _XID_RELID.unpack_from(msg, 1)
            if xid != self.subxid:
                return None
        else:
            (relid,) = _RELID.unpack_from(msg, 1)
        relation = self._relations.get(relid)
        if relation is None or not _gathered(relation):
            return None
        op = _OPS[msg[0]]
        names = tuple(relation.wanted_at[i] for i in sorted(relation.wanted_at))
        old: Side | None = None if op is Op.INSERT else tuple([] for _ in names)
        new: Side | None = None if op is Op.DELETE else tuple([] for _ in names)
        pack = ColumnPack(relation, op, names, old, new)
        return pack, relation.fast, old, new, pack.positions, not relation.not_in_key

    def close_open(self) -> None:
        """A Relation message inside the block: the packs so far are closed (the
        relation's columns may differ from here on)."""
        self._done += self._drained()
        if self._gatherer is not None:  # (the closed packs count against the limit)
            self._gatherer.limit = max(0, self._limit - sum(len(p) for p in self._done))

    def drain(self) -> list[ColumnPack]:
        """The packs gathered since the last drain, and a fresh start."""
        packs = self._done + self._drained()
        self._done = []
        if self._gatherer is not None:
            self._gatherer.limit = self._limit
        return [p for p in packs if len(p)]

    def _drained(self) -> list[ColumnPack]:
        if self._gatherer is None:
            return []
        packs = []
        for made, changed, without_old in self._gatherer.drain():
            pack = cast(ColumnPack, made)  # (made by _start)
            pack.differs = changed
            if without_old:
                self._decoder.missing_old(pack.relation)
            packs.append(pack)
        return packs


def _take_nothing(_msg: bytes) -> bool:
    return False


def _gathered(relation: Relation) -> bool:
    """Whether the relation's changes are gathered: its walk is C's (a relation that
    lost key columns has none), and no column filter judges its UPDATEs."""
    return Walker is not None and isinstance(relation.fast, Walker) and relation.judged_at is None
