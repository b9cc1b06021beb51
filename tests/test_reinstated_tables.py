"""A table removed from the configuration, added again with other templates (or
another redis_db), removed again, the listener stopped across those installs, with a
change committed under each mapping: each change's keys, as the mapping it was
committed under gave them, are deleted by the listener started on the last file."""

from __future__ import annotations

import pytest
import redis

from tests.support.env import Env
from tests.support.listener import Spawn, cli, stop_listener
from tests.support.waits import wait_until

pytestmark = [pytest.mark.usefixtures("capture"), pytest.mark.servers]

USERS = {"public.users": ["user:{id}"]}
OTHER_DB = 2


@pytest.mark.parametrize("again", ["templates", "redis_db"])
def test_a_table_removed_added_again_and_removed_keeps_each_mappings_keys(
    env: Env, spawn: Spawn, again: str
) -> None:
    """orders installed with a:{id}, row 1 changed; orders removed (install); added
    again with b:{id} (or a:{id} in Redis database 2), row 2 changed; removed again;
    the listener, stopped throughout, started on the last file. It rendered both
    changes with the last mapping's templates: b:1 and b:2 (or a:1 and a:2 in database
    2), and a:1 stayed cached in both modes, on PostgreSQL 15 (run by hand with this
    test). Now each earlier mapping's templates render them too; keys of rows nobody
    changed stay cached (no sweep)."""
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL);"
        "INSERT INTO users VALUES (1, 'A');"
        "INSERT INTO orders SELECT g, 0 FROM generate_series(1, 4) g"
    )
    r = env.redis()
    other = redis_db(env, OTHER_DB)
    second, later = ("b:{id}", r) if again == "templates" else ("a:{id}", other)
    r.mset({"a:1": "cached", "a:3": "cached", "user:1": "cached"})
    later.mset({second.format(id=2): "cached", second.format(id=3): "cached"})
    first = env.config({**USERS, "public.orders": ["a:{id}"]}, name="first.toml")
    assert cli("install", "--config", first) == 0
    env.sql("UPDATE orders SET user_id = 1 WHERE id = 1")  # under a:{id}
    assert cli("install", "--config", env.config(USERS, name="removed.toml")) == 0
    readded = env.config({**USERS, "public.orders": [second]}, name="again.toml")
    if again == "redis_db":
        with readded.open("a") as f:
            f.write(f"redis_db = {OTHER_DB}\n")  # the last table written: orders
    assert cli("install", "--config", readded) == 0
    env.sql("UPDATE orders SET user_id = 1 WHERE id = 2")  # under the second mapping
    last = env.config(USERS, name="last.toml")
    assert cli("install", "--config", last) == 0
    env.sql("UPDATE users SET name = 'B' WHERE id = 1")
    listener = spawn(last)
    wait_until(lambda: r.exists("user:1") == 0, what="the listener caught up")
    stop_listener(listener)  # (a clean stop: the batch it was in is done)
    assert (r.exists("a:1"), later.exists(second.format(id=2))) == (0, 0)
    assert (r.exists("a:3"), later.exists(second.format(id=3))) == (1, 1)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def redis_db(env: Env, db: int) -> redis.Redis:
    """The test's Redis, database `db`."""
    return redis.Redis.from_url(env.redis_url.rsplit("/", 1)[0] + f"/{db}")


# A table made of others: partitions (one partitioned in turn), or an inheritance child.
# Its changes made in those, the keys they must delete, and a key nobody's change owns.
DESCENDANTS = {
    "partitions": (
        "CREATE TABLE items (id int PRIMARY KEY, note text) PARTITION BY RANGE (id);"
        "CREATE TABLE items_1 PARTITION OF items FOR VALUES FROM (1) TO (100);"
        "CREATE TABLE items_2 PARTITION OF items FOR VALUES FROM (100) TO (200);"
        "CREATE TABLE items_3 PARTITION OF items FOR VALUES FROM (200) TO (300)"
        " PARTITION BY RANGE (id);"
        "CREATE TABLE items_3a PARTITION OF items_3 FOR VALUES FROM (200) TO (300);"
        "INSERT INTO items VALUES (1, 'x'), (150, 'y'), (250, 'z')",
        ["it:1", "it:150", "it:250"],
    ),
    "inheritance": (
        "CREATE TABLE items (id int PRIMARY KEY, note text);"
        "CREATE TABLE items_old (CHECK (id < 100)) INHERITS (items);"
        "INSERT INTO items VALUES (150, 'x'); INSERT INTO items_old VALUES (1, 'y')",
        ["it:1", "it:150"],
    ),
}


@pytest.mark.parametrize("made_of", sorted(DESCENDANTS))
def test_changes_made_in_the_partitions_or_children_of_a_removed_table_are_invalidated(
    env: Env, spawn: Spawn, made_of: str
) -> None:
    """items, partitioned (or with an inheritance child), installed; a row of each
    part changed; items removed (install); the listener started on the new file. In
    logical mode (publish_via_partition_root off; a child published under its own name)
    the stream names each part, which no mapping recorded: each change was a dead
    letter ("table public.items_1 is not in the configuration"), and its key stayed
    cached (PostgreSQL 15: it:1, it:150 and it:250 of the partitions; it:1 of the
    child). They are rendered with items' recorded templates now; trigger mode queued
    them under items' name already."""
    ddl, keys = DESCENDANTS[made_of]
    env.sql("CREATE TABLE users (id int PRIMARY KEY, name text);" + ddl)
    env.sql("INSERT INTO users VALUES (1, 'A')")
    r = env.redis()
    r.mset({**dict.fromkeys(keys, "c"), "it:2": "c", "user:1": "c"})
    first = env.config({**USERS, "public.items": ["it:{id}"]}, name="first.toml")
    assert cli("install", "--config", first) == 0
    env.sql("UPDATE items SET note = 'w'")
    last = env.config(USERS, name="last.toml")
    assert cli("install", "--config", last) == 0
    env.sql("UPDATE users SET name = 'B' WHERE id = 1")
    listener = spawn(last)
    wait_until(lambda: r.exists("user:1") == 0, what="the listener caught up")
    stop_listener(listener)  # (a clean stop: the batch it was in is done)
    assert [k for k in keys if r.exists(k)] == []
    assert r.exists("it:2") == 1  # (not swept)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


@pytest.mark.parametrize("capture", ["logical"])
def test_a_lost_slot_sweeps_a_table_an_install_stopped_watching(own_env: Env, spawn: Spawn) -> None:
    """The listener stopped; a change of orders committed; `install` without orders
    (no longer published); the slot lost (dropped here; max_slot_wal_keep_size or a
    failover without it alike). The listener started on the file swept the configured
    tables and those still published only: order:1, whose change was lost with the
    slot, stayed cached (PostgreSQL 15: `missed_changes_swept` tables: 1). Every table
    an installed mapping named is swept with them now."""
    env = own_env
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text);"
        "CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL);"
        "INSERT INTO users VALUES (1, 'A'); INSERT INTO orders VALUES (1, 0)"
    )
    config = env.config({**USERS, "public.orders": ["order:{id}"]})
    assert cli("install", "--config", config) == 0
    r = env.redis()
    r.mset({"order:1": "cached", "user:1": "cached"})
    env.sql("UPDATE orders SET user_id = 1 WHERE id = 1")
    assert env.config(USERS) == config
    assert cli("install", "--config", config) == 0
    env.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")
    listener = spawn(config)
    wait_until(lambda: r.exists("user:1") == 0, what="the configured tables swept")
    wait_until(lambda: r.exists("order:1") == 0, what="orders swept", timeout_s=5)
    stop_listener(listener)
