"""The logical-mode floor for bench/run.py: the least a pgoutput consumer can do.

A `replication=database` connection (psycopg 3) sends START_REPLICATION on a slot of its
own and reads the COPY_BOTH stream with psycopg.pq's low-level calls. Of pgoutput's
messages it decodes only Relation (where the key columns are), Insert and Update (the key
columns' text, old and new), and Commit (the position to acknowledge); nothing is
reused from cdc_invalidator's decoder. The keys read are UNLINKed 500 per command (the
listener's unlink_chunk) in one hiredis pipeline, after every read of the socket (the
latency floor) or every 10,000 keys (the drain floor: the listener's batch of 5,000
changes), then acknowledged with a standby status update. No bookkeeping table, no history, no
dead letters, no logging; DELETE and TRUNCATE are ignored: it is a floor, not a product.

As a script (the latency floor, a process of its own like floor_listener.py):
floor_logical.py DSN REDIS_PORT SLOT PUBLICATION. Prints "ready" once streaming; runs
until killed. The drain floors import Consumer and drive it themselves (floors.py).
"""

from __future__ import annotations

import select
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg
import redis
from psycopg import pq, sql

UNLINK_CHUNK = 500
# The key templates of the benchmark's tables, by column: user:{id}, user:email:{email}.
KEY_PREFIXES = ((b"id", b"user:"), (b"email", b"user:email:"))

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_COMMIT_END = struct.Struct("!Q")  # after 'C', flags (1 byte) and the commit LSN (8)
_STATUS = struct.Struct("!cQQQq?")
_PG_EPOCH_US = 946_684_800_000_000


class Consumer:
    """One slot's stream, decoded to the benchmark's keys."""

    def __init__(self, dsn: str, slot: str, publication: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, replication="database")
        self.pg = self.conn.pgconn
        command = sql.SQL(
            "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {})"
        ).format(sql.Identifier(slot), sql.Literal(publication))
        self.pg.send_query(command.as_bytes(self.conn))
        result = self.pg.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise RuntimeError(f"START_REPLICATION failed: {self.pg.get_error_message()}")
        self.pg.nonblocking = 1
        # relid -> {tuple index: key prefix} of each key column
        self.relations: dict[int, dict[int, bytes]] = {}
        self.rows = 0  # Insert and Update messages seen
        self.acked = self.received = 0  # commit end positions
        self.reply_wanted = False  # a keepalive asked for a status update

    def read(self, keys: list[bytes]) -> bool:
        """Decode every message already received, appending the keys of its rows to
        `keys`; False when nothing was there. Never blocks."""
        got = False
        while True:
            n, data = self.pg.get_copy_data(1)
            if n == 0:
                self.pg.consume_input()
                n, data = self.pg.get_copy_data(1)
                if n == 0:
                    return got
            if n < 0:
                raise RuntimeError(f"stream ended: {self.pg.get_error_message()}")
            got = True
            if data[0] == 0x77:  # 'w' XLogData: 24 bytes of header, then pgoutput's message
                self._message(bytes(data[25:]), keys)
            elif data[0] == 0x6B and data[17]:  # 'k' keepalive asking for a reply
                self.reply_wanted = True  # answered after the deletes, by consume()

    def _message(self, msg: bytes, keys: list[bytes]) -> None:
        kind = msg[0]
        if kind in (0x49, 0x55):  # 'I' Insert, 'U' Update: relid, [K|O old], N new
            wanted = self.relations[_U32.unpack_from(msg, 1)[0]]
            unpack = _U32.unpack_from
            row: list[bytes] = []
            pos = 5
            while pos < len(msg):  # each tuple: its kind, column count, columns
                pos += 3
                for i in range(_U16.unpack_from(msg, pos - 2)[0]):
                    if msg[pos] == 0x74:  # 't': text of a given length; 'n' null, 'u' unchanged
                        end = pos + 5 + unpack(msg, pos + 1)[0]
                        if i in wanted:
                            row.append(wanted[i] + msg[pos + 5 : end])
                        pos = end
                    else:
                        pos += 1
            keys += dict.fromkeys(row)  # old and new alike: one of each key
            self.rows += 1
        elif kind == 0x43:  # 'C' Commit: flags, commit LSN, end LSN, time
            self.received = _COMMIT_END.unpack_from(msg, 10)[0]
        elif kind == 0x52:  # 'R' Relation: relid, namespace, name, identity, columns
            relid = _U32.unpack_from(msg, 1)[0]
            pos = msg.index(0, msg.index(0, 5) + 1) + 2
            count = _U16.unpack_from(msg, pos)[0]
            pos += 2
            names: list[bytes] = []
            for _ in range(count):
                end = msg.index(0, pos + 1)
                names.append(msg[pos + 1 : end])
                pos = end + 9  # type OID, type modifier
            self.relations[relid] = {names.index(column): prefix for column, prefix in KEY_PREFIXES}

    def ack(self) -> None:
        """Standby status update: everything up to the last commit read is done."""
        clock = time.time_ns() // 1000 - _PG_EPOCH_US
        lsn = self.received
        self.pg.put_copy_data(_STATUS.pack(b"r", lsn, lsn, lsn, clock, False))
        while self.pg.flush() == 1:
            select.select([], [self.pg.socket], [], 1.0)
        self.acked = lsn
        self.reply_wanted = False

    def wait(self, timeout_s: float) -> None:
        select.select([self.pg.socket], [], [], timeout_s)

    def close(self) -> None:
        self.conn.close()


def unlink_all(client: redis.Redis, keys: list[bytes]) -> None:
    """UNLINK_CHUNK keys per UNLINK, every command in one pipeline."""
    pipe = client.pipeline(transaction=False)
    for lo in range(0, len(keys), UNLINK_CHUNK):
        pipe.unlink(*keys[lo : lo + UNLINK_CHUNK])
    pipe.execute()


def consume(
    consumer: Consumer,
    delete: Callable[[list[bytes]], Any],
    done: Callable[[Consumer], bool] = lambda _: False,
    *,
    batch_keys: int = 0,
    ack: bool = True,
) -> None:
    """Read what arrived; once `batch_keys` keys are in hand (0: after every read), or
    done() says no more will come, delete them and acknowledge (unless the caller will,
    after deletes of its own). Waits for more until done() and nothing is left."""
    pending: list[bytes] = []
    while True:
        got = consumer.read(pending)
        finished = done(consumer)
        if pending and (finished or len(pending) >= batch_keys):
            delete(pending)
            pending = []
        if ack and not pending and (consumer.received != consumer.acked or consumer.reply_wanted):
            consumer.ack()
        if finished and not pending:
            return
        if not got:
            consumer.wait(1.0)


def main(argv: list[str]) -> int:
    dsn, port, slot, publication = argv[1], int(argv[2]), argv[3], argv[4]
    client = redis.Redis(host="127.0.0.1", port=port)
    client.ping()
    consumer = Consumer(dsn, slot, publication)
    print("ready", flush=True)
    consume(consumer, lambda keys: unlink_all(client, keys))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
