"""A value as `::text` prints it, from the text its type's output function gives.

Keys render a column's value as PostgreSQL's text cast gives it (docs/configuration.md):
trigger mode's capture functions write `col::text`. pgoutput sends the output function's
text instead, and for most types the two are the same: a cast to text is an I/O
conversion. Three base types have a cast function of their own (pg_cast, castfunc to
text; `name` aside, which prints alike, and `"char"`, a one-byte catalog type), and
logical mode turns their output into what the cast gives, so that a key is the same in
either mode:

| type | output (pgoutput) | `::text` |
|---|---|---|
| boolean | `t`, `f` | `true`, `false` |
| character(n) | padded to n with spaces | trailing spaces removed |
| inet | the mask left out when it is the whole address (`/32`, `/128`) | always with it |

A domain over one of them prints as its base type.

A type the catalog says is cast to text by a function of the database's own (CREATE
CAST ... WITH FUNCTION) has a `::text` that only that function gives: the catalog look-up
(sql/base_types.sql) gives such a type's base as OWN_CAST, and logical mode sweeps the
changes of a table keyed by it rather than render the output function's text, which is
not the key trigger mode and `::text` give.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

BOOL: Final = 16
BPCHAR: Final = 1042
INET: Final = 869
# Types made by CREATE TYPE / CREATE DOMAIN / extensions start here (FirstNormalObjectId):
# a domain's base type is looked up in the catalog, built-in types are known by number.
FIRST_NORMAL_OID: Final = 16384
# The base type sql/base_types.sql gives a type cast to text by a function of its own: no
# type has oid 0, and no text cast is known by it.
OWN_CAST: Final = 0


def _bool(value: str) -> str:
    return "true" if value == "t" else "false" if value == "f" else value


def _bpchar(value: str) -> str:
    return value.rstrip(" ")


def _inet(value: str) -> str:
    if "/" in value:
        return value
    return value + ("/128" if ":" in value else "/32")


# Each is idempotent: applied to a value already cast, it changes nothing.
TEXT_CASTS: Final[Mapping[int, Callable[[str], str]]] = {BOOL: _bool, BPCHAR: _bpchar, INET: _inet}
