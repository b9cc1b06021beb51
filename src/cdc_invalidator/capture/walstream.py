"""The streaming replication protocol's COPY_BOTH loop, on psycopg 3's low-level calls.

psycopg 3 has no replication API, but a `replication=database` connection can send
START_REPLICATION and then read and write the copy stream with `psycopg.pq`. Messages
(PostgreSQL docs, "Streaming Replication Protocol"):
  server: 'w' XLogData (start LSN, end LSN, clock, payload), 'k' keepalive (end LSN,
          clock, reply requested)
  client: 'r' standby status update (write, flush, apply LSN, clock, reply requested)
"""

from __future__ import annotations

import select
import struct
import time
from typing import Any, NamedTuple

import psycopg
from psycopg import pq, sql

_KEEPALIVE = struct.Struct("!Qq?")
_LSN = struct.Struct("!Q")
_STATUS = struct.Struct("!cQQQq?")
# The protocol's clock: microseconds since 2000-01-01 UTC.
_PG_EPOCH_S = 946_684_800


class Keepalive(NamedTuple):
    wal_end: int
    reply: bool


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class SlotInUse(Exception):
    """START_REPLICATION refused: another process is streaming from the slot."""


class WalStream:
    """One START_REPLICATION … LOGICAL stream; the connection belongs to it."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._pgconn = conn.pgconn
        # The server's error that ended the stream (SQLSTATE, message), if it sent one.
        self.ended_with: tuple[str | None, str] | None = None
        # The WAL position of the first change of the last Stream Start's block: the
        # header of that message gives it (PostgreSQL's stream_start_cb_wrapper), and a
        # block's changes come in WAL order, none before it (the captures' eras).
        self.block_start = 0

    @property
    def walsender(self) -> int:
        """The process id of the walsender streaming to us: the slot's active_pid while
        the slot is ours."""
        return self._conn.info.backend_pid

    @property
    def application_name(self) -> str:
        """The stream's application_name: what synchronous_standby_names would name it by."""
        return self._conn.info.parameter_status("application_name") or ""

    @classmethod
    def start(
        cls,
        conn: psycopg.Connection[Any],
        slot: str,
        options: dict[str, str],
        start_lsn: int = 0,
    ) -> WalStream:
        """Send START_REPLICATION and enter COPY_BOTH; raises SlotInUse if it is taken."""
        command = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(slot),
            sql.SQL(format_lsn(start_lsn)),
            sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v))
                for k, v in options.items()
            ),
        )
        pgconn = conn.pgconn
        pgconn.send_query(command.as_bytes(conn))
        result = pgconn.get_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            message = _error_text(result, pgconn)
            # Drain the rest of the command's results so that the connection is usable.
            while pgconn.get_result() is not None:
                pass
            sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE) if result else None
            if sqlstate == b"55006":  # object_in_use: "replication slot ... is active"
                raise SlotInUse(message)
            raise psycopg.OperationalError(f"START_REPLICATION failed: {message}")
        pgconn.nonblocking = 1
        return cls(conn)

    def fileno(self) -> int:
        return self._pgconn.socket

    def read(self) -> bytes | Keepalive | None:
        """The next message already received: an XLogData's payload (bytes; its header's
        positions are not needed, the payload's own Commit carrying the position, but for
        a Stream Start's: block_start), a Keepalive, or None when nothing is buffered.
        Never blocks; raises OperationalError when the stream or the connection ends."""
        n, data = self._pgconn.get_copy_data(1)
        if n == 0:
            # Nothing complete in libpq's buffer: take what the socket has, without waiting.
            self._pgconn.consume_input()
            n, data = self._pgconn.get_copy_data(1)
            if n == 0:
                return None
        if n < 0:
            self._end_of_stream(n)
        kind = data[0]
        if kind == 0x77:  # 'w': start, end, clock (3 x 8 bytes), then the payload
            # (tobytes(): 0.14 us a message, bytes() of the slice 0.25 us; a 1M-row
            # statement is a million messages)
            payload = data[25:].tobytes()
            if payload[:1] == b"S":  # Stream Start
                self.block_start = _LSN.unpack_from(data, 1)[0]
            return payload
        if kind == 0x6B:  # 'k'
            end, _clock, reply = _KEEPALIVE.unpack_from(data, 1)
            return Keepalive(end, reply)
        raise psycopg.OperationalError(f"unexpected replication message type {chr(kind)!r}")

    def wait(self, timeout_s: float, wakeup_fd: int | None = None) -> bool:
        """Wait for data (True) or a byte on wakeup_fd or the timeout (False)."""
        sock = self._pgconn.socket
        fds = [sock] if wakeup_fd is None else [sock, wakeup_fd]
        readable, _, _ = select.select(fds, [], [], max(0.0, timeout_s))
        if sock in readable:
            self._pgconn.consume_input()  # raises OperationalError if the server is gone
            return True
        return False

    def send_status(self, write: int, flush: int, reply: bool = False) -> None:
        """Standby status update: received up to `write`, done (flushed, applied) up to
        `flush`. The slot's confirmed position moves to `flush`."""
        clock = int((time.time() - _PG_EPOCH_S) * 1_000_000)
        message = _STATUS.pack(b"r", write, flush, flush, clock, reply)
        if self._pgconn.put_copy_data(message) != 1:
            raise psycopg.OperationalError(
                f"cannot send status update: {self._pgconn.get_error_message()}"
            )
        # Non-blocking: 1 means more to send; a status update is small, wait for it.
        while self._pgconn.flush() == 1:
            select.select([], [self._pgconn.socket], [], 1.0)

    def close(self) -> None:
        self._conn.close()

    def _end_of_stream(self, n: int) -> None:
        if n == -2:
            raise psycopg.OperationalError(
                f"replication stream failed: {self._pgconn.get_error_message()}"
            )
        # -1: the server ended the copy; its reason is in the result that follows.
        result = self._pgconn.get_result()
        text = _error_text(result, self._pgconn)
        if result is not None:
            sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
            self.ended_with = (sqlstate.decode() if sqlstate else None, text)
        raise psycopg.OperationalError(f"replication stream ended by the server: {text}")


def _error_text(result: pq.abc.PGresult | None, pgconn: pq.abc.PGconn) -> str:
    if result is not None and result.error_message:
        return result.error_message.decode(errors="replace").strip()
    return pgconn.get_error_message(encoding="utf-8").strip() or "no reason given"
