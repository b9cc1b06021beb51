"""The floors: the least a program could do for each measurement, run in the same
benchmark on the same machine, so that ours is reported as a ratio to them. Every floor
packs its UNLINKs as the listener does (500 keys per command, or per hash slot on a
cluster) and reads its keys from the same source (trigger mode: the table, or the queue
for replay; logical mode: a slot of its own on the same publication, decoded by
floor_logical.py, or history_v1 for replay).

The latency floors' loops are processes of their own (floor_listener.py, and
floor_logical.py in logical mode); the drain and replay floors run here, in the
benchmark's process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson
import psycopg
import redis
from psycopg import sql
from redis.crc import key_slot

from cdc_invalidator.settings import Settings
from floor_logical import UNLINK_CHUNK, Consumer, consume, unlink_all
from harness import (
    FLOOR_CHANNEL,
    FLOOR_LISTENER,
    FLOOR_LOGICAL,
    LAT_FLOOR,
    Bench,
    ClusterKeys,
    Target,
)
from procs import read_ready, stop_process, wait_for

if Settings.model_fields["unlink_chunk"].default != UNLINK_CHUNK:
    raise RuntimeError("floor_logical.UNLINK_CHUNK must be the listener's default unlink_chunk")
PUBLICATION = str(Settings.model_fields["publication_name"].default)
# The logical drain floor deletes and acknowledges every 10,000 keys, as the listener
# does a batch of batch_size changes of two keys each.
DRAIN_BATCH_KEYS = 2 * int(Settings.model_fields["batch_size"].default)
FLOOR_SLOT = "cdc_bench_floor"  # the logical floors' own slot (one at a time)
FLOOR_PUBLICATION = "cdc_bench_floor"  # logical latency floor: its table only


def create_floor_slot(target: Target) -> None:
    """A pgoutput slot of the floor's own, from now on (before the changes it drains)."""
    target.admin.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [FLOOR_SLOT])


def drop_floor_slot(target: Target) -> None:
    """Once its walsender is gone (it exits shortly after the floor disconnects)."""

    def inactive() -> bool:
        row = target.admin.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = %s", [FLOOR_SLOT]
        ).fetchone()
        return row is not None and not row[0]

    wait_for(inactive, 30, "the floor's slot released", 0.01)
    target.admin.execute("SELECT pg_drop_replication_slot(%s)", [FLOOR_SLOT])


def start_floor_listener(bench: Bench, target: Target) -> subprocess.Popen[Any]:
    """The latency floor of a capture mode, started; stop it with stop_floor_listener."""
    if target.logical:
        return _start_logical_floor(bench, target)
    return _start_notify_floor(bench)


def stop_floor_listener(target: Target, proc: subprocess.Popen[Any]) -> None:
    stop_process(proc)
    if target.logical:
        drop_floor_slot(target)


def _start_logical_floor(bench: Bench, target: Target) -> subprocess.Popen[Any]:
    """Logical mode: a publication of the floor's table alone and a slot of its own,
    streamed by floor_logical.py (decode the key columns, UNLINK, acknowledge)."""
    target.admin.execute(
        sql.SQL("DROP PUBLICATION IF EXISTS {}; CREATE PUBLICATION {} FOR TABLE {}").format(
            sql.Identifier(FLOOR_PUBLICATION),
            sql.Identifier(FLOOR_PUBLICATION),
            sql.Identifier(LAT_FLOOR),
        )
    )
    create_floor_slot(target)
    proc = bench.spawn(
        [
            sys.executable,
            str(FLOOR_LOGICAL),
            target.dsn,
            str(bench.rs.port),
            FLOOR_SLOT,
            FLOOR_PUBLICATION,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    read_ready(proc, "logical floor listener")
    return proc


def _start_notify_floor(bench: Bench) -> subprocess.Popen[Any]:
    """Trigger mode: a row trigger with the keys in the pg_notify payload, and its loop."""
    bench.admin.execute(
        sql.SQL(
            """
            CREATE OR REPLACE FUNCTION bench_floor_notify() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify({}, 'user:' || NEW.id || ' user:email:' || NEW.email);
                RETURN NULL;
            END $$;
            CREATE OR REPLACE TRIGGER bench_floor AFTER UPDATE ON {}
                FOR EACH ROW EXECUTE FUNCTION bench_floor_notify();
            """
        ).format(sql.Literal(FLOOR_CHANNEL), sql.Identifier(LAT_FLOOR))
    )
    proc = bench.spawn(
        [sys.executable, str(FLOOR_LISTENER), bench.dsn, str(bench.rs.port), FLOOR_CHANNEL],
        stdout=subprocess.PIPE,
        text=True,
    )
    read_ready(proc, "floor listener")
    return proc


def drain_floor(bench: Bench, target: Target, table: str, rows: int) -> float:
    """Trigger mode: SELECT the key columns of every row of `table`, then UNLINK their
    keys 500 per command in one hiredis pipeline. Logical mode: stream the floor's slot
    (created before the changes) until `rows` changes were read, UNLINKing each read's
    keys likewise and acknowledging after them."""
    client = redis.Redis(host="127.0.0.1", port=bench.rs.port, socket_timeout=60)
    try:
        if target.logical:
            elapsed = _logical_floor(target, rows, lambda keys: unlink_all(client, keys))
        else:
            t0 = time.perf_counter()
            unlink_all(client, _table_keys(target, table))
            elapsed = time.perf_counter() - t0
    finally:
        client.close()
    if bench.dbsize() != 0:
        raise RuntimeError("floor drain left keys behind")
    return elapsed


def cluster_drain_floor(keys: ClusterKeys, target: Target, table: str, rows: int) -> float:
    """The same reads as drain_floor(), then one hiredis pipeline per node of one UNLINK
    per hash slot (500 keys at most) over the whole backlog. The slot table is read
    before. Logical mode acknowledges once every node confirmed its deletes."""
    owner = keys.owners()
    if target.logical:
        found: list[bytes] = []
        consumer = Consumer(target.dsn, FLOOR_SLOT, PUBLICATION)
        t0 = time.perf_counter()
        try:
            consume(
                consumer, found.extend, lambda c: c.rows >= rows, batch_keys=2 * rows, ack=False
            )
            _unlink_per_slot(keys, owner, found)
            consumer.ack()
            elapsed = time.perf_counter() - t0
        finally:
            consumer.close()
        drop_floor_slot(target)
    else:
        t0 = time.perf_counter()
        _unlink_per_slot(keys, owner, _table_keys(target, table))
        elapsed = time.perf_counter() - t0
    if keys.dbsize() != 0:
        raise RuntimeError("cluster floor drain left keys behind")
    return elapsed


def _logical_floor(target: Target, rows: int, delete: Any) -> float:
    """Stream the floor's slot until `rows` changes were read and acknowledged (timed
    from the connection), then drop the slot."""
    t0 = time.perf_counter()
    consumer = Consumer(target.dsn, FLOOR_SLOT, PUBLICATION)
    try:
        consume(consumer, delete, lambda c: c.rows >= rows, batch_keys=DRAIN_BATCH_KEYS)
        elapsed = time.perf_counter() - t0
    finally:
        consumer.close()
    drop_floor_slot(target)
    return elapsed


def _table_keys(target: Target, table: str) -> list[bytes]:
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        found = conn.execute(
            sql.SQL("SELECT id::text, email FROM {}").format(sql.Identifier(table))
        ).fetchall()
    return [k for id_text, email in found for k in _keys(id_text, email)]


def _keys(id_text: str | None, email: str | None) -> Iterable[bytes]:
    if id_text is not None:
        yield b"user:" + id_text.encode()
    if email is not None:
        yield b"user:email:" + email.encode()


def _history_keys(item: list[Any]) -> list[bytes]:
    """The keys of a history_v1 item: [schema, table, op, old, new], and on a
    transaction's first event its [xid, commit LSN, commit time] (what `explain` reads);
    or changes gathered column-wise, [schema, table, op, old, new, transaction, count],
    old and new each key column's array."""
    return _change_keys(item[3] or None, item[4] or None, len(item) == PACK_ITEM)


def _change_keys(
    old: dict[str, Any] | None, new: dict[str, Any] | None, packed: bool
) -> list[bytes]:
    """A change's keys: its old row's and, where its key columns differ, its new row's
    (an UPDATE that changed no key column has one set of keys); a pack's key columns are
    arrays, rendered a template at a time."""
    if old is not None and new is not None and _key_columns(old) == _key_columns(new):
        new = None
    found: list[bytes] = []
    for row in (old, new):
        if row is None:
            continue
        if not packed:
            found += _keys(row.get("id"), row.get("email"))
            continue
        found += [b"user:" + i.encode() for i in row.get("id") or [] if i is not None]
        found += [b"user:email:" + e.encode() for e in row.get("email") or [] if e is not None]
    return found


def _key_columns(row: dict[str, Any]) -> tuple[Any, Any]:
    return row.get("id"), row.get("email")


def _unlink_per_slot(keys: ClusterKeys, owner: list[int], found: list[bytes]) -> None:
    by_slot: dict[int, list[bytes]] = {}
    for key in found:
        by_slot.setdefault(key_slot(key), []).append(key)
    pipes = [client.pipeline(transaction=False) for client in keys.nodes]
    for slot, group in by_slot.items():
        for lo in range(0, len(group), UNLINK_CHUNK):
            pipes[owner[slot]].unlink(*group[lo : lo + UNLINK_CHUNK])
    for pipe in pipes:
        pipe.execute()


# What replay reads, per capture mode, in the window of the last %s seconds: trigger
# mode, the queue rows' old and new rows (an UPDATE may change a key) as text, each
# parsed once here (a statement's pack of rows holds its key columns' arrays); logical
# mode, history_v1's batches (a JSON array of [schema, table, op, old, new(, origin)]
# each, or a pack item of arrays), parsed here. The listener reads the same text and
# parses it with orjson. (The trigger floor used to have the server take each key column
# out of the JSON, `old_row->>'id'` and so on: four parses of every pack, slower than the
# listener's own replay; json_array_elements on history_v1 was slower still.)
PACK_ITEM = 7  # the length of a history_v1 item of changes gathered column-wise
REPLAY_TRIGGER = """
    SELECT old_row::text, new_row::text, rows
    FROM cdc_invalidator.queue_v1
    WHERE enqueued_at >= now() - make_interval(secs => %s)"""
REPLAY_LOGICAL = """
    SELECT events::text FROM cdc_invalidator.history_v1
    WHERE at >= now() - make_interval(secs => %s)"""


def _queue_keys(old_text: str | None, new_text: str | None, packed: bool) -> list[bytes]:
    """The keys of a queue row (its old and new rows as text, each parsed once; the new
    one not at all when its text is the old one's, as the listener does)."""
    if new_text == old_text:
        new_text = None
    return _change_keys(
        orjson.loads(old_text) if old_text is not None else None,
        orjson.loads(new_text) if new_text is not None else None,
        packed,
    )


def replay_floor(bench: Bench, target: Target, since_s: float) -> float:
    """Read the window's history rows (the queue in trigger mode, history_v1 in logical
    mode) and parse each once, then UNLINK the distinct keys 500 per command in one
    hiredis pipeline. Timed from the first query, on connections already open, as the
    listener's replay reports its own time."""
    client = redis.Redis(host="127.0.0.1", port=bench.rs.port, socket_timeout=60)
    client.ping()
    found: list[bytes] = []
    with psycopg.connect(target.dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        if target.logical:
            for (text,) in conn.execute(REPLAY_LOGICAL.encode(), [since_s]):
                for item in orjson.loads(text):
                    found += _history_keys(item)
        else:
            for old, new, rows in conn.execute(REPLAY_TRIGGER.encode(), [since_s]):
                found += _queue_keys(old, new, rows is not None)
    unlink_all(client, list(dict.fromkeys(found)))
    elapsed = time.perf_counter() - t0
    client.close()
    if bench.dbsize() != 0:
        raise RuntimeError("replay floor left keys behind")
    return elapsed
