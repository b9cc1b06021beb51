"""Fixtures: real PostgreSQL and Redis processes on free loopback ports.

One PostgreSQL cluster and one Redis serve the whole session (each test gets its own
database and a flushed Redis); tests that stop or kill a server get servers of their own
(`own_servers`). Where a Docker engine answers, set CDC_TEST_DOCKER=1 to take the shared
servers from testcontainers instead.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from tests.helpers import ListenerProcess, write_config
from tests.support.servers import PostgresServer, RedisServer, ServerError

# Durability buys nothing in a throwaway test cluster; it only slows every commit.
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@dataclass
class Servers:
    pg_dsn: Callable[[str], str]  # database name -> DSN
    redis_url: str
    pg: PostgresServer | None = None
    redis: RedisServer | None = None


def _docker_servers() -> Iterator[Servers]:  # pragma: no cover - needs a Docker engine
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    pg = PostgresContainer("postgres:16", driver=None).with_command("-c wal_level=logical")
    rd = RedisContainer("redis:7")
    with pg, rd:
        host, port = pg.get_container_host_ip(), pg.get_exposed_port(5432)
        user, password = pg.username, pg.password

        def dsn(db: str) -> str:
            return f"postgresql://{user}:{password}@{host}:{port}/{db}"

        yield Servers(dsn, f"redis://{rd.get_container_host_ip()}:{rd.get_exposed_port(6379)}/0")


def _local_servers() -> Iterator[Servers]:
    try:
        pg = PostgresServer.create(FAST_PG)
        rd = RedisServer.create()
    except ServerError as exc:
        pytest.skip(f"no local servers: {exc}")
    with pg, rd:
        yield Servers(pg.dsn, rd.url, pg, rd)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    if os.environ.get("CDC_TEST_DOCKER") == "1":
        yield from _docker_servers()
    else:
        yield from _local_servers()


@pytest.fixture
def own_servers() -> Iterator[Servers]:
    """A PostgreSQL and a Redis for one test alone, free to stop, restart and kill."""
    for servers in _local_servers():
        with psycopg.connect(servers.pg_dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        yield servers


@pytest.fixture(params=["trigger", "logical"])
def capture(request: pytest.FixtureRequest) -> str:
    """The capture mode: a module whose behaviour both modes share uses
    `pytestmark = pytest.mark.usefixtures("capture")`, and its `env` runs in each."""
    mode: str = request.param
    return mode


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


def _make_env(
    servers: Servers, tmp_path: Path, dbname: str | None = None, capture: str = "trigger"
) -> Iterator[Env]:
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
        _drop_slots(admin_dsn, dbname)
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'.encode())


def _capture_of(request: pytest.FixtureRequest) -> str:
    if "capture" in request.fixturenames:
        mode: str = request.getfixturevalue("capture")
        return mode
    return "trigger"


@pytest.fixture
def env(servers: Servers, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    yield from _make_env(servers, tmp_path, capture=_capture_of(request))


@pytest.fixture
def own_env(own_servers: Servers, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    yield from _make_env(own_servers, tmp_path, dbname="app", capture=_capture_of(request))


Spawn = Callable[..., ListenerProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start `cdc-invalidator run` processes (JSON logs); whatever is left is killed."""
    started: list[ListenerProcess] = []

    def start(config: Path, env: dict[str, str] | None = None) -> ListenerProcess:
        listener = ListenerProcess(config, tmp_path / f"listener-{len(started)}.log", env)
        started.append(listener)
        return listener.start()

    yield start
    for listener in started:
        listener.kill()
