"""Logical mode and a large transaction: streamed before its commit (pgoutput protocol 2,
`streaming 'on'`), its keys computed as it comes and deleted only at Stream Commit.

The test server's logical_decoding_work_mem is set to its minimum (64kB) for this module,
so that a transaction of a few thousand rows is streamed in blocks while still open.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_invalidator.capture.streamed import (
    PREFETCH_AHEAD,
    Chunk,
    Dead,
    Prefetch,
    StreamedTxn,
    pack,
)
from cdc_invalidator.capture.walstream import parse_lsn
from cdc_invalidator.events import ChangeEvent, Op, TableName
from cdc_invalidator.events import StandInKind as Kind
from cdc_invalidator.mapping.mapper import Invalidation, StoodIn
from tests.support.env import Env, Servers
from tests.support.faults import END_OF_WAL
from tests.support.listener import ListenerProcess
from tests.support.logical import (
    active,
    install,
    logical_config,
    slot,
    stop,
    the_dead_letter,
)
from tests.support.waits import wait_until

Spawn = Any  # conftest's spawn fixture: config -> ListenerProcess

N = 6000  # rows: far past 64kB of changes, so the transaction is streamed
BIG = {"public.big": ["big:{id}", "big:name:{name}"]}
SMALL = {"public.small": ["small:{id}"]}


@pytest.fixture(scope="module")
def small_work_mem(servers: Servers) -> Iterator[None]:
    """logical_decoding_work_mem at its minimum for this module's walsenders."""
    admin = servers.pg_dsn("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET logical_decoding_work_mem")
            conn.execute("SELECT pg_reload_conf()")


pytestmark = pytest.mark.usefixtures("small_work_mem")


def setup(
    env: Env, spawn: Spawn, history: str = "0s", second_delete_ms: int = 0
) -> tuple[ListenerProcess, Path]:
    env.sql(
        "CREATE TABLE big (id int PRIMARY KEY, name text);"
        "CREATE TABLE small (id int PRIMARY KEY, note text);"
        f"INSERT INTO big SELECT g, 'n' || g FROM generate_series(1, {N}) g;"
        "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 10) g"
    )
    # second deletes off (but where a test is about them): each test reads which keys
    # are gone at given moments, and a second delete 300 ms later would only delete the
    # same keys again.
    config = logical_config(
        env,
        {**BIG, **SMALL},
        log_level="debug",
        second_delete_ms=second_delete_ms,
        replay_history=history,
    )
    install(config)
    listener = spawn(config)
    wait_until(lambda: active(env), what="the listener streaming its slot")
    return listener, config


def streaming(listener: ListenerProcess, xid: int) -> bool:
    return any(line["xid"] == xid for line in listener.logged("transaction_streaming"))


def open_streamed(listener: ListenerProcess, writer: psycopg.Connection[Any], *sql: str) -> int:
    """Run `sql` in `writer`'s transaction, left open, and wait until its blocks have
    streamed to `listener`. Returns its xid as the stream names it (32 bits)."""
    row = writer.execute("SELECT txid_current()").fetchone()
    assert row is not None
    xid = int(row[0]) & 0xFFFFFFFF
    for statement in sql:
        writer.execute(statement.encode())  # bytes: our own test SQL
    wait_until(lambda: streaming(listener, xid), what="blocks streamed")
    return xid


def cache_big(env: Env, ids: range, name: str = "n") -> list[str]:
    """Cache both keys of each row (by its current name `name || id`)."""
    keys = [f"big:{i}" for i in ids] + [f"big:name:{name}{i}" for i in ids]
    env.redis().mset(dict.fromkeys(keys, "cached"))
    return keys


def marker(env: Env, i: int) -> int:
    """A single-row commit after everything before it, whose key is deleted once the
    listener has handled all that came before it (the stream is in commit order).
    Returns the WAL position before its commit: once the slot is confirmed past it, it is
    confirmed past the start of any transaction still open then."""
    r = env.redis()
    r.set(f"small:{i}", "cached")
    with psycopg.connect(env.dsn) as conn:
        conn.execute("UPDATE small SET note = note || '.' WHERE id = %s", [i])
        before = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert before is not None
    wait_until(lambda: r.exists(f"small:{i}") == 0, what=f"small:{i} deleted")
    return parse_lsn(before[0])


def owed_no_second_delete(env: Env, keys: list[str]) -> None:
    """`keys`, deleted, are owed no second delete: set again at once (a stale SET would
    be deleted by a second delete second_delete_ms after the first), they are still there
    once a later commit's own second delete, which comes after any owed before it (they
    run in order), has deleted its key set again."""
    r = env.redis()
    r.mset(dict.fromkeys(keys, "set again"))
    marker(env, 1)
    r.set("small:1", "set again")
    wait_until(lambda: r.exists("small:1") == 0, what="the marker's second delete")
    assert r.exists(*keys) == len(keys)


def confirmed(env: Env) -> int:
    found = slot(env)
    assert found is not None
    return parse_lsn(found["confirmed_flush_lsn"])


# A bulk statement of each kind, and the rows whose keys it deletes: each far past
# logical_decoding_work_mem, so streamed while its transaction is open.
BULK = [
    pytest.param("UPDATE big SET name = 'x' || id", range(1, N + 1), id="update"),
    pytest.param("DELETE FROM big", range(1, N + 1), id="delete"),
    pytest.param(
        f"INSERT INTO big SELECT g, 'n' || g FROM generate_series({N + 1}, {2 * N}) g",
        range(N + 1, 2 * N + 1),
        id="insert-select",
    ),
]


@pytest.mark.parametrize(("statement", "ids"), BULK)
def test_a_streamed_statement_is_deleted_only_after_its_commit(
    env: Env, spawn: Spawn, statement: str, ids: range
) -> None:
    listener, _ = setup(env, spawn, history="1h")
    r = env.redis()
    keys = cache_big(env, ids)  # an INSERT's: negatively cached
    with psycopg.connect(env.dsn) as writer:
        xid = open_streamed(listener, writer, statement)
        # Blocks of the open transaction have reached the listener; a marker committed
        # meanwhile is handled (so is everything streamed before it), and nothing of the
        # open one is deleted.
        marker(env, 1)
        assert r.exists(*keys) == len(keys)
        writer.commit()
    wait_until(lambda: r.exists(*keys) == 0, what="every key of the statement deleted")
    (committed,) = listener.logged("streamed_transaction_committed")
    assert committed["xid"] == xid

    # The replay history holds its changes like any other transaction's, the first one
    # naming the transaction (xid, commit LSN, commit time): most of them gathered
    # column-wise, an item of seven whose last says how many changes it holds.
    def history() -> list[tuple[int, str | None]]:
        with env.connect() as conn:
            return conn.execute(
                "SELECT CASE WHEN json_array_length(e) = 7 THEN (e->>6)::int ELSE 1 END,"
                " e->5->>0 FROM cdc_invalidator.history_v1, json_array_elements(events) e"
                " WHERE e->>1 = 'big'"
            ).fetchall()

    # (written behind the loop, after the deletes)
    wait_until(lambda: sum(n for n, _ in history()) >= N, what="the statement's history written")
    items = history()
    assert sum(n for n, _ in items) == N
    assert len(items) < N // 100  # column-wise: an item per chunk, not per change
    assert [x for _, x in items if x is not None] == [str(xid)]
    stop(listener)


def test_a_streamed_transaction_deleted_late_owes_no_second_deletes(env: Env, spawn: Spawn) -> None:
    """Its commit is seen visible in a snapshot when Stream Commit arrives: keys first
    deleted more than second_delete_ms after that are not deleted again (no stale SET
    can come after them), as for a backlog."""
    listener, _ = setup(env, spawn, second_delete_ms=300)
    r = env.redis()
    keys = cache_big(env, range(1, N + 1))
    with psycopg.connect(env.dsn) as writer:
        open_streamed(listener, writer, "UPDATE big SET name = 'x' || id")
        # Redis refuses writes for a second from before the commit: the first deletes
        # come well past 300 ms after the snapshot that saw the commit.
        r.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
        writer.commit()
    wait_until(lambda: listener.logged("streamed_transaction_committed"), what="Stream Commit")
    (committed,) = listener.logged("streamed_transaction_committed")
    assert committed["seen_complete"] is True
    wait_until(lambda: r.exists(*keys) == 0, what="every key of the statement deleted")
    owed_no_second_delete(env, keys)
    stop(listener)


def test_a_streamed_transaction_seen_ended_before_its_stream_commit_owes_no_second_deletes(
    env: Env, spawn: Spawn
) -> None:
    """The WAL sender behind (stopped here, as decoding a bulk statement keeps it for
    seconds): while the transaction is open the listener takes a snapshot now and then,
    and one that saw it end dates its visibility. Its Stream Commit, more than
    second_delete_ms later, then owes no second deletes (before: it was dated by a
    snapshot taken at Stream Commit, and every key deleted in the 300 ms after was owed
    again)."""
    listener, _ = setup(env, spawn, second_delete_ms=300)
    r = env.redis()
    keys = cache_big(env, range(1, N + 1))
    with psycopg.connect(env.dsn) as writer:
        xid = open_streamed(listener, writer, "UPDATE big SET name = 'x' || id")
        found = slot(env)
        assert found is not None
        sender = int(found["active_pid"])
        os.kill(sender, signal.SIGSTOP)
        # Should the stopped process hold a lock the COMMIT waits on, it goes on by
        # itself after a while: the test then fails instead of hanging.
        resume = threading.Timer(20.0, os.kill, (sender, signal.SIGCONT))
        resume.start()
        try:
            writer.commit()
            wait_until(
                lambda: any(
                    line["xid"] == xid
                    for line in listener.logged("streamed_transaction_seen_complete")
                ),
                what="a snapshot that saw it end",
            )
            # (the WAL sender that far behind: its Stream Commit past second_delete_ms)
            time.sleep(0.4)
            assert r.exists(*keys) == len(keys)  # nothing before its Stream Commit
        finally:
            resume.cancel()
            os.kill(sender, signal.SIGCONT)
    wait_until(lambda: r.exists(*keys) == 0, what="every key of the statement deleted")
    (committed,) = listener.logged("streamed_transaction_committed")
    assert committed["seen_before"] is True
    owed_no_second_delete(env, keys)
    stop(listener)


@pytest.mark.parametrize(("statement", "ids"), BULK)
def test_a_streamed_transaction_that_rolls_back_deletes_nothing(
    env: Env, spawn: Spawn, statement: str, ids: range
) -> None:
    listener, _ = setup(env, spawn)
    r = env.redis()
    keys = cache_big(env, ids)
    with psycopg.connect(env.dsn) as writer:
        open_streamed(listener, writer, statement)
        writer.rollback()
    wait_until(
        lambda: listener.logged("streamed_transaction_rolled_back"), what="the abort streamed"
    )
    marker(env, 1)  # everything before it handled
    assert r.exists(*keys) == len(keys)
    assert listener.logged("streamed_transaction_committed") == []
    stop(listener)


def test_a_subtransaction_rolled_back_inside_a_streamed_one_deletes_none_of_its_rows(
    env: Env, spawn: Spawn
) -> None:
    listener, _ = setup(env, spawn)
    r = env.redis()
    half = N // 2
    kept = cache_big(env, range(1, half + 1))
    rolled_back = cache_big(env, range(half + 1, N + 1))
    with psycopg.connect(env.dsn) as writer:
        writer.execute("UPDATE big SET name = 'x' || id WHERE id <= %s", [half])
        writer.execute("SAVEPOINT s")
        writer.execute("UPDATE big SET name = 'y' || id WHERE id > %s", [half])
        writer.execute("ROLLBACK TO SAVEPOINT s")
        writer.commit()
    wait_until(lambda: r.exists(*kept) == 0, what="the kept half's keys deleted")
    marker(env, 1)
    assert r.exists(*rolled_back) == len(rolled_back)
    # The subtransaction's changes had been streamed, and were discarded.
    aborts = listener.logged("streamed_transaction_rolled_back")
    assert aborts
    assert all(a["subxid"] != a["xid"] for a in aborts)
    stop(listener)


def test_single_row_commits_during_a_streamed_one_are_deleted_and_acknowledged_in_order(
    env: Env, spawn: Spawn
) -> None:
    listener, _ = setup(env, spawn)
    r = env.redis()
    keys = cache_big(env, range(1, N + 1))
    with psycopg.connect(env.dsn) as writer:
        open_streamed(listener, writer, f"UPDATE big SET name = 'x' || id WHERE id <= {N // 2}")
        # Other sessions commit while it is open: their keys go at once, and the slot
        # is confirmed past them, not held back by the open transaction.
        at = max(marker(env, i) for i in range(2, 8))
        wait_until(lambda: confirmed(env) > at, what="the singles acknowledged")
        writer.execute("UPDATE big SET name = 'x' || id WHERE id > %s", [N // 2])
        r.set("small:9", "cached")
        with env.connect() as other:  # interleaved in the WAL with the rest of it
            other.execute("UPDATE small SET note = 'y' WHERE id = 9")
        assert r.exists(*keys) == len(keys)
        before = writer.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert before is not None
        writer.commit()
    end = parse_lsn(env.scalar(END_OF_WAL))  # its commit's end (or past it)
    # Until every key of the statement is gone, the slot is never confirmed at its end.
    while r.exists(*keys):
        position = confirmed(env)
        if r.exists(*keys):
            assert position < end, "the slot was confirmed past a transaction not deleted"
    wait_until(lambda: r.exists("small:9") == 0, what="the interleaved commit's key deleted")
    wait_until(lambda: confirmed(env) > parse_lsn(before[0]), what="the statement acknowledged")
    stop(listener)


def test_a_listener_restarted_in_the_middle_of_a_streamed_transaction_deletes_all_of_it(
    env: Env, spawn: Spawn
) -> None:
    first, config = setup(env, spawn)
    r = env.redis()
    keys = cache_big(env, range(1, N + 1))
    with psycopg.connect(env.dsn) as writer:
        top = open_streamed(first, writer, f"UPDATE big SET name = 'x' || id WHERE id <= {N // 2}")
        # A commit after its start is acknowledged: the slot's confirmed position passes
        # the start of the open transaction, which must not make the slot skip it.
        at = marker(env, 1)
        wait_until(lambda: confirmed(env) > at, what="the marker acknowledged")
        first.signal(signal.SIGKILL)
        first.wait()
        second = spawn(config)
        wait_until(lambda: active(env), what="the second listener streaming")
        writer.execute("UPDATE big SET name = 'x' || id WHERE id > %s", [N // 2])
        # The slot sends the open transaction again from its first block.
        wait_until(lambda: streaming(second, top), what="blocks streamed to the second listener")
        assert r.exists(*keys) == len(keys)
        writer.commit()
    wait_until(lambda: r.exists(*keys) == 0, what="every key of the statement deleted")
    stop(second)


def test_a_streamed_transaction_written_before_install_replaced_templates_deletes_the_old_keys(
    env: Env, spawn: Spawn
) -> None:
    """big installed with a:{id}; no listener running; rows 1..N changed in one
    transaction, committed; install with big given b:{id}; rows N+1..2N changed likewise;
    the listener started on that file. Each transaction is streamed (decoded past
    logical_decoding_work_mem), so its keys were computed before its commit position was
    known, with the new templates only: a:1..a:N stayed cached (PostgreSQL 15), where
    the same transaction decoded whole deleted them. A streamed change written before the
    boundary is now rendered with the earlier templates too (its commit, after it, may
    be too); one written after it, with the new ones only: a:N+1..a:2N stay."""
    env.sql(
        "CREATE TABLE big (id int PRIMARY KEY, name text);"
        "CREATE TABLE small (id int PRIMARY KEY, note text);"
        f"INSERT INTO big SELECT g, 'n' || g FROM generate_series(1, {2 * N}) g;"
        "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 10) g"
    )
    first = logical_config(env, {"public.big": ["a:{id}"], **SMALL}, name="first.toml")
    install(first)
    r = env.redis()
    before, after = range(1, N + 1), range(N + 1, 2 * N + 1)
    r.mset(dict.fromkeys([f"{t}:{i}" for t in "ab" for i in range(1, 2 * N + 1)], "cached"))
    with psycopg.connect(env.dsn) as writer:  # a pack, and one row on its own
        xids = [writer.execute("SELECT txid_current()").fetchone()]
        writer.execute(f"UPDATE big SET name = 'x' || id WHERE id < {N}".encode())
        writer.execute(f"UPDATE big SET name = 'y' WHERE id = {N}".encode())
    second = logical_config(
        env,
        {"public.big": ["b:{id}"], **SMALL},
        name="second.toml",
        log_level="debug",
        second_delete_ms=0,
    )
    install(second)
    with psycopg.connect(env.dsn) as writer:
        xids.append(writer.execute("SELECT txid_current()").fetchone())
        writer.execute(f"UPDATE big SET name = 'x' || id WHERE id > {N}".encode())
    listener = spawn(second)
    marker(env, 1)
    streamed = {line["xid"] for line in listener.logged("transaction_streaming")}
    stop(listener)
    assert {int(row[0]) & 0xFFFFFFFF for row in xids if row} <= streamed
    assert [f"a:{i}" for i in before if r.exists(f"a:{i}")] == []
    assert [f"b:{i}" for i in range(1, 2 * N + 1) if r.exists(f"b:{i}")] == []
    # Written after the install: not rendered with the old templates (no double work).
    assert r.exists(*(f"a:{i}" for i in after)) == N
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_a_streamed_transaction_under_templates_an_install_replaced_is_not_judged_by_its_filter(
    env: Env, spawn: Spawn
) -> None:
    """orders installed with a:{email} (and x:{id}), no column filter; no listener
    running; rows 1..N's note changed in one transaction; install with orders given
    b:{id} and ignore_columns = ["note", "email"]; rows N+1..2N's note changed likewise;
    the listener started on that file. Each transaction streamed, the first one's
    UPDATEs were judged by the new filter and skipped: a:e1..a:eN stayed cached
    (PostgreSQL 15), though the old app's keys held the note. Now a stream block begun
    before the install's boundary is not judged; one after it is (its keys stay)."""
    env.sql(
        "CREATE TABLE orders (id int PRIMARY KEY, email text, note text);"
        "CREATE TABLE small (id int PRIMARY KEY, note text);"
        f"INSERT INTO orders SELECT g, 'e' || g, 'n' FROM generate_series(1, {2 * N}) g;"
        "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 10) g"
    )
    first = logical_config(env, {"public.orders": ["a:{email}", "x:{id}"], **SMALL}, name="1.toml")
    install(first)
    r = env.redis()
    before, after = range(1, N + 1), range(N + 1, 2 * N + 1)
    r.mset(dict.fromkeys([f"{t}{i}" for t in ("a:e", "b:") for i in (*before, *after)], "cached"))
    env.sql(f"UPDATE orders SET note = 'x' WHERE id <= {N}")
    second = logical_config(
        env, {"public.orders": ["b:{id}"], **SMALL}, name="2.toml", log_level="debug"
    )
    header = '[tables."public.orders"]\n'
    text = second.read_text()
    assert header in text
    second.write_text(text.replace(header, header + 'ignore_columns = ["note", "email"]\n'))
    install(second)
    env.sql(f"UPDATE orders SET note = 'x' WHERE id > {N}")
    listener = spawn(second)
    marker(env, 1)
    stop(listener)
    assert len(listener.logged("transaction_streaming")) >= 2
    assert [i for i in before if r.exists(f"a:e{i}")] == []
    # Committed after the install, only ignored columns changed: nothing deleted.
    assert r.exists(*(f"{t}{i}" for t in ("a:e", "b:") for i in after)) == 2 * N


def test_a_streamed_transaction_keeps_column_filters_truncate_and_dead_letters(
    env: Env, spawn: Spawn
) -> None:
    env.sql(
        "CREATE TABLE big (id int PRIMARY KEY, name text, note text);"
        "CREATE TABLE small (id int PRIMARY KEY, note text);"
        "CREATE TABLE other (id int PRIMARY KEY);"
        f"INSERT INTO big SELECT g, 'n' || g, '' FROM generate_series(1, {N}) g;"
        "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 10) g"
    )
    installed = logical_config(env, {**BIG, **SMALL, "public.other": ["other:{id}"]})
    install(installed)
    # The listener runs without `other` (published by the install, whose templates are
    # not recorded, as an earlier release's install left it): its changes are dead
    # letters. UPDATEs of big that change only `note` are judged and dropped.
    env.sql("UPDATE cdc_invalidator.mapping_v1 SET tables = NULL")
    config = logical_config(
        env, {**BIG, **SMALL}, name="run.toml", log_level="debug", second_delete_ms=0
    )
    header = '[tables."public.big"]\n'
    text = config.read_text()
    assert header in text
    config.write_text(text.replace(header, header + 'ignore_columns = ["note"]\n'))
    listener = spawn(config)
    wait_until(lambda: active(env), what="the listener streaming its slot")
    r = env.redis()
    renamed = cache_big(env, range(1, 11))
    noted = cache_big(env, range(11, N + 1))
    r.mset({"small:1": "c", "small:2": "c"})
    with psycopg.connect(env.dsn) as writer:
        xid = open_streamed(
            listener,
            writer,
            "UPDATE big SET note = 'seen'",  # judged: nothing to delete
            "UPDATE big SET name = 'x' || id WHERE id <= 10",
            "INSERT INTO other VALUES (1)",
            "TRUNCATE small",
        )
    wait_until(lambda: r.exists(*renamed, "small:1", "small:2") == 0, what="its keys deleted")
    assert r.exists(*noted) == len(noted)
    table, error = the_dead_letter(env)
    assert table == "other"
    assert "not in the configuration" in error
    assert f"transaction {xid}" in error
    (said,) = listener.logged("event_dead_lettered")
    assert "its keys were not deleted" in said["detail"], said  # and where to look
    stop(listener)


def test_a_key_column_moved_inside_a_streamed_transaction_is_read_where_it_is_now(
    env: Env, spawn: Spawn
) -> None:
    """A column dropped and another added inside the transaction: `name` moves from the
    third column to the second, the tuples keep three. The changes before and after are
    gathered column-wise each with their own Relation message (a walk kept from before
    would read the new third column as `name`, and leave the second UPDATE's keys)."""
    env.sql(
        "CREATE TABLE wide (id int PRIMARY KEY, note text, name text);"
        f"INSERT INTO wide SELECT g, 'x', 'n' || g FROM generate_series(1, {N}) g;"
        "CREATE TABLE small (id int PRIMARY KEY, note text);"
        "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 10) g"
    )
    tables = {"public.wide": ["wide:{id}", "wide:name:{name}"], **SMALL}
    config = logical_config(env, tables, log_level="debug", second_delete_ms=0)
    install(config)
    listener = spawn(config)
    wait_until(lambda: active(env), what="the listener streaming its slot")
    r = env.redis()
    ids = range(1, N + 1)
    keys = [f"wide:{i}" for i in ids] + [f"wide:name:{p}{i}" for i in ids for p in "nab"]
    with psycopg.connect(env.dsn) as writer:
        open_streamed(
            listener,
            writer,
            "UPDATE wide SET name = 'a' || id",
            "ALTER TABLE wide DROP COLUMN note",
            "ALTER TABLE wide ADD COLUMN note2 text",
            "UPDATE wide SET name = 'b' || id",
        )
        r.mset(dict.fromkeys(keys, "cached"))
        writer.commit()
    wait_until(lambda: r.exists(*keys) == 0, what="both statements' keys deleted")
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0
    stop(listener)


# --- the held keys, as units ----------------------------------------------------------------

BIG_T = TableName("public", "big")


def chunk(subxid: int, *keys: str) -> Chunk:
    return Chunk(subxid, len(keys), pack({None: Invalidation(set(keys))}))


def test_held_chunks_spill_to_a_file_and_come_back_without_the_rolled_back_subtransactions() -> (
    None
):
    txn = StreamedTxn(10, 1, spill_bytes=64)
    txn.add(chunk(10, "a:1", "a:2"))
    txn.add(chunk(11, "b:1"))
    txn.add(chunk(12, "c:1", "c:2", "c:3" * 40))  # past the bound: all three spilled
    assert txn.spilled_bytes > 0
    assert txn.held_bytes == 0
    txn.add(chunk(12, "c:4"))
    txn.add(chunk(13, "d:1"))
    txn.abort(12)  # in the file and in memory
    dead = Dead(7, "bad", ChangeEvent(BIG_T, Op.INSERT, None, {"id": None}, 7))
    swept = Invalidation(set(), {"big:*"})
    swept.add_stand_in(BIG_T, Kind.UNRENDERABLE, "why")
    txn.add(Chunk(10, 1, pack({5: swept}), [dead]))
    out = list(txn.chunks())
    assert [c.subxid for c in out] == [10, 11, 13, 10]
    keys = [sorted(k for inv in c.invalidations().values() for k in inv.keys) for c in out]
    assert keys == [["a:1", "a:2"], ["b:1"], ["d:1"], []]
    last = out[-1].invalidations()[5]
    assert last.patterns == {"big:*"}
    assert last.stood_in == {(BIG_T, Kind.UNRENDERABLE): StoodIn("why", 1)}
    assert out[-1].dead == [dead]
    txn.close()


def test_a_key_holding_the_separator_is_kept_whole() -> None:
    packed = pack({None: Invalidation({"a\0b", "c"})})
    (inv,) = Chunk(1, 2, packed).invalidations().values()
    assert inv.keys == {"a\0b", "c"}


class _FullDisk:
    """A temporary file that takes `room` writes, then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.data = bytearray()
        self.pos = 0

    def write(self, data: bytes) -> int:
        if self.room == 0:
            self.data += data[:3]  # a partial write before the failure
            raise OSError(28, "No space left on device")
        self.room -= 1
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        out = bytes(self.data[self.pos : end])
        self.pos += len(out)
        return out

    def readline(self) -> bytes:  # pickle.load asks for it
        return self.read()

    def close(self) -> None:
        pass


def test_a_full_temporary_disk_keeps_the_rest_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    disk = _FullDisk(room=1)
    monkeypatch.setattr("cdc_invalidator.capture.streamed.tempfile.TemporaryFile", lambda **_: disk)
    txn = StreamedTxn(10, 1, spill_bytes=64)
    txn.add(chunk(10, "a:1"))
    txn.add(chunk(10, "b:1" * 40))  # past the bound: a:1 written, b:1... fails
    assert txn.spill_error is not None
    assert "No space left" in txn.spill_error
    txn.add(chunk(10, "c:1" * 40))  # no more spilling: held in memory
    keys = [k for c in txn.chunks() for inv in c.invalidations().values() for k in inv.keys]
    assert keys == ["a:1", "b:1" * 40, "c:1" * 40]


def test_prefetch_hands_out_every_chunk_in_order_and_a_read_failure() -> None:
    txn = StreamedTxn(10, 1, spill_bytes=64)
    for i in range(PREFETCH_AHEAD + 3):  # more than it reads ahead
        txn.add(chunk(10, f"k:{i}" * 30))  # past the bound: in the file
    assert txn.spilled_bytes > 0
    ahead = Prefetch(txn.chunks())
    got = []
    while (item := ahead.next()) is not None:
        c, routed = item
        assert routed == c.invalidations()
        got.append(sorted(routed[None].keys))
    assert got == [[f"k:{i}" * 30] for i in range(PREFETCH_AHEAD + 3)]
    assert ahead.next() is None
    ahead.close()
    txn.close()

    def failing() -> Iterator[Chunk]:
        yield chunk(10, "a:1")
        raise OSError(5, "Input/output error")

    ahead = Prefetch(failing())
    first = ahead.next()
    assert first is not None
    with pytest.raises(OSError, match="Input/output error"):
        ahead.next()
    assert ahead.next() is None
    ahead.close()


def test_prefetch_closed_midway_stops_its_thread() -> None:
    ahead = Prefetch(chunk(10, f"k:{i}") for i in range(PREFETCH_AHEAD + 10))
    assert ahead.next() is not None
    ahead.close()  # its thread is blocked on a full queue
    assert not ahead._thread.is_alive()
