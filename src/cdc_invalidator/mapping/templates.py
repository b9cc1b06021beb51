"""Key templates such as ``user:{id}`` or ``user:email:{email}``.

Fields are column names; ``{{`` and ``}}`` stand for literal braces. A template renders
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
from collections.abc import Mapping
from dataclasses import dataclass

_GLOB_SPECIAL = frozenset("*?[]\\")
# What every field of a sample key holds (`check` matches sweeps against sample keys).
_SAMPLE_VALUE = "1"


class TemplateError(ValueError):
    """A template that cannot be parsed; the message names the template."""


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    source: str
    # Alternating literal text and field names: literals[0], fields[0], literals[1], ...
    literals: tuple[str, ...]
    fields: tuple[str, ...]
    # The field of a one-field template: the common case, given a fast path.
    single_field: str | None

    @classmethod
    def parse(cls, source: str) -> KeyTemplate:
        literals: list[str] = []
        fields: list[str] = []
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
                literals.append("".join(buf))
                buf.clear()
                fields.append(name)
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
        return cls(source, tuple(literals), tuple(fields), fields[0] if len(fields) == 1 else None)

    def render(self, row: Mapping[str, str | None]) -> str | None:
        """The key for this row, or None when a field is NULL (that key is skipped).

        Raises KeyError naming the column when the row lacks one, TypeError when a value
        is not text.
        """
        lits, fields = self.literals, self.fields
        if len(fields) == 1:  # the common case, on the hot path of a backlog
            value = row[fields[0]]
            if value.__class__ is str:
                return lits[0] + value + lits[1]
            if value is None:
                return None
            raise _not_text(fields[0], value)
        out = [lits[0]]
        for i, field in enumerate(fields):
            value = row[field]
            if value is None:
                return None
            if value.__class__ is not str:
                raise _not_text(field, value)
            out.append(value)
            out.append(lits[i + 1])
        return "".join(out)

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
        return self.literals[0] + "".join(_SAMPLE_VALUE + lit for lit in self.literals[1:])

    def sweeps(self, key: str) -> bool:
        """Whether this template's TRUNCATE sweep deletes `key`: what Redis's MATCH does
        with glob(), whose `*` matches any text and whose escaped literals only themselves."""
        pattern = ".*".join(re.escape(lit) for lit in self.literals)
        return re.fullmatch(pattern, key, re.DOTALL) is not None


def _not_text(field: str, value: object) -> TypeError:
    return TypeError(f"column {field!r} holds {type(value).__name__} {value!r}, expected text")


def _escape_glob(text: str) -> str:
    return "".join("\\" + ch if ch in _GLOB_SPECIAL else ch for ch in text)
