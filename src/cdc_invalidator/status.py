"""`status`: how far behind the listener is, read from the database."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg

from cdc_invalidator.pg.queries import Q


class NotInstalledHere(Exception):
    """Nothing of ours to report on in this database (for this slot)."""


def _when(value: datetime | None) -> str:
    return value.isoformat() if value else "never"


@dataclass(frozen=True, slots=True)
class Status:
    backlog: int
    oldest_pending_age_s: float | None
    dead_letters: int
    last_processed_at: datetime | None
    events_processed: int
    notify_queue_usage: float

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["capture"] = "trigger"
        data["last_processed_at"] = (
            self.last_processed_at.isoformat() if self.last_processed_at else None
        )
        return data

    def lines(self) -> list[str]:
        age = "-" if self.oldest_pending_age_s is None else f"{self.oldest_pending_age_s:.3f} s"
        return [
            "capture:              trigger",
            f"backlog:              {self.backlog} events",
            f"oldest pending age:   {age}",
            f"dead letters:         {self.dead_letters}",
            f"last processed at:    {_when(self.last_processed_at)}",
            f"events processed:     {self.events_processed}",
            f"NOTIFY queue usage:   {self.notify_queue_usage:.1%}",
        ]


@dataclass(frozen=True, slots=True)
class LogicalStatus:
    slot: str
    slot_exists: bool
    slot_lag_bytes: int | None  # WAL written since the position the listener confirmed
    slot_held_wal_bytes: int | None  # WAL kept for the slot, from its restart_lsn
    wal_status: str | None  # reserved, extended, unreserved or lost
    slot_active_pid: int | None
    safe_wal_size_bytes: int | None  # before the slot is lost (max_slot_wal_keep_size)
    sweep_owed: str | None  # why changes may have been missed, until the sweep is done
    dead_letters: int
    last_processed_at: datetime | None
    events_processed: int
    held_back_by: str | None  # the oldest transaction (over a second) keeping WAL back
    # Whether the role sees other roles' transactions (pg_read_all_stats): without it,
    # no held_back_by says nothing of them.
    sees_all_sessions: bool = True

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["capture"] = "logical"
        data["last_processed_at"] = (
            self.last_processed_at.isoformat() if self.last_processed_at else None
        )
        return data

    def _none_held(self) -> str:
        if self.sees_all_sessions:
            return "no transaction open over a second"
        return (
            "none of this role's open over a second (it lacks pg_read_all_stats: other "
            "roles' transactions are hidden from it; ask as a role that has it)"
        )

    def lines(self) -> list[str]:
        if not self.slot_exists:
            slot = "missing (the listener re-creates it and sweeps every watched table)"
        else:
            by = f"streamed by pid {self.slot_active_pid}" if self.slot_active_pid else "idle"
            slot = f"{self.wal_status}, {by}"
        lag = "-" if self.slot_lag_bytes is None else f"{self.slot_lag_bytes} bytes"
        held = "-" if self.slot_held_wal_bytes is None else f"{self.slot_held_wal_bytes} bytes"
        lost = self.wal_status == "lost"
        if lost or not self.slot_exists:
            safe = "-"
        elif self.safe_wal_size_bytes is None:
            safe = "unlimited (max_slot_wal_keep_size = -1)"
        else:
            safe = f"{self.safe_wal_size_bytes} bytes"
        owed = self.sweep_owed or (
            "at the listener's next start (the slot is lost or missing: it re-creates it)"
            if lost or not self.slot_exists
            else "no"
        )
        return [
            f"capture:              logical, slot {self.slot!r}",
            f"slot:                 {slot}",
            f"slot lag:             {lag}",
            f"WAL kept for it:      {held}",
            f"WAL before slot lost: {safe}",
            f"WAL held back by:     {self.held_back_by or self._none_held()}",
            f"sweep owed:           {owed}",
            f"dead letters:         {self.dead_letters}",
            f"last processed at:    {_when(self.last_processed_at)}",
            f"events processed:     {self.events_processed}",
        ]


def read_status(conn: psycopg.Connection[Any]) -> Status:
    row = conn.execute(Q.STATUS.sql).fetchone()
    if row is None:
        raise NotInstalledHere(
            "cdc_invalidator.listener_state_v1 is empty: run `cdc-invalidator install`"
        )
    backlog, age, dead, last, processed, notify_usage = row
    return Status(int(backlog), age, int(dead), last, int(processed), float(notify_usage))


def read_logical_status(conn: psycopg.Connection[Any], slot: str) -> LogicalStatus:
    row = conn.execute(Q.LOGICAL_STATUS.sql, {"slot": slot}).fetchone()
    if row is None:
        raise NotInstalledHere(
            f"slot {slot!r} is not registered: run `cdc-invalidator install` with "
            'capture = "logical"'
        )
    exists, lag, held, wal_status, pid, safe, owed, dead, last, processed, held_by, sees = row
    return LogicalStatus(
        slot,
        bool(exists),
        lag,
        held,
        wal_status,
        pid,
        safe,
        owed,
        int(dead),
        last,
        int(processed),
        held_by,
        bool(sees),
    )
