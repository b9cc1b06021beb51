"""From a key back to the rows that render it: which templates can produce a key, and
with which column values (`cdc-invalidator explain`).

A key is split along a template's literal text; where a literal also occurs inside a
value (`order:{id}:{user}` and `order:1:2:3`) every split is a candidate. A field with
filters is read back through them from the last: a filter whose output could not be the
text found rules the template out (`lower` never yields an upper-case letter, a digest is
hex of its length); `urlencode` has one value before it; `lower`, `upper` and `trim` have
many (the value up to case, up to surrounding whitespace), and a digest has no value that
can be named: it is described instead, and only rendering a suspected value (`keys`)
tells.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from cdc_invalidator.mapping.filters import FILTERS
from cdc_invalidator.mapping.templates import KeyTemplate

# Splits of one key along one template reported at most.
MAX_SPLITS = 20
_HEX_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64}
_HEX = re.compile(r"[0-9a-f]*")


@dataclass(frozen=True, slots=True)
class FieldValue:
    column: str
    text: str  # what the key holds in the field's place (after the filters)
    # A value of the column that renders `text` (None behind a digest: none can be
    # named), and whether it is the only one.
    value: str | None
    exact: bool
    meaning: str  # in words, e.g. "'ann@x.org' up to case (lower)"


@dataclass(frozen=True, slots=True)
class Match:
    template: KeyTemplate
    fields: tuple[FieldValue, ...]

    @property
    def row(self) -> dict[str, str] | None:
        """Column values that render the key (one of many for `lower`, `upper`, `trim`),
        or None when a digest stands in the way."""
        out: dict[str, str] = {}
        for f in self.fields:
            if f.value is None:
                return None
            out[f.column] = f.value
        return out


def matches(template: KeyTemplate, key: str) -> list[Match]:
    """Every way `template` can produce `key` (none: it cannot)."""
    found: list[Match] = []
    for texts in _splits(template.literals, key):
        values = []
        for column, names, text in zip(template.fields, template.filters, texts, strict=True):
            value = _read_back(column, names, text)
            if value is None:
                break
            values.append(value)
        else:
            found.append(Match(template, tuple(values)))
    return found


def _splits(literals: tuple[str, ...], key: str) -> list[list[str]]:
    """The field texts of each way `key` is literals[0] + t0 + literals[1] + ... + ln."""
    first, last = literals[0], literals[-1]
    if len(literals) == 1:
        return [[]] if key == first else []
    if not key.startswith(first) or not key.endswith(last) or len(key) < len(first) + len(last):
        return []
    middle = key[len(first) : len(key) - len(last)]
    out: list[list[str]] = []

    def walk(rest: str, inner: tuple[str, ...], taken: list[str]) -> None:
        if len(out) >= MAX_SPLITS:
            return
        if not inner:
            out.append([*taken, rest])
            return
        literal, start = inner[0], 0
        while (at := rest.find(literal, start)) >= 0:
            walk(rest[at + len(literal) :], inner[1:], [*taken, rest[:at]])
            start = at + 1  # (an empty literal: every cut, then find() gives -1)

    walk(middle, literals[1:-1], [])
    return out


def _read_back(column: str, names: tuple[str, ...], text: str) -> FieldValue | None:
    """The value(s) that `names` turn into `text`, or None when none can."""
    value: str | None = text
    words: list[str] = []
    for name in reversed(names):
        if value is None:  # behind a digest: what went in cannot be checked
            break
        if name in _HEX_LENGTHS:
            if len(value) != _HEX_LENGTHS[name] or not _HEX.fullmatch(value):
                return None
            words = [f"whose {'|'.join(names)} is {text!r}"]
            value = None
        elif name == "urlencode":
            plain = urllib.parse.unquote(value, errors="strict") if _decodable(value) else None
            if plain is None or FILTERS["urlencode"](plain) != value:
                return None
            value = plain
        elif FILTERS[name](value) != value:  # lower, upper, trim give fixed points
            return None
        else:
            words.append(
                {
                    "lower": "up to case (lower)",
                    "upper": "up to case (upper)",
                    "trim": "with any whitespace around it (trim)",
                }[name]
            )
    if value is None:
        meaning = "a value " + ", ".join(words) + " (a digest cannot be read back)"
    elif words:
        meaning = f"{value!r} " + ", ".join(words)
    else:
        meaning = repr(value)
    return FieldValue(column, text, value, value is not None and not words, meaning)


def _decodable(text: str) -> bool:
    try:
        urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        return False
    return True
