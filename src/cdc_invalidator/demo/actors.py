"""The demo's two actors: an app doing cache-aside reads, an admin at a psql prompt."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
import redis


@dataclass(frozen=True, slots=True)
class Read:
    key: str
    hit: bool
    value: dict[str, Any] | None


class App:
    """The application: cache-aside reads by id, keys exactly as in the config."""

    def __init__(self, dsn: str, cache: redis.Redis) -> None:
        self._db = psycopg.connect(dsn, autocommit=True, application_name="demo-app")
        self._cache = cache

    def read_user(self, user_id: int) -> Read:
        key = f"user:{user_id}"
        cached = self._cache.get(key)
        if cached is not None:
            return Read(key, True, json.loads(str(cached)))
        row = self._db.execute(
            "SELECT id, email, name FROM users WHERE id = %s", (user_id,)
        ).fetchone()
        if row is None:
            return Read(key, False, None)
        value = {"id": row[0], "email": row[1], "name": row[2]}
        pipe = self._cache.pipeline(transaction=False)
        pipe.set(key, json.dumps(value))
        pipe.set(f"user:email:{row[1]}", str(row[0]))
        pipe.execute()
        return Read(key, False, value)

    def user_id_by_email(self, email: str) -> str:
        """Lookup by email, caching "no such user" as an empty string (a negative cache)."""
        key = f"user:email:{email}"
        cached = self._cache.get(key)
        if cached is not None:
            return str(cached)
        row = self._db.execute("SELECT id FROM users WHERE email = %s", (email,)).fetchone()
        found = "" if row is None else str(row[0])
        self._cache.set(key, found)
        return found

    def close(self) -> None:
        self._db.close()


class Psql:
    """An admin at a psql prompt on database `dbname`: prints each statement and its
    command tag."""

    def __init__(self, dsn: str, dbname: str, say: Callable[[str], None]) -> None:
        self._conn = psycopg.connect(dsn, autocommit=True, application_name="psql")
        self._dbname = dbname
        self._say = say

    @property
    def connection(self) -> psycopg.Connection[Any]:
        return self._conn

    def prompt(self) -> str:
        in_tx = self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        return f"{self._dbname}=*#" if in_tx else f"{self._dbname}=#"

    def run(self, statement: LiteralString) -> float:
        """Run one statement as psql would; returns perf_counter() from just before it."""
        self._say(f"    {self.prompt()} {statement};")
        started = time.perf_counter()
        cur = self._conn.execute(statement)
        self._say(f"    {cur.statusmessage}")
        return started

    def close(self) -> None:
        self._conn.close()
