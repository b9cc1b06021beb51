"""What every capture mode hands to the mapping: one committed row change."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import NamedTuple

# Column values as PostgreSQL's text output (what ::text gives); None for SQL NULL.
Row = Mapping[str, str | None]

_PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*")
_MAX_NAME_PARTS = 2  # schema.table


class Op(StrEnum):
    INSERT = "I"
    UPDATE = "U"
    DELETE = "D"
    TRUNCATE = "T"


class StandInKind(StrEnum):
    """What a TRUNCATE event may stand for when no TRUNCATE ran; the key of its marker,
    the event's new row (the trigger queue's SQL writes the same keys). Its table is
    swept, and the runner logs and counts it by kind."""

    # {"unrenderable": reason}: changes the capture could not turn into key columns (a
    # key column was dropped, a partition has no capture triggers).
    UNRENDERABLE = "unrenderable"
    # {"bulk": rows}: one statement of at least that many rows (trigger mode's
    # bulk_sweep_rows), swept instead of its rows' keys deleted.
    BULK = "bulk"
    # {"resync": reason}: every watched table, after changes may have been missed
    # (logical mode: the slot was lost, missing or ahead of us; trigger mode: another
    # server, queued by note_server_v1()); the capture logs it.
    RESYNC = "resync"


class InvalidEvent(Exception):
    """An event that cannot become keys. It goes to the dead letters, never blocks."""


class TableName(NamedTuple):
    """A table's schema and name. A NamedTuple: every event of a backlog looks its table
    up in the mapper's dicts, and a tuple hashes and compares in C (a frozen dataclass's
    __hash__ and __eq__ are Python calls, measured at a tenth of the mapping's time)."""

    schema: str
    name: str

    @classmethod
    def parse(cls, text: str) -> TableName:
        """Read `schema.table` the way PostgreSQL reads a qualified name.

        Unquoted parts fold to lower case, double-quoted parts keep their case and may
        hold dots and doubled quotes; a name without a schema means `public`.
        """
        parts: list[str] = []
        i = 0
        while True:
            if i < len(text) and text[i] == '"':
                end = i + 1
                part = []
                while True:
                    q = text.find('"', end)
                    if q < 0:
                        raise ValueError(f"unterminated quoted identifier in {text!r}")
                    part.append(text[end:q])
                    if text.startswith('"', q + 1):
                        part.append('"')
                        end = q + 2
                        continue
                    i = q + 1
                    break
                parts.append("".join(part))
            else:
                dot = text.find(".", i)
                raw = text[i:] if dot < 0 else text[i:dot]
                if not raw.strip() or '"' in raw:
                    raise ValueError(f"invalid table name {text!r}")
                parts.append(raw.strip().lower())
                i = len(text) if dot < 0 else dot
            if i >= len(text):
                break
            if text[i] != ".":
                raise ValueError(f"invalid table name {text!r}")
            i += 1
        if not 1 <= len(parts) <= _MAX_NAME_PARTS or not all(parts):
            raise ValueError(f"invalid table name {text!r}: expected table or schema.table")
        return cls("public", parts[0]) if len(parts) == 1 else cls(parts[0], parts[1])

    @property
    def qualified(self) -> str:
        """`schema.table` with quotes only where PostgreSQL needs them."""
        return f"{_quote(self.schema)}.{_quote(self.name)}"

    def __str__(self) -> str:
        return self.qualified


def _quote(ident: str) -> str:
    if _PLAIN_IDENTIFIER.fullmatch(ident):
        return ident
    return '"' + ident.replace('"', '""') + '"'


class ChangeEvent(NamedTuple):
    """One committed change of one row (or one TRUNCATE of a whole table).

    `position` identifies the event at its source: the queue id in trigger mode. A
    NamedTuple, not a dataclass: a backlog makes a million of them.
    """

    table: TableName
    op: Op
    old: Row | None
    new: Row | None
    position: int


class StandIn(NamedTuple):
    """What a TRUNCATE event stands for when no TRUNCATE ran: its kind, with the
    capture's reason (UNRENDERABLE, RESYNC) or the statement size it was queued from
    (BULK)."""

    kind: StandInKind
    detail: str


def stand_in(event: ChangeEvent) -> StandIn | None:
    """What this TRUNCATE event stands for (StandInKind); None for a real TRUNCATE and
    any other event. The one reading of those markers."""
    if event.op is not Op.TRUNCATE or not event.new:
        return None
    for kind in StandInKind:
        detail = event.new.get(kind)
        if detail is not None:
            return StandIn(kind, str(detail))
    return None


# A pack's key columns: each column's values, one per row, in row order.
Columns = Mapping[str, Sequence[object]]


class Pack(NamedTuple):
    """The changes of `size` rows of one statement given column-wise (a trigger pack,
    capture/rows.py): what ChangeEvents they would be, without one per row. An UPDATE's
    old and new values are paired by index; `new is old` when their text is the same."""

    table: TableName
    op: Op
    old: Columns | None
    new: Columns | None
    size: int


class Origin(NamedTuple):
    """Where an event came from, for the operator's tools (`tail`): when it committed,
    as Unix time on the listener's clock (None when unknown), and its transaction in
    words ("xid 742", "xid 742, commit LSN 0/1A2B3C4")."""

    committed_at: float | None
    transaction: str
