"""Table inheritance (CREATE TABLE child () INHERITS (parent)), in both capture modes: the
inheritance children of a configured table are captured under its name and templates,
as the partitions of a partitioned table are. A statement naming the parent reads and
writes its children's rows too; one naming a child fires only the child's statement
triggers (trigger mode), and a child's changes are decoded as the child's relation
(logical mode)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import listening, run_cli
from tests.support.logical import logical_config
from tests.support.sync import SYNC, install, keys, settle
from tests.support.waits import wait_until

pytestmark = pytest.mark.usefixtures("capture")

ITEMS = {"public.items": ["item:{id}", "item:sku:{sku}"]}
# items_a: a primary key of its own (primary keys are not inherited). items_b: none, more
# columns than its parent, in another order (made first, then made to inherit).
INHERITED = (
    "CREATE TABLE items (id int PRIMARY KEY, sku text);"
    "CREATE TABLE items_a (PRIMARY KEY (id)) INHERITS (items);"
    "CREATE TABLE items_b (note text, sku text, id int NOT NULL, extra int);"
    "ALTER TABLE items_b INHERIT items;"
    "INSERT INTO items VALUES (0, 'p0');"
    "INSERT INTO items_a VALUES (1, 'a1');"
    "INSERT INTO items_b (id, sku, note) VALUES (2, 'b2', 'n')"
)
IDENTITY_B = "SELECT relreplident FROM pg_class WHERE oid = 'items_b'::regclass"
# Our triggers, on any table.
OURS_ON = (
    "SELECT count(*) FROM pg_trigger tg"
    " WHERE tg.tgrelid = %s::regclass AND tg.tgname LIKE 'cdc\\_invalidator\\_%%'"
)


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("check", "--config", str(config))


def dead_letter_count(env: Env) -> int:
    return int(env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1"))


def test_writes_through_the_parent_and_naming_a_child(env: Env) -> None:
    env.sql(INHERITED)
    config = install(env, ITEMS)
    r = env.redis()
    with listening(config):
        # Through the parent, a child's row; then naming each child.
        r.mset({"item:1": "x", "item:sku:a1": "x", "item:sku:a1x": "-", "other:1": "keep"})
        env.sql("UPDATE items SET sku = 'a1x' WHERE id = 1")
        wait_until(
            lambda: r.exists("item:1", "item:sku:a1", "item:sku:a1x") == 0, what="via parent"
        )
        r.mset({"item:2": "x", "item:sku:b2": "x", "item:sku:b2x": "-"})
        env.sql("UPDATE items_b SET sku = 'b2x', note = 'm' WHERE id = 2")  # no identity
        wait_until(lambda: r.exists("item:2", "item:sku:b2", "item:sku:b2x") == 0, what="child b")
        r.mset({"item:1": "x", "item:sku:a1x": "x", "item:sku:a1y": "-"})
        env.sql("UPDATE items_a SET sku = 'a1y' WHERE id = 1")
        wait_until(lambda: r.exists("item:1", "item:sku:a1x", "item:sku:a1y") == 0, what="child a")
        # A key column changed, through the parent and naming the child.
        r.mset({"item:2": "x", "item:12": "-", "item:3": "x", "item:13": "-"})
        env.sql("UPDATE items SET id = 12 WHERE id = 2")
        env.sql("INSERT INTO items_b (id, sku) VALUES (3, 'b3')")
        env.sql("UPDATE items_b SET id = 13 WHERE id = 3")
        wait_until(lambda: r.exists("item:2", "item:12", "item:3", "item:13") == 0, what="key")
        # The parent's own row, and deletes.
        r.mset({"item:0": "x", "item:sku:p0": "x", "item:12": "x", "item:13": "x"})
        env.sql("UPDATE items SET sku = 'p0x' WHERE id = 0")
        env.sql("DELETE FROM items WHERE id = 12")
        env.sql("DELETE FROM items_b WHERE id = 13")
        wait_until(
            lambda: r.exists("item:0", "item:sku:p0", "item:12", "item:13") == 0, what="deletes"
        )
        r.mset({"item:4": "x", "item:5": "x"})
        env.sql("INSERT INTO items_a VALUES (4, 'a4')")
        env.sql("INSERT INTO items_b (id, sku) VALUES (5, 'b5')")
        wait_until(lambda: r.exists("item:4", "item:5") == 0, what="inserts")
        # TRUNCATE of a child, then of the parent (and its children): a sweep.
        r.mset({"item:4": "x", "item:sku:a4": "x"})
        env.sql("TRUNCATE items_a")
        wait_until(lambda: r.exists("item:4", "item:sku:a4") == 0, what="child truncate")
        r.mset({"item:5": "x", "item:sku:b5": "x"})
        env.sql("TRUNCATE items")
        wait_until(lambda: r.exists("item:5", "item:sku:b5") == 0, what="parent truncate")
        settle(env, r)
    assert keys(r) == {"other:1"}
    assert dead_letter_count(env) == 0
    assert int(env.scalar("SELECT count(*) FROM items")) == 0


def test_a_child_the_guard_missed_is_reported_and_captured_after_install(env: Env) -> None:
    env.sql(INHERITED)
    config = install(env, ITEMS)
    assert check(config).returncode == 0
    # Made while the rebuild guard does not see it (as where a role that is not a
    # superuser installed, and there is no guard).
    env.sql(
        "ALTER EVENT TRIGGER cdc_invalidator_rebuilt DISABLE;"
        "CREATE TABLE items_c () INHERITS (items); INSERT INTO items_c VALUES (7, 'c7');"
        "ALTER EVENT TRIGGER cdc_invalidator_rebuilt ENABLE ALWAYS"
    )
    # Its writes still succeed (in logical mode it is not published yet).
    env.sql("UPDATE items_c SET sku = 'c7x' WHERE id = 7")
    done = check(config)
    assert done.returncode != 0
    assert "items_c" in done.stdout + done.stderr
    assert main(["install", "--config", str(config)]) == 0
    assert check(config).returncode == 0, check(config).stdout
    r = env.redis()
    with listening(config):
        r.mset({"item:7": "x", "item:sku:c7x": "x", "item:sku:c7y": "-", "other:1": "keep"})
        env.sql("UPDATE items_c SET sku = 'c7y' WHERE id = 7")
        wait_until(lambda: r.exists("item:7", "item:sku:c7x", "item:sku:c7y") == 0, what="c")
        settle(env, r)
    assert keys(r) == {"other:1"}
    assert dead_letter_count(env) == 0


def test_uninstall_leaves_nothing_on_the_children(env: Env) -> None:
    env.sql(INHERITED)
    config = install(env, ITEMS)
    if env.logical:
        # (items_b had no identity: made FULL, and published, as items is)
        assert env.scalar(IDENTITY_B) == "f"
        assert env.scalar(
            "SELECT array_agg(tablename::text ORDER BY tablename) FROM pg_publication_tables"
        ) == ["items", "items_a", "items_b", "sync"]
    else:
        assert int(env.scalar(OURS_ON, ["items_b"])) == 4
    assert main(["uninstall", "--config", str(config)]) == 0
    for table in ("items", "items_a", "items_b"):
        assert int(env.scalar(OURS_ON, [table])) == 0
    # Identities put back (items_b had none; the publication is gone with uninstall).
    assert env.scalar(IDENTITY_B) == "d"
    env.sql("UPDATE items_b SET note = 'after' WHERE id = 2")


def test_another_sessions_temporary_child_leaves_install_alone(env: Env) -> None:
    """A session's temporary table made to inherit from a watched one (its rows reach no
    other session): install tried to give it triggers, or a replica identity, and failed
    with "cannot alter temporary tables of other sessions". It is left out."""
    env.sql(INHERITED)
    with env.connect() as other:
        other.execute("CREATE TEMP TABLE scratch () INHERITS (items)")
        other.execute("INSERT INTO scratch VALUES (9, 't9')")
        config = install(env, ITEMS)
        assert check(config).returncode == 0, check(config).stdout
        assert int(env.scalar(OURS_ON, ["items_b"])) == (0 if env.logical else 4)
        other.execute("UPDATE scratch SET sku = 't9x'")  # its writes still succeed


@pytest.mark.parametrize("partitioned", [False, True], ids=["inherited", "partitioned"])
def test_a_table_configured_inside_another_configured_one_is_refused(
    env: Env, partitioned: bool
) -> None:
    """A row of items_a is a row of items, but each change is captured under one name
    (the table a statement names in trigger mode, items_a in logical mode): the other
    table's keys stayed cached (the second review: `t:5` or `c2:5` left). check reported
    it; install went through. Now install refuses such a file, changing nothing, and
    check names it. The same for a partition configured beside its table."""
    if partitioned:
        env.sql(
            "CREATE TABLE items (id int PRIMARY KEY, sku text) PARTITION BY RANGE (id);"
            "CREATE TABLE items_a PARTITION OF items FOR VALUES FROM (0) TO (100)"
        )
    else:
        env.sql(INHERITED)
    install(env, ITEMS)
    ours = int(env.scalar(OURS_ON, ["items_a"]))
    both = env.config({**ITEMS, "public.items_a": ["a:{id}"], **SYNC}, name="both.toml")
    refused = run_cli("install", "--config", str(both))
    assert refused.returncode != 0
    said = refused.stdout + refused.stderr
    named = (
        "table public.items_a is a partition or an inheritance child of public.items, "
        "and both are configured"
    )
    assert named in said, said
    assert "nothing was changed" in said, said
    assert "hint: configure one of them" in said, said
    assert int(env.scalar(OURS_ON, ["items_a"])) == ours, "install changed nothing"
    done = check(both)
    assert done.returncode != 0
    assert named in done.stdout + done.stderr, done.stdout + done.stderr


@pytest.mark.parametrize("capture", ["trigger"])
def test_a_child_that_also_inherits_from_an_unwatched_table_is_reported(env: Env) -> None:
    """Multiple inheritance: a statement naming the other parent changes the child's rows
    without firing its triggers (the second review: `t:6` left, check silent)."""
    env.sql(INHERITED + "; CREATE TABLE other (id int, sku text);"
            "CREATE TABLE both_ () INHERITS (items, other)")  # fmt: skip
    config = install(env, ITEMS)
    done = check(config)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "public.both_ (a child of public.other too)" in out, out


@pytest.mark.parametrize("capture", ["trigger"])
def test_a_configured_child_of_an_unconfigured_parent_is_reported(env: Env) -> None:
    """A statement naming the parent fires only the parent's statement triggers, so
    `check` says to configure the parent. (Logical mode decodes the child's changes as
    the child's relation, whichever table a statement names.)"""
    env.sql(INHERITED)
    config = install(env, {"public.items_b": ["item:{id}"]})
    done = check(config)
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "inheritance child of public.items, which is not watched" in out, out


@pytest.mark.parametrize("capture", ["logical"])
def test_keep_refuses_a_child_without_an_identity(env: Env) -> None:
    env.sql(INHERITED + "; CREATE TABLE sync (id int PRIMARY KEY)")
    config = logical_config(env, {**ITEMS, **SYNC}, keep=["public.items"])
    done = run_cli("install", "--config", str(config))
    assert done.returncode != 0
    assert "items_b" in done.stderr + done.stdout
    env.sql("UPDATE items_b SET note = 'still' WHERE id = 2")
    # Given a primary key, it is published as it is, and captured.
    env.sql("ALTER TABLE items_b ADD PRIMARY KEY (id)")
    assert main(["install", "--config", str(config)]) == 0
    assert env.scalar(IDENTITY_B) == "d"
    r = env.redis()
    with listening(config):
        r.mset({"item:2": "x", "other:1": "keep"})
        env.sql("UPDATE items SET id = 22 WHERE id = 2")
        wait_until(lambda: r.exists("item:2") == 0, what="kept child")
        settle(env, r)
    assert keys(r) == {"other:1"}
    assert dead_letter_count(env) == 0


# The rebuild guard: a child made, or made to inherit, after install is captured from its
# DDL on; rows that join or leave the table by INHERIT / NO INHERIT (or a child's DROP)
# are swept.


def test_a_child_created_after_install_is_captured_at_once(env: Env) -> None:
    env.sql(INHERITED)
    config = install(env, ITEMS)
    # A child, and a child of it, made after install: captured from their DDL on.
    env.sql(
        "CREATE TABLE items_c () INHERITS (items);"
        "CREATE TABLE items_cc (note text) INHERITS (items_c)"
    )
    if env.logical:
        assert env.scalar(
            "SELECT array_agg(tablename::text ORDER BY tablename) FROM pg_publication_tables"
        ) == ["items", "items_a", "items_b", "items_c", "items_cc", "sync"]
    else:
        assert int(env.scalar(OURS_ON, ["items_c"])) == 4
        assert int(env.scalar(OURS_ON, ["items_cc"])) == 4
    assert check(config).returncode == 0, check(config).stdout
    r = env.redis()
    with listening(config):
        r.mset({"item:7": "x", "item:sku:c7": "x", "item:8": "x", "other:1": "keep"})
        env.sql("INSERT INTO items_c VALUES (7, 'c7'); INSERT INTO items_cc VALUES (8, 'cc8')")
        wait_until(lambda: r.exists("item:7", "item:sku:c7", "item:8") == 0, what="inserts")
        r.mset({"item:7": "x", "item:sku:c7": "x", "item:sku:cc8": "x"})
        env.sql("UPDATE items_c SET sku = 'c7x' WHERE id = 7")
        env.sql("DELETE FROM items_cc WHERE id = 8")
        wait_until(lambda: r.exists("item:7", "item:sku:c7", "item:sku:cc8") == 0, what="c, cc")
        settle(env, r)
    assert keys(r) == {"other:1"}
    assert dead_letter_count(env) == 0


def test_inherit_of_a_table_with_rows_sweeps_and_captures_it(env: Env) -> None:
    env.sql(INHERITED + "; CREATE TABLE items_d (id int PRIMARY KEY, sku text, more int)")
    env.sql("INSERT INTO items_d VALUES (9, 'd9', 1)")
    config = install(env, ITEMS)
    r = env.redis()
    with listening(config):
        settle(env, r)
        # Its rows' keys, cached before they were the table's: swept by the INHERIT.
        r.mset({"item:9": "x", "item:sku:d9": "x", "other:1": "keep"})
        env.sql("ALTER TABLE items_d INHERIT items")
        wait_until(lambda: r.exists("item:9", "item:sku:d9") == 0, what="swept")
        r.mset({"item:9": "x", "item:sku:d9": "x"})
        env.sql("UPDATE items_d SET sku = 'd9x' WHERE id = 9")
        wait_until(lambda: r.exists("item:9", "item:sku:d9") == 0, what="captured")
        settle(env, r)
    assert keys(r) == {"other:1"}
    assert dead_letter_count(env) == 0
    assert check(config).returncode == 0, check(config).stdout


@pytest.mark.parametrize("capture", ["trigger"])
def test_inherit_of_an_empty_table_does_not_sweep(env: Env) -> None:
    env.sql(INHERITED + "; CREATE TABLE items_e (id int PRIMARY KEY, sku text)")
    install(env, ITEMS)
    env.sql("ALTER TABLE items_e INHERIT items")
    assert int(env.scalar(OURS_ON, ["items_e"])) == 4
    assert int(env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1")) == 0


def test_no_inherit_sweeps(env: Env) -> None:
    env.sql(INHERITED)
    config = install(env, ITEMS)
    r = env.redis()
    with listening(config):
        settle(env, r)
        # items_a's row leaves items: its keys are swept.
        r.mset({"item:1": "x", "item:sku:a1": "x", "other:1": "keep"})
        env.sql("ALTER TABLE items_a NO INHERIT items")
        wait_until(lambda: r.exists("item:1", "item:sku:a1") == 0, what="swept")
        # No longer the table's: in logical mode out of the publication (no dead letters);
        # in trigger mode it keeps its triggers until install, as a detached partition.
        env.sql("UPDATE items_a SET sku = 'a1x' WHERE id = 1")
        settle(env, r)
    assert keys(r) == {"other:1"}
    assert dead_letter_count(env) == 0
    if env.logical:
        assert "items_a" not in env.scalar(
            "SELECT array_agg(tablename::text) FROM pg_publication_tables"
        )
    else:
        assert int(env.scalar(OURS_ON, ["items_a"])) == 4
    assert main(["install", "--config", str(config)]) == 0
    assert int(env.scalar(OURS_ON, ["items_a"])) == 0
    assert check(config).returncode == 0, check(config).stdout


def test_dropping_a_child_with_rows_sweeps(env: Env) -> None:
    env.sql(INHERITED)
    config = install(env, ITEMS)
    r = env.redis()
    with listening(config):
        settle(env, r)
        r.mset({"item:2": "x", "item:sku:b2": "x", "other:1": "keep"})
        env.sql("DROP TABLE items_b")
        wait_until(lambda: r.exists("item:2", "item:sku:b2") == 0, what="swept")
        settle(env, r)
    assert keys(r) == {"other:1"}


@pytest.mark.parametrize("capture", ["logical"])
def test_keep_a_new_child_without_an_identity_warns_and_is_reported(env: Env) -> None:
    """The guard never fails the DBA's DDL: a child it cannot publish is a WARNING, and
    `check` names it."""
    env.sql(
        "CREATE TABLE items (id int PRIMARY KEY, sku text);"
        "CREATE TABLE items_f (id int NOT NULL, sku text);"
        "CREATE TABLE sync (id int PRIMARY KEY)"
    )
    config = logical_config(env, {**ITEMS, **SYNC}, keep=["public.items"])
    assert main(["install", "--config", str(config)]) == 0
    notices: list[str] = []
    with env.connect() as ddl:
        ddl.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        ddl.execute("ALTER TABLE items_f INHERIT items")
    assert any("items_f, an inheritance child of published table" in n for n in notices), notices
    env.sql("INSERT INTO items_f VALUES (1, 'f1'); UPDATE items_f SET sku = 'f1x'")
    done = check(config)
    assert done.returncode != 0
    assert "items_f" in done.stdout + done.stderr


@pytest.mark.parametrize("capture", ["trigger"])
def test_a_child_that_moves_to_another_watched_table_gets_its_triggers(env: Env) -> None:
    """NO INHERIT leaves a child the first table's triggers (until install); INHERIT of
    another watched table replaces them with that one's, and sweeps both; a new child's
    triggers are made without a NOTICE to the DBA."""
    env.sql(INHERITED + "; CREATE TABLE goods (id int PRIMARY KEY, sku text)")
    install(env, {**ITEMS, "public.goods": ["good:{id}"]})
    calls = (
        "SELECT array_agg(DISTINCT p.proname::text) FROM pg_trigger tg"
        " JOIN pg_proc p ON p.oid = tg.tgfoid WHERE tg.tgrelid = 'items_a'::regclass"
    )
    oid = "SELECT %s::regclass::oid"
    goods, items = (f"capture_{env.scalar(oid, [t])}_v1" for t in ("goods", "items"))
    notices: list[str] = []
    with env.connect() as ddl:
        ddl.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        ddl.execute("ALTER TABLE items_a NO INHERIT items")
        assert env.scalar(calls) == [items]
        ddl.execute("ALTER TABLE items_a INHERIT goods")
        ddl.execute("CREATE TABLE goods_z () INHERITS (goods)")
    assert env.scalar(calls) == [goods]
    assert notices == []
    assert env.scalar("SELECT array_agg(table_name ORDER BY id) FROM cdc_invalidator.queue_v1") == [
        "items",
        "goods",
    ]
