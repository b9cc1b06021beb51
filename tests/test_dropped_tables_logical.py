"""Logical mode: a published table dropped and made again under its name, many times.

The rebuild guard publishes each newcomer (a row in published_v1, and in
replica_identity_v1 where it set FULL); a dropped table's row is kept while a listener
may still decode changes made before the drop, and no longer: the guard forgets it once
every logical slot of the database has confirmed past the drop (sql/rebuild_guard.sql,
prune_dropped_v1()). Counts of rows, never timings.
"""

from __future__ import annotations

from functools import partial

import pytest
import redis

from cdc_invalidator.capture.pgoutput import Decoder
from cdc_invalidator.capture.relations import Known, Relations
from tests.support.env import Env
from tests.support.logical import install, logical_config, running
from tests.support.waits import wait_until

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}  # email: FULL identity
CYCLES = 12
REBUILD = (
    "DROP TABLE users; CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
    "INSERT INTO users VALUES (1, 'a@x', 'A')"
)


def rows(env: Env) -> tuple[int, int]:
    return (
        env.scalar("SELECT count(*) FROM cdc_invalidator.published_v1"),
        env.scalar("SELECT count(*) FROM cdc_invalidator.replica_identity_v1"),
    )


def caught_up(env: Env, lsn: str) -> bool:
    """Every logical slot of the database has confirmed past `lsn`."""
    return bool(
        env.scalar(
            "SELECT bool_and(confirmed_flush_lsn >= %s::pg_lsn)"
            " FROM pg_replication_slots WHERE database = current_database()",
            [lsn],
        )
    )


def changed(env: Env, statement: str) -> str:
    """Run `statement` and commit; a WAL position within its transaction, which the slot
    is confirmed past once the listener has done the change (its commit's end). Not a
    position read after the commit: WAL written since by any session (the listener's own
    books, autovacuum, a standby snapshot) may take it past what an idle listener
    confirms, which chases no WAL but its changes' under CHASE_BYTES (the test then timed
    out, the slot 64 bytes short of a page boundary; and again, in CI, the slot at the
    update's commit end). Read in an explicit transaction: the connection is autocommit,
    and a second execute() ran after the first's commit."""
    with env.connect() as conn, conn.transaction():
        conn.execute(statement)
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert lsn is not None
    return str(lsn[0])


@pytest.fixture
def decoders(monkeypatch: pytest.MonkeyPatch) -> list[Decoder]:
    """Every Decoder the listener makes: its Relation messages (packs.Collector reads
    the same dict)."""
    made: list[Decoder] = []
    init = Decoder.__init__

    def kept(self: Decoder, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(Decoder, "__init__", kept)
    return made


def gone(r: redis.Redis, key: str) -> bool:
    return r.exists(key) == 0


def processed(env: Env, r: redis.Redis) -> None:
    """The listener has deleted a change's key and the slot has confirmed past it. The
    slot first: the key alone may be gone before the update is read (the rebuild's own
    INSERT deletes it, and its sweep), while the slot passes the update only once Redis
    confirmed its deletes."""
    r.set("user:1", "cached")
    written = changed(env, "UPDATE users SET name = name || '.' WHERE id = 1")
    wait_until(lambda: caught_up(env, written), what="the slot confirming past the update")
    assert r.exists("user:1") == 0, "the update's key deleted"


def test_rows_of_dropped_tables_stay_bounded_with_the_listener_keeping_up(
    env: Env, monkeypatch: pytest.MonkeyPatch, decoders: list[Decoder]
) -> None:
    # The listener's map of relids (read again at each newcomer's Relation message).
    sizes: list[int] = []
    configured = Relations._configured

    def counted(self: Relations) -> Known:
        known = configured(self)
        sizes.append(len(known))
        return known

    monkeypatch.setattr(Relations, "_configured", counted)
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    env.sql("INSERT INTO users VALUES (1, 'a@x', 'A')")
    config = logical_config(env, USERS)
    install(config)
    assert rows(env) == (1, 1)
    r = env.redis()
    with running(env, config):
        for _ in range(CYCLES):
            env.sql(REBUILD)
            processed(env, r)
        described = len(decoders[-1].relations)
        # Each newcomer's changes are still decoded with exact keys.
        r.mset({"user:1": "cached", "user:email:a@x": "1"})
        env.sql("UPDATE users SET name = 'z' WHERE id = 1")
        wait_until(lambda: r.exists("user:1", "user:email:a@x") == 0, what="the exact keys")
    published, identities = rows(env)
    # Without pruning: CYCLES + 1 of each. With it: the live table's, and the last drops'
    # a DDL has not pruned since the slot passed them.
    assert published <= 3, published
    assert identities <= 2, identities
    assert sizes
    assert sizes[-1] <= 3, sizes
    assert described <= 3, described
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_a_listener_behind_the_drops_still_maps_the_changes_made_before_them(env: Env) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    env.sql("INSERT INTO users VALUES (1, 'a@x', 'A')")
    config = logical_config(env, USERS)
    install(config)
    r = env.redis()
    # No listener: the slot stays before every change below, so no published_v1 row may
    # be pruned.
    for i in range(CYCLES):
        env.sql(f"UPDATE users SET name = 'v{i}' WHERE id = 1")
        env.sql(REBUILD)
    assert rows(env) == (CYCLES + 1, 1)  # (an identity is nothing to put back once dropped)
    written = changed(env, "UPDATE users SET name = 'last' WHERE id = 1")
    r.mset({"user:1": "cached", "user:email:a@x": "1"})
    with running(env, config):
        wait_until(lambda: caught_up(env, written), what="the listener catching up")
        wait_until(lambda: r.exists("user:1", "user:email:a@x") == 0, what="the keys")
        # Every dropped table's changes mapped to the configured table: no dead letter.
        assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0
        # Past the drops now: the next DDL forgets them.
        env.sql(REBUILD)
        processed(env, r)
        env.sql("CREATE TABLE unrelated (id int); DROP TABLE unrelated")
    published, identities = rows(env)
    assert published <= 3, published
    assert identities <= 2, identities


BROKEN_PRUNE = """
CREATE OR REPLACE FUNCTION cdc_invalidator.prune_dropped_v1() RETURNS void
LANGUAGE plpgsql AS $$BEGIN RAISE EXCEPTION 'prune broken'; END$$
"""


@pytest.mark.parametrize("mode", ["logical", "trigger"])
def test_a_failing_prune_is_a_warning_never_a_failed_ddl(env: Env, mode: str) -> None:
    """The guard's prune (forget_dropped_v1(), sql/rebuild_guard.sql) failing: every DDL
    command the guard sees goes on, with a WARNING, and the drop's sweep is kept. Also
    once a trigger-mode install followed the logical one: it keeps the
    prune_dropped_v1() that install made (logical.sql is logical mode's alone)."""
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    install(logical_config(env, USERS))
    env.sql(BROKEN_PRUNE)
    if mode == "trigger":
        install(env.config(USERS))
        assert env.scalar("SELECT count(*) FROM pg_publication") == 0
        assert env.scalar("SELECT to_regprocedure('cdc_invalidator.prune_dropped_v1()')")
    swept = "SELECT count(*) FROM cdc_invalidator.queue_v1 WHERE op = 'T'"
    queued = env.scalar(swept) if mode == "trigger" else 0
    notices: list[str] = []
    with env.connect() as ddl:
        ddl.autocommit = True
        ddl.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        ddl.execute("ALTER TABLE users ADD COLUMN note text")  # (rebuilt_v1)
        ddl.execute("DROP TABLE users")  # (dropped_v1)
        ddl.execute("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    said = "the rebuild guard could not forget dropped tables (prune broken)"
    assert [n for n in notices if said in n] == [n for n in notices if "forget" in n]
    assert len([n for n in notices if said in n]) == 3  # one a command
    assert env.scalar("SELECT count(*) FROM users") == 0  # (made again)
    if mode == "trigger":  # the drop's sweep, and the newcomer's, queued
        assert env.scalar(swept) == queued + 2


def test_partitions_made_and_dropped_in_turn_leave_no_relation_behind(
    env: Env, decoders: list[Decoder]
) -> None:
    """A published partitioned table rotated (a partition made, another dropped, as a
    daily job does): each partition's changes come under its own relation, resolved
    through its configured ancestor; a dropped one is forgotten by the Decoder once the
    stream is read past its drop. (Partitions have no row in published_v1: before, the
    listener kept each one's relation for good.)"""
    env.sql(
        "CREATE TABLE events (id int, day int, PRIMARY KEY (id, day)) PARTITION BY LIST (day);"
        "CREATE TABLE events_0 PARTITION OF events FOR VALUES IN (0)"
    )
    config = logical_config(env, {"public.events": ["ev:{id}"]})
    install(config)
    r = env.redis()
    with running(env, config):
        for day in range(1, CYCLES + 1):
            env.sql(f"CREATE TABLE events_{day} PARTITION OF events FOR VALUES IN ({day})")
            r.set(f"ev:{day}", "cached")
            env.sql(f"INSERT INTO events VALUES ({day}, {day})")
            wait_until(partial(gone, r, f"ev:{day}"), what="the new row's key")
            env.sql(f"DROP TABLE events_{day - 1}")
        described = {relid for d in decoders for relid in d.relations}
    # Of CYCLES + 1 partitions: the live one, and the last ones dropped the stream was
    # not read past when the last Relation message came.
    assert len(described) <= 3, described
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0
