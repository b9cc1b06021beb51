"""The replication slot's rules, in one place.

`SlotState` is what the server says of the slot and what the listener last recorded
(slot_info.sql, read by column name); `classify()` is the one reading of it that the
listener (resume, sweep, refuse or stand by), `check` (its lines) and `install` (create
the slot or not) act on.

The listener saves the position in slot_state_v1 before it tells the slot, so a slot
found past that position was moved by someone else: changes may have been missed, as
they may when a slot that was used is gone, or lost the WAL it needed. Or a crash lost
the save (the bookkeeping session commits asynchronously) after the slot, which
PostgreSQL writes to disk at once when its restart position moves, was told: nothing
was missed then, but it cannot be told apart, and the sweep is the safe side.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import class_row

from cdc_invalidator.capture.errors import returned
from cdc_invalidator.capture.walstream import format_lsn, parse_lsn
from cdc_invalidator.pg.queries import Q


class SlotClass(enum.Enum):
    MISSING_FIRST_USE = "missing"  # never used (no position saved): created, nothing missed
    GONE = "gone"  # used, then dropped (or a failover to a server without it)
    FOREIGN = "foreign"  # another type, plugin or database: not ours to use
    IN_USE = "in use"  # a process streams it (another listener)
    LOST = "lost"  # invalidated: the WAL it needed was removed
    AHEAD = "ahead"  # past the position we saved: re-created, or consumed by another client
    OK = "ok"

    @property
    def missed_changes(self) -> bool:
        """Changes may have been missed: every watched table is swept before resuming."""
        return self in (SlotClass.GONE, SlotClass.LOST, SlotClass.AHEAD)

    @property
    def create(self) -> bool:
        """The slot must be created (LOST: after dropping the dead one)."""
        return self in (SlotClass.MISSING_FIRST_USE, SlotClass.GONE, SlotClass.LOST)


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: SlotClass
    reason: str  # says which slot and what is the matter, for a log line or a message


# What each pg_replication_slots.invalidation_reason means, for a DBA to act on (before
# PostgreSQL 17 there is no reason to read: the WAL's removal is the one that was likely).
INVALIDATED_BY = {
    "wal_removed": "WAL it needed was removed (past max_slot_wal_keep_size)",
    "idle_timeout": "it was unused for longer than idle_replication_slot_timeout",
    "rows_removed": "catalog rows it needed were removed (a conflict on a standby)",
    "wal_level_insufficient": "wal_level was set below logical",
}


@dataclass(frozen=True, slots=True)
class SlotState:
    slot_name: str
    current_database: str
    slot_exists: bool
    plugin: str | None
    slot_type: str | None
    database: str | None
    active_pid: int | None
    wal_status: str | None
    restart_lsn: str | None
    confirmed_flush_lsn: str | None
    acked_lsn: str | None  # the last position the listener saved (and then confirmed)
    resync_reason: str | None  # a sweep owed, and why
    registered: bool  # install registered the slot in slot_state_v1
    # Made with two_phase: pgoutput then sends a prepared transaction's changes at
    # PREPARE, before it commits, and only a COMMIT PREPARED message when it does.
    two_phase: bool = False
    server_run: str | None = None  # the server's run the listener last noted (lineage.py)
    # The server's lineage when the listener last connected, or install ran (lineage.py):
    # it came with the data, so a standby promoted shows the old primary's.
    server_lineage: str | None = None
    # A row of slot_state_v1 recorded in another table than this one, or in another
    # database: a dump restored, or a copy of another database (recorded_in and
    # recorded_in_database, sql/logical.sql), which took it back to that time.
    restored: bool = False
    # Why PostgreSQL invalidated it (pg_replication_slots.invalidation_reason, 17+):
    # wal_removed, rows_removed, wal_level_insufficient, idle_timeout (18+). None before
    # 17, or for a slot not invalidated.
    invalidation_reason: str | None = None

    @classmethod
    def read(cls, conn: psycopg.Connection[Any], slot: str) -> SlotState:
        with conn.cursor(row_factory=class_row(cls)) as cur:
            state = cur.execute(Q.SLOT_INFO.sql, {"slot": slot}).fetchone()
        return returned(state, f"row for replication slot {slot!r}")

    @property
    def where(self) -> str:
        return f"replication slot {self.slot_name!r}"

    @property
    def acked(self) -> int | None:
        return parse_lsn(self.acked_lsn) if self.acked_lsn else None

    @property
    def confirmed(self) -> int | None:
        return parse_lsn(self.confirmed_flush_lsn) if self.confirmed_flush_lsn else None

    @property
    def invalidated_by(self) -> str:
        """Why an invalidated slot was, as a DBA would act on it."""
        reason = self.invalidation_reason or "wal_removed"
        return INVALIDATED_BY.get(reason, f"invalidation_reason {reason}")

    def classify(self) -> Verdict:  # noqa: PLR0911 - one return per class, in rule order
        where, acked, confirmed = self.where, self.acked, self.confirmed
        if not self.slot_exists:
            if acked is None:
                return Verdict(SlotClass.MISSING_FIRST_USE, f"{where} does not exist yet")
            return Verdict(
                SlotClass.GONE,
                f"{where} is gone (dropped, or the server failed over to one without it)",
            )
        if (self.slot_type, self.plugin, self.database) != (
            "logical",
            "pgoutput",
            self.current_database,
        ):
            return Verdict(
                SlotClass.FOREIGN,
                f"{where} belongs to something else ({self.slot_type} slot of "
                f"{self.plugin!r} on database {self.database!r})",
            )
        if self.two_phase:
            return Verdict(
                SlotClass.FOREIGN,
                f"{where} was created with two_phase, which makes pgoutput send prepared "
                "transactions before they commit; the listener takes committed ones only",
            )
        if self.active_pid is not None:
            return Verdict(SlotClass.IN_USE, f"{where} is in use by process {self.active_pid}")
        if self.wal_status == "lost" or self.restart_lsn is None:
            return Verdict(
                SlotClass.LOST,
                f"{where} was invalidated: {self.invalidated_by} (wal_status {self.wal_status})",
            )
        if acked is not None and confirmed is not None and confirmed > acked:
            return Verdict(
                SlotClass.AHEAD,
                f"{where} is at {self.confirmed_flush_lsn}, past {format_lsn(acked)}, the last "
                "position this listener saved: it was re-created, or another client "
                "consumed it, or PostgreSQL crashed just after the slot was told (the "
                "listener's saves commit asynchronously: the last may be lost)",
            )
        return Verdict(SlotClass.OK, f"{where}: wal_status {self.wal_status}")
