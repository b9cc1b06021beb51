"""Two-phase commit on watched tables (trigger mode), on real PostgreSQL and Redis.

PostgreSQL refuses to PREPARE a transaction that sent a NOTIFY, and a capture function
wakes the listener with one while it is quiet (as here: no listener is busy). A session
that sets `cdc_invalidator.notify = off` (ALTER ROLE ... SET, for the roles whose
transactions are prepared) is captured without the wake-up: its transactions can be
prepared, and the listener's poll finds their rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from cdc_invalidator.cli import main
from cdc_invalidator.pg.queries import Q
from tests.support.env import Env, pg_of
from tests.support.faults import (
    NOTIFY_ROW,
    cache,
    forged_payload,
    keys_of,
    setup_users,
    update_without_notify,
)
from tests.support.listener import Spawn, check, listening, stop_listener
from tests.support.logs import captured_logs
from tests.support.waits import wait_until

pytestmark = pytest.mark.servers

ROWS = 10


@pytest.fixture
def prepared_env(own_env: Env) -> Iterator[Env]:
    """own_env's server with prepared transactions allowed (a restart)."""
    own_env.sql("ALTER SYSTEM SET max_prepared_transactions = 4")
    pg_of(own_env).restart()
    yield own_env
    # Whatever a failed test left prepared would keep its locks.
    with own_env.connect() as conn:
        for (gid,) in conn.execute("SELECT gid FROM pg_prepared_xacts").fetchall():
            conn.execute(f"ROLLBACK PREPARED '{gid}'".encode())


def prepare(env: Env, gid: str, *, notify: str | None) -> None:
    """One single-row and one several-row UPDATE of users, PREPAREd as `gid`; the
    session's cdc_invalidator.notify set to `notify` first (None: left alone)."""
    with env.connect() as conn:
        if notify is not None:
            conn.execute("SELECT set_config('cdc_invalidator.notify', %s, false)", [notify])
        conn.execute("BEGIN")
        conn.execute("UPDATE users SET email = email || '.' WHERE id = 1")
        conn.execute("UPDATE users SET email = email || '.' WHERE id > 1")
        conn.execute(f"PREPARE TRANSACTION '{gid}'".encode())


@pytest.mark.parametrize("notify_payload", [False, True], ids=["wake-up", "payload"])
def test_a_session_with_notify_off_can_prepare_and_its_changes_are_invalidated(
    prepared_env: Env, notify_payload: bool
) -> None:
    env = prepared_env
    config = setup_users(env, rows=ROWS, notify_payload=notify_payload, poll_interval_ms=200)
    r = env.redis()
    with listening(config):
        # As PostgreSQL has it: no PREPARE after a NOTIFY, so not by default.
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="NOTIFY"):
            prepare(env, "refused", notify=None)
        assert env.scalar("SELECT count(*) FROM pg_prepared_xacts") == 0

        cache(r, range(1, ROWS + 1))
        prepare(env, "prepared", notify="off")
        assert env.scalar("SELECT count(*) FROM pg_prepared_xacts") == 1
        env.sql("COMMIT PREPARED 'prepared'")
        wait_until(
            lambda: r.exists(*[k for i in range(1, ROWS + 1) for k in keys_of(i)]) == 0,
            what="the prepared transaction's keys deleted, found by the poll",
        )


@pytest.mark.parametrize("made", ["notify-off", "busy", "busy-draining"])
def test_a_payload_sent_after_prepare_never_stands_for_the_prepared_row(
    prepared_env: Env, made: str
) -> None:
    """A prepared transaction leaves its backend, which may then send any NOTIFY (a
    pooled session), or exit and have its pid taken by another's. A payload naming the
    prepared transaction and its row, sent by that very backend, deletes the keys before
    COMMIT PREPARED; the row must still be deleted once committed. A session with notify
    off queues no pid for a payload to match; one that wrote while the listener was busy
    (sent nothing, so PREPARE passed) queued its pid (a review): the queue read after the
    early delete sees the transaction still open, and forgets the early delete. So too
    when that read continues a window being drained in chunks, whose snapshot is older
    than the payload (a second review): each read judges by the snapshot it ran in."""
    env = prepared_env
    draining = made == "busy-draining"
    config = setup_users(
        env, rows=ROWS, notify_payload=True, second_delete_ms=0, batch_size=5 if draining else 500
    )
    r = env.redis()
    with (
        captured_logs() as logs,
        listening(config) as listener,
        env.connect() as writer,
        env.connect() as busy,
    ):
        # (LISTENing before the forged payload is sent: one sent before is not delivered)
        wait_until(lambda: listener.runner.active, what="the listener consuming")
        cache(r, [1])
        if made.startswith("busy"):
            # The busy lock held as a busy listener holds it: no payload, the pid queued.
            assert busy.execute(Q.BUSY.sql).fetchone() == (True,)
            writer.execute("BEGIN")
            writer.execute("UPDATE users SET email = email WHERE id = 1")
            found = writer.execute("SELECT pg_current_xact_id()::text").fetchone()
            assert found is not None
            xid = int(found[0])
            writer.execute("PREPARE TRANSACTION 'forged'")
            assert busy.execute(Q.QUIET.sql).fetchone() == (True,)
        else:
            xid = update_without_notify(writer, 1)
            writer.execute("PREPARE TRANSACTION 'forged'")
        if draining:
            # A backlog (no wake-up: found by the poll), read 5 rows at a time: a window
            # of 3,000 chunks, the payload delivered while they are read.
            with env.connect() as bulk:
                bulk.execute("SET cdc_invalidator.notify = 'off'")
                # (one row a statement: one queue row each; a statement of several
                # rows is queued in packs of 1,000, a chunk each, soon read)
                bulk.execute(
                    "DO $$BEGIN FOR i IN 1000..15999 LOOP"
                    " INSERT INTO users VALUES (i, 'b' || i); END LOOP; END$$"
                )
            wait_until(lambda: listener.runner.events_processed >= 100, what="the drain begun")
        # From the same backend, now free: delivered at once.
        writer.execute(NOTIFY_ROW, [forged_payload(xid, 1)])
        wait_until(lambda: not any(r.exists(k) for k in keys_of(1)), what="the early delete")
        cache(r, [1])  # a reader refills the cache from the row as it was
        wait_until(
            lambda: any(line["event"] == "payload_before_commit" for line in logs),
            what="the queue read seeing the transaction open",
        )
        if draining:
            assert listener.runner.events_processed < 15_000, "still draining"
        env.sql("COMMIT PREPARED 'forged'")
        wait_until(
            lambda: not any(r.exists(k) for k in keys_of(1)), what="the committed row deleted"
        )


def test_check_warns_where_transactions_can_be_prepared(
    prepared_env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    config = setup_users(prepared_env)
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "warning: max_prepared_transactions is 4" in out
    assert "cdc_invalidator.notify = 'off'" in out
    assert "compiled by an earlier release" not in out
    # A capture function of a release before the setting (this one's body stands in).
    function = prepared_env.scalar(
        "SELECT 'cdc_invalidator.' || quote_ident('capture_' || 'public.users'::regclass::oid"
        " || '_v1')"
    )
    prepared_env.sql(
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql"
        " AS $$BEGIN PERFORM pg_notify('cdc_invalidator_v1', ''); RETURN NULL; END$$"
    )
    assert main(["check", "--config", str(config)]) == 0
    assert "1 capture function(s) were compiled by an earlier release" in capsys.readouterr().out
    assert main(["install", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 0
    assert "compiled by an earlier release" not in capsys.readouterr().out


def test_a_prepared_transaction_holding_the_queues_lock_is_named(
    prepared_env: Env, spawn: Spawn
) -> None:
    """Any role may take the listeners' lock in a transaction it prepares: it outlives
    the session and a restart, and every listener waited on standby, taking it for
    another listener (the second review). It is named, with the command that ends it."""
    env = prepared_env
    config = setup_users(env, rows=1)
    with env.connect() as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('cdc_invalidator.queue_v1'))")
        conn.execute("PREPARE TRANSACTION 'hold'")
    listener = spawn(config)
    wait_until(lambda: listener.logged("standby_behind_a_foreign_session"), what="the holder named")
    holder = listener.logged("standby_behind_a_foreign_session")[0]["holder"]
    assert "prepared transaction 'hold'" in holder, holder
    assert "ROLLBACK PREPARED 'hold'" in holder, holder
    r = env.redis()
    cache(r, [1])
    env.sql("ROLLBACK PREPARED 'hold'")
    env.sql("UPDATE users SET email = 'new@x' WHERE id = 1")
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="consumed once it was rolled back")
    stop_listener(listener)


def a_second_old(env: Env, query: str) -> None:
    wait_until(
        lambda: env.scalar(f"SELECT {query} < now() - interval '1 second'"),
        what="a second old",
    )


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("capture", ["logical"])
@pytest.mark.parametrize("prepared", ["before", "while it waits"])
def test_a_prepared_transaction_a_new_slot_waits_for_is_named(
    prepared_env: Env, spawn: Spawn, prepared: str
) -> None:
    """Making a slot waits for prepared transactions too, which have no session: the
    listener sat in the silent CREATE, its loop still (a liveness probe failed at 60 s),
    naming nothing (second review). It waits in its loop and names the transaction. One
    begun before the wait and prepared during it too (third review: prepared after the
    time the wait began, it was let through to the CREATE)."""
    env = prepared_env
    config = setup_users(env, rows=2)
    env.sql("SELECT pg_drop_replication_slot('cdc_invalidator')")
    r = env.redis()
    cache(r, [1])
    listener = None
    if prepared == "before":
        prepare(env, "held", notify=None)  # (logical mode sends no NOTIFY)
    else:
        with env.connect() as conn:
            conn.execute("BEGIN")
            conn.execute("UPDATE users SET email = email || '.' WHERE id = 1")
            a_second_old(
                env,
                f"(SELECT xact_start FROM pg_stat_activity WHERE pid = {conn.info.backend_pid})",
            )
            waiting = listener = spawn(config)
            wait_until(lambda: waiting.logged("slot_creation_waits"), what="the session named")
            conn.execute("PREPARE TRANSACTION 'held'")
    a_second_old(env, "(SELECT prepared FROM pg_prepared_xacts WHERE gid = 'held')")
    listener = listener or spawn(config)
    named = listener
    wait_until(
        lambda: any("'held'" in w["holder"] for w in named.logged("slot_creation_waits")),
        what="the prepared transaction named",
    )
    holder = listener.logged("slot_creation_waits")[-1]["holder"]
    assert "prepared transaction 'held'" in holder, holder
    assert "ROLLBACK PREPARED 'held'" in holder, holder
    assert listener.logged("slot_created") == []
    env.sql("COMMIT PREPARED 'held'")
    wait_until(lambda: listener.logged("slot_created"), what="the slot made once it ended")
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="swept")
    stop_listener(listener)


def test_a_transaction_prepared_while_the_listener_is_busy_is_seen_out_and_named(
    prepared_env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Busy, the listener is sent no wake-up, so PREPARE passes (not to be counted on:
    quiet, it fails). The prepared transaction holds the second lock until COMMIT
    PREPARED: the listener's writers_seen.sql is false until then, and check names it."""
    config = setup_users(prepared_env, rows=ROWS)
    with prepared_env.connect() as listener:
        assert listener.execute(Q.BUSY.sql).fetchone() == (True,)
        prepare(prepared_env, "busy_xa", notify=None)
        assert listener.execute(Q.QUIET.sql).fetchone() == (True,)
        assert listener.execute(Q.WRITERS_SEEN.sql).fetchone() == (False,)
        _, out, err = check(config, capsys)
        assert "prepared transaction 'busy_xa'" in out + err, out + err
        prepared_env.sql("COMMIT PREPARED 'busy_xa'")
        assert listener.execute(Q.WRITERS_SEEN.sql).fetchone() == (True,)
