"""Schema migrations on a watched table, trigger mode: no DDL makes a write fail because
of our objects, and no change goes by unseen.

Each test changes the schema under an installed capture, then writes, and checks the
writes succeeded and the right keys were deleted: the exact keys where the change can
still be rendered (a renamed column or table is followed), or every key of the table's
templates (a sweep) where it cannot (a dropped key column, a partition created after
install). `check` names each drift. Logical mode has its own file.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo

from cdc_invalidator.cli import main
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.listener import Spawn, listening, run_cli, stop_listener
from tests.support.sync import SYNC, install, keys, settle, users_table
from tests.support.waits import wait_until

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cdc_invalidator", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def seed(r: redis.Redis, *ids: int) -> None:
    for i in ids:
        r.mset({f"user:{i}": "cached", f"user:email:u{i}@x": str(i)})


def test_renamed_key_column_keeps_invalidating_and_check_says_so(env: Env) -> None:
    users_table(env, [(1, "u1@x"), (2, "u2@x"), (3, "u3@x")])
    config = install(env, USERS)
    r = env.redis()
    env.sql("ALTER TABLE users RENAME COLUMN email TO mail")
    seed(r, 1, 2, 3, 4)
    r.set("user:email:new@x", "-")
    with listening(config):
        # Every kind of write succeeds, and each deletes the keys it should.
        env.sql("UPDATE users SET mail = 'new@x' WHERE id = 1")
        env.sql("DELETE FROM users WHERE id = 2")
        env.sql("INSERT INTO users (id, mail) VALUES (4, 'u4@x')")
        settle(env, r)
    assert keys(r) == {"user:3", "user:email:u3@x"}
    result = check(config)
    assert result.returncode == 1
    assert "key column 'email' of public.users is now named 'mail'" in result.stderr


def test_renamed_key_column_and_rows_moved_into_a_partition_that_drops_them(env: Env) -> None:
    """A capture function whose key column was renamed runs the general statements
    (queue_drifted_v1): rows an UPDATE moved into a partition whose BEFORE INSERT trigger
    dropped them are queued as DELETEs there too, one row alone and several at once."""
    env.sql(
        "CREATE TABLE ev (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);"
        "CREATE TABLE ev_a PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
        "CREATE TABLE ev_b PARTITION OF ev FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "INSERT INTO ev SELECT g, '2024-05-01' FROM generate_series(1, 5) g;"
        "CREATE FUNCTION drop_odd() RETURNS trigger LANGUAGE plpgsql AS"
        " 'BEGIN IF NEW.ident % 2 = 1 THEN RETURN NULL; END IF; RETURN NEW; END';"
    )
    config = install(env, {"public.ev": ["ev:{id}"]})
    env.sql(
        "ALTER TABLE ev RENAME COLUMN id TO ident;"
        "CREATE TRIGGER drops BEFORE INSERT ON ev_b FOR EACH ROW EXECUTE FUNCTION drop_odd()"
    )
    r = env.redis()
    r.mset({f"ev:{i}": "cached" for i in range(1, 7)})
    with listening(config):
        env.sql("UPDATE ev SET day = '2025-06-01' WHERE ident = 1")  # dropped
        env.sql("UPDATE ev SET day = '2025-06-01' WHERE ident IN (2, 3, 4)")  # 3 dropped
        settle(env, r)
    assert env.scalar("SELECT array_agg(ident ORDER BY ident) FROM ev_b") == [2, 4]
    assert keys(r) == {"ev:5", "ev:6"}


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
@pytest.mark.parametrize("settings", ["", "notify_payload = true"], ids=["queue", "payload"])
@pytest.mark.parametrize("lines", ["", 'ignore_columns = ["note"]'], ids=["all", "filtered"])
def test_a_row_moved_into_a_partition_that_drops_it_on_every_capture_path(
    env: Env, replica: bool, settings: str, lines: str
) -> None:
    """An UPDATE whose rows a partition's BEFORE INSERT trigger dropped deletes their keys
    on each of the capture function's paths: the queue or the NOTIFY payload, with or
    without a column filter (its judged statements), written in replica mode too; one
    row alone, then three rows of which two are dropped (packs)."""
    env.sql(
        "CREATE TABLE ev (id int, day date, note text, PRIMARY KEY (id, day))"
        " PARTITION BY RANGE (day);"
        "CREATE TABLE ev_a PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
        "CREATE TABLE ev_b PARTITION OF ev FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');"
        "INSERT INTO ev SELECT g, '2024-05-01' FROM generate_series(1, 5) g;"
        "CREATE FUNCTION drop_row() RETURNS trigger LANGUAGE plpgsql AS"
        " 'BEGIN IF NEW.id = 3 THEN RETURN NEW; END IF; RETURN NULL; END';"
        "CREATE TRIGGER drops BEFORE INSERT ON ev_b FOR EACH ROW EXECUTE FUNCTION drop_row();"
        # An ordinary trigger does not fire in replica mode: this one must, to drop the row.
        "ALTER TABLE ev_b ENABLE ALWAYS TRIGGER drops"
    )
    config = env.tmp_path / "config.toml"
    config.write_text(
        f'database_url = "{env.dsn}"\nredis_url = "{env.redis_url}"\n{settings}\n'
        f'[tables."public.ev"]\nkeys = ["ev:{{id}}"]\n{lines}\n'
    )
    assert main(["install", "--config", str(config)]) == 0
    r = env.redis()
    r.mset({f"ev:{i}": "cached" for i in range(1, 6)})
    with listening(config), env.connect() as conn:
        if replica:
            conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE ev SET day = '2025-06-01' WHERE id = 1")
        wait_until(lambda: r.exists("ev:1") == 0, what="the dropped row's key")
        conn.execute("UPDATE ev SET day = '2025-06-01' WHERE id IN (2, 3, 4)")
        wait_until(lambda: r.exists("ev:2", "ev:3", "ev:4") == 0, what="the three rows' keys")
    assert env.scalar("SELECT array_agg(id ORDER BY id) FROM ev") == [3, 5]
    assert r.get("ev:5") == "cached"
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_renamed_table_keeps_invalidating_and_check_says_so(env: Env) -> None:
    users_table(env, [(1, "u1@x"), (2, "u2@x")])
    config = install(env, USERS)
    r = env.redis()
    env.sql("ALTER TABLE users RENAME TO members")
    seed(r, 1, 2)
    with listening(config):
        env.sql("UPDATE members SET name = 'x' WHERE id = 1")
        settle(env, r)
    assert keys(r) == {"user:2", "user:email:u2@x"}
    result = check(config)
    assert result.returncode == 1
    assert "table public.users was renamed to public.members" in result.stderr
    assert "and run `cdc-invalidator install`, in either order" in result.stderr
    # No table took the old name: no warning says one did.
    assert "a name another table took since" not in result.stdout + result.stderr


def test_dropped_key_column_sweeps_the_table_and_is_logged(env: Env, spawn: Spawn) -> None:
    users_table(env, [(1, "u1@x"), (2, "u2@x")])
    env.sql("CREATE TABLE other (id int PRIMARY KEY)")
    config = install(env, {**USERS, "public.other": ["other:{id}"]})
    r = env.redis()
    env.sql("ALTER TABLE users DROP COLUMN email")
    seed(r, 1, 2)
    r.mset({"user:999": "another row", "other:1": "unrelated"})
    listener = spawn(config)
    env.sql("UPDATE users SET name = 'x' WHERE id = 1")  # succeeds
    # The change cannot be rendered: every key of every template of users is swept.
    wait_until(lambda: keys(r) == {"other:1"}, what="users' templates swept")
    wait_until(lambda: listener.logged("unrenderable_changes_swept"), what="the sweep logged")
    line = listener.logged("unrenderable_changes_swept")[0]
    assert line["table"] == "public.users"
    assert "email" in line["reason"]
    result = check(config)
    assert "key column 'email' of public.users was dropped" in result.stderr


def test_a_template_added_before_install_logs_its_sweeps_once_a_minute_per_reason(
    env: Env, spawn: Spawn
) -> None:
    """A template added to the configuration before `install` ran: every change lacks its
    column, and every batch sweeps the template, logged once a minute per reason. An
    INSERT's reason names the new row, an UPDATE's the old: alternating batches logged a
    warning each (400 lines for 200 INSERTs and 200 UPDATEs in 16 s), since only the
    last reason told was remembered."""
    users_table(env)
    install(env, {"public.users": ["user:{id}"]})
    config = env.config({**USERS, **SYNC})  # the listener's file; install not run again
    r = env.redis()
    listener = spawn(config)
    for i in range(1, 11):
        env.sql("INSERT INTO users (id, email) VALUES (%s, 'e')", [i])
        settle(env, r)
        env.sql("UPDATE users SET email = 'f' WHERE id = %s", [i])
        settle(env, r)
    lines = listener.logged("unrenderable_changes_swept")
    assert sorted(line["reason"].split(" lacks ")[0] for line in lines) == [
        "new row of public.users",
        "old row of public.users",
    ]


def test_retyped_key_column_and_other_ddl_change_nothing(env: Env) -> None:
    users_table(env, [(1, "u1@x"), (2, "u2@x")])
    # (no second deletes: the retype's sweep would sweep again 300 ms after it)
    config = install(env, USERS, second_delete_ms=0)
    r = env.redis()
    env.sql(
        "ALTER TABLE users ALTER COLUMN id TYPE bigint;"
        "ALTER TABLE users ALTER COLUMN email TYPE varchar(200);"
        "ALTER TABLE users RENAME COLUMN name TO full_name;"
        "ALTER TABLE users ADD COLUMN age int;"
        "ALTER TABLE users DROP COLUMN full_name"
    )
    # The int -> bigint retype rewrote the table: the rebuild guard queued a sweep (a
    # retype USING an expression changes values no trigger sees). Done first: the keys
    # cached before it are gone.
    seed(r, 1, 2)
    with listening(config):
        wait_until(lambda: not keys(r), what="the retype's sweep")
        settle(env, r)
        seed(r, 1, 2)
        env.sql("UPDATE users SET age = 3 WHERE id = 1")
        settle(env, r)
    assert keys(r) == {"user:2", "user:email:u2@x"}
    assert check(config).returncode == 0


def test_a_watched_table_attached_to_an_unwatched_parent_is_reported_by_check(env: Env) -> None:
    """A watched table ATTACHed as a partition of a table the configuration does not
    name: a statement that names the parent fires the parent's statement triggers, none
    of ours, so its changes of the partition's rows go unseen. Nothing at write time can
    know; `check` says so and what to do."""
    users_table(env, [(1, "u1@x"), (2, "u2@x")])
    config = install(env, USERS)
    assert check(config).returncode == 0
    env.sql(
        "CREATE TABLE everyone (id int NOT NULL, email text, name text) PARTITION BY RANGE (id);"
        "ALTER TABLE everyone ATTACH PARTITION users FOR VALUES FROM (0) TO (1000)"
    )
    r = env.redis()
    seed(r, 1, 2)
    with listening(config):
        env.sql("UPDATE everyone SET name = 'x' WHERE id = 1")  # names the parent
        env.sql("UPDATE users SET name = 'y' WHERE id = 2")  # names the table: seen
        settle(env, r)
    assert keys(r) == {"user:1", "user:email:u1@x"}  # what check warns of
    result = check(config)
    assert result.returncode == 1
    assert (
        "table public.users is now a partition or an inheritance child of public.everyone, "
        "which is not watched" in result.stderr
    )
    assert "Configure public.everyone instead" in result.stderr


def test_a_foreign_table_attached_as_a_partition_is_reported_by_check(env: Env) -> None:
    """install refuses a foreign-table partition (a trigger on a foreign table can have
    no transition tables); one ATTACHed after install makes an INSERT through the parent
    that lands in it fail, because of our triggers' transition tables (measured here:
    the same INSERT succeeded before install). check says so and what to do."""
    port, dbname = env.scalar("SELECT ARRAY[current_setting('port'), current_database()]")
    env.sql(
        "CREATE TABLE ev (id int NOT NULL, day date NOT NULL) PARTITION BY RANGE (day);"
        "CREATE TABLE ev_a PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');"
        "CREATE TABLE ev_remote (id int NOT NULL, day date NOT NULL);"
        "CREATE EXTENSION postgres_fdw;"
        "CREATE SERVER here FOREIGN DATA WRAPPER postgres_fdw"
        f" OPTIONS (host '127.0.0.1', port '{port}', dbname '{dbname}');"
        "CREATE USER MAPPING FOR CURRENT_USER SERVER here OPTIONS (user 'postgres');"
        "CREATE FOREIGN TABLE ev_f (id int NOT NULL, day date NOT NULL)"
        " SERVER here OPTIONS (table_name 'ev_remote');"
        "ALTER TABLE ev ATTACH PARTITION ev_f FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')"
    )
    env.sql("INSERT INTO ev VALUES (1, '2030-06-01')")  # unwatched: it succeeds
    env.sql("ALTER TABLE ev DETACH PARTITION ev_f")
    config = install(env, {"public.ev": ["ev:{id}"]})
    env.sql("ALTER TABLE ev ATTACH PARTITION ev_f FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')")
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="child foreign tables"):
        env.sql("INSERT INTO ev VALUES (2, '2030-06-01')")
    result = check(config)
    assert result.returncode == 1
    assert "partitions public.ev_f are foreign tables" in result.stderr
    assert "Detach them, or use logical mode for this table" in result.stderr
    assert "were created or attached after install" not in result.stderr


def test_partition_created_after_install_is_swept_until_install(env: Env) -> None:
    env.sql(
        "CREATE TABLE events (id int, kind text) PARTITION BY RANGE (id);"
        "CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100)"
    )
    tables = {"public.events": ["event:{id}"]}
    config = install(env, tables)
    r = env.redis()
    env.sql(
        "CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (100) TO (200);"
        "CREATE TABLE events_3 (id int, kind text);"
        "ALTER TABLE events ATTACH PARTITION events_3 FOR VALUES FROM (200) TO (300)"
    )
    result = check(config)
    assert "partitions public.events_2, public.events_3 were created or attached" in (result.stderr)
    with listening(config):
        for table, id_ in (("events_2", 150), ("events_3", 250)):
            r.mset({f"event:{id_}": "-", "event:5": "cached"})
            env.sql(f"INSERT INTO {table} VALUES ({id_}, 'x')")  # names the partition
            wait_until(lambda: r.exists("event:5") == 0, what=f"{table}'s write swept")
            assert r.exists(f"event:{id_}") == 0
        settle(env, r)
        # Installed again: the new partitions have statement triggers and exact keys.
        install(env, tables)
        assert check(config).returncode == 0
        r.mset({"event:151": "-", "event:5": "cached"})
        env.sql("INSERT INTO events_2 VALUES (151, 'y')")
        wait_until(lambda: r.exists("event:151") == 0, what="the exact key")
        settle(env, r)
        assert r.get("event:5") == "cached"


def test_the_owner_of_a_watched_partitioned_table_adds_partitions(env: Env) -> None:
    """PostgreSQL copies our row trigger onto a new partition as the role creating it,
    and checks that role may execute its function: the table's owner, not a superuser."""
    role = f"parts_{env.dsn.rsplit('/', 1)[1]}"
    env.sql(
        f"CREATE ROLE {role}; GRANT CREATE ON SCHEMA public TO {role}; SET ROLE {role};"
        "CREATE TABLE events (id int, kind text) PARTITION BY RANGE (id);"
        "CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100); RESET ROLE"
    )
    config = install(env, {"public.events": ["event:{id}"]})
    env.sql(
        f"SET ROLE {role};"
        "CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (100) TO (200);"
        "CREATE TABLE events_3 (id int, kind text);"
        "ALTER TABLE events ATTACH PARTITION events_3 FOR VALUES FROM (200) TO (300); RESET ROLE"
    )
    r = env.redis()
    with listening(config):
        r.mset({"event:150": "-", "event:5": "cached"})
        env.sql(f"SET ROLE {role}; INSERT INTO events_2 VALUES (150, 'x'); RESET ROLE")
        wait_until(lambda: r.exists("event:150", "event:5") == 0, what="the new partition swept")
        # A TRUNCATE naming a new partition fires its own statement triggers only: the
        # rebuild guard gave it one of ours.
        for partition in ("events_2", "events_3"):
            r.mset({"event:5": "cached"})
            env.sql(f"SET ROLE {role}; TRUNCATE {partition}; RESET ROLE")
            wait_until(lambda: r.exists("event:5") == 0, what=f"{partition}'s TRUNCATE swept")
        settle(env, r)
    # The function is the owner's to attach to a table of its own, with any name: it
    # sweeps nothing there.
    queued = "SELECT count(*) FROM cdc_invalidator.queue_v1 WHERE op = 'T'"
    before = env.scalar(queued)
    env.sql(
        f"SET ROLE {role}; CREATE TABLE mine (id int);"
        "CREATE TRIGGER forged AFTER INSERT ON mine FOR EACH STATEMENT"
        " EXECUTE FUNCTION cdc_invalidator.sweep_untriggered_v1('public', 'events');"
        "INSERT INTO mine VALUES (1); RESET ROLE"
    )
    assert env.scalar(queued) == before
    # Another owner since install: the rebuild guard grants it what adding a partition
    # needs; without the guard, check says that adding one fails.
    env.sql(
        f"CREATE ROLE {role}_2; GRANT CREATE ON SCHEMA public TO {role}_2;"
        f"ALTER TABLE events OWNER TO {role}_2; SET ROLE {role}_2;"
        "CREATE TABLE events_5 PARTITION OF events FOR VALUES FROM (500) TO (600); RESET ROLE"
    )
    env.sql(
        f"ALTER EVENT TRIGGER cdc_invalidator_rebuilt DISABLE; CREATE ROLE {role}_3;"
        f"ALTER TABLE events OWNER TO {role}_3"
    )
    result = check(config)
    assert f"role {role}_3, which owns the table, may not execute" in result.stderr
    env.sql(
        f"DROP OWNED BY {role}, {role}_2, {role}_3 CASCADE; DROP ROLE {role}, {role}_2, {role}_3"
    )


def test_a_watched_table_within_a_partition_tree_renamed_and_reconfigured(env: Env) -> None:
    """A watched table that is itself a partition (of a table not watched): a partition
    added under it is swept, its TRUNCATE too. Configured as its parent instead, install
    leaves the triggers it gives the old table in place; renamed and configured so, a
    partition added later is swept under the new name."""
    env.sql(
        "CREATE TABLE o (r text, id int) PARTITION BY LIST (r);"
        "CREATE TABLE o_eu PARTITION OF o FOR VALUES IN ('eu') PARTITION BY RANGE (id);"
        "CREATE TABLE o_eu_0 PARTITION OF o_eu FOR VALUES FROM (0) TO (100)"
    )
    config = install(env, {"public.o_eu": ["o:{id}"]})
    env.sql("CREATE TABLE o_eu_1 PARTITION OF o_eu FOR VALUES FROM (100) TO (200)")
    r = env.redis()
    with listening(config):
        r.mset({"o:150": "-", "o:5": "cached"})
        env.sql("INSERT INTO o_eu_1 VALUES ('eu', 150)")
        wait_until(lambda: r.exists("o:150", "o:5") == 0, what="the new sub-partition swept")
        r.set("o:5", "cached")
        env.sql("TRUNCATE o_eu_1")
        wait_until(lambda: r.exists("o:5") == 0, what="its TRUNCATE swept")
        settle(env, r)
    # The parent configured instead: the former table's partitions keep capture triggers.
    parent = install(env, {"public.o": ["o:{id}"]}, name="parent.toml")
    with listening(parent):
        r.mset({"o:7": "-", "o:8": "cached"})
        env.sql("INSERT INTO o_eu_0 VALUES ('eu', 7)")  # names the partition
        wait_until(lambda: r.exists("o:7") == 0, what="the exact key")
        settle(env, r)
        assert r.get("o:8") == "cached"
    # Renamed, and configured under the new name: a partition added later is swept under
    # it (the row trigger is made again with the new name).
    env.sql("ALTER TABLE o RENAME TO o2")
    renamed = install(env, {"public.o2": ["o:{id}"]}, name="renamed.toml")
    env.sql("CREATE TABLE o_us PARTITION OF o2 FOR VALUES IN ('us')")
    with listening(renamed):
        r.mset({"o:9": "-", "o:5": "cached"})
        env.sql("INSERT INTO o_us VALUES ('us', 9)")
        wait_until(lambda: r.exists("o:9", "o:5") == 0, what="the partition swept as o2")
        settle(env, r)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_a_partition_added_under_a_partitioned_partition_is_swept(env: Env) -> None:
    """install turned the row trigger's copies off on every partition it gave statement
    triggers, the partitioned ones too. A partitioned table's row trigger never fires: it
    is what PostgreSQL copies, state and all, onto partitions made later. A partition
    added under a sub-partitioned one got it disabled: its writes captured nothing.
    No second deletes: the listener started again would redo the last one's, a sweep of
    ev:* beside its stream that no queue row waits for, and take ev:5 with it (a sweep
    0.3 s slower did, every time)."""
    env.sql(
        "CREATE TABLE ev (id int, v text) PARTITION BY RANGE (id);"
        "CREATE TABLE ev_0 PARTITION OF ev FOR VALUES FROM (0) TO (100);"
        "CREATE TABLE ev_s PARTITION OF ev FOR VALUES FROM (100) TO (300) PARTITION BY RANGE (id);"
        "CREATE TABLE ev_s0 PARTITION OF ev_s FOR VALUES FROM (100) TO (200)"
    )
    config = install(env, {"public.ev": ["ev:{id}"]}, second_delete_ms=0)
    assert "cdc_invalidator_part_v1 is disabled" not in check(config).stderr
    # As an earlier release's install left it: check says so, and install mends it.
    env.sql("ALTER TABLE ev_s DISABLE TRIGGER cdc_invalidator_part_v1")
    result = check(config)
    assert result.returncode != 0
    assert "public.ev_s: trigger cdc_invalidator_part_v1 is disabled" in result.stderr
    config = install(env, {"public.ev": ["ev:{id}"]}, second_delete_ms=0)
    assert "cdc_invalidator_part_v1 is disabled" not in check(config).stderr
    env.sql("CREATE TABLE ev_s1 PARTITION OF ev_s FOR VALUES FROM (200) TO (300)")
    env.sql("INSERT INTO ev VALUES (250, 'a')")
    r = env.redis()
    with listening(config):
        settle(env, r)
        r.mset({"ev:250": "cached", "ev:5": "cached"})
        env.sql("UPDATE ev_s1 SET v = 'b' WHERE id = 250")  # names the new partition
        wait_until(lambda: r.exists("ev:250", "ev:5") == 0, what="the new partition swept")
    # Installed again: the new partition has statement triggers, and exact keys.
    config = install(env, {"public.ev": ["ev:{id}"]}, second_delete_ms=0)
    with listening(config):
        settle(env, r)
        r.mset({"ev:250": "cached", "ev:5": "cached"})
        env.sql("DELETE FROM ev_s1 WHERE id = 250")
        wait_until(lambda: r.exists("ev:250") == 0, what="its exact key")
        settle(env, r)
        assert r.get("ev:5") == "cached"
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_writes_in_replica_mode_are_captured(env: Env) -> None:
    users_table(env, [(1, "u1@x")])
    config = install(env, USERS)
    r = env.redis()
    seed(r, 1)
    with listening(config):
        with env.connect() as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("UPDATE users SET name = 'x' WHERE id = 1")
        wait_until(lambda: not keys(r) & {"user:1", "user:email:u1@x"}, what="keys deleted")
        settle(env, r)


DISABLE_ALL = "ALTER TABLE users DISABLE TRIGGER ALL"


def two_users_cached(env: Env) -> tuple[Path, redis.Redis]:
    users_table(env, [(1, "u1@x"), (2, "u2@x")])
    # (no second deletes: a sweep's would empty the keys the tests cache again after it)
    config = install(env, USERS, second_delete_ms=0)
    r = env.redis()
    seed(r, 1, 2)
    return config, r


@pytest.mark.parametrize(
    ("disable", "enable"),
    [
        # pg_restore --disable-triggers (a data-only restore) does this around its COPY
        pytest.param(DISABLE_ALL, "ALTER TABLE users ENABLE TRIGGER ALL", id="enable-all"),
        pytest.param(
            "ALTER TABLE users DISABLE TRIGGER cdc_invalidator_upd_v1",
            "ALTER TABLE users ENABLE ALWAYS TRIGGER cdc_invalidator_upd_v1",
            id="enable-one",
        ),
        pytest.param(
            "ALTER TABLE users ENABLE REPLICA TRIGGER cdc_invalidator_upd_v1",
            "ALTER TABLE users ENABLE ALWAYS TRIGGER cdc_invalidator_upd_v1",
            id="replica-then-always",
        ),
        pytest.param(DISABLE_ALL, "install", id="install"),
        # a DBA's session as restore tools set it: the guard's event triggers fire ALWAYS
        pytest.param(
            f"SET session_replication_role = replica; {DISABLE_ALL}",
            "SET session_replication_role = replica; ALTER TABLE users ENABLE TRIGGER ALL",
            id="replica-session",
        ),
    ],
)
def test_writes_made_while_a_capture_trigger_was_off_are_swept_when_it_is_on_again(
    env: Env, disable: str, enable: str
) -> None:
    config, r = two_users_cached(env)
    with listening(config):
        env.sql(disable)
        env.sql("UPDATE users SET name = 'x' WHERE id = 1")
        settle(env, r)
        # what a disabled trigger does not capture (the gap this closes at re-enabling)
        assert {"user:1", "user:2"} <= keys(r)
        turn_on(env, config, enable)
        # the changes made meanwhile are not known: every key of the table is swept
        wait_until(
            lambda: not keys(r) & {"user:1", "user:email:u1@x", "user:2"},
            what="the table's keys swept when its trigger was on again",
        )
        settle(env, r)
        # once: a later command on the table sweeps nothing
        seed(r, 1, 2)
        env.sql("ALTER TABLE users ADD COLUMN z int")
        env.sql("UPDATE users SET name = 'y' WHERE id = 1")
        settle(env, r)
        assert "user:2" in keys(r)
        assert "user:1" not in keys(r)


NOOP = "CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;"


@pytest.mark.parametrize(
    ("table", "drop"),
    [
        ("users", "DROP TRIGGER cdc_invalidator_upd_v1 ON users"),
        (
            "users",
            "DROP TRIGGER cdc_invalidator_ins_v1 ON users; DROP TRIGGER cdc_invalidator_upd_v1"
            " ON users; DROP TRIGGER cdc_invalidator_del_v1 ON users;"
            " DROP TRIGGER cdc_invalidator_trunc_v1 ON users",
        ),
        # ours by name, not by function: install gives it back
        (
            "users",
            f"{NOOP} CREATE OR REPLACE TRIGGER cdc_invalidator_upd_v1 AFTER UPDATE ON users"
            " FOR EACH STATEMENT EXECUTE FUNCTION noop()",
        ),
        ("ev", "DROP TRIGGER cdc_invalidator_upd_v1 ON ev"),
    ],
    ids=["one", "all-four", "replaced", "partitioned"],
)
def test_writes_made_while_a_capture_trigger_was_dropped_are_swept_at_install(
    env: Env, table: str, drop: str
) -> None:
    """A trigger of ours dropped (or replaced under its name), then writes, then
    `install`, which gives it back: what the writes changed stayed cached for good
    (user:1 and ev:150 left). install now sweeps the table's templates, once."""
    if table == "users":
        config, r = two_users_cached(env)
        key, other = "user:1", "user:2"
    else:
        config, r = ev_installed(env)
        key, other = "ev:150", "ev:5"
    with listening(config):
        env.sql(drop)
        uncaptured(env, r, key, f"UPDATE {table} SET name = 'x' WHERE id = 1"
                   if table == "users" else "UPDATE ev SET v = 'b' WHERE id = 150")  # fmt: skip
        # a later ALTER TABLE (the rebuild guard looks at its triggers) sweeps nothing
        r.set(other, "cached")
        env.sql(f"ALTER TABLE {table} ADD COLUMN z int")
        settle(env, r)
        assert r.exists(key, other) == 2
        turn_on(env, config, "install")
        wait_until(lambda: r.exists(key, other) == 0, what=f"{table}'s templates swept")
        settle(env, r)
        # once: a later install sweeps nothing
        r.mset({key: "cached", other: "cached"})
        turn_on(env, config, "install")
        settle(env, r)
        assert r.exists(key, other) == 2


@pytest.mark.parametrize(
    "drop",
    [
        "DROP TRIGGER cdc_invalidator_upd_v1 ON kid",
        f"{NOOP} CREATE OR REPLACE TRIGGER cdc_invalidator_upd_v1 AFTER UPDATE ON kid"
        " FOR EACH STATEMENT EXECUTE FUNCTION noop()",
    ],
    ids=["dropped", "replaced"],
)
def test_an_inheritance_childs_dropped_capture_trigger_is_swept_at_install(
    env: Env, drop: str
) -> None:
    """Like a partition's (above): an inheritance child of a watched plain table, one of
    its four capture triggers dropped (or replaced under its name), written by its own
    name, then `install`. Review finding: install's unwatch_others() takes every trigger
    of ours off the child (it is neither configured nor a partition) before watch()
    reads trigger_states_v1(), which then finds none and sweeps nothing: kid:2 stayed
    cached for good."""
    env.sql(
        "CREATE TABLE par (id int PRIMARY KEY, v text);"
        "CREATE TABLE kid () INHERITS (par);"
        "INSERT INTO par VALUES (1, 'a'); INSERT INTO kid VALUES (2, 'b')"
    )
    config = install(env, {"public.par": ["kid:{id}"]}, second_delete_ms=0)
    r = env.redis()
    with listening(config):
        env.sql(drop)
        uncaptured(env, r, "kid:2", "UPDATE kid SET v = 'x' WHERE id = 2")
        turn_on(env, config, "install")
        wait_until(lambda: r.exists("kid:2") == 0, what="par's templates swept")


def test_writes_to_a_partition_made_while_the_row_trigger_was_dropped_are_swept_at_install(
    env: Env,
) -> None:
    """The partitioned table's row trigger dropped (it went from every partition too), a
    partition made and written by its own name: nothing of ours captures those writes
    (the guard gives the partition its TRUNCATE trigger only). Review finding: install
    puts cdc_invalidator_part_v1 back, but trigger_states_v1() counts only the four
    statement triggers as missing: ev:250 stayed cached for good."""
    config, r = ev_installed(env)
    with listening(config):
        env.sql("DROP TRIGGER cdc_invalidator_part_v1 ON ev")
        env.sql("CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (200) TO (300)")
        env.sql("INSERT INTO ev_2 VALUES (250, 'a')")
        uncaptured(env, r, "ev:250", "UPDATE ev_2 SET v = 'b' WHERE id = 250")
        turn_on(env, config, "install")
        wait_until(lambda: r.exists("ev:250") == 0, what="ev's templates swept")


EV_TWO_PARTS = (
    "CREATE TABLE ev (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);"
    "CREATE TABLE ev_0 PARTITION OF ev FOR VALUES FROM (0) TO (100);"
    "CREATE TABLE ev_1 PARTITION OF ev FOR VALUES FROM (100) TO (200);"
    "INSERT INTO ev VALUES (5, 'a'), (150, 'a')"
)


def ev_installed(env: Env) -> tuple[Path, redis.Redis]:
    """EV_TWO_PARTS installed with `ev:{id}`, without second deletes (a sweep's would
    empty the keys the tests cache again right after it)."""
    env.sql(EV_TWO_PARTS)
    return install(env, {"public.ev": ["ev:{id}"]}, second_delete_ms=0), env.redis()


def uncaptured(env: Env, r: redis.Redis, key: str, *writes: str) -> None:
    """`key` cached, then `writes` run: what triggers turned off let by leaves it."""
    settle(env, r)
    r.set(key, "cached")
    for write in writes:
        env.sql(write)
    settle(env, r)
    assert r.exists(key) == 1  # not captured


def only_its_keys_deleted(env: Env, r: redis.Redis) -> None:
    """An UPDATE of ev_1's row deletes its key only: no copy of the table's row trigger
    is on there to sweep the table (install keeps them off)."""
    settle(env, r)
    r.mset({"ev:5": "cached", "ev:150": "cached"})
    env.sql("UPDATE ev_1 SET v = 'c' WHERE id = 150")
    wait_until(lambda: r.exists("ev:150") == 0, what="ev:150 deleted")
    settle(env, r)
    assert r.exists("ev:5") == 1


def turn_on(env: Env, config: Path, enable: str) -> None:
    """Run `enable`, a command, or `install` again."""
    if enable == "install":
        assert main(["install", "--config", str(config)]) == 0
    else:
        env.sql(enable)


@pytest.mark.parametrize("named", ["ev_1", "ev"])  # a partition; the partitioned table
def test_writes_to_a_partition_whose_triggers_were_off_sweep_its_table(
    env: Env, named: str
) -> None:
    config, r = ev_installed(env)
    with listening(config):
        r.mset({"ev:5": "cached", "ev:150": "cached"})
        env.sql(f"ALTER TABLE {named} DISABLE TRIGGER ALL")
        env.sql(f"UPDATE {named} SET v = 'b' WHERE id = 150")
        settle(env, r)
        assert r.exists("ev:150", "ev:5") == 2  # not captured
        env.sql(f"ALTER TABLE {named} ENABLE TRIGGER ALL")
        wait_until(lambda: r.exists("ev:150", "ev:5") == 0, what="ev's templates swept")
        # and only then: ENABLE TRIGGER ALL also turned on the partition's copy of the
        # table's row trigger (of the partitioned table: recursively)
        only_its_keys_deleted(env, r)


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE ev DISABLE TRIGGER ALL; ALTER TABLE ev ENABLE TRIGGER ALL",
        "ALTER TABLE ev ENABLE ALWAYS TRIGGER cdc_invalidator_part_v1",
        "ALTER TABLE ev ENABLE TRIGGER USER",
    ],
)
def test_enabling_a_partitioned_tables_triggers_leaves_its_partitions_copies_off(
    env: Env, ddl: str
) -> None:
    """Enabling the partitioned table's row trigger turns on its copies on every
    partition (PostgreSQL recurses): install keeps them off where the partition has
    statement triggers, else each transaction writing a partition sweeps the table."""
    config, r = ev_installed(env)
    with listening(config):
        env.sql(ddl)
        only_its_keys_deleted(env, r)


def test_enabling_a_partitioned_tables_triggers_keeps_the_copies_that_capture(
    env: Env,
) -> None:
    """Turning the copies of installed partitions off again leaves on those that are
    all that captures a partition: of one made after install, under a partitioned
    partition too."""
    env.sql(
        EV_TWO_PARTS + ";CREATE TABLE ev_m PARTITION OF ev FOR VALUES FROM (300) TO (500)"
        " PARTITION BY RANGE (id);"
        "CREATE TABLE ev_m1 PARTITION OF ev_m FOR VALUES FROM (300) TO (400);"
        "INSERT INTO ev VALUES (350, 'a')"
    )
    config = install(env, {"public.ev": ["ev:{id}"]}, second_delete_ms=0)
    r = env.redis()
    with listening(config):
        env.sql(
            "CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (200) TO (300);"
            "CREATE TABLE ev_m2 PARTITION OF ev_m FOR VALUES FROM (400) TO (500);"
            "INSERT INTO ev VALUES (250, 'a'), (450, 'a')"
        )
        env.sql("ALTER TABLE ev DISABLE TRIGGER ALL; ALTER TABLE ev ENABLE TRIGGER ALL")
        settle(env, r)
        r.mset({f"ev:{i}": "cached" for i in (5, 150, 250, 350, 450)})
        env.sql("UPDATE ev_2 SET v = 'c' WHERE id = 250")  # a sweep of ev
        wait_until(lambda: r.exists("ev:250") == 0, what="ev:250 deleted")
        settle(env, r)
        r.mset({f"ev:{i}": "cached" for i in (5, 150, 250, 350, 450)})
        env.sql("UPDATE ev_m2 SET v = 'c' WHERE id = 450")
        wait_until(lambda: r.exists("ev:450") == 0, what="ev:450 deleted")
        settle(env, r)
        r.mset({f"ev:{i}": "cached" for i in (5, 150, 250, 350, 450)})
        env.sql("UPDATE ev_1 SET v = 'c' WHERE id = 150; UPDATE ev_m1 SET v = 'c' WHERE id = 350")
        wait_until(lambda: r.exists("ev:150", "ev:350") == 0, what="ev:150, ev:350 deleted")
        settle(env, r)
        assert r.exists("ev:5", "ev:250", "ev:450") == 3


@pytest.mark.parametrize(
    "enable", ["ALTER TABLE ev ENABLE ALWAYS TRIGGER cdc_invalidator_part_v1", "install"]
)
def test_writes_to_a_partition_made_while_the_tables_row_trigger_was_off_are_swept(
    env: Env, enable: str
) -> None:
    """The partitioned table's row trigger is what captures a partition made after
    install (its copy, with its state): writes naming it while it was off are swept."""
    config, r = ev_installed(env)
    with listening(config):
        env.sql("ALTER TABLE ev DISABLE TRIGGER cdc_invalidator_part_v1")
        env.sql("CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (200) TO (300)")
        env.sql("INSERT INTO ev_2 VALUES (250, 'a')")
        uncaptured(env, r, "ev:250", "UPDATE ev_2 SET v = 'b' WHERE id = 250")
        turn_on(env, config, enable)
        wait_until(lambda: r.exists("ev:250") == 0, what="ev's templates swept")


@pytest.mark.parametrize("enable", ["ALTER TABLE ev_2 ENABLE TRIGGER ALL", "install"])
def test_writes_to_a_partition_made_after_install_while_its_triggers_were_off_are_swept(
    env: Env, enable: str
) -> None:
    """A partition made after install is captured by its copy of the table's row trigger
    and by the guard's TRUNCATE trigger: `pg_restore --disable-triggers` turns them off
    around its COPY as it does the statement triggers install gives a partition."""
    config, r = ev_installed(env)
    with listening(config):
        env.sql(
            "CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (200) TO (300);"
            "INSERT INTO ev_2 VALUES (250, 'a')"
        )
        uncaptured(
            env,
            r,
            "ev:250",
            "ALTER TABLE ev_2 DISABLE TRIGGER ALL",
            "UPDATE ev_2 SET v = 'b' WHERE id = 250",
        )
        turn_on(env, config, enable)
        wait_until(lambda: r.exists("ev:250") == 0, what="ev's templates swept")
        settle(env, r)
        # once: a later command on the partition sweeps nothing
        r.set("ev:5", "cached")
        env.sql("ALTER TABLE ev_2 ALTER COLUMN v SET DEFAULT 'd'")
        settle(env, r)
        assert r.exists("ev:5") == 1


def test_writes_to_a_stand_in_whose_trigger_was_off_are_swept(env: Env) -> None:
    """A table that took a watched table's name is captured by the guard's stand-in
    trigger until install: turned off and on again, it sweeps as a capture trigger."""
    env.sql("CREATE TABLE u (id int PRIMARY KEY, v text); INSERT INTO u VALUES (1, 'a')")
    config = install(env, {"public.u": ["u:{id}"]}, second_delete_ms=0)
    r = env.redis()
    with listening(config):
        env.sql(
            "CREATE TABLE u2 (LIKE u INCLUDING ALL); INSERT INTO u2 VALUES (1, 'a');"
            "ALTER TABLE u RENAME TO u_old; ALTER TABLE u2 RENAME TO u"
        )
        uncaptured(
            env, r, "u:1", "ALTER TABLE u DISABLE TRIGGER ALL", "UPDATE u SET v = 'b' WHERE id = 1"
        )
        env.sql("ALTER TABLE u ENABLE TRIGGER ALL")
        wait_until(lambda: r.exists("u:1") == 0, what="u's templates swept")


def test_writes_made_in_the_transaction_that_disabled_and_enabled_a_trigger_are_swept(
    env: Env,
) -> None:
    config, r = two_users_cached(env)
    with listening(config):
        env.sql(
            f"BEGIN; {DISABLE_ALL}; UPDATE users SET name = 'x' WHERE id = 1;"
            " ALTER TABLE users ENABLE TRIGGER ALL; COMMIT"
        )
        wait_until(
            lambda: not keys(r) & {"user:1", "user:email:u1@x", "user:2"},
            what="the table's keys swept",
        )
        # rolled back: nothing swept
        seed(r, 1, 2)
        env.sql(
            f"BEGIN; {DISABLE_ALL}; UPDATE users SET name = 'z' WHERE id = 1;"
            " ALTER TABLE users ENABLE TRIGGER ALL; ROLLBACK"
        )
        settle(env, r)
        assert {"user:1", "user:2"} <= keys(r)


@pytest.mark.parametrize(
    ("ddl", "complaint"),
    [
        ("ALTER TABLE users DISABLE TRIGGER cdc_invalidator_upd_v1", "is disabled"),
        ("ALTER TABLE users ENABLE TRIGGER cdc_invalidator_upd_v1", "does not fire ALWAYS"),
        ("ALTER TABLE users ENABLE REPLICA TRIGGER cdc_invalidator_upd_v1", "does not fire"),
        ("DROP TRIGGER cdc_invalidator_upd_v1 ON users", "is missing"),
        (
            "CREATE FUNCTION public.impostor() RETURNS trigger LANGUAGE plpgsql"
            " AS 'BEGIN RETURN NULL; END';"
            "DROP TRIGGER cdc_invalidator_upd_v1 ON users;"
            "CREATE TRIGGER cdc_invalidator_upd_v1 AFTER UPDATE ON users"
            " FOR EACH STATEMENT EXECUTE FUNCTION public.impostor()",
            "calls public.impostor(), not our capture function",
        ),
    ],
)
def test_check_verifies_each_trigger_is_ours_and_fires_always(
    env: Env, ddl: str, complaint: str
) -> None:
    users_table(env)
    config = install(env, USERS)
    assert check(config).returncode == 0
    env.sql(ddl)
    result = check(config)
    assert result.returncode == 1
    assert f"public.users: trigger cdc_invalidator_upd_v1 {complaint}" in result.stderr
    assert main(["install", "--config", str(config)]) == 0  # puts it right
    assert check(config).returncode == 0, check(config).stderr


def test_a_table_owners_cast_runs_with_the_owners_rights_only(env: Env) -> None:
    """The capture function converts key columns to text; a table owner may define that
    conversion (a cast of their own type). It must run as the table owner, never with the
    installer's (here a superuser's) rights."""
    role = f"owner_{env.dsn.rsplit('/', 1)[1]}"
    env.sql(
        f"""
        CREATE ROLE {role};
        GRANT CREATE ON SCHEMA public TO {role};
        SET ROLE {role};
        CREATE TYPE mood AS ENUM ('happy', 'sad');
        CREATE TABLE seen_as (who name);
        CREATE FUNCTION mood_text(m mood) RETURNS text LANGUAGE plpgsql
        SET search_path = pg_catalog AS $$
        BEGIN
            INSERT INTO public.seen_as VALUES (current_user);
            IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                EXECUTE 'ALTER ROLE {role} SUPERUSER';  -- what an attacker would do
            END IF;
            RETURN format('%s', m);  -- the output function: not this cast again
        END $$;
        CREATE CAST (mood AS text) WITH FUNCTION mood_text(mood);
        CREATE TABLE feelings (id int PRIMARY KEY, mood mood);
        RESET ROLE;
        """
    )
    config = install(env, {"public.feelings": ["feeling:{id}:{mood}"]})
    r = env.redis()
    r.set("feeling:1:happy", "x")
    with listening(config):
        with env.connect() as conn:
            conn.execute(f"SET ROLE {role}")
            conn.execute("INSERT INTO feelings VALUES (1, 'happy')")
        wait_until(lambda: r.exists("feeling:1:happy") == 0, what="the key deleted")
        settle(env, r)
    assert env.scalar(f"SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'") is False
    assert env.scalar("SELECT array_agg(DISTINCT who::text) FROM seen_as") == [role]
    owner = env.scalar(
        "SELECT proowner::regrole::text FROM pg_proc"
        " WHERE proname = 'capture_' || 'feelings'::regclass::oid || '_v1'"
    )
    assert owner == role
    env.sql(f"DROP OWNED BY {role} CASCADE; DROP ROLE {role}")


def test_install_refuses_a_table_whose_owner_it_cannot_act_for(env: Env) -> None:
    """The capture function must belong to the table's owner: an installer that is not
    that role, a member of it or a superuser (here one with only TRIGGER on the table)
    is refused with a message naming both, and nothing is installed."""
    suffix = env.dsn.rsplit("/", 1)[1]
    owner, installer = f"tab_owner_{suffix}", f"installer_{suffix}"
    dbname = env.dsn.rsplit("/", 1)[1]
    env.sql(
        f"CREATE ROLE {owner}; CREATE ROLE {installer} LOGIN;"
        f'GRANT CREATE ON DATABASE "{dbname}" TO {installer};'
        f"CREATE TABLE users (id int PRIMARY KEY, email text);"
        f"ALTER TABLE users OWNER TO {owner}; GRANT TRIGGER ON users TO {installer}"
    )
    try:
        config = write_config(
            env.tmp_path / "installer.toml",
            database_url=make_conninfo(env.dsn, user=installer),
            redis_url=env.redis_url,
            tables=USERS,
        )
        result = run_cli("install", "--config", str(config))
        assert result.returncode == 1, result.stderr
        assert f"table public.users belongs to role {owner}, and role {installer} is not" in (
            result.stderr
        )
        assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
    finally:
        env.sql(
            f'DROP TABLE users; REVOKE ALL ON DATABASE "{dbname}" FROM {installer};'
            f"DROP ROLE {installer}; DROP ROLE {owner}"
        )


def test_serializable_writers_of_new_partitions_do_not_fail_each_other(env: Env) -> None:
    """Sessions that each create a partition of a watched table and write into it, at
    once, under SERIALIZABLE. The sweep each write queues (the partition has no capture
    triggers until install) first looked in the queue for one of its transaction: that
    read's predicate locks, on the index page every writer inserts into, made them fail
    each other with "could not serialize access" (a review: 134 of 150). Unwatched, none
    fails; watched, none must."""
    env.sql("CREATE TABLE events (id int, kind text) PARTITION BY RANGE (id)")
    install(env, {"public.events": ["event:{id}"]})
    failures: list[str] = []

    def writer(n: int) -> None:
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            for i in range(10):
                low = (n * 100 + i) * 10
                name = f"events_{n}_{i}"
                try:
                    with conn.transaction():
                        conn.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                        conn.execute(
                            f"CREATE TABLE {name} PARTITION OF events"  # (our own names)
                            f" FOR VALUES FROM ({low}) TO ({low + 10})".encode()
                        )
                        conn.execute("INSERT INTO events VALUES (%s, 'x')", [low])
                except psycopg.errors.SerializationFailure as exc:
                    failures.append(str(exc))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert env.scalar("SELECT count(*) FROM events") == 40
    assert (
        env.scalar("SELECT count(DISTINCT xid) FROM cdc_invalidator.queue_v1 WHERE op = 'T'") == 40
    )


def requeue_dead_letters(env: Env) -> None:
    """operations.md's requeue, as written there (without its WHERE)."""
    env.sql(
        "WITH moved AS ("
        " DELETE FROM cdc_invalidator.dead_letter_v1"
        " RETURNING id, schema_name, table_name, op, old_row, new_row, rows)"
        " INSERT INTO cdc_invalidator.queue_v1"
        " (schema_name, table_name, op, old_row, new_row, rows)"
        " SELECT schema_name, table_name, op, old_row, new_row, rows FROM moved ORDER BY id"
    )


@pytest.mark.parametrize("payload", [False, True], ids=["", "notify_payload"])
@pytest.mark.parametrize("rename", ["table", "schema"])
def test_a_renamed_table_configured_so_loses_no_change_in_any_order(
    env: Env, spawn: Spawn, rename: str, payload: bool
) -> None:
    """check's advice after a rename (configure the new name, run install), followed in
    every order: rows queued under the old name before the listener restarts on the
    edited file, before install, read after it, and requeued dead letters of it, are
    all mapped by the table's name now; none is a dead letter. A listener still on the
    old mapping after install stops (configuration_superseded), and one on the edited
    file reads the rows queued under the new name."""
    env.sql("CREATE SCHEMA shop")
    env.sql("CREATE TABLE shop.users (id int PRIMARY KEY, email text, name text)")
    env.sql("INSERT INTO shop.users SELECT i, 'u' || i || '@x' FROM generate_series(1, 12) i")
    config = install(
        env, {"shop.users": ["user:{id}", "user:email:{email}"]}, notify_payload=payload
    )
    if rename == "table":
        env.sql("ALTER TABLE shop.users RENAME TO members")
        new_name = "shop.members"
    else:
        env.sql("ALTER SCHEMA shop RENAME TO store")
        new_name = "store.users"
    table = new_name
    renamed = env.config(
        {new_name: ["user:{id}", "user:email:{email}"], "public.sync": ["sync:{id}"]},
        name="renamed.toml",
        notify_payload=payload,
    )
    r = env.redis()
    seed(r, *range(1, 13))
    # 1. Writes queued under the old name (one row, and a pack); the file edited, the
    # listener started on it before install.
    env.sql(f"UPDATE {table} SET name = 'a' WHERE id = 1")
    env.sql(f"UPDATE {table} SET name = 'a' WHERE id IN (2, 3)")
    with listening(renamed):
        wait_until(lambda: r.exists("user:1", "user:2", "user:3") == 0, what="1 to 3")
        # Written while it runs, still under the old name.
        env.sql(f"DELETE FROM {table} WHERE id = 4")
        settle(env, r)
    # check: the file names the table now, install is owed.
    result = check(renamed)
    assert result.returncode == 1
    assert (
        f"table {new_name} was renamed from shop.users since install, and its changes are "
        "still queued under that name"
    ) in result.stderr
    # 2. Queued under the old name, install of the edited file, then under the new one;
    # read by a listener started after both.
    env.sql(f"UPDATE {table} SET name = 'b' WHERE id IN (5, 6)")
    assert main(["install", "--config", str(renamed)]) == 0
    env.sql(f"UPDATE {table} SET name = 'b' WHERE id = 7")
    # A dead letter of the old name (as a listener of an earlier release parked it).
    env.sql(
        "INSERT INTO cdc_invalidator.dead_letter_v1 (id, schema_name, table_name, op,"
        " new_row, error) VALUES (-1, 'shop', 'users', 'I',"
        ' \'{"id": "8", "email": "u8@x"}\', \'table shop.users is not in the configuration\')'
    )
    requeue_dead_letters(env)
    with listening(renamed):
        settle(env, r)
    assert check(renamed).returncode == 0, check(renamed).stderr
    # 3. A listener still on the old mapping stops before it acknowledges anything (a
    # later install replaced its mapping); one on the edited file reads what is left.
    env.sql(f"UPDATE {table} SET name = 'c' WHERE id IN (9, 10)")
    stale = spawn(config)
    assert stale.wait() == 1
    assert stale.logged("configuration_superseded")
    with listening(renamed):
        settle(env, r)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0
    assert keys(r) == {"user:11", "user:email:u11@x", "user:12", "user:email:u12@x"}


def test_a_renamed_table_dropped_before_its_rows_are_read_loses_no_change(
    env: Env, spawn: Spawn
) -> None:
    """Renamed, installed so, written, then dropped before its rows were read: a
    listener still on the old file stops (a later install replaced its mapping), and
    one on the installed file deletes their keys and sweeps, though the table is gone."""
    users_table(env, [(1, "u1@x"), (2, "u2@x")])
    config = install(env, USERS)
    env.sql("ALTER TABLE users RENAME TO members")
    renamed = install(env, {"public.members": USERS["public.users"]}, name="renamed.toml")
    r = env.redis()
    seed(r, 1, 2)
    r.set("user:email:new@x", "-")
    env.sql("UPDATE members SET email = 'new@x' WHERE id = 1")
    env.sql("DROP TABLE members")
    stale = spawn(config)
    assert stale.wait() == 1
    assert stale.logged("configuration_superseded")
    with listening(renamed):
        settle(env, r)
    assert keys(r) == set()
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


@pytest.mark.parametrize("first", ["edit", "install"])
def test_a_rename_followed_while_writes_go_on_loses_no_change(
    env: Env, spawn: Spawn, first: str
) -> None:
    """The review's run: writes to the renamed table all along, a listener on the
    configuration file, the file edited to the new name and install run back to back
    (the file first: the listener exits when it sees it changed; install first, the
    listener down meanwhile), then the listener started again on the file. Every
    write's keys are deleted, none is a dead letter."""
    rows = 600
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    env.sql(f"INSERT INTO users SELECT i, 'u' || i || '@x' FROM generate_series(1, {rows}) i")
    config = install(env, USERS)
    env.sql("ALTER TABLE users RENAME TO members")
    r = env.redis()
    seed(r, *range(1, rows + 1))
    written = threading.Event()

    def writer() -> None:
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            for i in range(1, rows + 1):
                conn.execute("UPDATE members SET name = 'w' WHERE id = %s", [i])
                if i % 50 == 0:
                    time.sleep(0.05)
        written.set()

    thread = threading.Thread(target=writer)
    listener = spawn(config)
    thread.start()
    try:
        wait_until(lambda: r.exists("user:100") == 0, what="writes before the rename's steps")
        renamed = {"public.members": USERS["public.users"], "public.sync": ["sync:{id}"]}
        if first == "edit":
            env.config(renamed)
            assert main(["install", "--config", str(config)]) == 0
            assert listener.wait() == 1
            assert listener.logged("configuration_changed")
        else:
            # Down meanwhile (a deploy): a backlog under the old name, read after both.
            stop_listener(listener)
            time.sleep(0.2)
            other = env.config(renamed, name="other.toml")
            assert main(["install", "--config", str(other)]) == 0
            env.config(renamed)
        assert not written.is_set(), "the writes went on through the steps"
        spawn(config)
        wait_until(written.is_set, what="every write", timeout_s=60)
        settle(env, r)
    finally:
        thread.join(60)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0
    assert r.exists(*[f"user:{i}" for i in range(1, rows + 1)]) == 0
