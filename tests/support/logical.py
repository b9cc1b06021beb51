"""Logical mode's world, which its migration tests share: users and orders tables, a
logical-mode config, install, and our replication slot as PostgreSQL shows it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from tests.support.config import toml_value, write_config
from tests.support.env import Env
from tests.support.listener import ListenerProcess, ListenerThread, cli
from tests.support.waits import wait_until

SLOT = "cdc_invalidator"  # the default slot_name and publication_name


USERS = {"public.users": ["user:{id}", "user:email:{email}"]}  # email: not in the PK
ORDERS = {"public.orders": ["order:{id}"]}  # PK only: the default identity covers it


def make_tables(env: Env) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, note text);"
        "INSERT INTO users VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B');"
        "INSERT INTO orders VALUES (1, 'one')"
    )


def logical_config(
    env: Env,
    tables: dict[str, list[str]],
    *,
    name: str = "config.toml",
    keep: Sequence[str] = (),
    database_url: str | None = None,
    **settings: object,
) -> Path:
    """A logical-mode config; tables named in `keep` get replica_identity = "keep"."""
    path = write_config(
        env.tmp_path / name,
        database_url=database_url or env.dsn,
        redis_url=env.redis_url,
        tables=tables,
        capture="logical",
        **settings,
    )
    text = path.read_text()
    for table in keep:
        header = f"[tables.{toml_value(table)}]\n"
        assert header in text
        text = text.replace(header, header + 'replica_identity = "keep"\n')
    path.write_text(text)
    return path


def install(config: Path) -> None:
    assert cli("install", "--config", config) == 0


def slot(env: Env, name: str = SLOT) -> dict[str, Any] | None:
    """Our slot as pg_replication_slots shows it, or None."""
    with env.connect() as conn:
        cur = conn.execute(
            "SELECT plugin, slot_type, database, active_pid, wal_status,"
            " restart_lsn::text, confirmed_flush_lsn::text"
            " FROM pg_replication_slots WHERE slot_name = %s",
            [name],
        )
        row = cur.fetchone()
        if row is None:
            return None
        assert cur.description is not None
        return {d.name: v for d, v in zip(cur.description, row, strict=True)}


def active(env: Env) -> bool:
    found = slot(env)
    return found is not None and found["active_pid"] is not None


def gone(r: redis.Redis, *keys: str) -> bool:
    return r.exists(*keys) == 0


@contextmanager
def running(env: Env, config: Path) -> Iterator[ListenerThread]:
    """A listener in a thread, streaming its slot by the time the body runs."""
    listener = ListenerThread.from_file(config).start()
    try:
        wait_until(lambda: active(env), what="the listener streaming its slot")
        yield listener
    finally:
        listener.stop()


def stop(listener: ListenerProcess) -> None:
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


def the_dead_letter(env: Env) -> tuple[str, str]:
    """(table, error) of the one dead letter saved, once it is."""
    wait_until(
        lambda: env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 1,
        what="the dead letter saved",
    )
    table, error = env.scalar("SELECT array[table_name, error] FROM cdc_invalidator.dead_letter_v1")
    return table, error
