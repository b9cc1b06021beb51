"""Two-phase commit on watched tables in logical mode, on real PostgreSQL and Redis.

The slot is made without `two_phase`, so pgoutput sends a prepared transaction only once
it is committed: nothing at PREPARE TRANSACTION, the whole transaction (Begin ... Commit)
at COMMIT PREPARED, nothing at ROLLBACK PREPARED. A large one is streamed while it runs
(logical_decoding_work_mem at its minimum here), so its blocks arrive before PREPARE;
its Stream Commit comes at COMMIT PREPARED, its Stream Abort at ROLLBACK PREPARED. A
reader between PREPARE and COMMIT PREPARED still reads the old row: nothing may be
deleted before the commit, or it would cache the old row again.

The listener confirms the slot past a transaction left prepared while others commit
(its changes are not in anything confirmed: PostgreSQL keeps the slot's restart_lsn
before them and sends the transaction at COMMIT PREPARED, whatever was confirmed). So a
listener stopped or killed in between still invalidates it.

Making a slot waits for a prepared transaction to end, and what commits meanwhile is in
no slot: a slot `install` made so owes the listener a sweep, as one the listener makes.

Prepared transactions need max_prepared_transactions, which the shared test server does
not set: the module has a server of its own.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc_invalidator.capture.walstream import parse_lsn
from tests.support.env import FAST_PG, Env, Servers, make_env
from tests.support.evidence import unavailable
from tests.support.listener import ListenerProcess, cli
from tests.support.logical import active, install, logical_config, slot, stop
from tests.support.servers import PostgresServer, RedisServer, ServerError
from tests.support.waits import wait_until

Spawn = Any  # conftest's spawn fixture: config -> ListenerProcess

pytestmark = pytest.mark.servers

N = 6000  # rows: far past 64kB of changes, so the transaction is streamed
USERS = {"public.users": ["user:{id}", "user:email:{email}"]}
SMALL = {"public.small": ["small:{id}"]}
GID = "xa-1"


@pytest.fixture(scope="module")
def prepared_servers() -> Iterator[Servers]:
    """A PostgreSQL of the module's own with prepared transactions allowed and large
    transactions streamed early, and a Redis."""
    settings = {
        **FAST_PG,
        "max_prepared_transactions": "4",
        "logical_decoding_work_mem": "64kB",
    }
    try:
        pg = PostgresServer.create(settings)
        rd = RedisServer.create()
    except ServerError as exc:
        unavailable(f"no local servers: {exc}")
    with pg, rd:
        yield Servers(pg.dsn, rd.url, pg, rd)


@pytest.fixture
def xa_env(prepared_servers: Servers, tmp_path: Path) -> Iterator[Env]:
    for env in make_env(prepared_servers, tmp_path, capture="logical"):
        yield env
        # Whatever a failed test left prepared would keep its locks, and its database;
        # and a standby named would hold every commit after.
        with env.connect() as conn:
            conn.execute("SET synchronous_commit = local")
            conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
            conn.execute("SELECT pg_reload_conf()")
            gids = conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchall()
            for (gid,) in gids:
                conn.execute(f"ROLLBACK PREPARED '{gid}'".encode())


def setup(env: Env, spawn: Spawn) -> tuple[ListenerProcess, Path]:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        f"INSERT INTO users SELECT g, 'u' || g || '@x', 'n' || g FROM generate_series(1, {N}) g;"
        "CREATE TABLE small (id int PRIMARY KEY, note text);"
        "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 100) g"
    )
    # Second deletes off: the tests read which keys exist at given moments.
    config = logical_config(env, {**USERS, **SMALL}, log_level="debug", second_delete_ms=0)
    install(config)
    return start(env, spawn, config), config


def start(env: Env, spawn: Spawn, config: Path) -> ListenerProcess:
    listener: ListenerProcess = spawn(config)
    wait_until(lambda: active(env), what="the listener streaming its slot")
    return listener


def cache(env: Env, ids: range) -> list[str]:
    """Both keys of each row cached, by its email now."""
    with env.connect() as conn:
        rows = conn.execute(
            "SELECT id, email FROM users WHERE id BETWEEN %s AND %s", [ids[0], ids[-1]]
        ).fetchall()
    keys = [k for i, email in rows for k in (f"user:{i}", f"user:email:{email}")]
    env.redis().mset(dict.fromkeys(keys, "cached"))
    return keys


def marker(env: Env, i: int) -> int:
    """A single-row commit whose key is deleted once everything the stream sent before
    it was handled (it is in commit order). Returns the WAL position after its commit."""
    r = env.redis()
    r.set(f"small:{i}", "cached")
    with env.connect() as conn:
        conn.execute("UPDATE small SET note = note || '.' WHERE id = %s", [i])
        after = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert after is not None
    wait_until(lambda: r.exists(f"small:{i}") == 0, what=f"small:{i} deleted")
    return parse_lsn(after[0])


def streamed(listener: ListenerProcess, xid: int) -> bool:
    return any(line["xid"] == xid for line in listener.logged("transaction_streaming"))


def prepare(
    env: Env, listener: ListenerProcess, ids: range, *, big: bool, savepoint: range | None = None
) -> int:
    """UPDATE the rows `ids` (and those of `savepoint` in a subtransaction rolled back)
    in a transaction PREPAREd as GID; a big one once its blocks have reached the
    listener. Returns its xid (32 bits, as the stream has it)."""
    with env.connect() as conn:
        return _prepare(conn, listener, ids, big=big, savepoint=savepoint)


def _prepare(
    conn: psycopg.Connection[Any],
    listener: ListenerProcess,
    ids: range,
    *,
    big: bool,
    savepoint: range | None,
) -> int:
    conn.execute("BEGIN")
    row = conn.execute("SELECT txid_current()").fetchone()
    assert row is not None
    xid = int(row[0]) & 0xFFFFFFFF
    conn.execute(
        "UPDATE users SET name = 'p' || id, email = 'p' || email WHERE id BETWEEN %s AND %s",
        [ids[0], ids[-1]],
    )
    if savepoint is not None:
        conn.execute("SAVEPOINT s")
        conn.execute(
            "UPDATE users SET email = 'rb' || email WHERE id BETWEEN %s AND %s",
            [savepoint[0], savepoint[-1]],
        )
        conn.execute("ROLLBACK TO SAVEPOINT s")
    if big:
        wait_until(lambda: streamed(listener, xid), what="its blocks streamed")
    conn.execute(f"PREPARE TRANSACTION '{GID}'".encode())
    return xid


def old_name(env: Env) -> str:
    name = env.scalar("SELECT name FROM users WHERE id = 1")
    assert isinstance(name, str)
    return name


SIZES = [pytest.param(False, id="small"), pytest.param(True, id="streamed")]


@pytest.mark.parametrize("big", SIZES)
def test_a_prepared_transaction_is_invalidated_at_commit_prepared_not_at_prepare(
    xa_env: Env, spawn: Spawn, big: bool
) -> None:
    env = xa_env
    listener, _ = setup(env, spawn)
    r = env.redis()
    ids = range(1, N // 2 + 1) if big else range(1, 3)
    rolled_back = range(N // 2 + 1, N + 1) if big else range(3, 5)
    keys, untouched = cache(env, ids), cache(env, rolled_back)
    xid = prepare(env, listener, ids, big=big, savepoint=rolled_back)
    marker(env, 1)  # everything the stream sent until now was handled
    # Prepared, not committed: readers still read the old row, and cache it.
    assert old_name(env) == "n1"
    assert r.exists(*keys) == len(keys)
    env.sql(f"COMMIT PREPARED '{GID}'")  # from another session, as a coordinator does
    assert old_name(env) == "p1"
    wait_until(lambda: r.exists(*keys) == 0, what="its keys deleted after COMMIT PREPARED")
    marker(env, 2)
    # The subtransaction rolled back inside it deleted nothing.
    assert r.exists(*untouched) == len(untouched)
    if big:
        (committed,) = listener.logged("streamed_transaction_committed")
        assert committed["xid"] == xid
    stop(listener)


@pytest.mark.parametrize("big", SIZES)
def test_a_prepared_transaction_rolled_back_deletes_nothing(
    xa_env: Env, spawn: Spawn, big: bool
) -> None:
    env = xa_env
    listener, _ = setup(env, spawn)
    r = env.redis()
    ids = range(1, N + 1) if big else range(1, 3)
    keys = cache(env, ids)
    xid = prepare(env, listener, ids, big=big)
    marker(env, 1)
    env.sql(f"ROLLBACK PREPARED '{GID}'")
    if big:
        wait_until(
            lambda: any(
                line["xid"] == xid and line["subxid"] == xid
                for line in listener.logged("streamed_transaction_rolled_back")
            ),
            what="its Stream Abort",
        )
    marker(env, 2)  # the listener goes on, past the rollback
    assert r.exists(*keys) == len(keys)
    assert listener.logged("streamed_transaction_committed") == []
    stop(listener)


@pytest.mark.parametrize("big", SIZES)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_transaction_prepared_across_a_listener_restart_is_invalidated(
    xa_env: Env, spawn: Spawn, big: bool, signum: int
) -> None:
    """Other transactions commit while it stays prepared: each is deleted at once, and
    the slot is confirmed past its PREPARE. The listener stops (or is killed), COMMIT
    PREPARED comes while it is down: the next one deletes its keys all the same (the
    slot sends the whole transaction again, not streamed then)."""
    env = xa_env
    listener, config = setup(env, spawn)
    r = env.redis()
    ids = range(1, N + 1) if big else range(1, 3)
    keys = cache(env, ids)
    prepare(env, listener, ids, big=big)
    prepared_at = env.scalar("SELECT pg_current_wal_insert_lsn()::text")
    last = max(marker(env, i) for i in range(1, 21))
    wait_until(
        lambda: parse_lsn((slot(env) or {})["confirmed_flush_lsn"]) >= last,
        what="the slot confirmed past the commits after the PREPARE",
    )
    assert parse_lsn(prepared_at) < last
    assert r.exists(*keys) == len(keys)
    listener.signal(signum)
    assert listener.wait() == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
    env.sql(f"COMMIT PREPARED '{GID}'")
    again = start(env, spawn, config)
    wait_until(lambda: r.exists(*keys) == 0, what="its keys deleted by the next listener")
    stop(again)


@pytest.mark.parametrize("big", SIZES)
def test_a_commit_prepared_held_by_a_synchronous_standby_is_deleted_once_visible(
    xa_env: Env, spawn: Spawn, big: bool
) -> None:
    """COMMIT PREPARED waits for a synchronous standby (here one that never comes): its
    commit is flushed and streamed, but the prepared transaction stays in the proc
    array, and readers read the old row, until the wait ends (cancelled here). Its keys
    go only then."""
    env = xa_env
    listener, _ = setup(env, spawn)
    env.sql("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    env.sql("SELECT pg_reload_conf()")
    wait_until(lambda: listener.logged("commits_seen_before_deletes"), what="the gate on")
    r = env.redis()
    ids = range(1, N + 1) if big else range(1, 3)
    keys = cache(env, ids)
    xid = prepare(env, listener, ids, big=big)  # (not held: synchronous_commit is off)
    # A commit after it, not held (the test server's synchronous_commit is off): the
    # snapshots' xmax passes the prepared transaction's id, which stays in progress.
    marker(env, 1)
    committer = env.connect()
    committer.execute("SET synchronous_commit = on")
    pid = committer.info.backend_pid
    commit = threading.Thread(
        target=_commit_prepared_ignoring_cancel, args=(committer,), daemon=True
    )
    commit.start()
    try:
        wait_until(
            lambda: (
                env.scalar("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [pid])
                == "SyncRep"
            ),
            what="COMMIT PREPARED flushed, waiting for the standby",
        )
        # (or, were it not held back, its keys deleted before anyone can see it)
        wait_until(
            lambda: (
                any(xid in line["xids"] for line in listener.logged("commits_not_visible_yet"))
                or r.exists(*keys) < len(keys)
            ),
            what="its commit streamed, held back",
        )
        assert old_name(env) == "n1"
        assert r.exists(*keys) == len(keys)
        env.sql(f"SELECT pg_cancel_backend({pid})")  # the wait ends: committed here
        commit.join(10)
        assert old_name(env) == "p1"
        wait_until(lambda: r.exists(*keys) == 0, what="its keys deleted once visible")
    finally:
        env.sql(f"SELECT pg_cancel_backend({pid})")
        commit.join(10)
        committer.close()
    stop(listener)


def _commit_prepared_ignoring_cancel(conn: psycopg.Connection[Any]) -> None:
    """COMMIT PREPARED; a cancel of its wait for the standby leaves it committed here
    (PostgreSQL warns and returns)."""
    conn.execute(f"COMMIT PREPARED '{GID}'".encode())


@pytest.mark.parametrize("prepared_long_before", [True, False], ids=["long-before", "just-before"])
def test_writes_committed_while_install_waits_for_a_prepared_transaction_are_swept(
    xa_env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str], prepared_long_before: bool
) -> None:
    """Making the slot waits for every transaction running then, a prepared one too (for
    as long as its coordinator takes), and what commits meanwhile is in no slot: neither
    the prepared transaction nor a write committed while `install` waits, the publication
    long made. The listener that makes the slot itself sweeps for that; a slot `install`
    made so owes the same sweep (before, nothing deleted those keys, ever). Prepared over
    a second before install, install names it before it waits; prepared just before
    (slot_blockers.sql's one-second filter does not count it), the wait's own length
    says a transaction held the slot."""
    env = xa_env
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
        "INSERT INTO users SELECT g, 'u' || g || '@x', 'n' || g FROM generate_series(1, 10) g;"
        "CREATE TABLE small (id int PRIMARY KEY, note text);"
        "INSERT INTO small SELECT g, 'x' FROM generate_series(1, 100) g"
    )
    config = logical_config(env, {**USERS, **SMALL}, second_delete_ms=0)
    r = env.redis()
    with env.connect() as conn:  # (install locks small no more than a writer does)
        conn.execute("BEGIN")
        conn.execute("UPDATE small SET note = 'p' WHERE id BETWEEN 90 AND 92")
        conn.execute(f"PREPARE TRANSACTION '{GID}'".encode())
    prepared = [f"small:{i}" for i in range(90, 93)]
    r.mset(dict.fromkeys(prepared, "cached"))
    keys = cache(env, range(1, 3))
    if prepared_long_before:
        wait_until(
            lambda: env.scalar(
                "SELECT bool_and(prepared < now() - interval '1 second') FROM pg_prepared_xacts"
            ),
            what="the prepared transaction over a second old (a long one, as the listener counts)",
        )
    installed: list[int] = []
    installing = threading.Thread(
        target=lambda: installed.append(cli("install", "--config", config))
    )
    installing.start()
    try:
        wait_until(
            lambda: env.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'transactionid'"
                " AND query LIKE '%pg_create_logical_replication_slot%'"
            ),
            what="install making the slot, waiting for the prepared transaction",
        )
        if prepared_long_before:
            # Said while it waits, naming the transaction (install sat silent behind it).
            said = capsys.readouterr().err
            assert "slot_creation_waits" in said, said
            assert f"prepared transaction '{GID}'" in said, said
        env.sql("UPDATE users SET email = 'w' || email WHERE id BETWEEN 1 AND 2")
        if not prepared_long_before:
            time.sleep(1.5)  # the coordinator takes its time: a long wait, begun young
    finally:
        env.sql(f"COMMIT PREPARED '{GID}'")
        installing.join(30)
    assert installed == [0]
    reason = env.scalar("SELECT resync_reason FROM cdc_invalidator.slot_state_v1")
    listener = start(env, spawn, config)
    marker(env, 1)  # the stream handled up to here (none of those changes is in it)
    # The sweep runs beside the stream, which it does not hold back: the marker's delete
    # can come first (all 7 keys still cached once: the sweep completed 1 ms later).
    wait_until(lambda: listener.logged("sweep_completed"), what="the sweep the slot owes")
    left = r.exists(*keys, *prepared)
    stop(listener)
    assert reason is not None
    assert left == 0, (reason, left)


def test_status_names_the_transaction_holding_the_slots_wal_back(
    xa_env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A transaction open for over a second, then the same prepared, keep the slot's
    WAL from its start: `status` names each, the prepared one by its gid (it has no
    session to find in pg_stat_activity; a helper's note: status showed the WAL kept
    and not what kept it)."""
    env = xa_env
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    config = logical_config(env, USERS)
    install(config)

    def held_back_by() -> str | None:
        capsys.readouterr()
        assert cli("status", "--json", "--config", config) == 0
        by: str | None = json.loads(capsys.readouterr().out)["held_back_by"]
        return by

    assert held_back_by() is None
    capsys.readouterr()
    assert cli("status", "--config", config) == 0
    assert "WAL held back by:     no transaction open over a second" in capsys.readouterr().out
    with env.connect() as conn:
        conn.execute("BEGIN")
        conn.execute("INSERT INTO users VALUES (1, 'a@x', 'a')")
        pid = conn.info.backend_pid
        wait_until(lambda: (held_back_by() or "").startswith(f"pid {pid} "), what="pid named")
        conn.execute(f"PREPARE TRANSACTION '{GID}'".encode())
    wait_until(
        lambda: (held_back_by() or "").startswith(f"prepared transaction '{GID}' (owner "),
        what="the prepared transaction named",
    )
    capsys.readouterr()
    assert cli("status", "--config", config) == 0
    assert f"WAL held back by:     prepared transaction '{GID}'" in capsys.readouterr().out
    env.sql(f"ROLLBACK PREPARED '{GID}'")
    assert held_back_by() is None
