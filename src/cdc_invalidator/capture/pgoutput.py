"""Decode the messages of PostgreSQL's built-in `pgoutput` plugin (protocol version 2).

Pure: bytes in, ChangeEvents out; the replication stream (walstream.py) hands over the
payload of each XLogData message. Formats: PostgreSQL docs, "Logical Replication Message
Formats". Only the columns the key templates use are decoded, since a backlog spends its
time here.

Old values (UPDATE, DELETE) come as a 'K' tuple (the replica identity's columns, the
others sent as nulls that mean "not sent") or an 'O' tuple (REPLICA IDENTITY FULL: the
whole row). An UPDATE that changed no replica-identity column sends no old tuple at all.
A TOASTed value that an UPDATE left alone arrives as an "unchanged" marker ('u') in the
new tuple: the old tuple's value (FULL identity) is the same, and is used instead.

A table with a column filter (mapping/columns.py) also has its counted columns read from
both tuples of an UPDATE: when every one is byte for byte the same text (or 'u' in the
new tuple), the change is dropped. Each U message is one row, so old and new are paired
by construction. Judging needs the whole old row ('O', REPLICA IDENTITY FULL, which
install sets); without it the UPDATE is an event as usual.

Protocol 2 with `streaming 'on'` sends a large transaction while it is still in progress,
in blocks between Stream Start ('S', its xid) and Stream Stop ('E'), then Stream Commit
('c') or Stream Abort ('A', a subtransaction's or the whole transaction's). Inside a
block (only there) every change, Relation, Type and logical Message carries the xid of
the (sub)transaction that made it right after its type byte: `streamed()` takes it off
and decodes the rest as protocol 1 lays it out. Outside blocks the layouts are
protocol 1's.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeVar, cast

from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.capture.text_casts import FIRST_NORMAL_OID, OWN_CAST, TEXT_CASTS
from cdc_invalidator.events import ChangeEvent, InvalidEvent, Op, Row, StandInKind, TableName
from cdc_invalidator.mapping.columns import ColumnFilter, Judge

try:  # capture/_walk.c, built at install where there is a C compiler (pyproject.toml)
    from cdc_invalidator.capture._walk import Walker
except ImportError:  # pragma: no cover - the Python walks below do the same, slower
    Walker = None  # type: ignore[assignment,misc]  # (one name, with or without C)

# The tuple walks are in C (capture/_walk.c) when it was built: True here then.
NATIVE_WALKS: Final = Walker is not None

K = TypeVar("K", int, str)  # what a tuple walk keys its values by: index or name

# A relation's compiled tuple walk (see _compile_walk): TupleData at `pos` -> the wanted
# columns' text by name (in column order) and where the tuple ends, or None for anything it does
# not handle (the general walk then decodes the change, and says what is wrong).
FastWalk = Callable[[bytes, int], "tuple[dict[str, str | None], int] | None"]
# Its walk of an UPDATE's old and new tuples in one call (see _compile_pair): the old row,
# the new row (the same dict when the wanted columns' text is the same) and the end.
FastPair = Callable[[bytes, int], "tuple[dict[str, str | None], dict[str, str | None], int] | None"]

_U16 = struct.Struct("!H")
_I32 = struct.Struct("!I")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit time
_REL_HEAD = struct.Struct("!I")
_TRUNC = struct.Struct("!IB")  # relation count, options
_STREAM_START = struct.Struct("!IB")  # xid, first segment
_STREAM_COMMIT = struct.Struct("!IBQQq")  # xid, flags, commit LSN, end LSN, commit time
_STREAM_ABORT = struct.Struct("!II")  # xid, subxid (protocol 4 adds an LSN and a time)
_MESSAGE_HEAD = struct.Struct("!BQ")  # flags (1: transactional), the message's LSN
# The prefix of our logical decoding messages (pg_logical_emit_message, written by our
# event triggers: sql/rebuild_guard.sql): a table to sweep, as a JSON object {"schema",
# "table", "reason"}. Messages of any other prefix are somebody else's.
MESSAGE_PREFIX: Final = "cdc_invalidator_v1"
# What a compiled tuple walk may raise on bytes it does not handle (the general walk
# then decodes them and names what is wrong).
_FAST_MISSES = (IndexError, struct.error, UnicodeDecodeError)
_INSERT, _UPDATE, _DELETE = Op.INSERT, Op.UPDATE, Op.DELETE
# ChangeEvent(...) without its generated __new__ (a Python call per event): the tuple's
# own, given the fields in order.
_event = tuple.__new__
# Messages that carry a (sub)transaction's xid after their type byte inside a stream
# block: Insert, Update, Delete, Truncate, Relation, Type, Message.
_STREAMED_KINDS = frozenset(b"IUDTRYM")

# What a tuple holds for a column besides text: a value the plugin did not send.
UNCHANGED: Final = object()  # 'u': a TOASTed value the UPDATE did not change
NOT_SENT: Final = object()  # a non-identity column of a 'K' tuple


class ProtocolError(Fatal):
    """The bytes are not a pgoutput message this decoder understands: the stream is
    broken or the server speaks another protocol version. Not one bad event."""


class Begin(NamedTuple):
    final_lsn: int  # the commit record's LSN
    commit_time: int  # microseconds since 2000-01-01
    xid: int


class Commit(NamedTuple):
    commit_lsn: int
    end_lsn: int  # the end of the commit record: the position to acknowledge
    commit_time: int


class StreamStart(NamedTuple):
    xid: int  # the top-level transaction's
    first: bool  # its first block


class StreamStop(NamedTuple):
    pass


class StreamCommit(NamedTuple):
    xid: int
    commit_lsn: int
    end_lsn: int  # the position to acknowledge
    commit_time: int


class StreamAbort(NamedTuple):
    xid: int  # the top-level transaction
    subxid: int  # the subtransaction rolled back: xid itself when the whole one was


Stream = StreamStart | StreamStop | StreamCommit | StreamAbort
STREAM_STOP: Final = StreamStop()


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    table: TableName  # the configured table it is or belongs to (else its own name)
    identity: str  # 'd' default (primary key), 'n' nothing, 'f' full, 'i' index
    columns: tuple[str, ...]  # as this message names them
    identity_columns: frozenset[str]
    # Positions of the wanted columns: (column name as configured, index in the tuple).
    wanted: tuple[tuple[str, int], ...]
    # The same by index, for the tuple scan.
    wanted_at: Mapping[int, str]
    # Wanted columns outside the replica identity: not in a 'K' tuple.
    not_in_key: tuple[str, ...]
    # Key columns the relation no longer has (dropped): its changes cannot be rendered,
    # and each becomes a sweep of the table's templates instead.
    missing: tuple[str, ...] = ()
    # A column filter's counted columns, by index in the tuple; None: UPDATEs not judged.
    judged_at: Mapping[int, int] | None = None
    # The compiled walk that gives the wanted columns' values (None: a relation whose
    # changes take the general walk only).
    fast: FastWalk | None = field(default=None, compare=False, repr=False)
    # Its walk of an UPDATE's two tuples (None when `fast` is).
    pair: FastPair | None = field(default=None, compare=False, repr=False)
    # `missing` holds every key column because their names are not certain (Resolved).
    unsure: bool = False
    # Wanted columns whose type's `::text` differs from its output (text_casts.py): their
    # values are cast by _row and by the compiled walks (which then are not C's alone, so
    # that its changes are not gathered column-wise: capture/packs.py).
    casts: Mapping[str, Callable[[str], str]] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a Relation message is to the configuration: the configured table it is (or,
    for a partition, belongs to), its key columns as configured, and the name each has
    in this message (a column without one is gone)."""

    table: TableName
    columns: tuple[str, ...]
    names: Mapping[str, str]
    column_filter: ColumnFilter | None = None
    # The message names its columns as they were when the change was made, and a key
    # column's name now may have been another column's then (names swapped since, the
    # message decoded behind the renames): which column is which is not certain, so the
    # relation's changes are swept, as for a missing key column.
    unsure: bool = False
    # Columns of `columns` that only an earlier mapping's templates use (the captures'
    # eras): decoded where the message has them, never missing, their old values never
    # owed (a change after that mapping's install need not carry them).
    optional: frozenset[str] = frozenset()
    # Those of `optional` the message lacks because they are generated columns, which no
    # publication carries before PostgreSQL 18 (Decoder.unprintable).
    unsent: frozenset[str] = frozenset()


# (relid, name in the message, column names in the message) -> Resolved, or None for a
# relation the configuration does not know. Called once per Relation message.
Resolve = Callable[[int, TableName, tuple[str, ...]], Resolved | None]
# The base type of each of these types (a domain's; any other type is its own).
BaseTypes = Callable[[set[int]], Mapping[int, int]]


def by_name(
    columns_for: Callable[[TableName], Sequence[str] | None],
    ancestors_of: Callable[[int], Sequence[TableName]] | None = None,
    filters: Mapping[TableName, ColumnFilter] | None = None,
) -> Resolve:
    """A resolver that goes by names only: `columns_for(table)` names the columns to
    decode (None: every column, for a table it does not know), `ancestors_of(relid)`
    the tables a partition belongs to, nearest first. For units; the listener resolves
    by relation OID and column number (capture/logical.py)."""

    def resolve(relid: int, table: TableName, columns: tuple[str, ...]) -> Resolved:
        wanted = columns_for(table)
        if wanted is None and ancestors_of is not None:
            for ancestor in ancestors_of(relid):
                wanted = columns_for(ancestor)
                if wanted is not None:
                    table = ancestor
                    break
        if wanted is None:
            wanted = columns
        column_filter = (filters or {}).get(table)
        return Resolved(table, tuple(wanted), {c: c for c in wanted}, column_filter)

    return resolve


class Decoder:
    """Turns pgoutput messages into ChangeEvents, remembering Relation messages.

    `resolve` says which configured table a relation is and where its key columns are
    (see Resolve); a relation it does not know keeps its own name and has no column
    decoded: its events become dead letters naming the table and the operation only.
    `on_missing_old(relation, columns)` is told once when old values of key columns are
    not sent; `on_unrenderable(relation)` once when a Relation message lacks key columns
    (again for other columns, or after one that lacked none); each change of such a table
    becomes a TRUNCATE event carrying the reason (StandInKind.UNRENDERABLE), which the
    runner sweeps, logs and counts.
    `base_types(types)`: the catalog's base type of each type a key column's Relation
    names that is not built in (a domain's; without it, such a type is its own), for the
    types whose text cast differs from what pgoutput sends (capture/text_casts.py).

    `compiled`: each relation's tuples are walked by code compiled for it (the fast path
    of text and NULL values) before the general walk; False walks them the general way
    only (the tests compare the two). `native`: that code is C (capture/_walk.c, where it
    was built), else Python generated for the relation.
    """

    def __init__(  # noqa: PLR0913 - the listener's hooks, two switches
        self,
        resolve: Resolve,
        on_missing_old: Callable[[Relation, list[str]], None] | None = None,
        on_unrenderable: Callable[[Relation], None] | None = None,
        *,
        base_types: BaseTypes | None = None,
        compiled: bool = True,
        native: bool = NATIVE_WALKS,
    ) -> None:
        self._compiled = compiled
        self._base_types = base_types
        self._bases: dict[int, int] = {}  # a domain's base type (which never changes)
        self._dropped: set[int] = set()  # types the catalog no longer has
        self._native = native
        self._resolve = resolve
        self._on_missing_old = on_missing_old
        self._on_unrenderable = on_unrenderable
        self._relations: dict[int, Relation] = {}
        self._warned: set[tuple[int, tuple[str, ...]]] = set()
        self.position = 0  # a serial number for every event decoded
        # Columns only an earlier mapping's templates use (Resolved.optional) that a
        # Relation message of the table named with a type that cannot be printed (a
        # domain dropped since, a cast of the database's own), or lacked as generated
        # columns (Resolved.unsent): their values are not decoded, so the earlier
        # templates that use them are swept for the changes rendered with those
        # templates (the captures' eras), as a listener of that mapping swept them (a
        # missing key column). Kept for the listener's life.
        self.unprintable: dict[TableName, frozenset[str]] = {}
        # The tables whose UPDATEs decoded now column filters do not judge: those of a
        # transaction committed under an earlier mapping whose templates of them are
        # rendered too (the captures' eras: the listener sets it per transaction, and
        # per stream block). That mapping's filter was not this one: an UPDATE of a
        # column the new one ignores changed what its keys held (before, a:e1 of
        # a:{email} stayed cached).
        self.unjudged: frozenset[TableName] = frozenset()

    @property
    def relations(self) -> Mapping[int, Relation]:
        return self._relations

    def forget(self, relid: int) -> None:
        """A relation no change of which is left in the stream (a table dropped, read
        past its drop): pgoutput sends its Relation message again if it ever does."""
        self._relations.pop(relid, None)
        self._warned = {w for w in self._warned if w[0] != relid}

    def decode(  # noqa: PLR0911, PLR0912 - one return per message type
        self, msg: bytes
    ) -> Begin | Commit | ChangeEvent | list[ChangeEvent] | Stream | None:
        """One message: Begin, Commit, one ChangeEvent (I/U/D, or a sweep our logical
        decoding message asks for), a list (TRUNCATE of several tables), a stream message
        (Stream Start, Stop, Commit, Abort) or None (Relation, Type, Origin, somebody
        else's Message, an UPDATE that its table's column filter judged unchanged:
        nothing to invalidate). A message inside a stream block is
        unwrapped by unwrap_streamed() first.

        Raises InvalidEvent for a change that cannot become an event (a value that is not
        UTF-8, an unknown relation) and ProtocolError for bytes that do not parse.
        """
        if not msg:
            raise ProtocolError("empty message")
        try:
            kind = msg[0]
            if kind == 0x49:  # 'I'
                return self._insert(msg)
            if kind == 0x55:  # 'U'
                return self._update(msg)
            if kind == 0x44:  # 'D'
                return self._delete(msg)
            if kind == 0x42:  # 'B'
                return Begin._make(_BEGIN.unpack_from(msg, 1))
            if kind == 0x43:  # 'C'
                _flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(msg, 1)
                return Commit(commit_lsn, end_lsn, ts)
            if kind == 0x52:  # 'R'
                self._relation(msg)
                return None
            if kind == 0x54:  # 'T'
                return self._truncate(msg)
            if kind == 0x4D:  # 'M'
                return self._message(msg)
            if kind in b"YO":  # Type, Origin
                return None
            if kind == 0x53:  # 'S'
                xid, first = _STREAM_START.unpack_from(msg, 1)
                return StreamStart(xid, first == 1)
            if kind == 0x45:  # 'E'
                return STREAM_STOP
            if kind == 0x63:  # 'c'
                xid, _flags, commit_lsn, end_lsn, ts = _STREAM_COMMIT.unpack_from(msg, 1)
                return StreamCommit(xid, commit_lsn, end_lsn, ts)
            if kind == 0x41:  # 'A'
                return StreamAbort._make(_STREAM_ABORT.unpack_from(msg, 1))
        # Helpers raise ValueError for bytes that do not fit the format.
        except (struct.error, IndexError, ValueError) as exc:
            raise ProtocolError(f"malformed {chr(msg[0])!r} message: {exc}") from None
        raise ProtocolError(f"unknown pgoutput message type {chr(msg[0])!r}")

    # --- messages ------------------------------------------------------------------------

    def _relation(self, msg: bytes) -> None:
        (relid,) = _REL_HEAD.unpack_from(msg, 1)
        namespace, pos = _cstring(msg, 5)
        name, pos = _cstring(msg, pos)
        identity = chr(msg[pos])
        (ncols,) = _U16.unpack_from(msg, pos + 1)
        pos += 3
        columns: list[str] = []
        types: list[int] = []
        identity_columns: set[str] = set()
        for _ in range(ncols):
            flags = msg[pos]
            column, pos = _cstring(msg, pos + 1)
            pos += 8  # type oid, type modifier
            if pos > len(msg):
                raise ValueError(f"relation message ends inside column {column!r}")
            types.append(_I32.unpack_from(msg, pos - 8)[0])
            columns.append(column)
            if flags & 1:
                identity_columns.add(column)
        # An empty namespace means pg_catalog (the plugin abbreviates it).
        table = TableName(namespace or "pg_catalog", name)
        resolved = self._resolve(relid, table, tuple(columns))
        missing: tuple[str, ...] = ()
        judged_at: Mapping[int, int] | None = None
        optional: frozenset[str] = frozenset()
        if resolved is None:
            wanted: tuple[tuple[str, int], ...] = ()
        else:
            table, optional = resolved.table, resolved.optional
            wanted, missing = self._wanted(resolved, columns, types)
            if resolved.column_filter is not None and not missing:
                # (not by the earlier templates' columns: what they render is never judged)
                keys = {i for c, i in wanted if c not in optional}
                judged_at = _counted(resolved.column_filter, tuple(columns), keys)
        identity_at = {i for i, c in enumerate(columns) if c in identity_columns}
        wanted_at = {i: c for c, i in wanted}
        order = {i: wanted_at[i] for i in sorted(wanted_at)}
        casts = self._casts(wanted, types)
        compiled = self._compiled and not missing
        fast, pair = _walks(ncols, order, native=self._native) if compiled else (None, None)
        if fast is not None and pair is not None and casts:
            fast, pair = _casting(fast, pair, casts)
        relation = Relation(
            relid,
            table,
            identity,
            tuple(columns),
            frozenset(identity_columns),
            wanted,
            wanted_at,
            tuple(c for c, i in wanted if i not in identity_at and c not in optional),
            missing,
            judged_at,
            fast,
            pair,
            resolved is not None and resolved.unsure,
            casts,
        )
        before = self._relations.get(relid)
        self._relations[relid] = relation
        # Told once while it lacks the same columns: pgoutput sends a Relation message per
        # streamed block of a transaction (dozens for a large one), each lacking them.
        told = before is not None and (before.missing, before.unsure) == (missing, relation.unsure)
        if missing and not told and self._on_unrenderable is not None:
            self._on_unrenderable(relation)

    def _wanted(
        self, resolved: Resolved, columns: list[str], types: list[int]
    ) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
        """The resolved columns found in the message, with their indexes, and the key
        columns it lacks (missing: its changes cannot be rendered)."""
        index = {c: i for i, c in enumerate(columns)}
        names = {} if resolved.unsure else resolved.names
        at = {c: index.get(names.get(c, "")) for c in resolved.columns}
        optional = resolved.optional
        if optional:
            # One the message lacks or cannot print is left out, never missing: one that
            # cannot be printed, or a generated column the stream never sends, is noted
            # (unprintable), and the earlier templates that use it are swept instead.
            at = {c: i for c, i in at.items() if c not in optional or i is not None}
            found = tuple((c, i) for c, i in at.items() if c in optional and i is not None)
            untyped = self._untyped(found, types)
            at = {c: i for c, i in at.items() if c not in untyped}
            if untyped or resolved.unsent:
                table = resolved.table
                had = self.unprintable.get(table, frozenset())
                self.unprintable[table] = had.union(untyped, resolved.unsent)
        wanted = tuple((c, i) for c, i in at.items() if i is not None)
        # (and a key column of a type dropped since: how it prints is not known)
        missing = tuple(c for c, i in at.items() if i is None) + self._untyped(wanted, types)
        return wanted, missing

    def _untyped(self, wanted: tuple[tuple[str, int], ...], types: list[int]) -> tuple[str, ...]:
        """The wanted columns of a type not built in that the catalog no longer has (a
        domain dropped since the change: it may have been over a type cast otherwise), or
        whose cast to text is a function of the database's own (OWN_CAST: its `::text`
        cannot be rendered here). Asks the catalog the base type of those not asked
        before."""
        if self._base_types is None:
            return ()
        unknown = {t for _, i in wanted if (t := types[i]) >= FIRST_NORMAL_OID} - self._bases.keys()
        if unknown:
            found = self._base_types(unknown)
            self._bases.update(found)
            self._dropped |= unknown - found.keys()
        return tuple(
            c
            for c, i in wanted
            if types[i] in self._dropped or self._bases.get(types[i]) == OWN_CAST
        )

    def _casts(
        self, wanted: tuple[tuple[str, int], ...], types: list[int]
    ) -> dict[str, Callable[[str], str]]:
        """The wanted columns whose type (a domain's: its base type) has a text cast of
        its own, with that cast (_untyped() asked the catalog first)."""
        return {
            c: to_text
            for c, i in wanted
            if (to_text := TEXT_CASTS.get(self._bases.get(types[i], types[i]))) is not None
        }

    def _unrenderable(self, relation: Relation) -> ChangeEvent:
        """A change of a table that lost key columns: its keys cannot be known, so it
        stands for a sweep of every template of the table, as a TRUNCATE does."""
        self.position += 1
        missing = ", ".join(relation.missing)
        reason = {
            StandInKind.UNRENDERABLE.value: f"key columns {missing} of {relation.table} "
            + (
                "were renamed after this change, and their names in it are other "
                "columns' now: which column is which is not certain"
                if relation.unsure
                else "are not in it (dropped since, or generated columns, which PostgreSQL "
                "sends from version 18 on), or are of a type dropped since, or of a type "
                "cast to text by a function of its own (CREATE CAST ... WITH FUNCTION), "
                "whose `::text` logical mode cannot render"
            )
        }
        return ChangeEvent(relation.table, Op.TRUNCATE, None, reason, self.position)

    def _insert(self, msg: bytes, o: int = 0) -> ChangeEvent:
        # `o`: 4 for a message inside a stream block (its xid after the type byte)
        relation = self._relations.get(_I32.unpack_from(msg, 1 + o)[0])
        # (fast is None for a relation that lost key columns)
        if relation is not None and (fast := relation.fast) is not None and msg[5 + o] == 0x4E:
            try:
                got = fast(msg, 6 + o)  # 'N'
            except _FAST_MISSES:
                got = None
            if got is not None and got[1] == len(msg):
                self.position += 1
                return ChangeEvent(relation.table, _INSERT, None, got[0], self.position)
        if o:
            msg = msg[:1] + msg[5:]  # protocol 1's layout, for the general walk
        relation = self._relation_of(msg)
        if relation.missing:
            return self._unrenderable(relation)
        if msg[5] != 0x4E:  # 'N'
            raise ValueError(f"INSERT without a new tuple (got {chr(msg[5])!r})")
        values, end = _scan(msg, 6, relation)
        _at_end(msg, end)
        try:
            new = _row(relation, values)
        except InvalidEvent as exc:
            raise Undecodable(exc, relation, Op.INSERT, None, values) from None
        self.position += 1
        return ChangeEvent(relation.table, Op.INSERT, None, new, self.position)

    def _update(self, msg: bytes, o: int = 0) -> ChangeEvent | None:
        # (the hot path of a bulk UPDATE: helpers inlined where they were calls per row)
        # `o`: 4 for a message inside a stream block (its xid after the type byte)
        relation = self._relations.get(_I32.unpack_from(msg, 1 + o)[0])
        if relation is None or relation.missing or relation.judged_at is not None:
            if o:
                msg = msg[:1] + msg[5:]  # protocol 1's layout, for the general walk
                o = 0
            relation = relation or self._relation_of(msg)
            if relation.missing:
                return self._unrenderable(relation)
            judged = relation.judged_at
            if (
                judged is not None
                and msg[5] == 0x4F  # 'O'
                and relation.table not in self.unjudged
                and _unchanged(msg, judged)
            ):
                return None  # judged first: a skipped UPDATE is walked once, not decoded
        pair = relation.pair
        if pair is not None:
            # The compiled walks; what they do not handle goes on to the general one. An
            # old tuple they take is 'O' (FULL) or a 'K' holding every wanted column.
            got = one = None
            try:
                tag = msg[5 + o]
                if tag == 0x4F or (tag == 0x4B and not relation.not_in_key):
                    got = pair(msg, 6 + o)
                elif tag == 0x4E:
                    one = cast(FastWalk, relation.fast)(msg, 6 + o)  # (set with pair)
            except _FAST_MISSES:
                got = one = None
            if got is not None and got[2] == len(msg):
                self.position += 1
                return _event(ChangeEvent, (relation.table, _UPDATE, got[0], got[1], self.position))
            if one is not None and one[1] == len(msg):
                # No old tuple: the new values are the best there is (as below).
                if relation.identity != "f" and relation.not_in_key:
                    self._missing_old(relation, partial=True)
                self.position += 1
                return _event(ChangeEvent, (relation.table, _UPDATE, one[0], one[0], self.position))
        return self._update_general(relation, msg[:1] + msg[5:] if o else msg)

    def _update_general(self, relation: Relation, msg: bytes) -> ChangeEvent:
        """An UPDATE the compiled walk did not take: every case, and every error."""
        old_values: dict[str, object] | None = None
        pos = 5
        tag = msg[pos]
        wanted_at, ncols = relation.wanted_at, len(relation.columns)
        if tag in (0x4B, 0x4F):  # 'K' key, 'O' old (FULL)
            old_values, pos = _walk(msg, pos + 1, wanted_at, ncols)
            if tag == 0x4B:
                for column in relation.not_in_key:
                    old_values[column] = NOT_SENT
                self._missing_old(relation, partial=True)
            tag = msg[pos]
        if tag != 0x4E:
            raise ValueError(f"UPDATE without a new tuple (got {chr(tag)!r})")
        new_values, end = _walk(msg, pos + 1, wanted_at, ncols)
        if end != len(msg):
            _at_end(msg, end)
        try:
            if old_values is None:
                # No old tuple: no replica-identity column changed. Others may have, and
                # their old values are not sent; the new ones are the best there is.
                new = old = _row(relation, new_values)
                self._missing_old(relation, partial=relation.identity != "f")
            elif old_values == new_values:
                # The key columns did not change (the common UPDATE): one row for both,
                # which the mapper renders once.
                new = old = _row(relation, new_values, old_values)
            else:
                new = _row(relation, new_values, old_values)
                old = _row(relation, old_values, new_values)
                if old == new:
                    old = new
        except InvalidEvent as exc:
            raise Undecodable(exc, relation, Op.UPDATE, old_values, new_values) from None
        self.position += 1
        return ChangeEvent(relation.table, Op.UPDATE, old, new, self.position)

    def _delete(self, msg: bytes, o: int = 0) -> ChangeEvent:
        # `o`: 4 for a message inside a stream block (its xid after the type byte)
        relation = self._relations.get(_I32.unpack_from(msg, 1 + o)[0])
        tag = msg[5 + o]
        if (
            relation is not None
            and (fast := relation.fast) is not None
            and (tag == 0x4F or (tag == 0x4B and not relation.not_in_key))
        ):
            try:
                got = fast(msg, 6 + o)
            except _FAST_MISSES:
                got = None
            if got is not None and got[1] == len(msg):
                self.position += 1
                return ChangeEvent(relation.table, _DELETE, got[0], None, self.position)
        if o:
            msg = msg[:1] + msg[5:]  # protocol 1's layout, for the general walk
        relation = self._relation_of(msg)
        if relation.missing:
            return self._unrenderable(relation)
        tag = msg[5]
        if tag not in (0x4B, 0x4F):
            raise ValueError(f"DELETE without an old tuple (got {chr(tag)!r})")
        values, end = _scan(msg, 6, relation)
        _at_end(msg, end)
        if tag == 0x4B:
            for column in relation.not_in_key:
                values[column] = NOT_SENT
            self._missing_old(relation, partial=True)
        try:
            old = _row(relation, values)
        except InvalidEvent as exc:
            raise Undecodable(exc, relation, Op.DELETE, values, None) from None
        self.position += 1
        return ChangeEvent(relation.table, Op.DELETE, old, None, self.position)

    def _truncate(self, msg: bytes) -> list[ChangeEvent]:
        count, _options = _TRUNC.unpack_from(msg, 1)
        events = []
        for i in range(count):
            (relid,) = _I32.unpack_from(msg, 6 + 4 * i)
            relation = self._relations.get(relid)
            if relation is None:
                raise InvalidEvent(f"TRUNCATE of relation {relid}, which was never described")
            self.position += 1
            events.append(ChangeEvent(relation.table, Op.TRUNCATE, None, None, self.position))
        return events

    def _message(self, msg: bytes) -> ChangeEvent | None:
        """A logical decoding message. Ours (our prefix, transactional: it commits or
        aborts with the DDL that wrote it) names a table whose keys must all go: a TRUNCATE
        event carrying the reason (StandInKind.UNRENDERABLE), swept, logged and counted
        by the runner. Any other is not ours to read."""
        flags, _lsn = _MESSAGE_HEAD.unpack_from(msg, 1)
        prefix, pos = _cstring(msg, 1 + _MESSAGE_HEAD.size)
        if prefix != MESSAGE_PREFIX or not flags & 1:
            return None
        (length,) = _I32.unpack_from(msg, pos)
        content = bytes(msg[pos + 4 : pos + 4 + length])
        try:
            body = json.loads(content)
            table = TableName(str(body["schema"]), str(body["table"]))
            reason = str(body["reason"])
            # What PostgreSQL text cannot hold (a lone surrogate, NUL) would fail this
            # event's dead letter, and the listener at every start.
            for text in (*table, reason):
                _storable(text)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            # (any role may emit a message of our prefix: a dead letter, never a crash)
            raise InvalidEvent(f"message {content[:200]!r} ({MESSAGE_PREFIX}): {exc}") from None
        self.position += 1
        return ChangeEvent(
            table, Op.TRUNCATE, None, {StandInKind.UNRENDERABLE.value: reason}, self.position
        )

    def _relation_of(self, msg: bytes) -> Relation:
        (relid,) = _I32.unpack_from(msg, 1)
        relation = self._relations.get(relid)
        if relation is None:
            raise InvalidEvent(f"change to relation {relid}, which was never described")
        return relation

    def missing_old(self, relation: Relation) -> None:
        """An UPDATE of `relation` came without its old tuple (told as _update does)."""
        self._missing_old(relation, partial=relation.identity != "f")

    def _missing_old(self, relation: Relation, partial: bool) -> None:
        """Tell (once per relation and set of columns) that old values were not sent."""
        if not partial or self._on_missing_old is None:
            return
        missing = relation.not_in_key
        if missing and (relation.relid, missing) not in self._warned:
            self._warned.add((relation.relid, missing))
            self._on_missing_old(relation, list(missing))

    def decode_streamed(
        self, msg: bytes
    ) -> tuple[int, Begin | Commit | ChangeEvent | list[ChangeEvent] | Stream | None]:
        """A message inside a stream block: the xid it carries (see unwrap_streamed) and
        what decode() makes of it unwrapped. A change is decoded in place, not copied
        without its xid first (a bulk statement is a million of them)."""
        kind = msg[0] if msg else 0
        if kind in (0x55, 0x49, 0x44) and len(msg) >= 9:  # 'U', 'I', 'D'
            (xid,) = _I32.unpack_from(msg, 1)
            try:
                if kind == 0x55:
                    return xid, self._update(msg, 4)
                if kind == 0x49:
                    return xid, self._insert(msg, 4)
                return xid, self._delete(msg, 4)
            except (struct.error, IndexError, ValueError) as exc:
                raise ProtocolError(f"malformed {chr(kind)!r} message: {exc}") from None
        xid, body = unwrap_streamed(msg)
        return xid, self.decode(body)


def unwrap_streamed(msg: bytes) -> tuple[int, bytes]:
    """A message inside a stream block: the xid of the (sub)transaction it belongs to
    (0 for one that carries none: Origin, Stream Stop) and the message as protocol 1
    lays it out, for decode()."""
    if msg[:1] and msg[0] in _STREAMED_KINDS:
        if len(msg) < 5:
            raise ProtocolError(f"streamed {chr(msg[0])!r} message without an xid")
        (xid,) = _I32.unpack_from(msg, 1)
        return xid, msg[:1] + msg[5:]
    return 0, msg


class Undecodable(InvalidEvent):
    """A change whose values cannot become keys. `event` holds what is known of it (the
    values decoded leniently) for the dead letter, so that it can be replayed by hand."""

    def __init__(
        self,
        cause: InvalidEvent,
        relation: Relation,
        op: Op,
        old: dict[str, object] | None,
        new: dict[str, object] | None,
    ) -> None:
        super().__init__(str(cause))
        self.event = ChangeEvent(relation.table, op, _lenient(old), _lenient(new), 0)


def _lenient(values: dict[str, object] | None) -> Row | None:
    """Values as text whatever they hold: bytes that are not UTF-8 are escaped, values
    not sent are left out."""
    if values is None:
        return None
    return {
        c: v.decode(errors="backslashreplace") if isinstance(v, bytes) else None
        for c, v in values.items()
        if v is None or isinstance(v, bytes)
    }


def _cstring(msg: bytes, pos: int) -> tuple[str, int]:
    end = msg.index(0, pos)
    return bytes(msg[pos:end]).decode(), end + 1


def _scan(msg: bytes, pos: int, relation: Relation) -> tuple[dict[str, object], int]:
    """TupleData: the wanted columns' raw values, by name, and where the tuple ends."""
    return _walk(msg, pos, relation.wanted_at, len(relation.columns))


def _walk(
    msg: bytes, pos: int, at: Mapping[int, K], expect: int = -1
) -> tuple[dict[K, object], int]:
    """TupleData at `pos`: the raw values (bytes, None for NULL, UNCHANGED) of the
    columns whose index `at` names, under that name, and where the tuple ends. Every
    column is walked; only those are kept. `expect`: the relation's column count, which
    the tuple must have (-1: not checked)."""
    (n,) = _U16.unpack_from(msg, pos)
    if expect >= 0 and n != expect:
        raise ValueError(f"tuple has {n} columns, its relation {expect}")
    pos += 2
    values: dict[K, object] = {}
    unpack = _I32.unpack_from
    for i in range(n):
        kind = msg[pos]
        if kind == 0x74:  # 't'
            (length,) = unpack(msg, pos + 1)
            start = pos + 5
            pos = start + length
            if i in at:
                values[at[i]] = msg[start:pos]
        elif kind == 0x6E:  # 'n'
            pos += 1
            if i in at:
                values[at[i]] = None
        elif kind == 0x75:  # 'u'
            pos += 1
            if i in at:
                values[at[i]] = UNCHANGED
        else:  # 'b' (binary) is only sent when asked for
            raise ValueError(f"unexpected column kind {chr(kind)!r}")
    if pos > len(msg):
        raise ValueError("message ends inside a column value")
    return values, pos


def _walks(ncols: int, wanted: Mapping[int, str], *, native: bool) -> tuple[FastWalk, FastPair]:
    """A relation's compiled walks (wanted: index -> name, in column order): in C when
    `native` (capture/_walk.c: the same results, a third of the decoding's time), else
    the Python ones below."""
    if native and Walker is not None:
        columns = tuple(wanted.items())
        return (
            cast(FastWalk, Walker(ncols, columns)),
            cast(FastPair, Walker(ncols, columns, pair=True)),
        )
    return _compile_walk(ncols, wanted), _compile_pair(ncols, wanted)


def _casting(
    fast: FastWalk, pair: FastPair, casts: Mapping[str, Callable[[str], str]]
) -> tuple[FastWalk, FastPair]:
    """The compiled walks of a relation with `casts`, casting what they give."""

    def cast_walk(msg: bytes, pos: int) -> tuple[dict[str, str | None], int] | None:
        got = fast(msg, pos)
        if got is not None:
            _cast(got[0], casts)
        return got

    def cast_pair(
        msg: bytes, pos: int
    ) -> tuple[dict[str, str | None], dict[str, str | None], int] | None:
        got = pair(msg, pos)
        if got is not None:
            _cast(got[0], casts)
            if got[1] is not got[0]:
                _cast(got[1], casts)
        return got

    return cast_walk, cast_pair


def _cast(row: dict[str, str | None], casts: Mapping[str, Callable[[str], str]]) -> None:
    for column, to_text in casts.items():
        if (value := row.get(column)) is not None:
            row[column] = to_text(value)


def _compile_walk(ncols: int, wanted: Mapping[int, str]) -> FastWalk:
    """A walk of this relation's TupleData with its loop unrolled: per column, one type
    byte read and, for text, one length read; the wanted columns (`wanted`: index -> name,
    in column order) decoded to str on the way, into one dict display. No per-column
    membership test, no dict filled one value at a time: a
    bulk statement's changes spend half the listener's time walking tuples (profiled:
    _walk, _row, struct.unpack_from).

    It handles text and NULL, and an unchanged TOASTed value ('u') in a column not
    wanted. A wanted 'u', a binary value, another column count, a value that is not
    UTF-8 or a message that ends early give None (or raise, which the caller takes as
    None): the general walk decodes those, with its errors and its TOAST rules.
    """
    lines = [
        "def walk(msg, pos):",
        *_tuple_lines(ncols, wanted, "v", decode=True),
        f"    return {_display(wanted, 'v')}, pos",
    ]
    return cast(FastWalk, _compiled(lines, "walk"))


def _compile_pair(ncols: int, wanted: Mapping[int, str]) -> FastPair:
    """An UPDATE's two tuples walked in one call, as _compile_walk's walk walks one: the
    old at `pos` (after its 'O' or 'K'), then 'N' and the new. The wanted columns' bytes
    are compared before anything is decoded: when they are the same (an UPDATE that left
    the key columns alone, nearly every one) only the new values are decoded, into one
    dict that stands for both rows, as `old = new` does in the general walk. Returns
    (old, new, where the message ends), or None as walk does (for an old 'u' in a wanted
    column too). Profiled on a backlog of UPDATEs: two walks, the old row's dict and
    the rows' comparison were a third of the decoding."""
    same = " and ".join(f"o{i} == n{i}" for i in wanted) or "True"
    lines = [
        "def pair(msg, pos):",
        *_tuple_lines(ncols, wanted, "o", decode=False),
        "    if msg[pos] != 78:",  # 'N'
        "        return None",
        "    pos += 1",
        *_tuple_lines(ncols, wanted, "n", decode=False),
        *(f"    v{i} = None if n{i} is None else n{i}.decode()" for i in wanted),
        f"    new = {_display(wanted, 'v')}",
        f"    if {same}:",
        "        return new, new, pos",
        *(f"    v{i} = None if o{i} is None else o{i}.decode()" for i in wanted),
        f"    return {_display(wanted, 'v')}, new, pos",
    ]
    return cast(FastPair, _compiled(lines, "pair"))


def _tuple_lines(ncols: int, wanted: Mapping[int, str], var: str, *, decode: bool) -> list[str]:
    """The unrolled walk of one TupleData at `pos`, leaving `pos` after it: column i's
    value in `{var}i` (a wanted one's: its bytes, or its text if `decode`; None for
    NULL); `return None` for what the compiled walks do not take."""
    lines = [
        f"    if msg[pos] != {ncols >> 8} or msg[pos + 1] != {ncols & 0xFF}:",
        "        return None",
        "    pos += 2",
    ]
    value = ".decode()" if decode else ""
    for i in range(ncols):
        lines.append("    k = msg[pos]")
        lines.append("    if k == 116:")  # 't'
        if i in wanted:
            lines.append("        e = pos + 5 + unpack(msg, pos + 1)[0]")
            lines.append(f"        {var}{i} = msg[pos + 5 : e]{value}")
            lines.append("        pos = e")
            lines.append("    elif k == 110:")  # 'n'
            lines.append(f"        {var}{i} = None")
            lines.append("        pos += 1")
        else:
            lines.append("        pos += 5 + unpack(msg, pos + 1)[0]")
            lines.append("    elif k == 110 or k == 117:")  # 'n', 'u'
            lines.append("        pos += 1")
        lines.append("    else:")
        lines.append("        return None")
    return lines


def _display(wanted: Mapping[int, str], var: str) -> str:
    """A dict display of the wanted columns' values, `{var}i` for column i, by name.
    (repr() of a str is a literal of the same str: names are any text.)"""
    return "{" + ", ".join(f"{name!r}: {var}{i}" for i, name in wanted.items()) + "}"


def _compiled(lines: list[str], name: str) -> object:
    namespace: dict[str, object] = {"unpack": _I32.unpack_from}
    exec("\n".join(lines), namespace)  # noqa: S102 - our own text, built by this module
    return namespace[name]


def _counted(
    column_filter: ColumnFilter, columns: tuple[str, ...], keys: set[int]
) -> Mapping[int, int] | None:
    """The indexes of a filter's counted columns in a relation's tuple (the key columns,
    `keys`, whatever their names now), or None when the relation cannot be judged: a
    column `columns` lists is not there (renamed or dropped): every UPDATE invalidates
    until the configuration names it again (fail safe, as the trigger does)."""
    if column_filter.judge is Judge.COLUMNS:
        if not set(column_filter.listed) <= set(columns):
            return None
        listed = set(column_filter.listed)
        return {i: i for i, c in enumerate(columns) if c in listed or i in keys}
    # ignore_columns: a column renamed or added since counts (its name is not listed).
    return {i: i for i, c in enumerate(columns) if column_filter.counts(c) or i in keys}


def _unchanged(msg: bytes, judged: Mapping[int, int]) -> bool:
    """An UPDATE with an old tuple ('O') whose counted columns all hold the same text
    in both tuples ('u', an unchanged TOASTed value, in the new one is the same). Asked
    before the tuples are decoded: a skipped UPDATE is only walked, once."""
    old, pos = _walk(msg, 6, judged)
    if msg[pos] != 0x4E:  # 'N'
        return False
    new, end = _walk(msg, pos + 1, judged)
    _at_end(msg, end)
    for i, value in new.items():
        if value is UNCHANGED:
            continue
        if old.get(i, UNCHANGED) != value:
            return False
    return True


def _at_end(msg: bytes, end: int) -> None:
    if end != len(msg):
        raise ValueError(f"{len(msg) - end} bytes after the tuple data")


def _row(
    relation: Relation, values: dict[str, object], other: dict[str, object] | None = None
) -> Row:
    """The wanted columns as text (as `::text` gives it); a value not sent is taken from
    the other tuple."""
    row = _texts(relation, values, other)
    _cast(row, relation.casts)
    return row


def _texts(
    relation: Relation, values: dict[str, object], other: dict[str, object] | None
) -> dict[str, str | None]:
    """The wanted columns as the output functions print them (_row)."""
    row: dict[str, str | None] = {}
    for column, value in values.items():
        if value.__class__ is bytes:
            # A SQL_ASCII database's bytes that are not UTF-8 (its stream is read as they
            # are: pg/connect.py): which key the application made of them depends on its
            # own client encoding, so none can be known. The row lacks the column, and
            # the mapper sweeps the templates that use it and deletes the others' keys
            # (Mapper._add_lacking), as trigger mode does (capture/rows.py).
            with contextlib.suppress(UnicodeDecodeError):
                row[column] = value.decode()
            continue
        if value is None:
            row[column] = None
            continue
        alt = other.get(column, NOT_SENT) if other is not None else NOT_SENT
        if alt is not UNCHANGED and alt is not NOT_SENT:
            # The other tuple's value for it (bytes or NULL), decoded the same way.
            decoded = _texts(relation, {column: alt}, None)
            if column in decoded:  # (not, if it is not UTF-8)
                row[column] = decoded[column]
        elif value is UNCHANGED:
            # Rendering the marker would delete a key nobody uses and leave the
            # real one stale: park the event instead.
            raise InvalidEvent(
                f"column {column!r} of {relation.table} is an unchanged TOASTed value "
                "and the old row was not sent: set REPLICA IDENTITY FULL on the table"
            )
        else:
            row[column] = None  # an old value outside the replica identity: unknown
    return row


def _storable(text: str) -> None:
    """Raise ValueError for text PostgreSQL cannot store: a NUL, or a lone surrogate
    (UnicodeEncodeError, a ValueError)."""
    if "\0" in text:
        raise ValueError("a NUL, which PostgreSQL text cannot hold")
    text.encode()
