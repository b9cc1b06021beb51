"""`check` of the configuration alone, before any server: the key templates."""

from __future__ import annotations

import re
from itertools import permutations

from cdc_invalidator.checks.report import Report
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping import KeyTemplate
from cdc_invalidator.settings import Settings
from cdc_invalidator.sink import url_db


def check_templates(settings: Settings, config_name: str) -> Report:
    """Warn where one table's TRUNCATE sweep would delete another table's keys.

    Each template's sweep is matched, as Redis matches it, against a sample key of every
    template of the other tables (every field "1"): a match means a TRUNCATE of the one
    table empties part of the other's cache. Harmless for correctness (cache misses),
    rarely what was meant. Tables whose keys live in different Redis databases never
    meet."""
    report = Report()
    mapper = settings.mapper()
    names = {TableName.parse(name): name for name in settings.tables}
    url_db = _url_db(settings.redis_url)
    dbs: dict[TableName, int | None] = {}
    for table in mapper.tables:
        db = settings.tables[names[table]].redis_db
        dbs[table] = url_db if db is None else db
    for table, templates in sorted(mapper.tables.items()):
        for template in templates:
            _warn_literal_field(report, config_name, names[table], template)
    for a, b in permutations(sorted(mapper.tables), 2):
        if dbs[a] is not None and dbs[b] is not None and dbs[a] != dbs[b]:
            continue
        for ta in mapper.tables[a]:
            for tb in mapper.tables[b]:
                key = tb.sample()
                if ta.sweeps(key):
                    report.warnings.append(
                        f"{config_name}: a TRUNCATE of table {names[a]!r} sweeps "
                        f"{ta.glob()!r} (template {ta.source!r}), which also matches keys of "
                        f"table {names[b]!r} (template {tb.source!r}, such as {key!r}): "
                        "they are deleted too. Give each table's templates a prefix of "
                        "their own if that is not meant"
                    )
    return report


# Literal text that reads as a field: "{{id}}" (doubled braces are literal) where a
# Redis Cluster hash tag around the value, "{{{id}}}", was meant.
_LITERAL_FIELD = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*(?:\|[^{}]*)?\}")


def _warn_literal_field(
    report: Report, config_name: str, table: str, template: KeyTemplate
) -> None:
    for literal in template.literals:
        if (found := _LITERAL_FIELD.search(literal)) is not None:
            text = found.group(0)
            tagged = template.source.replace("{" + text + "}", "{{" + text + "}}")
            report.warnings.append(
                f"{config_name}: template {template.source!r} of table {table!r} has the "
                f"literal text {text!r} in every key (doubled braces are literal): for a "
                f"Redis Cluster hash tag around the value, write {tagged!r}"
            )


def _url_db(url: str) -> int | None:
    """The logical database redis_url names, or None when it cannot be told."""
    try:
        return url_db(url)
    except ValueError:
        return None
