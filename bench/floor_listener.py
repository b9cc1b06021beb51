"""The latency floor for bench/run.py: the least a NOTIFY-driven invalidator can do.

A row trigger sends the row's keys in the NOTIFY payload; this loop receives the
notification with psycopg 3 and UNLINKs the keys with redis-py (hiredis parser). No
queue, no batching, no acknowledgement, no logging: nothing survives a restart, which is
why the product cannot work this way, and why it is the floor.

Usage: floor_listener.py DSN REDIS_PORT CHANNEL. Prints "ready" once LISTENing; runs
until killed.
"""

from __future__ import annotations

import sys

import psycopg
import redis
from psycopg import sql


def main(argv: list[str]) -> int:
    dsn, port, channel = argv[1], int(argv[2]), argv[3]
    client = redis.Redis(host="127.0.0.1", port=port)
    client.ping()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        print("ready", flush=True)
        for notify in conn.notifies():
            client.unlink(*notify.payload.split(" "))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
