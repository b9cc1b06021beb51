"""The Redis identity (run_id and master_replid) last seen, saved in PostgreSQL
(redis_identity_v1): a listener that restarts while Redis changed still notices."""

from __future__ import annotations

from typing import Any

import psycopg

from cdc_invalidator.pg.queries import Q


class IdentityStore:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def load(self) -> tuple[str, float] | None:
        """(identity, seconds since it was saved) or None before the first save."""
        row = self._conn.execute(Q.LOAD_REDIS_IDENTITY.sql).fetchone()
        return (row[0], max(0.0, row[1])) if row else None

    def save(self, identity: str) -> None:
        self._conn.execute(Q.SAVE_REDIS_IDENTITY.sql, {"identity": identity})
