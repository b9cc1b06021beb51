"""The SQL shipped in sql/ (the package cdc_invalidator.sql), read once per use."""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import LiteralString

from psycopg import sql


@cache
def text(name: str) -> LiteralString:
    # Trusted text shipped with the package, never built from input: a LiteralString.
    content: LiteralString = files("cdc_invalidator.sql").joinpath(name).read_text("utf-8")
    return content


def query(name: str) -> sql.SQL:
    return sql.SQL(text(name))
