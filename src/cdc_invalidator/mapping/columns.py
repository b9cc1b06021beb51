"""Column filters: which changed columns make an UPDATE invalidate (a table's
`ignore_columns` or `columns`). Pure: both capture modes ask the same question of it.

A table without a filter judges nothing: every UPDATE invalidates, whatever it changed.
With one, each row of an UPDATE is judged on its own and invalidates only when a counted
column's value changed (its text, as PostgreSQL prints it: what keys render from and what
an app reads back). The columns the table's templates use always count, even when listed
in `ignore_columns`: a changed key column must delete the old key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Judge(StrEnum):
    IGNORE = "ignore"  # every column counts but those listed
    COLUMNS = "columns"  # only the listed columns count


@dataclass(frozen=True, slots=True)
class ColumnFilter:
    judge: Judge
    listed: tuple[str, ...]  # as configured: names as the catalog stores them
    templates: tuple[str, ...]  # the columns the table's templates use: always counted

    def counts(self, column: str) -> bool:
        """Whether a change of `column` invalidates."""
        if column in self.templates:
            return True
        return (column in self.listed) != (self.judge is Judge.IGNORE)

    def counted(self, columns: Iterable[str]) -> list[str]:
        """The columns of `columns` (a table's, in order) whose change invalidates."""
        return [c for c in columns if self.counts(c)]

    @property
    def ignored_template_columns(self) -> list[str]:
        """Columns listed in ignore_columns that a template uses: they count anyway."""
        if self.judge is not Judge.IGNORE:
            return []
        return [c for c in self.listed if c in self.templates]
