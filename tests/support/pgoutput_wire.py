"""pgoutput messages for the decoder's tests: those recorded from a real server
(tests/data/pgoutput.json, the scenarios by name) and ones built by hand."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cdc_invalidator.events import TableName

ColumnsFor = Callable[[TableName], Sequence[str] | None]

_DATA = json.loads((Path(__file__).parent.parent / "data" / "pgoutput.json").read_text())
TOAST_SLUG: str = _DATA["_values"]["pages_full.slug"]
SCENARIOS: dict[str, list[bytes]] = {
    name: [bytes.fromhex(m) for m in messages]
    for name, messages in _DATA.items()
    if name != "_values"
}

CHANGE_SCENARIOS = sorted(
    name for name, msgs in SCENARIOS.items() if any(m[:1] in (b"I", b"U", b"D") for m in msgs)
)


def columns(wanted: Mapping[TableName, Sequence[str]]) -> ColumnsFor:
    """The given columns for the given tables, every column of any other table."""
    return wanted.get


def text_field(value: bytes) -> bytes:
    """A TupleData column holding text: 't', Int32 length, the bytes."""
    return b"t" + struct.pack("!I", len(value)) + value


# A table whose key column is not its first: (name text, id int, body text), with
# REPLICA IDENTITY FULL ('f'), every column flagged as part of it.
HAND_RELID = 40001
HAND = TableName("public", "hand")


def hand_relation(identity: bytes = b"f") -> bytes:
    cols = b"".join(
        b"\x01" + name + b"\x00" + struct.pack("!Ii", oid, -1)
        for name, oid in ((b"name", 25), (b"id", 23), (b"body", 25))
    )
    return (
        b"R" + struct.pack("!I", HAND_RELID) + b"public\x00hand\x00" + identity + b"\x00\x03" + cols
    )


def tuple_data(*values: bytes | str | None) -> bytes:
    """TupleData: bytes as text, None as NULL, "u" as an unchanged TOASTed value."""
    out = struct.pack("!H", len(values))
    for v in values:
        out += b"n" if v is None else b"u" if v == "u" else text_field(v)  # type: ignore[arg-type]
    return out


def hand_change(kind: bytes, *tuples: tuple[bytes, bytes]) -> bytes:
    return kind + struct.pack("!I", HAND_RELID) + b"".join(tag + data for tag, data in tuples)


def streamed_layout(msg: bytes, xid: int) -> bytes:
    """A protocol-1 change as a stream block carries it: its xid after the type byte."""
    return msg[:1] + struct.pack("!I", xid) + msg[1:]
