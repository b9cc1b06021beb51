"""Sync points: every test's config also watches a `sync` table, and settle() commits a
row to it and waits until that change and everything committed before it is done. With
the users table and the key listing of the tests that settle.

In trigger mode the queue is then empty: the listener deletes a queue row in the same
transaction that it commits only after Redis confirmed the deletes. In logical mode the
stream is in commit order, so the sync row's key deleted means every change committed
before it was handled; and the slot's confirmed position passing the sync row's commit
means that batch (and its dead letters, saved before the acknowledgement) is done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import redis

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.waits import wait_until

# Every test's config also watches `sync`: committing a row to it is a sync point.
SYNC = {"public.sync": ["sync:{id}"]}

# The changes queued: a pack (a statement's rows, up to a thousand per queue row) weighs
# its rows.
QUEUE_LEN = "SELECT coalesce(sum(coalesce(rows, 1)), 0) FROM cdc_invalidator.queue_v1"
SLOT = "cdc_invalidator"  # the default slot_name and publication_name


def install(
    env: Env, tables: Mapping[str, Sequence[str]], name: str = "config.toml", **settings: object
) -> Path:
    if env.scalar("SELECT to_regclass('public.sync')") is None:
        env.sql("CREATE TABLE sync (id int PRIMARY KEY)")
    config = env.config({**tables, **SYNC}, name=name, **settings)
    assert main(["install", "--config", str(config)]) == 0
    return config


def queue_len(env: Env) -> int:
    return int(env.scalar(QUEUE_LEN))


def confirmed_past(env: Env, lsn: str) -> bool:
    """The slot's confirmed position (what the listener told it it has finished) is
    past `lsn`."""
    return bool(
        env.scalar(
            "SELECT coalesce(confirmed_flush_lsn > %s::pg_lsn, false)"
            " FROM pg_replication_slots WHERE slot_name = %s",
            [lsn, SLOT],
        )
    )


def keys(r: redis.Redis) -> set[str]:
    return set(cast(list[str], r.keys("*")))


def settle(env: Env, r: redis.Redis) -> None:
    """Commit a change to `sync` and wait until it and everything before it is done."""
    n = int(env.scalar("SELECT coalesce(max(id), 0) + 1 FROM sync"))
    r.set(f"sync:{n}", "x")
    with env.connect() as conn, conn.transaction():
        conn.execute("INSERT INTO sync VALUES (%s)", [n])
        # The WAL position just before the commit record.
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    if env.logical:
        # The listener confirms the end of a transaction it finished, or a position
        # between transactions: past the sync row's last change means past its commit.
        wait_until(
            lambda: r.exists(f"sync:{n}") == 0 and confirmed_past(env, row[0]),
            what=f"sync point {n} processed and acknowledged",
        )
    else:
        wait_until(
            lambda: r.exists(f"sync:{n}") == 0 and queue_len(env) == 0,
            what=f"sync point {n} processed and the queue empty",
        )


def users_table(env: Env, rows: Sequence[tuple[int, str | None]] = ()) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    with env.connect() as conn:
        for id_, email in rows:
            conn.execute("INSERT INTO users (id, email) VALUES (%s, %s)", [id_, email])
