"""After the database was restored (docs/DBA.md, "After restoring the database").

From a dump into another cluster, in trigger mode:

pg_dump carries the queue's transaction ids and the listener's saved snapshot as data;
the new cluster's transaction counter runs lower. Unchecked, every change committed
there looks done already to the listener (and is pruned unprocessed). It must refuse to
start, and sql/reset_after_restore.sql must bring it back without losing a change.

After any restore, the sweep the guide gives deletes every watched table's keys (both
modes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict

from cdc_invalidator.cli import main
from cdc_invalidator.pg.queries import Q
from tests.support.config import write_config
from tests.support.env import Env, Servers, drop_database, pg_of, recovered_from
from tests.support.faults import TEMPLATES, cache, changed_and_deleted, keys_of, setup_users
from tests.support.listener import ListenerThread, Spawn, check, listening
from tests.support.servers import find_pg_bindir
from tests.support.sync import install, queue_len, settle
from tests.support.waits import wait_until

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}

# Transaction ids used up in the source first, so that its counter is well past a new
# cluster's (each subtransaction that writes takes an id of its own).
BURN_XIDS = """
CREATE TABLE burn (i int);
DO $$ BEGIN
    FOR i IN 1..3000 LOOP
        BEGIN INSERT INTO burn VALUES (i); EXCEPTION WHEN others THEN NULL; END;
    END LOOP;
END $$;
DROP TABLE burn;
"""


def installed_users(env: Env, replay_history: str = "2h") -> Path:
    """users(id, email) holding 1 a@x, 2 b@x and 3 c@x, installed: the configuration."""
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x'), (3, 'c@x')"
    )
    config = env.config(USERS, replay_history=replay_history)
    assert main(["install", "--config", str(config)]) == 0
    return config


def pg_program(program: str, *args: str, stdin: str | None = None) -> str:
    """One of the test server's programs (pg_dump, psql, pg_restore) run: its stdout."""
    return subprocess.run(
        [str(find_pg_bindir() / program), *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def pg_dump(dsn: str) -> str:
    """The database at `dsn` as pg_dump writes it (plain SQL, no owners)."""
    return pg_program("pg_dump", "--no-owner", "-d", dsn)


def psql(dsn: str, script: str) -> None:
    """`script` run by psql in one transaction, stopping at the first error."""
    pg_program("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-1", "-d", dsn, stdin=script)


@contextlib.contextmanager
def another_database(env: Env, template: str = "template1") -> Iterator[str]:
    """A new database of the test's cluster, a copy of `template`, dropped after (its
    slots first): its DSN."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = env.servers.pg_dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'.encode())
    try:
        yield env.servers.pg_dsn(name)
    finally:
        drop_database(admin, name)


@contextlib.contextmanager
def copy_of(env: Env, how: str) -> Iterator[str]:
    """The test's database as it is now, in a new database of its cluster (dropped
    after): a dump of it restored there ("pg_dump"), or a copy made by CREATE DATABASE
    ... TEMPLATE ("template": no session may be open on it). Its DSN."""
    if how == "template":
        with another_database(env, template=str(conninfo_to_dict(env.dsn)["dbname"])) as dsn:
            yield dsn
        return
    dump = pg_dump(env.dsn)
    with another_database(env) as dsn:
        psql(dsn, dump)
        yield dsn


def test_restored_into_another_cluster_refuses_to_skip_then_resets(
    env: Env, own_servers: Servers, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    env.sql(BURN_XIDS)
    source = installed_users(env, replay_history="1h")
    r = env.redis()
    listener = ListenerThread.from_file(source).start()
    try:
        r.set("user:1", "-")
        env.sql("UPDATE users SET email = 'z@x' WHERE id = 1")
        wait_until(lambda: r.exists("user:1") == 0, what="an invalidation on the source")
    finally:
        listener.stop()
    # A change committed after the listener stopped, and still queued at the dump.
    env.sql("UPDATE users SET email = 'y@x' WHERE id = 2")

    dump = pg_dump(env.dsn)
    restored_dsn = own_servers.pg_dsn("app")
    psql(restored_dsn, dump)
    restored = psycopg.connect(restored_dsn, autocommit=True)
    # Writers on the restored database, before the listener is back.
    restored.execute("UPDATE users SET email = 'x@x' WHERE id = 3")

    # The restored database's own cache: a Redis of its own.
    client = redis.Redis.from_url(own_servers.redis_url, decode_responses=True)
    client.mset({"user:2": "-", "user:email:b@x": "-", "user:3": "-", "user:email:c@x": "-"})
    config = write_config(
        env.tmp_path / "restored.toml",
        database_url=restored_dsn,
        redis_url=own_servers.redis_url,
        tables=USERS,
    )
    # The capture functions are named after the old cluster's table OIDs, and still
    # capture: check said they were dropped and the writes not captured (a review).
    _, out, err = check(config, capsys)
    said = out + err
    assert "named after the OID the table had before a dump and restore" in said, said
    assert "its writes are not captured" not in said, said
    first = spawn(config)
    assert first.wait() == 1
    fatal = first.logged("cannot_consume")
    assert len(fatal) == 1, first.lines()
    assert "restored from a dump into another cluster" in fatal[0]["error"]
    assert "reset_after_restore.sql" in fatal[0]["error"]
    assert client.exists("user:3") == 1
    assert restored.execute("SELECT count(*) FROM cdc_invalidator.queue_v1").fetchone() != (0,), (
        "nothing pruned unprocessed"
    )

    with restored.transaction():
        restored.execute(Q.RESET_AFTER_RESTORE.text.encode())
    second = spawn(config)
    wait_until(
        lambda: client.exists("user:3", "user:email:c@x", "user:2", "user:email:b@x") == 0,
        what="the change made after the restore, and the one queued at the dump",
    )
    client.mset({"user:3": "-"})
    restored.execute("UPDATE users SET email = 'w@x' WHERE id = 3")
    wait_until(lambda: client.exists("user:3") == 0, what="a change after the reset")
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    restored.close()
    client.close()


RESYNCS = "SELECT count(*) FROM cdc_invalidator.queue_v1 WHERE new_row::jsonb ? 'resync'"


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("how", ["pg_dump", "template"])
def test_a_dump_restored_or_a_copy_in_the_same_cluster_is_swept_once(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    """A dump restored into another database of the same cluster, or a copy made by
    CREATE DATABASE ... TEMPLATE (as a snapshot before a risky change, renamed into place
    later): the same system identifier and timeline as the source, so the lineage cannot
    tell it. The database went back to the dump's or copy's time; a value read from the
    source after it stays cached unless swept. listener_state_v1's row came with it,
    recorded in the source's table (a dump) or database (a copy, which keeps the table's
    oid). Trigger mode: install leaves it, `check` says the next start sweeps, which it
    does, once. Logical mode: the copy needs a slot of its own, so an install, which owes
    the sweep; the listener does it, once."""
    source = installed_users(env)
    r = env.redis()
    with listening(source):
        r.set("user:1", "-")
        env.sql("UPDATE users SET email = 'z@x' WHERE id = 1")
        wait_until(lambda: r.exists("user:1") == 0, what="an invalidation on the source")
    with copy_of(env, how) as restored_dsn:
        with listening(source):
            # After the copy: changed, invalidated, read again and cached by a reader.
            r.set("user:2", "-")
            env.sql("UPDATE users SET email = 'y@x' WHERE id = 2")
            wait_until(lambda: r.exists("user:2") == 0, what="the change after the copy")
        r.mset({"user:2": "y@x", "user:email:y@x": "2", "user:3": "c@x", "other:1": "-"})
        mode = {"capture": "logical", "slot_name": "restored"} if env.logical else {}
        config = write_config(
            env.tmp_path / "restored.toml",
            database_url=restored_dsn,
            redis_url=env.redis_url,
            tables=USERS,
            replay_history="1h",  # (trigger mode: the sweep kept, to count)
            **mode,
        )
        # (Logical mode: for a slot of its own. Trigger mode: `check` advises it for the
        # capture functions, named after the source's table OIDs; it leaves the mark.)
        assert main(["install", "--config", str(config)]) == 0
        if env.logical:
            said = "missed_changes_swept"
        else:
            _, out, err = check(config, capsys)
            assert "this database was restored from a dump" in out + err, out + err
            said = "changes_may_have_been_missed"
        first = spawn(config)
        wait_until(
            lambda: r.exists("user:2", "user:email:y@x", "user:3") == 0,
            what="every watched key swept: user 2 is b@x again here",
        )
        wait_until(lambda: first.logged(said), what=said)
        (missed,) = first.logged(said)
        assert "restored from a dump" in missed["reason"]
        assert r.get("other:1") == "-"
        first.signal(signal.SIGTERM)
        assert first.wait() == 0

        # Started again: nothing more to sweep. (The first's sweep may be deleted again
        # as its second deletes: no key tells.)
        second = spawn(config)
        r.set("user:3", "-")
        with psycopg.connect(restored_dsn, autocommit=True) as conn:
            conn.execute("UPDATE users SET email = 'w@x' WHERE id = 3")
            wait_until(lambda: r.exists("user:3") == 0, what="a change on the restored database")
            if not env.logical:
                assert conn.execute(RESYNCS).fetchone() == (1,)
        assert not second.logged(said)
        second.signal(signal.SIGTERM)
        assert second.wait() == 0


def renamed(admin: str, *names: tuple[str, str]) -> None:
    """Databases renamed, in order: (from, to)."""
    with psycopg.connect(admin, autocommit=True) as conn:
        for old, new in names:
            conn.execute(f'ALTER DATABASE "{old}" RENAME TO "{new}"'.encode())


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("settled", [True, False], ids=["copy-swept", "copy-sweep-unknown"])
def test_the_original_renamed_back_after_a_copy_served_is_swept(
    env: Env, spawn: Spawn, settled: bool
) -> None:
    """A copy made by CREATE DATABASE ... TEMPLATE renamed into the database's place (a
    rollback) serves for a while: a change there, invalidated, read again and cached.
    Then the original is renamed back (the rollback undone). Its rows were recorded where
    they are, so nothing in it tells; the source mark the listener keeps in Redis does
    (another database's oid under this name; or, when the copy's listener stopped before
    its own sweep was done, that sweep owed), and the listener's next start sweeps every
    watched table once (a review reproduced the value staying cached)."""
    installed_users(env)
    # (no second deletes: a key cached after a change is deleted again only by a sweep)
    config = env.config(USERS, second_delete_ms=0, source_mark=True)
    r = env.redis()
    with listening(config):
        r.set("user:1", "-")
        env.sql("UPDATE users SET email = 'z@x' WHERE id = 1")
        wait_until(lambda: r.exists("user:1") == 0, what="a change on the original")
    name = str(conninfo_to_dict(env.dsn)["dbname"])
    copy, aside = f"{name}_copy", f"{name}_aside"
    admin = env.servers.pg_dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{name}"'.encode())
    try:
        renamed(admin, (name, aside), (copy, name))
        # (unsettled: its sweep's end is looked at only after a minute, long after it stops)
        looks = {} if settled else {"redis_check_interval_ms": 60_000}
        # (logical mode: the original's slot is the original database's)
        slot = {"slot_name": "copy"} if env.logical else {}
        on_copy = env.config(
            USERS, name="copy.toml", second_delete_ms=0, source_mark=True, **looks, **slot
        )
        if env.logical:
            assert main(["install", "--config", str(on_copy)]) == 0
        serving = spawn(on_copy)
        wait_until(
            lambda: serving.logged("changes_may_have_been_missed"),
            what="the copy swept for as it took the name",
        )
        r.set("user:2", "-")
        env.sql("UPDATE users SET email = 'y@x' WHERE id = 2")
        wait_until(lambda: r.exists("user:2") == 0, what="a change on the copy")
        if settled:
            wait_until(lambda: serving.logged("source_sweep_done"), what="the copy's sweep")
        serving.signal(signal.SIGTERM)
        assert serving.wait() == 0
        r.mset({"user:2": "y@x", "user:email:y@x": "2"})
        renamed(admin, (name, copy), (aside, name))
        back = spawn(config)
        wait_until(
            lambda: r.exists("user:2", "user:email:y@x") == 0,
            what="every watched key swept: user 2 is b@x on the original",
        )
        reasons = [m["reason"] for m in back.logged("changes_may_have_been_missed")]
        said = "not the one this Redis" if settled else "is not known to be done"
        assert any(said in reason for reason in reasons), reasons
        back.signal(signal.SIGTERM)
        assert back.wait() == 0
    finally:
        drop_database(admin, copy)
        drop_database(admin, aside)


def test_a_dump_restored_over_the_same_database_is_swept(env: Env, spawn: Spawn) -> None:
    """Trigger mode, `pg_restore --clean` over the database the dump was taken from, the
    listener stopped meanwhile: our tables are made again, and the listener's next start
    sweeps every watched table."""
    config = installed_users(env)
    r = env.redis()
    dump = env.tmp_path / "app.dump"
    with listening(config):
        pg_program("pg_dump", "-Fc", "-f", str(dump), "-d", env.dsn)
        r.set("user:2", "-")
        env.sql("UPDATE users SET email = 'y@x' WHERE id = 2")
        wait_until(lambda: r.exists("user:2") == 0, what="the change after the dump")
    r.mset({"user:2": "y@x", "user:email:y@x": "2", "user:1": "a@x"})
    pg_program("pg_restore", "--clean", "-d", env.dsn, str(dump))
    listener = spawn(config)
    wait_until(
        lambda: r.exists("user:2", "user:email:y@x", "user:1") == 0,
        what="every watched key swept: user 2 is b@x again",
    )
    (missed,) = listener.logged("changes_may_have_been_missed")
    assert "restored from a dump" in missed["reason"]
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


@pytest.mark.parametrize("into", ["ev_2", "ev_0"])  # made after install; installed with it
def test_a_data_only_restore_with_disabled_triggers_is_swept(env: Env, into: str) -> None:
    """Trigger mode, `pg_restore --data-only --disable-triggers`: it turns off every
    trigger of the table around its COPY (a partition made after install: its copy of
    the table's row trigger and its TRUNCATE trigger, all that captures it until
    install); its ENABLE TRIGGER ALL sweeps the table's keys."""
    env.sql(
        "CREATE TABLE ev (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);"
        "CREATE TABLE ev_0 PARTITION OF ev FOR VALUES FROM (0) TO (100);"
        "INSERT INTO ev VALUES (5, 'a')"
    )
    config = install(env, {"public.ev": ["ev:{id}"]}, second_delete_ms=0)
    r = env.redis()
    dump = env.tmp_path / "part.dump"
    with listening(config):
        env.sql(
            "CREATE TABLE ev_2 PARTITION OF ev FOR VALUES FROM (200) TO (300);"
            "INSERT INTO ev_2 VALUES (250, 'a')"
        )
        pg_program("pg_dump", "-Fc", "--data-only", "-t", into, "-f", str(dump), "-d", env.dsn)
        env.sql(f"DELETE FROM {into}")
        settle(env, r)
        r.mset({"ev:5": "-", "ev:250": "-"})  # read while the rows were gone
        pg_program("pg_restore", "--data-only", "--disable-triggers", "-d", env.dsn, str(dump))
        wait_until(lambda: r.exists("ev:5", "ev:250") == 0, what="ev's templates swept")


RECORDED_ELSEWHERE = "UPDATE cdc_invalidator.slot_state_v1 SET recorded_in = 1"
COPIED_FROM_ELSEWHERE = "UPDATE cdc_invalidator.slot_state_v1 SET recorded_in_database = 1"
OWED = "SELECT resync_reason FROM cdc_invalidator.slot_state_v1 WHERE slot_name = %s"


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("capture", ["logical"])
@pytest.mark.parametrize(
    "elsewhere", [RECORDED_ELSEWHERE, COPIED_FROM_ELSEWHERE], ids=["restored", "copied"]
)
def test_a_slot_row_a_restore_copied_is_swept_for_by_the_listener_once(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str], elsewhere: str
) -> None:
    """Logical mode, a restore that keeps the slot (pg_restore --clean over the same
    database), stood in for by a row recorded in another table, or a copy of another
    database (its slot kept by a DBA who renamed the two), by a row recorded in another
    database: the listener sweeps at connect and records it, so neither its next start
    nor a later install (an upgrade, a configuration change) owes another sweep (a
    review: install alone recorded it, and swept again months later). An upgrade's
    install owes nothing either; `check` on the restored database says the sweep is
    coming, and an install run before the listener owes it, and says so."""
    config = setup_users(env, rows=2)
    slot = env.scalar("SELECT slot_name FROM cdc_invalidator.slot_state_v1")
    env.sql(
        "ALTER TABLE cdc_invalidator.slot_state_v1 DROP COLUMN recorded_in,"
        " DROP COLUMN recorded_in_database;"
        "CREATE OR REPLACE FUNCTION cdc_invalidator.schema_revision() RETURNS integer"
        " LANGUAGE sql IMMUTABLE AS 'SELECT 7'"
    )
    assert main(["install", "--config", str(config)]) == 0
    assert env.scalar(OWED, [slot]) is None, "an upgrade from revision 7 owes nothing"
    env.sql(elsewhere)
    r = env.redis()
    cache(r, [1, 2])
    first = spawn(config)
    wait_until(lambda: r.exists(*keys_of(1), *keys_of(2)) == 0, what="every key swept")
    wait_until(lambda: first.logged("missed_changes_swept"), what="the sweep said")
    (missed,) = first.logged("changes_may_have_been_missed")
    assert "restored from a dump" in missed["reason"]
    first.signal(signal.SIGTERM)
    assert first.wait() == 0
    assert main(["install", "--config", str(config)]) == 0
    assert env.scalar(OWED, [slot]) is None, "install owes nothing more"
    second = spawn(config)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert not second.logged("changes_may_have_been_missed")
    second.signal(signal.SIGTERM)
    assert second.wait() == 0
    # The same restore, with `check`, then `install`, run before the listener: each says
    # it, and install owes the sweep.
    env.sql(elsewhere)
    _, out, err = check(config, capsys)
    assert "this database was restored from a dump" in out + err, out + err
    assert main(["install", "--config", str(config)]) == 0
    assert "restored from a dump" in capsys.readouterr().out
    assert "restored from a dump" in env.scalar(OWED, [slot])


STATE_IN_TABLE = (
    "SELECT recorded_in = 'cdc_invalidator.listener_state_v1'::regclass"
    " FROM cdc_invalidator.listener_state_v1"
)


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("capture", ["logical"])
def test_a_restore_logical_mode_swept_for_is_not_swept_again_at_a_switch(
    env: Env, spawn: Spawn
) -> None:
    """A restore swept for in logical mode: its listener records slot_state_v1's marks,
    and listener_state_v1's stays as the dump left it (that role may not write it). A
    switch to trigger mode then sweeps once, for the switch, and records that mark too:
    the trigger listener sweeps nothing more (a review: it swept again, saying the
    database was restored)."""
    config = setup_users(env, rows=2)
    env.sql(RECORDED_ELSEWHERE + "; UPDATE cdc_invalidator.listener_state_v1 SET recorded_in = 1")
    r = env.redis()
    logical = spawn(config)
    wait_until(lambda: logical.logged("missed_changes_swept"), what="the restore swept for")
    logical.signal(signal.SIGTERM)
    assert logical.wait() == 0
    assert env.scalar(STATE_IN_TABLE) is False, "left as the dump did"
    trigger = write_config(
        env.tmp_path / "trigger.toml",
        database_url=env.dsn,
        redis_url=env.redis_url,
        tables={"public.users": TEMPLATES},
    )
    assert main(["install", "--config", str(trigger)]) == 0
    assert env.scalar(STATE_IN_TABLE) is True
    listener = spawn(trigger)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert not listener.logged("changes_may_have_been_missed")
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


# As docs/DBA.md gives them: after any restore, sweep the watched tables' keys once.
SWEEP_TRIGGER = """
INSERT INTO cdc_invalidator.queue_v1 (schema_name, table_name, op)
SELECT n.nspname, c.relname, 'T'
FROM cdc_invalidator.watched_v1 w
JOIN pg_class c ON c.oid = w.relid JOIN pg_namespace n ON n.oid = c.relnamespace;
"""
SWEEP_LOGICAL = """
UPDATE cdc_invalidator.slot_state_v1
SET resync_reason = 'database restored from a backup';
"""


@pytest.mark.usefixtures("capture")
def test_the_sweep_after_a_restore_deletes_every_watched_key(env: Env, spawn: Spawn) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    config = env.config(USERS)
    assert main(["install", "--config", str(config)]) == 0
    r = env.redis()
    r.mset({"user:1": "-", "user:email:a@x": "-", "user:2": "-", "other:1": "-"})
    if env.logical:
        env.sql(SWEEP_LOGICAL)
        listener = spawn(config)
        wait_until(lambda: listener.logged("missed_changes_swept"), what="the sweep")
    else:
        listener = spawn(config)
        env.sql(SWEEP_TRIGGER)
    wait_until(lambda: r.keys("user:*") == [], what="every watched key swept")
    assert r.get("other:1") == "-"
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


def test_a_server_without_the_last_transactions_is_read_from_its_saved_position(
    own_env: Env,
) -> None:
    """Trigger mode: the listener reconnects to a server that lacks the transactions it
    read last (a standby promoted before it received them; here a cold copy of the data
    directory taken earlier, on the same port). That server hands those transaction ids
    out again: read on from the position reached on the old server, its new
    transactions would look done already and be skipped. It resumes from the position
    saved there instead."""
    env = own_env
    pg = pg_of(env)
    rows = 20
    # (second deletes off: those of the keys deleted before the copy came up would
    # delete the keys cached after it, whatever the listener read there)
    config = setup_users(env, rows=rows, second_delete_ms=0)
    r = env.redis()
    copy = pg.datadir.with_name("copy")
    with listening(config) as listener:
        wait_until(lambda: listener.runner.postgres.available, what="the listener connected")
        pg.stop()
        shutil.copytree(pg.datadir, copy, symlinks=True)
        if (owner := pg.user) is not None:  # (copied as root)
            for path in [copy, *copy.rglob("*")]:
                shutil.chown(path, owner, owner)
        pg.start()
        # Transactions the copy will not have, read by the listener.
        with env.connect() as conn:
            for i in range(300):
                conn.execute("UPDATE users SET email = %s WHERE id = %s", [f"{i}@x", 1 + i % rows])
        wait_until(lambda: queue_len(env) == 0, what="the copy's missing transactions read")

        pg.stop()  # the old server is gone; the copy comes up in its place
        shutil.rmtree(pg.datadir)
        copy.rename(pg.datadir)
        pg.start()
        read = listener.runner.events_processed
        cache(r, range(1, rows + 1))
        with env.connect() as conn:
            for i in range(1, rows + 1):
                conn.execute("UPDATE users SET email = %s WHERE id = %s", [f"new{i}@x", i])
        wait_until(
            lambda: r.exists(*[k for i in range(1, rows + 1) for k in keys_of(i)]) == 0,
            timeout_s=30,
            what="the changes committed on the copy invalidated",
        )
        # Read from the queue (counted once acknowledged, after Redis deleted the keys).
        wait_until(
            lambda: listener.runner.events_processed >= read + rows,
            what="the changes committed on the copy counted",
        )
        assert listener.runner.postgres.failures >= 2  # both stops were seen


def test_transaction_ids_a_crash_hands_out_again_are_not_skipped(own_env: Env) -> None:
    """Trigger mode: a crash of any backend restarts every session, and PostgreSQL
    recovers without its postmaster restarting (pg_postmaster_start_time() unchanged).
    The WAL not yet flushed is lost, and with it the ids of the transactions that ended
    in it (here rollbacks and asynchronous commits, with the WAL writer stopped): the
    listener had read past them, and recovery hands them out again. Read on from the
    position in memory, the transactions that got them were skipped, their keys cached
    for good (the position saved past them too). It resumes from the position saved."""
    env = own_env
    # (no sweep after the crash either, which would delete the keys this test caches
    # after it whether or not their changes were read: tests/test_crash_sweep.py)
    config = setup_users(env, rows=10, second_delete_ms=0, sweep_after_crash="never")
    r = env.redis()

    def walwriter() -> int:
        pid = env.scalar("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walwriter'")
        assert isinstance(pid, int)
        return pid

    with listening(config) as listener:
        wait_until(lambda: listener.runner.postgres.available, what="the listener connected")
        writer = walwriter()
        env.sql("CHECKPOINT")  # what came before is on disk (the tests' commits are async)
        os.kill(writer, signal.SIGSTOP)  # what ends from now on stays in WAL buffers
        try:
            with env.connect() as conn:
                for _ in range(20):  # ids handed out, never flushed
                    conn.execute("BEGIN")
                    conn.execute("SELECT pg_current_xact_id()")
                    conn.execute("ROLLBACK")
                conn.execute("SET synchronous_commit = off")
                cache(r, [1])
                conn.execute("UPDATE users SET email = 'async@x' WHERE id = 1")
            # The listener reads past them (its snapshot's xmax beyond every one).
            wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the listener past them")
            failures = listener.runner.postgres.failures
        finally:
            # A crash: every session ends, WAL buffers lost. (SIGKILL ends a stopped
            # process too; the postmaster may have reaped it before the SIGCONT.)
            os.kill(writer, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(writer, signal.SIGCONT)
        wait_until(lambda: listener.runner.postgres.failures > failures, what="the crash seen")
        wait_until(lambda: recovered_from(env, writer), what="PostgreSQL recovered")
        wait_until(lambda: listener.runner.postgres.available, what="the listener back")
        ids = range(2, 11)
        cache(r, ids)
        with env.connect() as conn:
            for i in ids:  # (each a transaction of its own: ids the crash lost)
                conn.execute("UPDATE users SET email = %s WHERE id = %s", [f"new{i}@x", i])
        wait_until(
            lambda: r.exists(*[k for i in ids for k in keys_of(i)]) == 0,
            what="the changes committed after the crash invalidated",
        )


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("capture", ["logical"])
def test_a_slot_made_again_behind_where_the_old_one_was_confirmed_sweeps(
    env: Env, spawn: Spawn
) -> None:
    """A dump restored into another cluster carries slot_state_v1, not the slot, and the
    new cluster's WAL positions run lower. `install` first (as `check` advises) made the
    slot there and owed no sweep: only a slot made again at a position past the old one
    owed one. The changes the old slot held stayed cached (a review, 15 to 18 by
    pg_dump). Stood in for here by a confirmed position past this server's."""
    config = setup_users(env, rows=3)
    r = env.redis()
    env.sql(
        "SELECT pg_drop_replication_slot('cdc_invalidator');"
        "UPDATE cdc_invalidator.slot_state_v1"
        " SET acked_lsn = pg_current_wal_lsn() + 1000000000, resync_reason = NULL"
    )
    cache(r, [1, 2])
    assert main(["install", "--config", str(config)]) == 0
    owed = env.scalar("SELECT resync_reason FROM cdc_invalidator.slot_state_v1")
    assert owed is not None
    assert "another server" in owed, owed
    listener = spawn(config)
    wait_until(lambda: listener.logged("missed_changes_swept"), what="the sweep")
    assert r.exists(*keys_of(1), *keys_of(2)) == 0
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0
