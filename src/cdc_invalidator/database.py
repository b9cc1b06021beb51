"""Connections for the CLI's one-shot commands, with an error a person can read."""

from __future__ import annotations

from typing import Any

import psycopg

from cdc_invalidator.pg.connect import CLI, Kind, PgConnector
from cdc_invalidator.redact import redact_url
from cdc_invalidator.settings import Settings


class DatabaseError(Exception):
    """Cannot reach or use the database; the message is safe to print."""


def connect(
    settings: Settings, *, autocommit: bool = True, kind: Kind = CLI
) -> psycopg.Connection[Any]:
    try:
        return PgConnector.from_settings(settings).connect(kind, autocommit=autocommit)
    except psycopg.Error as exc:
        where = redact_url(settings.database_url) or "(libpq defaults)"
        raise DatabaseError(f"cannot connect to PostgreSQL at {where}: {exc}") from None
