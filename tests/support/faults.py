"""The fault tests' world, shared with the chaos, probes, metrics, replay, standby and
logical tests: users(id, email) with two key templates, transactions noted by their WAL
positions, whether the listener has acknowledged them (tests/test_faults.py's docstring
says how each mode tells), and whether it is held on a paused Redis.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg.conninfo import make_conninfo

from cdc_invalidator.capture.trigger_queue import TriggerQueue
from cdc_invalidator.cli import main
from cdc_invalidator.pg.connect import LISTENER
from tests.support.config import write_config
from tests.support.env import Env, redis_of
from tests.support.waits import wait_until

TEMPLATES = ["user:{id}", "user:email:{email}"]
APP_NAME = "cdc-invalidator"  # the listener's application_name (the default setting)
SLOT = "cdc_invalidator"  # logical mode: the default slot_name


def email(i: int) -> str:
    return f"u{i}@x"


def keys_of(i: int) -> list[str]:
    return [f"user:{i}", f"user:email:{email(i)}"]


def setup_users(
    env: Env, *, rows: int = 0, database_url: str | None = None, **settings: Any
) -> Path:
    """users(id, email) with `rows` rows (written before install: no events), installed."""
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    if rows:
        insert_users(env, 1, rows)
    config = users_config(env, database_url=database_url, **settings)
    assert main(["install", "--config", str(config)]) == 0
    return config


def users_config(
    env: Env,
    *,
    name: str = "config.toml",
    database_url: str | None = None,
    role: str | None = None,
    **settings: object,
) -> Path:
    """A configuration of users' TEMPLATES in the test's capture mode, connecting as
    `role` (the test's superuser by default) or to `database_url`."""
    mode: dict[str, object] = {"capture": env.capture} if env.logical else {}
    dsn = make_conninfo(env.dsn, user=role) if role else env.dsn
    return write_config(
        env.tmp_path / name,
        database_url=database_url or dsn,
        redis_url=env.redis_url,
        tables={"public.users": TEMPLATES},
        **{**mode, **settings},
    )


@dataclass(frozen=True)
class Written:
    """One committed transaction: the user ids it changed, and where the WAL ended after
    its last change (before its commit record) and after its commit (END_OF_WAL)."""

    ids: range
    last_change: str
    committed: str


# Where the last WAL record ended. pg_current_wal_insert_lsn() says where the next one
# starts: past a page's header (24 bytes; 40 on a segment's first page) when the last
# one ended at the page's start, where a WAL reader puts that record's end (the commit
# end that pgoutput sends, and the listener confirms). Compared as it was, a commit that
# ended on a page boundary looked unconfirmed by 24 bytes (CI, PostgreSQL 18:
# confirmed 0/1922E000, "committed" 0/1922E018).
END_OF_WAL = """
SELECT (CASE
            WHEN (at - '0/0') % segment = 40 THEN at - 40
            WHEN (at - '0/0') % page = 24 THEN at - 24
            ELSE at
        END)::text
FROM (SELECT pg_current_wal_insert_lsn() AS at,
             current_setting('wal_block_size')::numeric AS page,
             pg_size_bytes(current_setting('wal_segment_size')) AS segment) s
"""


def write(env: Env, statement: str, params: Sequence[Any] = (), *, ids: range) -> Written:
    """Run one statement (changing the rows `ids`) in a transaction of its own, noting
    where it is in the WAL."""
    position = END_OF_WAL
    with env.connect() as conn:
        with conn.transaction():
            conn.execute(statement.encode(), params)
            last_change = conn.execute(position).fetchone()
        committed = conn.execute(position).fetchone()
    assert last_change is not None
    assert committed is not None
    return Written(ids, last_change[0], committed[0])


def insert_users(env: Env, first: int, count: int) -> Written:
    """One statement, one transaction: `count` INSERT events once installed."""
    return write(
        env,
        "INSERT INTO users SELECT i, 'u' || i || '@x' FROM generate_series(%s::int, %s::int) i",
        [first, first + count - 1],
        ids=range(first, first + count),
    )


def insert_users_one_by_one(env: Env, first: int, count: int) -> Written:
    """One transaction of `count` one-row INSERT statements: in trigger mode, `count`
    queue rows, where one statement over them all would be queued as packs of a thousand
    (which a batch takes whole, whatever batch_size says)."""
    last = first + count - 1
    return write(
        env,
        f"DO $$ BEGIN FOR i IN {first:d}..{last:d} LOOP "
        "INSERT INTO users VALUES (i, 'u' || i || '@x'); END LOOP; END $$",
        ids=range(first, last + 1),
    )


def cache(r: redis.Redis, ids: Sequence[int] | range, value: str = "stale") -> None:
    """What an app would have cached (or negatively cached) for these rows."""
    pipe = r.pipeline(transaction=False)
    ids = list(ids)
    for start in range(0, len(ids), 5000):
        pipe.mset({key: value for i in ids[start : start + 5000] for key in keys_of(i)})
    pipe.execute()


@contextmanager
def bulk_limit_at(limit: int, *servers: redis.Redis) -> Iterator[None]:
    """proto-max-bulk-len set to `limit` on each server, for a while (then as it was)."""
    before = [str(r.config_get("proto-max-bulk-len")["proto-max-bulk-len"]) for r in servers]
    for r in servers:
        r.config_set("proto-max-bulk-len", limit)
    try:
        yield
    finally:
        for r, value in zip(servers, before, strict=True):
            r.config_set("proto-max-bulk-len", value)


def changed_and_deleted(
    r: redis.Redis, dsn: str, i: int, what: str, *, first: Sequence[str] = ()
) -> None:
    """User `i` cached, its email changed on the server at `dsn` (in a session that runs
    `first` before), and its keys seen deleted."""
    cache(r, [i])
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in first:
            conn.execute(statement.encode())
        conn.execute("UPDATE users SET email = %s WHERE id = %s", [f"changed{i}@x", i])
    wait_until(lambda: r.exists(*keys_of(i)) == 0, what=what)


# Trigger mode: the events the listener has not acknowledged (its saved progress, as
# `status` reads it), one row each: a queue row's, or each element of a pack's (a
# statement's rows, their key columns as arrays). Processed rows stay in the table until
# pruned, so the queue's size is not the measure.
PENDING = """
    SELECT q.id, coalesce(e.id, coalesce(q.new_row, q.old_row) ->> 'id')::int
    FROM cdc_invalidator.listener_state_v1 s
    JOIN cdc_invalidator.queue_v1 q
      ON q.xid >= pg_snapshot_xmin(s.snapshot)
     AND NOT pg_visible_in_snapshot(q.xid, s.snapshot)
     AND NOT coalesce(pg_visible_in_snapshot(q.xid, s.window_end)
                      AND (q.xid, q.id) <= (s.after_xid, s.after_id), false)
    LEFT JOIN LATERAL (
        SELECT json_array_elements_text(coalesce(q.new_row, q.old_row) -> 'id') AS id
        WHERE q.rows IS NOT NULL
    ) e ON true
"""


def queue_count(env: Env) -> int:
    """Trigger mode: events not acknowledged yet."""
    with env.connect() as conn:
        return len(conn.execute(PENDING.encode()).fetchall())


def read_and_saved(env: Env, queue: TriggerQueue, sizes: list[int] | None = None) -> bool:
    """Trigger mode, a queue the test reads itself: one batch read and acknowledged (its
    size noted in `sizes`), then saved and pruned if due. True once nothing committed is
    left to read, the window is finished, and that is saved (what status.sql reads)."""
    with queue.batch(5000) as batch:
        if sizes is not None:
            sizes.append(batch.size)
    queue.maintain()
    progress = queue._progress
    return queue_count(env) == 0 and progress.window is None and not progress.unsaved


def queue_blocks_read(
    env: Env, statement: str, params: dict[str, Any] | None = None, *, listener: bool = True
) -> int:
    """Trigger mode: the blocks of the queue and its index that `statement` reads, in a
    session of its own (PostgreSQL 15 counts a session's reads until it reports them)
    with the listener's settings (or none), in a transaction rolled back: what it costs,
    not how long it takes. Sequential scans off: on a queue of production size the
    planner takes the index for these reads, on a test's few hundred pages it may not,
    and the test is of what the statement asks the index for."""
    read = (
        "SELECT pg_stat_get_xact_blocks_fetched('cdc_invalidator.queue_v1'::regclass)"
        " + pg_stat_get_xact_blocks_fetched('cdc_invalidator.queue_v1_xid_id'::regclass)"
    )
    settings = [*(LISTENER.settings if listener else ()), ("enable_seqscan", "off")]
    with env.connect() as conn, conn.transaction(force_rollback=True):
        for name, value in settings:
            conn.execute("SELECT set_config(%s, %s, true)", [name, str(value)])
        conn.execute(statement.encode(), params)
        blocks = conn.execute(read).fetchone()
    assert blocks is not None
    return int(blocks[0])


def slot_confirmed(env: Env) -> str:
    """Logical mode: the slot's confirmed position (what the listener finished)."""
    lsn = env.scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        [SLOT],
    )
    assert lsn is not None, f"no replication slot {SLOT!r}"
    return str(lsn)


def resumes_at(env: Env) -> str:
    """Logical mode: where the next listener resumes, what it acknowledged: the position
    it saved (slot_state_v1), which it starts the stream from, or the slot's if that is
    ahead (the server forwards a start point behind it)."""
    saved = env.scalar("SELECT acked_lsn::text FROM cdc_invalidator.slot_state_v1")
    confirmed = slot_confirmed(env)
    return confirmed if saved is None or lsn_before(str(saved), confirmed) else str(saved)


def lsn_before(a: str, b: str) -> bool:
    high_a, low_a = a.split("/")
    high_b, low_b = b.split("/")
    return (int(high_a, 16), int(low_a, 16)) < (int(high_b, 16), int(low_b, 16))


def acknowledged(env: Env, written: Written) -> bool:
    """Everything up to the transaction `written` (included) is acknowledged."""
    if env.logical:
        return lsn_before(written.last_change, slot_confirmed(env))
    return queue_count(env) == 0


def blocked_on_redis(r: redis.Redis) -> bool:
    """Under CLIENT PAUSE WRITE: the listener sent its UNLINKs and Redis holds them.

    An at-least-once listener has not acknowledged that batch yet, whatever its design.
    """
    return any(
        client.get("name") == APP_NAME and "b" in client.get("flags", "")
        for client in r.client_list()
    )


def update_without_notify(writer: psycopg.Connection[Any], user_id: int) -> int:
    """In `writer` (autocommit), a transaction left open after a one-row UPDATE of user
    `user_id`, made with cdc_invalidator.notify off (no payload of its own, as two-phase
    commit needs): its xid."""
    writer.execute("SELECT set_config('cdc_invalidator.notify', 'off', false)")
    writer.execute("BEGIN")
    writer.execute("UPDATE users SET email = email WHERE id = %s", [user_id])
    found = writer.execute("SELECT pg_current_xact_id()::text").fetchone()
    assert found is not None
    return int(found[0])


# A NOTIFY on the payloads' channel, as a capture function sends one, and as the owner of
# a watched table may (it may call notify_row_v1(); it may not read the channel's name).
NOTIFY_ROW = "SELECT cdc_invalidator.notify_row_v1(%s)"


def payload_channel(env: Env) -> str:
    """The NOTIFY payloads' channel: its name only the installing role may read (the
    tests' superuser)."""
    channel = env.scalar("SELECT channel FROM cdc_invalidator.payload_channel_v1")
    assert isinstance(channel, str)
    return channel


def listener_quiet(env: Env) -> bool:
    """The wake-up's first lock free (schema.sql's wake_needed_v1()): the listener is
    quiet, and a one-row write now sends its payload."""
    return bool(
        env.scalar(
            "SELECT pg_try_advisory_lock_shared(hashtext('cdc_invalidator.queue_v1'), 1)"
            " AND pg_advisory_unlock_shared(hashtext('cdc_invalidator.queue_v1'), 1)"
        )
    )


def forged_payload(xid: int, user_id: int) -> str:
    """The NOTIFY payload a capture function would send for that UPDATE (users(id,
    email) as setup_users makes it), as another session can forge it."""
    row = {"id": str(user_id), "email": f"u{user_id}@x"}
    return json.dumps({"s": "public", "t": "users", "x": xid, "a": None, "r": [["U", row, row]]})


def with_rdb_snapshots(env: Env) -> None:
    """Restart the test's Redis with RDB snapshots on, as a production one's may be."""
    server = redis_of(env)
    server.args = [*server.args, "--save", "3600 1"]
    server.restart()


def crash_onto_the_snapshot(env: Env) -> None:
    """Redis killed, and started on its last snapshot: deletes since are undone."""
    server = redis_of(env)
    server.kill()  # SIGKILL: the deletes since the SAVE are lost with it
    server.start()  # loads dump.rdb: the stale keys are back
