"""Connections for the CLI's one-shot commands (the listener has its own)."""

from __future__ import annotations

from typing import Any

import psycopg

from cdc_invalidator.redact import redact_url
from cdc_invalidator.settings import Settings


class DatabaseError(Exception):
    """Cannot reach or use the database; the message is safe to print."""


def connect(settings: Settings, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            settings.database_url,
            autocommit=autocommit,
            application_name=f"{settings.application_name}-cli",
            connect_timeout=max(1, round(settings.connect_timeout_s)),
        )
    except psycopg.Error as exc:
        where = redact_url(settings.database_url) or "(libpq defaults)"
        raise DatabaseError(f"cannot connect to PostgreSQL at {where}: {exc}") from None
