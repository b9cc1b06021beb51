"""Key-deletion clock for bench/run.py, run as its own process.

Subscribes to Redis keyspace notifications (the benchmark sets notify-keyspace-events to
"Kg", so DEL and UNLINK publish `del` on `__keyspace@<db>__:<key>`) and notes, per key,
the CLOCK_MONOTONIC time at which its first deletion arrived. CLOCK_MONOTONIC is one
clock for every process of the machine, so the benchmark subtracts its own commit times.

A separate process rather than a thread of the benchmark: the writer's Python code then
never holds a lock the clock needs, and the same clock measures the floor and ours.

Usage: keywatch.py PORT PATTERN. Prints "ready" once subscribed; on the message "dump"
on the control channel it prints one JSON object {key: monotonic_ns} and exits. Redis
delivers one connection's messages in order, so every deletion published before the
"dump" was seen.
"""

from __future__ import annotations

import json
import sys
import time

import redis

CONTROL = "cdc-bench:control"
KEYSPACE_PREFIX = "__keyspace@0__:"


def main(argv: list[str]) -> int:
    port, pattern = int(argv[1]), argv[2]
    client = redis.Redis(host="127.0.0.1", port=port)
    pubsub = client.pubsub()
    pubsub.psubscribe(KEYSPACE_PREFIX + pattern)
    pubsub.subscribe(CONTROL)
    prefix = KEYSPACE_PREFIX.encode()
    deleted: dict[str, int] = {}
    confirmations = 0
    for message in pubsub.listen():
        now = time.monotonic_ns()
        kind = message["type"]
        if kind == "pmessage":
            if message["data"] == b"del":
                channel: bytes = message["channel"]
                deleted.setdefault(channel[len(prefix) :].decode(), now)
        elif kind == "message":
            if message["data"] == b"dump":
                sys.stdout.write(json.dumps(deleted) + "\n")
                sys.stdout.flush()
                return 0
        elif kind in ("psubscribe", "subscribe"):
            confirmations += 1
            if confirmations == 2:
                print("ready", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
