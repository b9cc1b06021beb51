"""One test's world (Env): a fresh database and a flushed Redis on the session's servers
(Servers), with helpers to configure them. The fixtures in tests/conftest.py make them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.support.config import write_config
from tests.support.servers import PostgresServer, RedisServer

# Durability buys nothing in a throwaway test cluster; it only slows every commit. The
# logical-replication launcher starts apply workers at most once per
# wal_retrieve_retry_interval (5 s by default): a subscription's test waited for it.
FAST_PG = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_retrieve_retry_interval": "100ms",
}


@dataclass
class Servers:
    pg_dsn: Callable[[str], str]  # database name -> DSN
    redis_url: str
    pg: PostgresServer | None = None
    redis: RedisServer | None = None


@dataclass
class Env:
    """One test's world: a fresh database, a flushed Redis, helpers to configure them."""

    dsn: str
    redis_url: str
    tmp_path: Path
    servers: Servers
    capture: str = "trigger"

    @property
    def logical(self) -> bool:
        return self.capture == "logical"

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True, **kwargs)

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> None:
        with self.connect() as conn:
            conn.execute(
                query.encode(), params
            )  # bytes: our own test SQL, may hold many statements

    def scalar(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Any:
        with self.connect() as conn:
            row = conn.execute(query.encode(), params).fetchone()
            return None if row is None else row[0]

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def config(
        self, tables: Mapping[str, Sequence[str]], name: str = "config.toml", **settings: object
    ) -> Path:
        mode: dict[str, object] = {"capture": self.capture} if self.logical else {}
        return write_config(
            self.tmp_path / name,
            database_url=self.dsn,
            redis_url=self.redis_url,
            tables=tables,
            **{**mode, **settings},
        )


def recovered_from(env: Env, killed: int) -> bool:
    """Whether the test's PostgreSQL takes connections again after its process `killed`
    was killed (a crash): that process is gone from pg_stat_activity, which keeps a killed
    process's entry until the postmaster has noticed, ended every session and recovered.
    (Taking connections is not enough: one made before the postmaster noticed is ended by
    it, and the next is refused while it recovers, as CI saw.)"""
    try:
        return not env.scalar(
            "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)", [killed]
        )
    except psycopg.OperationalError:
        return False


def pg_of(env: Env) -> PostgresServer:
    """The test's own PostgreSQL (own_env), to stop, restart or kill."""
    assert env.servers.pg is not None
    return env.servers.pg


def redis_of(env: Env) -> RedisServer:
    """The test's own Redis (own_env), to stop, restart or kill."""
    assert env.servers.redis is not None
    return env.servers.redis


def _drop_slots(admin_dsn: str, dbname: str) -> None:
    """A database with a replication slot cannot be dropped, and slots are per server."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL",
            [dbname],
        )
        for (slot,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = %s", [dbname]
        ).fetchall():
            for _ in range(100):  # a terminated walsender lets go of its slot shortly
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
                    break
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.05)


def make_env(
    servers: Servers, tmp_path: Path, dbname: str | None = None, capture: str = "trigger"
) -> Iterator[Env]:
    """An Env on `servers` for a fixture to yield from: a new database (dropped after),
    or `dbname` as it is; Redis flushed."""
    admin_dsn = servers.pg_dsn("postgres")
    created = dbname is None
    if dbname is None:
        dbname = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"'.encode())
    client = redis.Redis.from_url(servers.redis_url)
    client.flushall()
    client.close()
    yield Env(servers.pg_dsn(dbname), servers.redis_url, tmp_path, servers, capture)
    if created:
        drop_database(admin_dsn, dbname)


def drop_database(admin_dsn: str, dbname: str) -> None:
    """Drop a test's database, and its replication slots first."""
    _drop_slots(admin_dsn, dbname)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'.encode())


def capture_of(request: pytest.FixtureRequest) -> str:
    """The test's capture mode: its `capture` fixture's, else trigger."""
    if "capture" in request.fixturenames:
        mode: str = request.getfixturevalue("capture")
        return mode
    return "trigger"
