"""`check`: the configuration against the live database and Redis."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis

from cdc_invalidator import sqlfiles
from cdc_invalidator.capture.trigger_sql import SCHEMA_VERSION, installed_version
from cdc_invalidator.events import TableName
from cdc_invalidator.redact import redact_url
from cdc_invalidator.settings import Settings


@dataclass(slots=True)
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors


def check_database(conn: psycopg.Connection[Any], settings: Settings, config_name: str) -> Report:
    report = Report()
    mapper = settings.mapper()
    names = {TableName.parse(name): name for name in settings.tables}
    version = installed_version(conn)
    installed = version == SCHEMA_VERSION
    if version is None:
        report.errors.append(
            f"database {conn.info.dbname!r}: cdc_invalidator is not installed "
            "(run `cdc-invalidator install`, or have a DBA apply `cdc-invalidator sql`)"
        )
    elif not installed:
        report.errors.append(
            f"database {conn.info.dbname!r}: installed SQL is v{version}, this release needs "
            f"v{SCHEMA_VERSION}: run `cdc-invalidator install`"
        )
    else:
        report.ok.append(f"database {conn.info.dbname!r}: cdc_invalidator v{version} installed")

    for table, templates in sorted(mapper.tables.items()):
        where = f"{config_name}: [tables.{names[table]!r}]"
        info = conn.execute(
            sqlfiles.query("check_table.sql"), {"table": table.qualified}
        ).fetchone()
        assert info is not None
        exists, columns = info
        if not exists:
            report.errors.append(f"{where}: table {table} does not exist")
            continue
        problems = False
        for template in templates:
            for column in template.fields:
                if column not in columns:
                    problems = True
                    report.errors.append(
                        f"{where}: template {template.source!r} uses column {column!r}, "
                        f"which table {table} does not have"
                    )
        if problems or not installed:
            continue
        wanted = mapper.columns(table)
        watch = conn.execute(
            sqlfiles.query("check_watch.sql"), {"table": table.qualified}
        ).fetchone()
        assert watch is not None
        watched_columns, triggers, unwatched_partitions = watch
        if triggers != 4 or watched_columns is None:
            report.errors.append(
                f"{where}: table {table} is not watched (no triggers): "
                "run `cdc-invalidator install`"
            )
        elif sorted(watched_columns) != wanted:
            report.errors.append(
                f"{where}: triggers copy columns {sorted(watched_columns)} but the templates "
                f"need {wanted}: run `cdc-invalidator install` to bring them in line"
            )
        elif unwatched_partitions:
            report.errors.append(
                f"{where}: partitions {', '.join(unwatched_partitions)} have no triggers, so "
                "writes that name them are not captured: run `cdc-invalidator install`"
            )
        else:
            report.ok.append(f"{where}: watched, columns {wanted}")

    if installed:
        configured = [t.qualified for t in mapper.tables]
        for (name,) in conn.execute(
            sqlfiles.query("check_unconfigured.sql"), {"tables": configured}
        ):
            report.warnings.append(
                f"table {name} is watched but not in {config_name}: its events will go to "
                "the dead letters (run `cdc-invalidator install` to remove its triggers)"
            )
    return report


def check_redis(client: redis.Redis, url: str) -> Report:
    report = Report()
    try:
        client.ping()
    except redis.RedisError as exc:
        report.errors.append(f"redis at {redact_url(url)}: {exc}")
    else:
        report.ok.append(f"redis at {redact_url(url)}: reachable")
    return report
