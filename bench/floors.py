"""The floors: the least a program could do for each measurement, run in the same
benchmark on the same machine, so that ours is reported as a ratio to them.

The latency floor's loop is a process of its own (floor_listener.py); the drain and
replay floors run here, in the benchmark's process.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import psycopg
import redis
from psycopg import sql
from redis.crc import key_slot

from harness import (
    FLOOR_CHANNEL,
    FLOOR_LISTENER,
    LAT_FLOOR,
    Bench,
    ClusterKeys,
    user_keys,
)
from procs import read_ready


def start_floor_listener(bench: Bench) -> subprocess.Popen[Any]:
    """The floor: a row trigger with the keys in the pg_notify payload, and its loop."""
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


def drain_floor(bench: Bench, table: str, keys_per_unlink: int, dsn: str) -> float:
    """SELECT the key columns of every row + pipelined UNLINK of their keys (hiredis)."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id::text, email FROM {}").format(sql.Identifier(table))
        ).fetchall()
    client = redis.Redis(host="127.0.0.1", port=bench.rs.port, socket_timeout=60)
    pipe = client.pipeline(transaction=False)
    keys: list[str] = []
    for id_text, email in rows:
        keys.append("user:" + id_text)
        keys.append("user:email:" + email)
        if len(keys) >= keys_per_unlink:
            pipe.unlink(*keys)
            keys = []
            if len(pipe) >= max(100, 10_000 // keys_per_unlink):
                pipe.execute()
    if keys:
        pipe.unlink(*keys)
    pipe.execute()
    elapsed = time.perf_counter() - t0
    client.close()
    if bench.dbsize() != 0:
        raise RuntimeError("floor drain left keys behind")
    return elapsed


def cluster_drain_floor(keys: ClusterKeys, table: str, dsn: str, per_slot: bool) -> float:
    """SELECT the key columns of every row + one hiredis pipeline per node: one UNLINK
    per key, or (per_slot) one UNLINK per hash slot. The slot table is read before."""
    owner = keys.owners()
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id::text, email FROM {}").format(sql.Identifier(table))
        ).fetchall()
    pipes = [client.pipeline(transaction=False) for client in keys.nodes]
    by_slot: dict[int, list[str]] = {}
    for n, (id_text, email) in enumerate(rows, 1):
        for key in ("user:" + id_text, "user:email:" + email):
            slot = key_slot(key.encode())
            if per_slot:
                by_slot.setdefault(slot, []).append(key)
            else:
                pipes[owner[slot]].unlink(key)
        if n % 5000 == 0 and not per_slot:
            for pipe in pipes:
                pipe.execute()
    for slot, group in by_slot.items():
        pipes[owner[slot]].unlink(*group)
    for pipe in pipes:
        pipe.execute()
    elapsed = time.perf_counter() - t0
    if keys.dbsize() != 0:
        raise RuntimeError("cluster floor drain left keys behind")
    return elapsed


def unlink_floor(bench: Bench, ids: range) -> float:
    """Pipelined UNLINK of the replayed keys, one key per UNLINK (keys known up front)."""
    keys = [k for i in ids for k in user_keys(i)]
    client = redis.Redis(host="127.0.0.1", port=bench.rs.port, socket_timeout=60)
    t0 = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.unlink(key)
        if len(pipe) >= 10_000:
            pipe.execute()
    pipe.execute()
    elapsed = time.perf_counter() - t0
    client.close()
    if bench.dbsize() != 0:
        raise RuntimeError("floor unlink left keys behind")
    return elapsed
