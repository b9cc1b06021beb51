"""A SQL_ASCII database's text, read and written as the bytes it holds.

A SQL_ASCII database stores whatever bytes a client sent, and PostgreSQL checks text it
sends a UTF8 session: a value that is not UTF-8 fails the whole query that reads it
("invalid byte sequence for encoding UTF8"), every time. For the listener's sessions that
read captured rows (the trigger queue, the history a replay reads) one such row would
hold back every change after it. Their client encoding is SQL_ASCII instead (no check,
no conversion), and these adapters make text of the bytes: UTF-8 decoded as usual, any
other byte as a lone surrogate (Python's "surrogateescape"), which the row decoder
refuses with the column's name (capture/rows.py) so that the change is a dead letter.
Text sent back (a dead letter's error) is encoded the same way, so nothing is lost.

Only for sessions that compose no identifiers: psycopg composes them in the client
encoding, which is ASCII then.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.adapt import Buffer
from psycopg.types.string import StrDumperUnknown, TextLoader

ENCODING = "SQL_ASCII"
# The text types psycopg loads as str (types.string.register_default_adapters), and the
# types it does not know (0).
_TEXT_TYPES = (0, "bpchar", "name", "text", "varchar", '"char"')


class _RawTextLoader(TextLoader):
    def load(self, data: Buffer) -> str:
        return bytes(data).decode("utf-8", "surrogateescape")


class _RawStrDumper(StrDumperUnknown):
    def dump(self, obj: str) -> Buffer | None:
        if "\x00" in obj:
            raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        return obj.encode("utf-8", "surrogateescape")


def reads_raw(conn: psycopg.Connection[Any]) -> bool:
    """Whether `conn` reads raw text: a SQL_ASCII database's session, adapted here."""
    return conn.pgconn.parameter_status(b"client_encoding") == ENCODING.encode()


def adapt(conn: psycopg.Connection[Any]) -> None:
    """Make `conn` (whose client_encoding is, or is about to be, SQL_ASCII) load and dump
    text as above."""
    adapters = conn.adapters
    for name in _TEXT_TYPES:
        adapters.register_loader(name, _RawTextLoader)
    adapters.register_dumper(str, _RawStrDumper)
