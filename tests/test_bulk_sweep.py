"""Trigger mode's bulk_sweep_rows, on real PostgreSQL and Redis.

With `bulk_sweep_rows = N` (0, off, by default), a statement that changed at least N rows
queues one sweep of its table's templates instead of its rows in packs: the writer pays
PostgreSQL's transition table and a count of N rows, and every cached key of the table
goes (a cold cache instead of a slow write). A smaller statement is queued as before.
These tests look at what the statement queued, at Redis after the listener, and at the
listener's count of the sweeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo

from tests.support.config import toml_value, write_config
from tests.support.env import Env
from tests.support.faults import cache, keys_of, queue_count, setup_users, write
from tests.support.listener import ListenerThread, cli
from tests.support.roles import login_role
from tests.support.waits import wait_until

ROWS = 1_500
BULK = 1_000  # bulk_sweep_rows: the least there is
UNRELATED = ["session:1", "other:user:1"]


def queued(env: Env) -> list[tuple[str, object, int | None]]:
    """What the queue holds: (op, new_row, rows) per queue row."""
    with env.connect() as conn:
        return [
            (op, new, rows)
            for op, new, rows in conn.execute(
                "SELECT op, new_row, rows FROM cdc_invalidator.queue_v1 ORDER BY xid, id"
            )
        ]


def bulk_sweeps(listener: ListenerThread, table: str = "public.users") -> float:
    value = listener.runner.metrics.registry.get_sample_value(
        "cdc_invalidator_bulk_sweeps_total", {"table": table}
    )
    return value or 0.0


@contextmanager
def listening(config: Path) -> Iterator[ListenerThread]:
    listener = ListenerThread.from_file(config)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


def warm(r: redis.Redis) -> None:
    """Every row's keys cached, and keys of no watched table's."""
    cache(r, range(1, ROWS + 1))
    r.mset(dict.fromkeys(UNRELATED, "keep"))


def filtered_users(env: Env) -> Path:
    """users with a column `note` that ignore_columns leaves out, installed."""
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK)
    text = config.read_text().replace(
        '[tables."public.users"]', '[tables."public.users"]\nignore_columns = ["note"]'
    )
    config.write_text(text)
    env.sql("ALTER TABLE users ADD COLUMN note text")
    assert cli("install", "--config", str(config)) == 0
    return config


def settled_swept(env: Env, r: redis.Redis, listener: ListenerThread) -> None:
    """Everything acknowledged; every users key gone, the unrelated ones kept; one sweep."""
    wait_until(lambda: queue_count(env) == 0, what="the sweep acknowledged")
    assert gone(r, range(1, ROWS + 1))
    assert r.exists(*UNRELATED) == len(UNRELATED)
    assert bulk_sweeps(listener) == 1


def gone(r: redis.Redis, ids: range) -> bool:
    return not any(r.exists(k) for i in ids for k in keys_of(i))


STATEMENTS = {
    "UPDATE": f"UPDATE users SET email = email WHERE id <= {BULK}",
    "DELETE": f"DELETE FROM users WHERE id <= {BULK}",
    "INSERT": (
        f"INSERT INTO users SELECT i, 'u' || i || '@x' FROM generate_series({ROWS + 1}, "
        f"{ROWS + BULK}) i"
    ),
}


@pytest.mark.parametrize("op", list(STATEMENTS))
def test_a_statement_of_bulk_sweep_rows_sweeps_its_table(env: Env, op: str) -> None:
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK)
    r = env.redis()
    warm(r)
    write(env, STATEMENTS[op], ids=range(1, BULK + 1))
    # One sweep, not a thousand rows in a pack.
    assert queued(env) == [("T", {"bulk": BULK}, None)]
    with listening(config) as listener:
        # Every key of the table: the rows the statement changed and those it did not.
        settled_swept(env, r, listener)


def test_a_smaller_statement_is_queued_in_packs_and_deletes_only_its_rows(env: Env) -> None:
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK)
    r = env.redis()
    warm(r)
    write(env, f"UPDATE users SET email = email WHERE id < {BULK}", ids=range(1, BULK))
    assert [(op, rows) for op, _, rows in queued(env)] == [("U", BULK - 1)]
    with listening(config) as listener:
        wait_until(lambda: gone(r, range(1, BULK)), what="the changed rows' keys deleted")
        wait_until(lambda: queue_count(env) == 0, what="the pack acknowledged")
        assert all(r.exists(k) for i in range(BULK, ROWS + 1) for k in keys_of(i))
        assert bulk_sweeps(listener) == 0


def test_a_rolled_back_bulk_statement_sweeps_nothing(env: Env) -> None:
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK)
    r = env.redis()
    warm(r)
    with listening(config) as listener:
        with env.connect() as conn, conn.transaction(force_rollback=True):
            conn.execute(STATEMENTS["DELETE"])
            # Its sweep was queued, and goes with the rollback.
            assert conn.execute("SELECT count(*) FROM cdc_invalidator.queue_v1").fetchone() == (1,)
        # A change committed after it, processed: the rolled-back one came before.
        write(env, "UPDATE users SET email = email WHERE id = 1200", ids=range(1200, 1201))
        wait_until(lambda: gone(r, range(1200, 1201)), what="the committed change")
        wait_until(lambda: queue_count(env) == 0, what="it acknowledged")
        assert all(r.exists(k) for i in range(1, ROWS + 1) if i != 1200 for k in keys_of(i))
        assert bulk_sweeps(listener) == 0


def test_bulk_statements_beside_single_row_writes_lose_nothing(env: Env) -> None:
    """A bulk statement's sweep and other sessions' one-row changes of another table,
    committed around it: every key goes, and the sweep is acknowledged only once done
    (nothing of the queue left behind)."""
    env.sql("CREATE TABLE orders (id int PRIMARY KEY, user_id int)")
    env.sql("INSERT INTO orders SELECT i, i FROM generate_series(1, 50) i")
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK)
    text = config.read_text().replace(
        '[tables."public.users"]',
        '[tables."public.orders"]\nkeys = ["order:{id}"]\n\n[tables."public.users"]',
    )
    config.write_text(text)
    assert cli("install", "--config", str(config)) == 0
    r = env.redis()
    warm(r)
    r.mset({f"order:{i}": "stale" for i in range(1, 51)})
    with listening(config) as listener:
        with env.connect() as bulk, env.connect() as one:
            with bulk.transaction():
                bulk.execute(STATEMENTS["UPDATE"])
                for i in range(1, 26):  # committed while the bulk one is open
                    one.execute("UPDATE orders SET user_id = user_id WHERE id = %s", [i])
            for i in range(26, 51):
                one.execute("UPDATE orders SET user_id = user_id WHERE id = %s", [i])
        wait_until(lambda: queue_count(env) == 0, what="everything acknowledged")
        assert not any(r.exists(f"order:{i}") for i in range(1, 51))
        assert gone(r, range(1, ROWS + 1))
        assert r.exists(*UNRELATED) == len(UNRELATED)
        assert bulk_sweeps(listener) == 1


def test_a_filtered_tables_updates_are_still_judged(env: Env) -> None:
    """A column filter's UPDATEs stay judged row by row, however many: a filter exists
    so that rows whose counted columns did not change invalidate nothing."""
    filtered_users(env)
    write(env, "UPDATE users SET note = 'x'", ids=range(1, ROWS + 1))
    assert queued(env) == [], "no counted column changed: nothing queued, no sweep"
    write(env, STATEMENTS["DELETE"], ids=range(1, BULK + 1))
    assert queued(env) == [("T", {"bulk": BULK}, None)], "a DELETE still sweeps"


def test_a_partitioned_tables_bulk_statements_are_swept(env: Env) -> None:
    """Through the parent (rows moved between partitions too) and on one partition: the
    parent's capture function counts and sweeps alike; a smaller statement is packed."""
    rows = 3 * BULK
    env.sql(
        "CREATE TABLE ev (id int, part int, PRIMARY KEY (id, part)) PARTITION BY LIST (part);"
        "CREATE TABLE ev_a PARTITION OF ev FOR VALUES IN (1);"
        "CREATE TABLE ev_b PARTITION OF ev FOR VALUES IN (2);"
        # even ids in ev_a, odd ones in ev_b
        f"INSERT INTO ev SELECT i, 1 + i % 2 FROM generate_series(1, {rows}) i"
    )
    config = write_config(
        env.tmp_path / "ev.toml",
        database_url=env.dsn,
        redis_url=env.redis_url,
        tables={"public.ev": ["ev:{id}"]},
        bulk_sweep_rows=BULK,
    )
    assert cli("install", "--config", str(config)) == 0
    sweep = ("T", {"bulk": BULK}, None)
    steps = [
        ("UPDATE ev SET part = 3 - part", [sweep]),  # all 3000 moved: odd ids now in ev_a
        (f"DELETE FROM ev_a WHERE id <= {BULK}", [("D", None, BULK // 2)]),  # a partition
        ("DELETE FROM ev_b", [sweep]),  # a partition named: its 1500 even ids
        (f"UPDATE ev SET part = 3 - part WHERE id > {rows - 100}", [("U", None, 50)]),
    ]
    for statement, queue in steps:
        env.sql("DELETE FROM cdc_invalidator.queue_v1")
        env.sql(statement)
        assert [(op, new if op == "T" else None, n) for op, new, n in queued(env)] == queue
    env.sql("DELETE FROM cdc_invalidator.queue_v1")
    r = env.redis()
    r.mset({f"ev:{i}": "stale" for i in range(1, rows + 1)})
    r.set("keep", "x")
    # The odd ids above BULK are left: BULK rows, 50 of them in ev_b, moved again.
    write(env, "UPDATE ev SET part = 3 - part", ids=range(1, 2))
    with listening(config) as listener:
        wait_until(lambda: queue_count(env) == 0, what="the sweep acknowledged")
        assert not any(r.exists(f"ev:{i}") for i in range(1, rows + 1))
        assert r.exists("keep")
        assert bulk_sweeps(listener, "public.ev") == 1


def test_with_notify_payload_a_bulk_statement_is_swept_and_one_row_sent(env: Env) -> None:
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK, notify_payload=True)
    r = env.redis()
    warm(r)
    with listening(config) as listener:
        write(env, STATEMENTS["DELETE"], ids=range(1, BULK + 1))
        write(env, "UPDATE users SET email = email WHERE id = 1400", ids=range(1400, 1401))
        settled_swept(env, r, listener)


def test_a_filtered_tables_bulk_update_of_a_counted_column_is_packed(env: Env) -> None:
    config = filtered_users(env)
    r = env.redis()
    warm(r)
    write(env, "UPDATE users SET email = 'n' || email", ids=range(1, ROWS + 1))
    assert [(op, rows) for op, _, rows in queued(env)] == [("U", 1000), ("U", ROWS - 1000)]
    with listening(config) as listener:
        wait_until(lambda: queue_count(env) == 0, what="the packs acknowledged")
        assert gone(r, range(1, ROWS + 1))
        assert r.exists(*UNRELATED) == len(UNRELATED), "packed: no sweep"
        assert bulk_sweeps(listener) == 0


# A DBA's migrations of the watched table after install, with bulk_sweep_rows on: each
# leaves the capture function compiled for the old schema. The table the writes name
# after it, and how its key columns are named in them.
MIGRATIONS = {
    "rename a key column": ("ALTER TABLE users RENAME COLUMN email TO mail", "users"),
    "retype a key column alike": ("ALTER TABLE users ALTER COLUMN id TYPE bigint", "users"),
    "retype a key column to a type printed per session": (
        "ALTER TABLE users ALTER COLUMN id TYPE float8",
        "users",
    ),
    "drop a key column": ("ALTER TABLE users DROP COLUMN email", "users"),
    "rename the table": ("ALTER TABLE users RENAME TO people", "people"),
}


@pytest.mark.parametrize("migration", list(MIGRATIONS))
def test_after_a_migration_bulk_and_single_writes_succeed_and_lose_nothing(
    env: Env, migration: str
) -> None:
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK)
    ddl, table = MIGRATIONS[migration]
    env.sql(ddl)
    r = env.redis()
    warm(r)
    # No write fails: a bulk one, and a one-row one beside it.
    write(env, f"UPDATE {table} SET id = id WHERE id <= {BULK}", ids=range(1, BULK + 1))
    write(env, f"DELETE FROM {table} WHERE id = 1400", ids=range(1400, 1401))
    with listening(config):
        wait_until(lambda: queue_count(env) == 0, what="everything acknowledged")
        assert gone(r, range(1, BULK + 1))
        assert gone(r, range(1400, 1401))


def test_a_bulk_statement_in_replica_mode_is_swept(env: Env) -> None:
    """Writes applied with session_replication_role = replica (subscribers, loaders) fire
    our triggers (ENABLE ALWAYS): a bulk one is swept like any other."""
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK)
    r = env.redis()
    warm(r)
    with env.connect() as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(STATEMENTS["DELETE"])
    assert queued(env) == [("T", {"bulk": BULK}, None)]
    with listening(config) as listener:
        settled_swept(env, r, listener)


def test_a_bulk_statement_under_least_privilege_roles(env: Env) -> None:
    """An application role that may only write the table, and a listener role granted
    by grant_listener() alone: the sweep is queued (by the capture function, as the
    table's owner) and swept, and nothing else is needed."""
    config = setup_users(env, rows=ROWS, bulk_sweep_rows=BULK)
    r = env.redis()
    warm(r)
    with login_role(env, "app_writer_") as writer, login_role(env, "cdc_listener_") as reader:
        env.sql(f"GRANT SELECT, UPDATE, DELETE ON users TO {writer}")
        env.sql("SELECT cdc_invalidator.grant_listener(%s, 'trigger')", [reader])
        own = config.with_name("listener.toml")
        own.write_text(
            config.read_text().replace(
                f"database_url = {toml_value(env.dsn)}",
                f"database_url = {toml_value(make_conninfo(env.dsn, user=reader))}",
            )
        )
        assert reader in own.read_text()
        with psycopg.connect(make_conninfo(env.dsn, user=writer), autocommit=True) as conn:
            conn.execute(STATEMENTS["DELETE"].encode())
        with listening(own) as listener:
            settled_swept(env, r, listener)
