"""`cdc-invalidator keys TABLE COLUMN=VALUE ...`: the keys a row maps to.

Offline, the values given on the command line go through the table's templates exactly
as the listener renders a row (the same compiled renderers, filters included): nothing
is connected. With `--where SQL` the rows come from the database instead: the
template columns, as text, of the rows the condition selects, read in a READ ONLY
transaction under a statement_timeout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString

import psycopg
from psycopg import sql

from cdc_invalidator.events import Row, TableName
from cdc_invalidator.mapping import KeyTemplate, Mapper
from cdc_invalidator.mapping.templates import RenderError
from cdc_invalidator.pg.connect import RENDER_SETTINGS
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.tools import UsageError

# `--where`: rows read at most (the default), and how long the query may run.
DEFAULT_LIMIT = 1000
STATEMENT_TIMEOUT = "10s"


def find_table(mapper: Mapper, text: str) -> TableName:
    """The configured table `text` names (`users`, `public.users`, `"Odd"."Name"`)."""
    try:
        table = TableName.parse(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if table not in mapper.tables:
        known = ", ".join(sorted(str(t) for t in mapper.tables))
        raise UsageError(f"table {text!r} is not in the configuration (configured: {known})")
    return table


@dataclass(frozen=True, slots=True)
class Request:
    """What the command line asks: a row's values, or a condition selecting live rows."""

    table: TableName
    values: dict[str, str]
    where: str | None
    limit: int


def request(
    mapper: Mapper, table: str, values: Sequence[str], where: str | None, limit: int
) -> Request:
    """The command line's arguments checked; UsageError naming the wrong one."""
    given = parse_values(values)
    if where is not None and given:
        raise UsageError("give COLUMN=VALUE or --where, not both")
    if where is None and not given:
        raise UsageError("give the row's values as COLUMN=VALUE, or --where SQL")
    if limit < 1:
        raise UsageError(f"--limit {limit}: must be at least 1")
    return Request(find_table(mapper, table), given, where, limit)


def parse_values(items: Sequence[str]) -> dict[str, str]:
    """COLUMN=VALUE arguments: the value is everything after the first `=`, as text (as
    PostgreSQL prints it: what the listener renders keys from)."""
    values: dict[str, str] = {}
    for item in items:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise UsageError(f"{item!r} is not COLUMN=VALUE")
        if column in values:
            raise UsageError(f"column {column!r} is given twice")
        values[column] = value
    return values


@dataclass(slots=True)
class RowKeys:
    """What one row's values render to, template by template."""

    keys: list[str] = field(default_factory=list)
    # Templates that could not render: the columns they lack.
    missing: dict[str, list[str]] = field(default_factory=dict)
    # Templates skipped because a field is NULL (the row has no such key).
    null: list[str] = field(default_factory=list)


def row_keys(templates: Iterable[KeyTemplate], row: Row) -> RowKeys:
    """Each template rendered from `row`, as the listener renders it."""
    out = RowKeys()
    for template in templates:
        lacking = [f for f in dict.fromkeys(template.fields) if f not in row]
        if lacking:
            out.missing[template.source] = lacking
            continue
        try:
            key = template.render(row)
        except RenderError as exc:  # only text reaches here: kept for the rule's sake
            out.missing[template.source] = [exc.column]
            continue
        if key is None:
            out.null.append(template.source)
        else:
            out.keys.append(key)
    return out


def unused(mapper: Mapper, table: TableName, values: Iterable[str]) -> list[str]:
    """Given columns that no template of the table uses (a typo, most likely)."""
    used = set(mapper.columns(table))
    return [c for c in values if c not in used]


PIN_RENDER_SETTINGS: LiteralString = "SELECT " + ", ".join(
    ["set_config(%s, %s, true)"] * len(RENDER_SETTINGS)
)


@dataclass(frozen=True, slots=True)
class LiveRows:
    rows: list[dict[str, str | None]]
    limited: bool  # more rows matched than the limit


def read_rows(
    conn: psycopg.Connection[Any], table: TableName, columns: Sequence[str], where: str, limit: int
) -> LiveRows:
    """The template columns of the rows `where` selects, at most `limit` of them.

    `where` is the operator's own SQL, run with the operator's role: a READ ONLY
    transaction (rolled back), one statement of the extended protocol (the limit is a
    bound parameter, so a `;` in the condition is a syntax error, never a second
    statement), and a statement_timeout. Values print with the settings the listener
    renders them with (UTC, ISO dates, hex bytea: RENDER_SETTINGS), which the condition
    is read with too."""
    query = Q.KEYS_WHERE.sql.format(
        columns=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns),
        table=sql.Identifier(table.schema, table.name),
        # The operator's condition, by design (see above): not a literal string.
        where=sql.SQL(where),
    )
    cast = conn.execute(
        Q.KEYS_CASTS.sql, {"table": table.qualified, "columns": list(columns)}
    ).fetchone()
    if cast is not None:
        column, type_name, function = cast
        raise UsageError(
            f"column {column!r} of {table} is of type {type_name}, which {function} casts to "
            "text: --where reads it as text, which would run that function as this role. "
            "Run it as the table's owner (database_url), or give COLUMN=VALUE: offline"
        )
    tx = conn.transaction(force_rollback=True)
    with tx:
        conn.execute("SET TRANSACTION READ ONLY")
        conn.execute(
            sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(STATEMENT_TIMEOUT))
        )
        conn.execute(PIN_RENDER_SETTINGS, [v for setting in RENDER_SETTINGS for v in setting])
        # The condition is the operator's SQL, read as psql would read it: with the
        # session's own search_path (the role's or database's), not pg_catalog alone,
        # which our sessions pin (an operator of an extension in public, citext's `=`,
        # was read as text's, and matched nothing). The rest of the query names no
        # function (the columns' casts to text are not looked up by search_path).
        conn.execute("SET LOCAL search_path TO DEFAULT")
        fetched = conn.execute(query, {"limit": limit + 1}).fetchall()
    rows = [dict(zip(columns, row, strict=True)) for row in fetched[:limit]]
    return LiveRows(rows, len(fetched) > limit)
