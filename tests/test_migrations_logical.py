"""Schema migrations on watched tables, in logical mode, against a real PostgreSQL.

For each DDL: the application's writes that follow still succeed (our publication,
replica identities and column lists never make them fail), and either invalidation
follows (the right keys are deleted, or the table is swept) or the DDL is refused with
a message naming cdc_invalidator. The configuration keeps its old names throughout:
tables and key columns are followed by relation and column number.
"""

from __future__ import annotations

import psycopg
import pytest
import redis

from cdc_invalidator.capture.errors import NotInstalled
from tests.support.env import Env
from tests.support.listener import ListenerThread, Spawn, check, cli
from tests.support.logical import (
    ORDERS,
    USERS,
    active,
    gone,
    install,
    logical_config,
    make_tables,
    running,
    stop,
)
from tests.support.sync import confirmed_past
from tests.support.waits import wait_until

pytestmark = [pytest.mark.servers]


def dead_letters(env: Env) -> list[tuple[str | None, str | None, object, object, str]]:
    with env.connect() as conn:
        return conn.execute(
            "SELECT table_name, op, old_row, new_row, error FROM cdc_invalidator.dead_letter_v1"
            " ORDER BY id DESC"
        ).fetchall()


def publication_columns(env: Env, table: str) -> list[str] | None:
    """The columns the publication carries of a table (None: all, no column list)."""
    with env.connect() as conn:
        row = conn.execute(
            "SELECT pr.prattrs IS NULL,"
            " (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a"
            "  WHERE a.attrelid = pr.prrelid AND a.attnum = ANY (pr.prattrs))"
            " FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid"
            " WHERE p.pubname = 'cdc_invalidator' AND pr.prrelid = %s::regclass",
            [table],
        ).fetchone()
    assert row is not None, f"{table} is not in the publication"
    return None if row[0] else list(row[1])


def writes_and_deletes(env: Env, r: redis.Redis, table: str, email_column: str) -> None:
    """INSERT, UPDATE, DELETE on users (whatever it is called now): each succeeds and
    deletes the keys the configured templates render."""
    r.mset({"user:3": "-", "user:email:c@x": "-"})
    env.sql(f"INSERT INTO {table} (id, {email_column}) VALUES (3, 'c@x')")
    wait_until(lambda: gone(r, "user:3", "user:email:c@x"), what="the insert's keys")
    r.mset({"user:3": "C", "user:email:c@x": "3", "user:email:d@x": "-"})
    env.sql(f"UPDATE {table} SET {email_column} = 'd@x' WHERE id = 3")
    wait_until(
        lambda: gone(r, "user:3", "user:email:c@x", "user:email:d@x"), what="the update's keys"
    )
    r.mset({"user:3": "C", "user:email:d@x": "3"})
    env.sql(f"DELETE FROM {table} WHERE id = 3")
    wait_until(lambda: gone(r, "user:3", "user:email:d@x"), what="the delete's keys")


def test_publication_carries_the_fewest_columns_the_server_allows(env: Env) -> None:
    make_tables(env)
    env.sql("CREATE TABLE wide (id int PRIMARY KEY, code text NOT NULL UNIQUE, big text)")
    env.sql("ALTER TABLE wide REPLICA IDENTITY USING INDEX wide_code_key")
    install(logical_config(env, {**USERS, **ORDERS, "public.wide": ["wide:{code}"]}))
    # FULL (email is outside the key): no list is possible, a list would fail writes.
    assert publication_columns(env, "users") is None
    # DEFAULT: the key columns (and the primary key, which they are).
    assert publication_columns(env, "orders") == ["id"]
    # USING INDEX: the key columns and the identity's columns.
    assert publication_columns(env, "wide") == ["code"]
    env.sql("INSERT INTO wide VALUES (1, 'a', 'x'); UPDATE wide SET big = 'y'; DELETE FROM wide")


def test_renamed_key_column_keeps_invalidating(env: Env) -> None:
    make_tables(env)
    config = logical_config(env, USERS)
    install(config)
    r = env.redis()
    with running(env, config):
        env.sql("ALTER TABLE users RENAME COLUMN email TO mail")
        writes_and_deletes(env, r, "users", "mail")
    assert dead_letters(env) == []


def test_renamed_table_keeps_invalidating_and_stores_no_rows(env: Env) -> None:
    make_tables(env)
    config = logical_config(env, USERS)
    install(config)
    r = env.redis()
    with running(env, config):
        env.sql("ALTER TABLE users RENAME TO members")
        writes_and_deletes(env, r, "members", "email")
    assert dead_letters(env) == []


def test_renames_made_while_the_listener_was_down_are_followed(env: Env) -> None:
    """Changes from before the renames (old names in their Relation messages) and after
    them (new names), all decoded after both renames."""
    make_tables(env)
    config = logical_config(env, USERS)
    install(config)
    r = env.redis()
    r.mset({"user:1": "A", "user:email:a@x": "1", "user:email:e@x": "-", "user:2": "B"})
    r.mset({"user:email:b@x": "2", "user:email:f@x": "-"})
    env.sql("UPDATE users SET email = 'e@x' WHERE id = 1")  # before: users.email
    env.sql("ALTER TABLE users RENAME COLUMN email TO mail; ALTER TABLE users RENAME TO members")
    env.sql("UPDATE members SET mail = 'f@x' WHERE id = 2")  # after: members.mail
    with running(env, config):
        wait_until(
            lambda: (
                gone(r, "user:1", "user:email:a@x", "user:email:e@x", "user:2")
                and gone(r, "user:email:b@x", "user:email:f@x")
            ),
            what="keys of changes before and after the renames",
        )
        writes_and_deletes(env, r, "members", "mail")
    assert dead_letters(env) == []


SWAP_EMAIL_AND_NAME = (
    "ALTER TABLE users RENAME COLUMN email TO swapping;"
    "ALTER TABLE users RENAME COLUMN name TO email;"
    "ALTER TABLE users RENAME COLUMN swapping TO name"
)


def test_key_column_names_swapped_while_the_listener_was_down(env: Env) -> None:
    """A change made before two columns swapped names, decoded after: its message names
    the columns as they were, and the key column's name now belongs to the other one.
    Which is which cannot be told from names: the change is swept, never rendered from
    the wrong column. Changes made after the swap get exact keys from the column named
    `email` now, as the application's queries (and trigger mode) have it."""
    make_tables(env)
    # (no second deletes: a sweep repeated 300 ms later would take the later keys)
    config = logical_config(env, USERS, second_delete_ms=0)
    install(config)
    r = env.redis()
    r.mset({"user:1": "A", "user:email:a@x": "1"})
    env.sql("UPDATE users SET name = 'AA' WHERE id = 1")  # before the swap
    env.sql(SWAP_EMAIL_AND_NAME)
    with running(env, config):
        wait_until(lambda: gone(r, "user:1", "user:email:a@x"), what="the early change's keys")
        with env.connect() as conn, conn.transaction():
            conn.execute("INSERT INTO users (id, name) VALUES (9, 'z@x')")
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        # (acknowledged past a later change: the sweep is done, it acknowledges first)
        wait_until(lambda: confirmed_past(env, row[0]), what="the sweep done")
        r.set("user:2", "B")
        writes_and_deletes(env, r, "users", "email")
        assert r.get("user:2") == "B", "changes after the swap are not swept"
    assert dead_letters(env) == []


def test_a_key_column_replaced_by_expand_and_contract_is_followed_by_name(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Expand/contract: the key column renamed out of the way, a new column of its name
    added and filled, in one transaction. The listener followed the old column by its
    number, so changes to the new `email` kept their keys cached (a review), and `check`
    advised renaming the configuration, which was right already. Keys follow the
    configured name where a column has it, as the application's queries do."""
    make_tables(env)
    config = logical_config(env, USERS)
    install(config)
    r = env.redis()
    with running(env, config):
        env.sql(
            "BEGIN; ALTER TABLE users RENAME COLUMN email TO email_legacy;"
            " ALTER TABLE users ADD COLUMN email text;"
            " UPDATE users SET email = email_legacy; COMMIT"
        )
        writes_and_deletes(env, r, "users", "email")
    code, _, err = check(config, capsys)
    assert code == 1
    assert "keys are rendered from the column named 'email'" in err, err
    assert "run `cdc-invalidator install` to record it" in err
    assert "edit the configuration to the new names" not in err
    assert dead_letters(env) == []


def test_dropped_key_column_sweeps_the_table(env: Env) -> None:
    make_tables(env)
    config = logical_config(env, {**USERS, **ORDERS})
    install(config)
    r = env.redis()
    with running(env, config) as listener:
        env.sql("ALTER TABLE users DROP COLUMN email")
        r.mset({"user:1": "A", "user:email:zz@x": "?", "order:1": "O", "other": "keep"})
        env.sql("UPDATE users SET name = 'AA' WHERE id = 1")  # succeeds
        wait_until(lambda: gone(r, "user:1", "user:email:zz@x"), what="users swept")
        assert r.get("order:1") == "O", "only the table that lost a column is swept"
        assert r.get("other") == "keep"
        env.sql("INSERT INTO users (id) VALUES (9); DELETE FROM users WHERE id = 9")
        r.set("user:5", "x")
        env.sql("DELETE FROM users WHERE id = 2")
        wait_until(lambda: gone(r, "user:5"), what="swept again for the delete")

        def sweeps() -> float:
            value = listener.runner.metrics.registry.get_sample_value(
                "cdc_invalidator_unrenderable_sweeps_total", {"table": "public.users"}
            )
            return value or 0.0

        # Counted per batch that swept. (user:5 may have gone to the first sweep's second
        # delete, 300 ms after it, before the DELETE's batch was counted.)
        wait_until(lambda: sweeps() >= 2, what="the DELETE's sweep counted")
    assert dead_letters(env) == [], "swept, never parked nor dropped"


def test_dropping_a_listed_key_column_is_refused_naming_cdc_invalidator(env: Env) -> None:
    make_tables(env)
    install(logical_config(env, ORDERS))
    with pytest.raises(psycopg.errors.DependentObjectsStillExist, match="cdc_invalidator"):
        env.sql("ALTER TABLE orders DROP COLUMN id")
    # CASCADE would take the table out of the publication: changes lost. Refused too.
    with pytest.raises(psycopg.errors.DependentObjectsStillExist, match="cdc_invalidator"):
        env.sql("ALTER TABLE orders DROP COLUMN id CASCADE")
    # The setting install stands the guard aside with is anyone's to set: alone, it is
    # not install (its transaction marks itself where only the installing role can).
    with pytest.raises(psycopg.errors.DependentObjectsStillExist, match="cdc_invalidator"):
        env.sql(
            "BEGIN; SET LOCAL cdc_invalidator.installing = 'on';"
            " ALTER TABLE orders DROP COLUMN id CASCADE; COMMIT"
        )
    assert publication_columns(env, "orders") == ["id"]
    env.sql("UPDATE orders SET note = 'n'; DELETE FROM orders")  # writes still work


@pytest.mark.parametrize(
    "alter",
    [
        "SET (publish = 'insert')",
        "SET (publish_via_partition_root = true)",
        "SET TABLE users WHERE (id < 50), orders, part",
        "DROP TABLE users",
        "SET TABLE users (email), orders, part",
        # (every key column, but not the FULL identity: UPDATE and DELETE would fail)
        "SET TABLE users (id, email), orders, part",
        "ADD TABLE part_1 WHERE (id < 5)",  # a partition, published under its own name
        "RENAME TO other_name",  # decoding would stop at the rename
        "SET TABLES IN SCHEMA empty",  # (names a schema, not the tables it takes out)
    ],
)
def test_altering_our_publication_is_refused(env: Env, alter: str) -> None:
    """What the publication no longer publishes is not captured, and nothing says so:
    the guard refuses it, as install made it (another publication is nobody's care)."""
    make_tables(env)
    make_part(env)
    env.sql("CREATE SCHEMA empty")
    install(logical_config(env, {**USERS, **ORDERS, "public.part": ["part:{id}"]}))
    with pytest.raises(psycopg.errors.ObjectInUse, match=r"cdc_invalidator: .* after this"):
        env.sql(f"ALTER PUBLICATION cdc_invalidator {alter}")
    env.sql(
        "CREATE PUBLICATION other FOR TABLE users; ALTER PUBLICATION other SET (publish = 'insert')"
    )
    env.sql("DROP PUBLICATION other")


def make_part(env: Env) -> None:
    env.sql(
        "CREATE TABLE part (id int PRIMARY KEY) PARTITION BY RANGE (id);"
        "CREATE TABLE part_1 PARTITION OF part FOR VALUES FROM (0) TO (100)"
    )


@pytest.mark.parametrize(
    "ddl",
    [
        # Their rows' changes are not in the WAL, or not on this server at all.
        "CREATE UNLOGGED TABLE part_2 PARTITION OF part FOR VALUES FROM (100) TO (200)",
        "ALTER TABLE part_1 SET UNLOGGED",
        # A table published with a row filter of its own, then attached.
        "CREATE TABLE part_5 (id int PRIMARY KEY);"
        " ALTER PUBLICATION cdc_invalidator ADD TABLE part_5 WHERE (id < 0);"
        " ALTER TABLE part ATTACH PARTITION part_5 FOR VALUES FROM (500) TO (600)",
    ],
)
def test_a_partition_whose_changes_would_not_be_decoded_is_refused(env: Env, ddl: str) -> None:
    make_part(env)
    install(logical_config(env, {"public.part": ["part:{id}"]}))
    with pytest.raises(psycopg.errors.ObjectInUse, match=r"cdc_invalidator: .* after this"):
        env.sql(ddl)
    env.sql("INSERT INTO part VALUES (1); UPDATE part SET id = 2; DELETE FROM part")


def test_other_publications_stay_free_while_ours_is_put_wrong(env: Env) -> None:
    """Ours drifted with the guard off: check says so, install puts it right. Meanwhile
    another team's publications are theirs to change and drop."""
    make_tables(env)
    install(logical_config(env, USERS))
    env.sql(DRIFT_UNGUARDED)
    env.sql(
        "CREATE PUBLICATION theirs FOR TABLE orders; ALTER PUBLICATION theirs DROP TABLE orders;"
        "ALTER PUBLICATION theirs ADD TABLE orders; DROP PUBLICATION theirs"
    )


def test_dropping_our_publication_is_refused(env: Env) -> None:
    """Decoding stops for good at a DROP PUBLICATION of the one the slot streams (even if
    made again in the same transaction): refused. uninstall still removes it."""
    make_tables(env)
    config = logical_config(env, USERS)
    install(config)
    for ddl in (
        "DROP PUBLICATION cdc_invalidator",
        "BEGIN; DROP PUBLICATION cdc_invalidator;"
        " CREATE PUBLICATION cdc_invalidator FOR TABLE users WHERE (id < 50); COMMIT",
    ):
        with pytest.raises(psycopg.errors.ObjectInUse, match="would no longer exist"):
            env.sql(ddl)
    assert cli("uninstall", "--config", config) == 0
    assert env.scalar("SELECT count(*) FROM pg_publication") == 0


# Our publication put wrong with the guard off (as a role that may turn it off can).
DRIFT_UNGUARDED = (
    "ALTER EVENT TRIGGER cdc_invalidator_guard DISABLE;"
    "ALTER PUBLICATION cdc_invalidator SET (publish = 'insert');"
    "ALTER EVENT TRIGGER cdc_invalidator_guard ENABLE ALWAYS"
)


def test_a_publication_changed_without_the_guard_is_reported_then_swept_by_install(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    make_tables(env)
    config = logical_config(env, USERS)
    install(config)
    env.sql(DRIFT_UNGUARDED)
    code, _, err = check(config, capsys)
    assert code == 1
    assert "publication cdc_invalidator publishes only insert: the changes it does not" in err
    r = env.redis()
    with running(env, config):
        r.mset({"user:1": "stale", "user:2": "cached"})
        env.sql("UPDATE users SET email = 'changed@x' WHERE id = 1")  # not published
        install(config)  # put right, and every table it held swept
        wait_until(lambda: gone(r, "user:1", "user:2"), what="the sweep")
    assert check(config, capsys)[0] == 0


def test_a_publication_dropped_without_the_guard_and_made_again_by_install_resumes(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """`DROP PUBLICATION` where no guard refuses it (install by a non-superuser), then
    `install`, the documented way back: decoding reads the catalog as it was at each
    change, and the slot held changes made while the publication did not exist. Before
    PostgreSQL 18 the stream failed there at every start, the listener retried forever,
    and every key stayed cached: the slot is now dropped and made again, and every table
    swept. PostgreSQL 18 decodes on, without those changes: install now sweeps."""
    make_tables(env)
    config = logical_config(env, USERS)
    install(config)
    r = env.redis()
    listener = ListenerThread.from_file(config).start()
    try:
        wait_until(lambda: active(env), what="the listener streaming its slot")
        env.sql(
            "ALTER EVENT TRIGGER cdc_invalidator_guard DISABLE;"
            "ALTER EVENT TRIGGER cdc_invalidator_guard_drops DISABLE;"
            "DROP PUBLICATION cdc_invalidator;"
            "ALTER EVENT TRIGGER cdc_invalidator_guard ENABLE ALWAYS;"
            "ALTER EVENT TRIGGER cdc_invalidator_guard_drops ENABLE ALWAYS"
        )
        r.mset({"user:1": "stale", "user:2": "cached"})
        env.sql("UPDATE users SET email = 'gap@x' WHERE id = 1")  # while it did not exist
        install(config)
        # The stream fails at that change, and the listener connects again. Had it done
        # so before install made the publication again, it found none and exited (`run`
        # exits 1 when our SQL is missing); its supervisor starts it again.
        wait_until(lambda: gone(r, "user:1", "user:2") or not listener.alive(), what="the sweep")
        if not listener.alive():
            assert isinstance(listener.error, NotInstalled), listener.error
            listener.error = None
            listener.stop()
            listener = ListenerThread.from_file(config).start()
            wait_until(lambda: gone(r, "user:1", "user:2"), what="the sweep")
        r.set("user:2", "cached")
        env.sql("UPDATE users SET email = 'after@x' WHERE id = 2")
        wait_until(lambda: gone(r, "user:2"), what="a change after it")
    finally:
        listener.stop()
    assert check(config, capsys)[0] == 0


def update_and_delete_order_1(env: Env, r: redis.Redis) -> None:
    """An UPDATE and a DELETE of order 1: each succeeds and deletes order:1."""
    r.mset({"order:1": "O"})
    env.sql("UPDATE orders SET note = 'n' WHERE id = 1")
    wait_until(lambda: gone(r, "order:1"), what="the update's key")
    r.mset({"order:1": "O"})
    env.sql("DELETE FROM orders WHERE id = 1")
    wait_until(lambda: gone(r, "order:1"), what="the delete's key")


def test_dropping_the_primary_key_keeps_writes_working(env: Env) -> None:
    """Without a primary key, a DEFAULT identity is none: UPDATE and DELETE of a
    published table would fail. The guard sets FULL, and drops the column list that
    FULL cannot have."""
    make_tables(env)
    config = logical_config(env, ORDERS)
    install(config)
    r = env.redis()
    with running(env, config):
        env.sql("ALTER TABLE orders DROP CONSTRAINT orders_pkey")
        assert publication_columns(env, "orders") is None
        update_and_delete_order_1(env, r)


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE orders DROP CONSTRAINT orders_pkey, ADD PRIMARY KEY (id, note)",
        "CREATE UNIQUE INDEX orders_id_note ON orders (id, note);"
        " ALTER TABLE orders ALTER COLUMN note SET NOT NULL,"
        " REPLICA IDENTITY USING INDEX orders_id_note",
    ],
    ids=["wider-primary-key", "identity-index"],
)
def test_a_replica_identity_on_other_columns_keeps_writes_working(env: Env, ddl: str) -> None:
    """The identity still covers the key columns but takes a column the publication's
    list lacks: a list must cover the identity, or UPDATE and DELETE fail. The guard
    republishes the table with the identity's columns."""
    make_tables(env)
    config = logical_config(env, ORDERS)
    install(config)
    r = env.redis()
    with running(env, config):
        assert publication_columns(env, "orders") == ["id"]
        env.sql(ddl)
        assert publication_columns(env, "orders") == ["id", "note"]
        update_and_delete_order_1(env, r)


def test_retyping_a_key_column(env: Env) -> None:
    make_tables(env)
    config = logical_config(env, {**USERS, **ORDERS})
    install(config)
    # A listed column (orders.id): PostgreSQL refuses, naming our publication.
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="cdc_invalidator"):
        env.sql("ALTER TABLE orders ALTER COLUMN id TYPE bigint")
    r = env.redis()
    with running(env, config):
        # A table published whole (users): allowed, invalidation follows.
        env.sql("ALTER TABLE users ALTER COLUMN email TYPE varchar(100)")
        writes_and_deletes(env, r, "users", "email")


def test_other_columns_renamed_dropped_added(env: Env) -> None:
    make_tables(env)
    config = logical_config(env, {**USERS, **ORDERS})
    install(config)
    r = env.redis()
    with running(env, config):
        env.sql(
            "ALTER TABLE users RENAME COLUMN name TO full_name;"
            "ALTER TABLE users ADD COLUMN age int;"
            "ALTER TABLE orders ADD COLUMN total int;"
            "ALTER TABLE orders RENAME COLUMN note TO remark;"
            "ALTER TABLE orders DROP COLUMN remark"
        )
        assert publication_columns(env, "orders") == ["id"], "new columns stay out"
        writes_and_deletes(env, r, "users", "email")
        env.sql("ALTER TABLE users DROP COLUMN full_name")
        writes_and_deletes(env, r, "users", "email")
        r.set("order:5", "x")
        env.sql("INSERT INTO orders (id, total) VALUES (5, 1); UPDATE orders SET total = 2")
        env.sql("DELETE FROM orders")
        wait_until(lambda: gone(r, "order:5", "order:1"), what="orders' keys")
    assert dead_letters(env) == []


@pytest.mark.parametrize("how", ["create", "attach"])
def test_new_partition_writes_and_invalidates(env: Env, how: str) -> None:
    env.sql(
        "CREATE TABLE events (id int, email text) PARTITION BY RANGE (id);"
        "CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100)"
    )
    config = logical_config(env, {"public.events": ["ev:{id}", "ev:email:{email}"]})
    install(config)
    r = env.redis()
    with running(env, config):
        if how == "create":
            env.sql("CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (100) TO (200)")
        else:
            # Its own column order: a partition is matched to its parent by name.
            env.sql(
                "CREATE TABLE events_2 (email text, id int);"
                "ALTER TABLE events ATTACH PARTITION events_2 FOR VALUES FROM (100) TO (200)"
            )
        r.mset({"ev:101": "-", "ev:email:a@x": "-"})
        env.sql("INSERT INTO events VALUES (101, 'a@x')")
        wait_until(lambda: gone(r, "ev:101", "ev:email:a@x"), what="the insert's keys")
        r.mset({"ev:101": "E", "ev:email:a@x": "101", "ev:email:b@x": "-"})
        env.sql("UPDATE events SET email = 'b@x' WHERE id = 101")  # no primary key: FULL
        wait_until(
            lambda: gone(r, "ev:101", "ev:email:a@x", "ev:email:b@x"), what="the update's keys"
        )
        env.sql("DELETE FROM events WHERE id = 101")


@pytest.mark.parametrize("keep", [False, True], ids=["full", "keep"])
def test_ddl_on_one_partition_does_not_wait_on_another(env: Env, keep: bool) -> None:
    """The DDL guard reads a published table's partitions (their replica identities; a
    kept table's at COMMIT): through pg_partition_tree(), which locks every one to the
    end of the transaction. DDL on one partition waited on a lock another session held
    on another (VACUUM FULL, CLUSTER, a TRUNCATE of it), and held its own meanwhile; two
    such transactions on two partitions deadlocked. It reads pg_inherits now."""
    env.sql(
        "CREATE TABLE events (id int PRIMARY KEY, email text) PARTITION BY RANGE (id);"
        "CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100);"
        "CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (100) TO (200)"
    )
    kept = ["public.events"] if keep else []
    install(logical_config(env, {"public.events": ["ev:{id}", "ev:email:{email}"]}, keep=kept))
    with env.connect() as holder, env.connect(options="-c lock_timeout=2s") as ddl:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE events_2 IN ACCESS EXCLUSIVE MODE")
        ddl.execute("BEGIN")
        ddl.execute("ALTER TABLE events_1 ALTER COLUMN email SET DEFAULT 'x'")
        ddl.execute("COMMIT")
        holder.execute("COMMIT")


def test_dead_letters_hold_key_columns_only(env: Env, spawn: Spawn) -> None:
    make_tables(env)
    env.sql("CREATE TABLE secrets (id int PRIMARY KEY, password_hash text)")
    config = logical_config(env, USERS)
    install(config)
    # A table in the publication the configuration does not know (added by hand).
    env.sql("ALTER PUBLICATION cdc_invalidator ADD TABLE secrets")
    listener = spawn(config)
    env.sql("INSERT INTO secrets VALUES (1, 'hash')")
    wait_until(lambda: len(dead_letters(env)) == 1, what="the unknown table's dead letter")
    stop(listener)
    ((table, op, old, new, error),) = dead_letters(env)
    assert (table, op, old, new) == ("secrets", "I", None, None)
    assert "not in the configuration" in error
    assert "hash" not in error


def test_check_reports_renames_and_drops(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    make_tables(env)
    config = logical_config(env, {**USERS, **ORDERS})
    install(config)
    assert check(config, capsys)[0] == 0
    env.sql("ALTER TABLE users RENAME TO members; ALTER TABLE members RENAME COLUMN email TO mail")
    code, _, err = check(config, capsys)
    assert code == 1
    # (named with its schema: every session of ours has search_path = pg_catalog)
    assert "table public.users was renamed to public.members" in err
    assert "column 'email' of public.members was renamed to 'mail'" in err
    assert "edit the configuration" in err
    env.sql("ALTER TABLE members DROP COLUMN mail")
    code, _, err = check(config, capsys)
    assert "column 'email' of public.members was dropped" in err
    assert "swept" in err


def test_the_ddl_guard_never_gets_in_the_way_of_other_roles(env: Env) -> None:
    """The guard fires on every role's CREATE TABLE and ALTER TABLE in the database,
    temporary tables included: a role with no privilege on our schema keeps its DDL, and
    the non-superuser owner of a watched table keeps its migrations (the guard's own
    work, setting FULL, is done with the installer's rights)."""
    make_tables(env)
    install(logical_config(env, ORDERS))
    role = f"app_{env.dsn.rsplit('/', 1)[1]}"
    env.sql(f"CREATE ROLE {role} LOGIN; GRANT CREATE ON SCHEMA public TO {role}")
    env.sql(f"ALTER TABLE orders OWNER TO {role}")
    as_app = psycopg.conninfo.make_conninfo(env.dsn, user=role)
    try:
        with psycopg.connect(as_app, autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE scratch (a int)")
            conn.execute("CREATE TABLE mine (a int PRIMARY KEY)")
            conn.execute("ALTER TABLE mine ADD COLUMN b int")
            conn.execute("ALTER TABLE orders DROP CONSTRAINT orders_pkey")
            conn.execute("UPDATE orders SET note = 'n' WHERE id = 1")
        assert publication_columns(env, "orders") is None
        assert env.scalar("SELECT relreplident FROM pg_class WHERE oid = 'orders'::regclass") == "f"
    finally:
        env.sql(
            f"DROP TABLE IF EXISTS mine; ALTER TABLE orders OWNER TO CURRENT_USER;"
            f"REVOKE ALL ON SCHEMA public FROM {role}; DROP ROLE {role}"
        )


def test_a_foreign_partition_is_refused(env: Env) -> None:
    """What is written to a foreign table happens on its server: never decoded here.
    (A partitioned table with unique indexes takes no foreign partition at all.)"""
    env.sql(
        "CREATE TABLE loose (id int) PARTITION BY RANGE (id);"
        "CREATE TABLE loose_1 PARTITION OF loose FOR VALUES FROM (0) TO (100);"
        "CREATE FOREIGN DATA WRAPPER nothing; CREATE SERVER nowhere FOREIGN DATA WRAPPER nothing"
    )
    install(logical_config(env, {"public.loose": ["loose:{id}"]}))
    with pytest.raises(psycopg.errors.ObjectInUse, match="is a foreign table"):
        env.sql(
            "CREATE FOREIGN TABLE loose_2 PARTITION OF loose FOR VALUES FROM (100) TO (200)"
            " SERVER nowhere"
        )


@pytest.mark.parametrize(
    "ddl",
    [
        "ALTER TABLE orders REPLICA IDENTITY FULL",
        "ALTER TABLE orders DROP CONSTRAINT orders_pkey, ADD PRIMARY KEY (id, note)",
    ],
)
def test_a_keep_tables_new_identity_is_published_for(env: Env, ddl: str) -> None:
    """replica_identity = "keep": the identity is the DBA's. One its column list does not
    cover is published for, as for any table, not refused."""
    make_tables(env)
    env.sql("UPDATE orders SET note = 'n'")
    install(logical_config(env, ORDERS, keep=["public.orders"]))
    assert publication_columns(env, "orders") == ["id"]
    env.sql(ddl)
    env.sql("UPDATE orders SET note = 'm'; DELETE FROM orders")  # writes work


def test_a_keep_tables_primary_key_is_required_at_commit_not_between_statements(
    env: Env,
) -> None:
    """replica_identity = "keep": a transaction may leave the table without an identity
    between two statements (a migration that replaces the primary key in two;
    `pg_restore --clean --single-transaction`, which drops the key, then the table).
    Only a COMMIT that leaves it without one is refused: its UPDATEs and DELETEs would
    fail from then on."""
    make_tables(env)
    config = logical_config(env, ORDERS, keep=["public.orders"])
    install(config)
    drop_key = "ALTER TABLE orders DROP CONSTRAINT orders_pkey"
    env.sql(f"{drop_key}; ALTER TABLE orders ADD PRIMARY KEY (id)")
    for alone in ("", "SET session_replication_role = replica; "):
        with pytest.raises(
            psycopg.errors.ObjectNotInPrerequisiteState, match=r"orders.*no replica identity"
        ):
            env.sql(alone + drop_key)
    r = env.redis()
    with running(env, config):
        update_and_delete_order_1(env, r)  # the key is still there, and captured
    env.sql(f"{drop_key}; DROP TABLE orders")


def test_install_after_a_template_outside_the_identity_sweeps_nothing(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """install gives the table REPLICA IDENTITY FULL before it publishes the table whole:
    the column list in between is install's own, no drift, nothing swept."""
    make_tables(env)
    install(logical_config(env, ORDERS))
    r = env.redis()
    r.mset({"order:1": "cached", "order:2": "-"})
    wider = logical_config(env, {"public.orders": ["order:{id}", "order:note:{note}"]})
    capsys.readouterr()
    assert cli("install", "--config", wider) == 0
    assert "warning" not in capsys.readouterr().err
    assert publication_columns(env, "orders") is None  # published whole, FULL
    with running(env, wider):
        # Decoded after install's transaction: once its keys are gone, so would be a
        # sweep that install had asked for.
        env.sql("INSERT INTO orders VALUES (2, 'two')")
        wait_until(lambda: r.exists("order:2") == 0, what="the insert's key")
    assert r.get("order:1") == "cached", "nothing was swept"


@pytest.mark.parametrize("emptied", ["TRUNCATE events_2", "DELETE FROM events_2; VACUUM events_2"])
def test_a_partition_emptied_then_detached_before_its_changes_are_decoded(
    env: Env, emptied: str
) -> None:
    """Changes to a partition, which then lost its rows and left the table, decoded after
    it left (the listener behind): the listener finds no table of theirs and dead-letters
    them. A detach of a partition without rows swept nothing, so their keys stayed cached
    (a review). In logical mode a partition a command detaches is swept whatever its
    size."""
    env.sql(
        "CREATE TABLE events (id int, email text) PARTITION BY RANGE (id);"
        "CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (100);"
        "CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (100) TO (200)"
    )
    config = logical_config(env, {"public.events": ["ev:{id}", "ev:email:{email}"]})
    install(config)
    env.sql("INSERT INTO events VALUES (101, 'a@x')")
    for statement in emptied.split("; "):
        env.sql(statement)
    env.sql("ALTER TABLE events DETACH PARTITION events_2")
    r = env.redis()
    r.mset({"ev:101": "-", "ev:email:a@x": "-"})
    with running(env, config):
        wait_until(lambda: gone(r, "ev:101", "ev:email:a@x"), what="the detached change's keys")


@pytest.mark.parametrize("concurrently", [False, True], ids=["drop", "concurrently"])
def test_drop_index_of_the_replica_identity_index_keeps_writes_working(
    env: Env, concurrently: bool
) -> None:
    """A table with REPLICA IDENTITY USING INDEX (one covering the key columns, which
    install leaves alone; and a partition's own), then a DBA's DROP INDEX of that index:
    PostgreSQL treats the identity as NOTHING, and every UPDATE and DELETE of the table
    failed ("does not have a replica identity and publishes updates", a review on
    18.6): DROP INDEX is no ALTER TABLE. The guard's sql_drop trigger for DROP INDEX
    (cdc_invalidator_guard_index) gives the table REPLICA IDENTITY FULL and publishes it
    whole in the same transaction; uninstall puts NOTHING back, there being no index."""
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text);"
        "CREATE UNIQUE INDEX users_id_email ON users (id, email);"
        "ALTER TABLE users REPLICA IDENTITY USING INDEX users_id_email;"
        "CREATE TABLE orders (id int, note text NOT NULL, PRIMARY KEY (id))"
        " PARTITION BY RANGE (id);"
        "CREATE TABLE orders_1 PARTITION OF orders FOR VALUES FROM (0) TO (10);"
        "CREATE UNIQUE INDEX orders_1_id_note ON orders_1 (id, note);"
        "ALTER TABLE orders_1 REPLICA IDENTITY USING INDEX orders_1_id_note;"
        "INSERT INTO users VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B');"
        "INSERT INTO orders VALUES (1, 'one'), (2, 'two')"
    )
    config = logical_config(env, {**USERS, "public.orders": ["order:{id}", "order:note:{note}"]})
    install(config)
    assert publication_columns(env, "users") == ["id", "email"]
    drop = "DROP INDEX CONCURRENTLY" if concurrently else "DROP INDEX"
    env.sql(f"{drop} users_id_email")
    env.sql(f"{drop} orders_1_id_note")
    r = env.redis()
    with running(env, config):
        r.mset({"user:1": "A", "user:email:a@x": "1", "user:2": "B", "user:email:b@x": "2"})
        r.mset({"order:1": "1", "order:note:one": "1", "order:2": "2", "order:note:two": "2"})
        env.sql("UPDATE users SET email = 'c@x' WHERE id = 1; DELETE FROM users WHERE id = 2")
        env.sql("UPDATE orders SET note = 'uno' WHERE id = 1; DELETE FROM orders WHERE id = 2")
        wait_until(
            lambda: (
                gone(r, "user:1", "user:email:a@x", "user:2", "user:email:b@x")
                and gone(r, "order:1", "order:note:one", "order:2", "order:note:two")
            ),
            what="the keys of the rows updated and deleted after the DROP INDEX",
        )
    assert publication_columns(env, "users") is None
    assert cli("uninstall", "--config", config) == 0
    assert env.scalar("SELECT relreplident FROM pg_class WHERE oid = 'users'::regclass") == "n"


def kept_identity_table(env: Env) -> None:
    """users, its identity the DBA's (`keep`): REPLICA IDENTITY USING INDEX of (id, email);
    installed."""
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text);"
        "CREATE UNIQUE INDEX users_id_email ON users (id, email);"
        "ALTER TABLE users REPLICA IDENTITY USING INDEX users_id_email;"
        "INSERT INTO users VALUES (1, 'a@x', 'A')"
    )
    install(logical_config(env, USERS, keep=["public.users"]))


def test_drop_index_of_a_kept_tables_identity_index_is_refused(env: Env) -> None:
    """replica_identity = "keep": the identity is the DBA's, and a DROP INDEX that leaves
    the table without one is refused at COMMIT (the index stays, writes go on), as a
    dropped primary key is. (DROP INDEX CONCURRENTLY cannot be undone by then: a
    WARNING says the writes fail.)"""
    kept_identity_table(env)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="no replica identity"):
        env.sql("DROP INDEX users_id_email")
    env.sql("UPDATE users SET name = 'x' WHERE id = 1")
    with env.connect() as conn:
        warned: list[str] = []
        conn.add_notice_handler(lambda d: warned.append(d.message_primary or ""))
        conn.execute("DROP INDEX CONCURRENTLY users_id_email")
    assert any("has no replica identity now" in w for w in warned), warned


def test_a_kept_table_left_without_identity_fails_no_other_drop_index(env: Env) -> None:
    """A DROP INDEX CONCURRENTLY of a `keep` table's identity index leaves it without one
    (a WARNING). The DROP INDEX guard then looked at every published table without an
    identity, not at the one whose index a command dropped: every later DROP INDEX in
    the database, of an index of a table we do not watch, was refused at COMMIT
    ("table users has no replica identity", by hand on PG 15 and 18). Only a table
    the DROP INDEX locked is looked at now."""
    kept_identity_table(env)
    env.sql(
        "CREATE TABLE other (id int, note text);"
        "CREATE INDEX other_note ON other (note); CREATE INDEX other_id ON other (id)"
    )
    env.sql("DROP INDEX CONCURRENTLY users_id_email")
    env.sql("DROP INDEX other_note")
    env.sql("DROP INDEX CONCURRENTLY other_id")
    assert env.scalar("SELECT count(*) FROM pg_index WHERE indrelid = 'other'::regclass") == 0


def test_a_comment_naming_concurrently_does_not_take_the_refusal_away(env: Env) -> None:
    """The guard told DROP INDEX CONCURRENTLY (a WARNING for a `keep` table, its index
    unusable by then) by the word in the query's text: a comment naming it made a plain
    DROP INDEX of the identity index pass with only the WARNING, and every UPDATE of
    the table failed after ("does not have a replica identity and publishes updates",
    by hand on PG 15 and 18). The lock DROP INDEX took on the table tells it now."""
    kept_identity_table(env)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="no replica identity"):
        env.sql("DROP INDEX users_id_email /* not concurrently: in a transaction */")
    env.sql("UPDATE users SET name = 'x' WHERE id = 1")


def test_an_identity_index_dropped_by_a_cascade_keeps_writes_working(env: Env) -> None:
    """An index goes with an object it depends on: DROP COLLATION ... CASCADE of the
    collation one of its columns names drops the REPLICA IDENTITY USING INDEX index and
    leaves the table. The guard's sql_drop trigger fired for DROP INDEX only: every
    UPDATE of the table failed after ("cannot update table "users" because it does not
    have a replica identity and publishes updates", by hand on PG 15.18 and 18.6)."""
    env.sql(
        'CREATE COLLATION mine FROM "C";'
        "CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text);"
        "CREATE UNIQUE INDEX users_id_email ON users (id, email COLLATE mine);"
        "ALTER TABLE users REPLICA IDENTITY USING INDEX users_id_email;"
        "INSERT INTO users VALUES (1, 'a@x', 'A'), (2, 'b@x', 'B')"
    )
    install(logical_config(env, USERS))
    env.sql("DROP COLLATION mine CASCADE")
    assert env.scalar("SELECT count(*) FROM pg_index WHERE indrelid = 'users'::regclass") == 1
    env.sql("UPDATE users SET name = 'x' WHERE id = 1; DELETE FROM users WHERE id = 2")


def test_a_drop_index_elsewhere_does_not_look_at_every_published_table(env: Env) -> None:
    """The DROP INDEX guard called without_replica_identity_v1() (and through it
    partitions_v1()) for every published table in each DROP INDEX of the database: with
    500 published tables and a 100-partition one, a DROP INDEX of an unwatched table's
    index took 98-120 ms instead of 0.8 ms with the trigger disabled (100 in a loop,
    PG 15, by hand). It starts from the tables the command locked now (1.6-2.4 ms)."""
    tables = {f"public.t{i}": [f"t{i}:{{id}}"] for i in range(20)}
    env.sql(";".join(f"CREATE TABLE t{i} (id int PRIMARY KEY)" for i in range(20)))
    env.sql("CREATE TABLE other (id int, v int); CREATE INDEX other_v ON other (v)")
    install(logical_config(env, tables))
    with env.connect() as conn, conn.transaction():
        conn.execute("SET LOCAL track_functions = 'all'")
        conn.execute("DROP INDEX other_v")
        calls = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions"
            " WHERE schemaname = 'cdc_invalidator'"
            " AND funcname IN ('without_replica_identity_v1', 'partitions_v1')"
        ).fetchone()
    # (a few for the table dropped from, whatever the number of published tables;
    # three a published table before: 60)
    assert calls is not None
    assert calls[0] < 10, calls
