"""Key templates such as ``user:{id}`` or ``user:email:{email}``.

Fields are column names, each optionally followed by filters (``{email|lower}``,
``{code|trim|upper}``: mapping/filters.py); ``{{`` and ``}}`` stand for literal braces.
A field's name is everything before its first ``|``. A template renders
into one key from a row's values, or into a Redis glob pattern (every field a ``*``)
for a TRUNCATE sweep, with the literal parts escaped so that a ``*`` or ``[`` the app put
in its key names matches only itself.

A sweep must stay inside keys its template can produce, as far as a glob can: a template
with fields must begin with literal text holding a letter or digit (``user:{id}``, its
sweep ``user:*``), never with a field (``{id}:user`` sweeps ``*:user``) or punctuation
alone (``{email}:{id}`` sweeps ``*:*``: every key with a colon, sessions and locks too).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from cdc_invalidator.events import InvalidEvent, Row
from cdc_invalidator.mapping.filters import FILTERS, Filter, chain

# A template's key for one row: see _renderer(), the one rule every path uses.
Render = Callable[[Row], str | None]
# The same for many rows: their keys (a NULL field: none for that row), or RenderError.
RenderAll = Callable[[Sequence[Row]], list[str]]
# The same for rows given column-wise (a pack: each column's values, one per row, in
# row order), or None when this cannot be done exactly: see _render_columns().
RenderColumns = Callable[[Mapping[str, Sequence[object]], int], list[str] | None]

_GLOB_SPECIAL = frozenset("*?[]\\")
# What every field of a sample key holds (`check` matches sweeps against sample keys).
_SAMPLE_VALUE = "1"


class TemplateError(ValueError):
    """A template that cannot be parsed; the message names the template."""


_MISSING = object()


class RenderError(InvalidEvent):
    """A row a template cannot render: it lacks a column the template uses, or a value is
    not text. The message names the column and the template; within() says which row."""

    def __init__(self, template: str, column: str, value: object = _MISSING) -> None:
        self.template = template
        self.column = column
        self.value = value
        super().__init__(self.within("the row"))

    @property
    def missing(self) -> bool:
        """The row lacks the column (rather than holding a value that is not text)."""
        return self.value is _MISSING

    def within(self, row: str) -> str:
        """The message, with `row` saying whose row it was ("old row of public.users")."""
        if self.value is _MISSING:
            # (A capture queues the columns its templates had; the decoder leaves out a
            # SQL_ASCII database's value that is not UTF-8: capture/rows.py.)
            return (
                f"{row} lacks column {self.column!r} used by template {self.template!r} "
                "(captured before install added the template, or, in a SQL_ASCII database, "
                "a value that is not UTF-8)"
            )
        kind = type(self.value).__name__
        return (
            f"{row}: template {self.template!r}: column {self.column!r} holds "
            f"{kind} {self.value!r}, expected text"
        )


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    source: str
    # Alternating literal text and field names: literals[0], fields[0], literals[1], ...
    literals: tuple[str, ...]
    fields: tuple[str, ...]  # column names
    # Each field's filters, in the order they apply (empty: the value as it is).
    filters: tuple[tuple[str, ...], ...] = ()
    # The key of a row, or None when a field is NULL (that key is skipped); RenderError
    # for a missing column or a value that is not text. Compiled once (_renderer()): a
    # backlog calls it for every row.
    render: Render = field(init=False, repr=False, compare=False)
    # render() for many rows at once (_render_all()): a bulk statement's keys.
    render_all: RenderAll = field(init=False, repr=False, compare=False)
    # render_all() for rows given as columns (_render_columns()): a trigger pack's keys.
    render_columns: RenderColumns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Frozen: object.__setattr__ is how a field derived from the others is set.
        if not self.filters:
            object.__setattr__(self, "filters", ((),) * len(self.fields))
        transforms = tuple(chain(names) for names in self.filters)
        render = _renderer(self.source, self.literals, self.fields, transforms)
        object.__setattr__(self, "render", render)
        object.__setattr__(
            self, "render_all", _render_all(render, self.literals, self.fields, transforms)
        )
        object.__setattr__(
            self, "render_columns", _render_columns(self.literals, self.fields, transforms)
        )

    @classmethod
    def parse(cls, source: str) -> KeyTemplate:
        literals: list[str] = []
        fields: list[str] = []
        filters: list[tuple[str, ...]] = []
        buf: list[str] = []
        i, n = 0, len(source)
        while i < n:
            ch = source[i]
            if ch == "{":
                if source.startswith("{", i + 1):
                    buf.append("{")
                    i += 2
                    continue
                end = source.find("}", i + 1)
                if end < 0:
                    raise TemplateError(f"template {source!r}: unbalanced '{{' at offset {i}")
                name = source[i + 1 : end]
                if not name:
                    raise TemplateError(f"template {source!r}: empty field '{{}}' at offset {i}")
                if "{" in name:
                    raise TemplateError(f"template {source!r}: unbalanced '{{' at offset {i}")
                column, names = _field(source, name)
                literals.append("".join(buf))
                buf.clear()
                fields.append(column)
                filters.append(names)
                i = end + 1
            elif ch == "}":
                if not source.startswith("}", i + 1):
                    raise TemplateError(f"template {source!r}: unbalanced '}}' at offset {i}")
                buf.append("}")
                i += 2
            else:
                buf.append(ch)
                i += 1
        literals.append("".join(buf))
        if not source:
            raise TemplateError("template '' is empty")
        return cls(source, tuple(literals), tuple(fields), tuple(filters))

    def glob(self) -> str:
        """A Redis MATCH pattern for every key this template can produce."""
        return "*".join(_escape_glob(lit) for lit in self.literals)

    def too_broad(self) -> str | None:
        """Why this template's sweep could reach keys of other tables and apps, or None.

        The sweep of a template with fields is confined to the keys that begin with its
        leading literal text: that text must exist and hold a letter or digit, since
        separators alone (":", "-", "/") are shared by every namespace.
        """
        if not self.fields or any(ch.isalnum() for ch in self.literals[0]):
            return None
        if not self.literals[0]:
            return f"it begins with the field {{{self.fields[0]}}}"
        return f"it begins with {self.literals[0]!r}, which holds no letter or digit"

    def sample(self) -> str:
        """The key of a row whose every field holds "1": what a key of this template
        typically looks like (ids are numbers, and "1" is no word of any template)."""
        values = [(chain(names) or str)(_SAMPLE_VALUE) for names in self.filters]
        return self.literals[0] + "".join(
            v + lit for v, lit in zip(values, self.literals[1:], strict=True)
        )

    def sweeps(self, key: str) -> bool:
        """Whether this template's TRUNCATE sweep deletes `key`: what Redis's MATCH does
        with glob(), whose `*` matches any text and whose escaped literals only themselves."""
        pattern = ".*".join(re.escape(lit) for lit in self.literals)
        return re.fullmatch(pattern, key, re.DOTALL) is not None


def _field(source: str, text: str) -> tuple[str, tuple[str, ...]]:
    """A field's column and filters: `email`, or `email|lower` (spaces around a `|` are
    allowed); an unknown or empty filter is a TemplateError naming the template."""
    column, *names = text.split("|")
    if not names:
        return column, ()
    column = column.rstrip()
    if not column:
        raise TemplateError(f"template {source!r}: field {{{text}}} names no column")
    filters = tuple(name.strip() for name in names)
    for name in filters:
        if name not in FILTERS:
            known = ", ".join(FILTERS)
            raise TemplateError(
                f"template {source!r}: unknown filter {name!r} in {{{text}}} (known: {known})"
            )
    return column, filters


def _renderer(
    source: str,
    literals: tuple[str, ...],
    fields: tuple[str, ...],
    transforms: tuple[Filter | None, ...],
) -> Render:
    """How a row renders this template's key, the one rule for every path (the listener's
    batches, replay, the tests): each field's value is text and goes in as it is, or
    through its filters; a NULL field means no key (None: the row has no such key to
    delete); a missing column or a value that is not text is a RenderError naming the
    column and the template. Fields are read in order: a NULL before a missing column is
    no error.

    A closure per template: the one-field case without filters, nearly every template,
    does no loop and no call."""
    if len(fields) == 1 and transforms == (None,):
        (column,) = fields
        prefix, suffix = literals

        def render_one(row: Row) -> str | None:
            try:
                value = row[column]
            except KeyError:
                raise RenderError(source, column) from None
            if value.__class__ is str:
                return prefix + value + suffix
            if value is None:
                return None
            raise RenderError(source, column, value)

        return render_one

    # Each field with its filters, or none.
    steps = [
        (column, transform or _same) for column, transform in zip(fields, transforms, strict=True)
    ]

    def render_many(row: Row) -> str | None:
        out = [literals[0]]
        for i, (column, transform) in enumerate(steps):
            try:
                value = row[column]
            except KeyError:
                raise RenderError(source, column) from None
            if value is None:
                return None
            if value.__class__ is not str:
                raise RenderError(source, column, value)
            out.append(transform(value))
            out.append(literals[i + 1])
        return "".join(out)

    return render_many


def _render_all(
    render: Render,
    literals: tuple[str, ...],
    fields: tuple[str, ...],
    transforms: tuple[Filter | None, ...],
) -> RenderAll:
    """render() over many rows: the keys, in row order, of those that have one.

    The one-field case without filters is one comprehension, no call per row (a bulk
    statement's chunk renders 10,000 rows per template; the call per row was most of the
    mapping's time). Its rows' values are str or None, as every capture gives them;
    anything else (a missing column: KeyError; a value not text: TypeError) sends the
    rows through render() one by one, which raises the RenderError that names it."""
    if len(fields) == 1 and transforms == (None,):
        (column,) = fields
        prefix, suffix = literals

        def render_all_one(rows: Sequence[Row]) -> list[str]:
            try:
                return [prefix + v + suffix for row in rows if (v := row[column]) is not None]
            except (KeyError, TypeError):
                return [k for row in rows if (k := render(row)) is not None]

        return render_all_one

    def render_all_many(rows: Sequence[Row]) -> list[str]:
        return [k for row in rows if (k := render(row)) is not None]

    return render_all_many


def _render_columns(
    literals: tuple[str, ...],
    fields: tuple[str, ...],
    transforms: tuple[Filter | None, ...],
) -> RenderColumns:
    """render_all() over `count` rows given as columns (label -> the rows' values): the
    same keys as render_all() of the rows, without building a row per element.

    Exactly render()'s rule, or None, never an error: a missing column, a column of
    another length, or a value neither text nor NULL (which render() would refuse for
    some row, depending on the order of its fields) gives None, and the caller goes
    row by row, where render() says which row and why."""
    if not fields:
        # A constant key (no field): every row renders it.
        (constant,) = literals

        def render_constant(columns: Mapping[str, Sequence[object]], count: int) -> list[str]:
            return [constant] if count else []

        return render_constant
    if len(fields) == 1 and transforms == (None,):
        (column,) = fields
        prefix, suffix = literals

        def render_columns_one(
            columns: Mapping[str, Sequence[object]], count: int
        ) -> list[str] | None:
            values = columns.get(column)
            if values is None or len(values) != count:
                return None
            # Typed as text for the comprehension: a value neither str nor None makes it
            # raise TypeError (str + int, str + list...), which is the check.
            texts = cast("Sequence[str | None]", values)
            try:
                return [prefix + v + suffix for v in texts if v is not None]
            except TypeError:
                return None

        return render_columns_one

    steps = [transform or _same for transform in transforms]

    def render_columns_many(
        columns: Mapping[str, Sequence[object]], count: int
    ) -> list[str] | None:
        arrays: list[Sequence[object]] = []
        for column in fields:
            values = columns.get(column)
            if values is None or len(values) != count or not _texts(values):
                return None
            arrays.append(values)
        out: list[str] = []
        # Every value is text or None (_texts() above): typed so for the loop.
        texts = zip(*cast("list[Sequence[str | None]]", arrays), strict=True)
        try:
            for values in texts:
                parts = [literals[0]]
                for i, value in enumerate(values):
                    if value is None:
                        break  # a NULL field: no key for this row
                    parts.append(steps[i](value))
                    parts.append(literals[i + 1])
                else:
                    out.append("".join(parts))
        except UnicodeError:
            # A filter that encodes (md5, urlencode) met a lone surrogate, which JSON
            # can spell: row by row, render() meets it as it always did.
            return None
        return out

    return render_columns_many


_TEXT_OR_NULL = frozenset((str, type(None)))


def _texts(values: Sequence[object]) -> bool:
    """Whether every value is text or NULL (one pass in C: no Python call per value)."""
    return set(map(type, values)) <= _TEXT_OR_NULL


def _same(value: str) -> str:
    return value


def _escape_glob(text: str) -> str:
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in text)
