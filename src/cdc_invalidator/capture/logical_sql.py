"""The SQL that `install`, `uninstall` and `sql` run for logical-replication capture.

The script (one transaction) installs the shared schema, the logical mode's objects,
REPLICA IDENTITY FULL where the key columns need it, and the publication. The slot is
created after it commits: PostgreSQL refuses to create a logical slot in a transaction
that has written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import class_row

from cdc_invalidator.capture.errors import returned
from cdc_invalidator.capture.slot import SlotClass, SlotState
from cdc_invalidator.capture.trigger_sql import (
    SCRIPT_HEADER,
    guard,
    refuse_nested,
    version_check,
)
from cdc_invalidator.capture.walstream import parse_lsn
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping import Mapper
from cdc_invalidator.mapping.columns import ColumnFilter
from cdc_invalidator.pg.queries import Q

log = structlog.get_logger("cdc_invalidator.capture.logical_sql")

# Making a slot that took longer waited for a transaction (slot_blockers.sql's "long").
SLOT_WAIT_S = 1.0

IDENTITY_HEADER = """
-- Old values. UPDATE and DELETE carry the old values of the replica identity's columns
-- only (by default: the primary key). A key built from another column, such as
-- user:email:{email}, needs that column's old value to be deleted when the email
-- changes or the row is deleted. Where a table's identity does not cover the columns
-- its templates use, it gets REPLICA IDENTITY FULL (the whole old row is then written
-- to WAL on UPDATE and DELETE); uninstall puts the old identity back. So does a table
-- with a column filter (its UPDATEs are judged from the whole old row: record_filter()
-- below). Tables configured with replica_identity = "keep" are left alone.
"""

SLOT_FOOTER = """
-- The replication slot (PostgreSQL refuses to create one in a transaction that has
-- written): `cdc-invalidator install` creates it once this script has committed, and
-- the listener does on its first start if it is missing. By hand:
--   SELECT pg_create_logical_replication_slot({slot}, 'pgoutput');
"""


def install_script(
    mapper: Mapper,
    keep: Mapping[TableName, bool],
    publication: str,
    slot: str,
    filters: Mapping[TableName, ColumnFilter] | None = None,
) -> sql.Composed:
    identities: list[sql.Composable] = [sql.SQL(IDENTITY_HEADER)]
    records: list[sql.Composable] = []
    for table in sorted(mapper.tables):
        records.append(
            Q.RECORD_PUBLISHED.sql.format(
                table=sql.Literal(table.qualified),
                schema=sql.Literal(table.schema),
                name=sql.Literal(table.name),
                columns=_text_array(mapper.columns(table)),
                keep=sql.Literal(keep.get(table, False)),
                publication=sql.Literal(publication),
            )
        )
        column_filter = (filters or {}).get(table)
        if column_filter is not None:
            records.append(
                Q.RECORD_FILTER.sql.format(
                    table=sql.Literal(table.qualified),
                    judge=sql.Literal(column_filter.judge.value),
                    columns=_text_array(list(column_filter.listed)),
                    keep=sql.Literal(keep.get(table, False)),
                )
            )
        if keep.get(table, False):
            # A table name may hold anything but a newline is all a comment must avoid.
            name = table.qualified.replace("\n", " ").replace("\r", " ")
            identities.append(
                sql.SQL('-- {}: replica_identity = "keep": left as it is, if it has one.\n').format(
                    sql.SQL(name)
                )
            )
            identities.append(
                Q.REQUIRE_REPLICA_IDENTITY.sql.format(table=sql.Literal(table.qualified))
            )
            continue
        identities.append(
            Q.ENSURE_REPLICA_IDENTITY.sql.format(
                table=sql.Literal(table.qualified),
                columns=_text_array(mapper.columns(table)),
            )
        )
    tables = sql.SQL(", ").join(sql.Literal(t.qualified) for t in sorted(mapper.tables))
    publish = Q.LOGICAL_INSTALL.sql.format(
        records=sql.SQL("").join(records),
        tables=tables,
        publication=sql.Literal(publication),
        slot=sql.Literal(slot),
    )
    footer = sql.SQL(SLOT_FOOTER.replace("{slot}", sql.Literal(slot).as_string(None)))
    return sql.Composed(
        [
            sql.SQL(SCRIPT_HEADER),
            guard(publication),
            sql.SQL("\n"),
            version_check("logical"),
            sql.SQL("\n"),
            refuse_nested(mapper.tables),
            sql.SQL("\n"),
            Q.INSTALLING.sql,
            sql.SQL("\n"),
            Q.SCHEMA.sql,
            sql.SQL("\n"),
            Q.LOGICAL.sql,
            sql.SQL("\n"),
            Q.GRANTS.sql,
            sql.SQL("\n"),
            Q.LEAVE_TRIGGER.sql,
            Q.LOGICAL_DRIFT_SWEEP.sql,
            *identities,
            sql.SQL("\n-- The publication the listener streams: exactly the configured tables.\n"),
            publish,
            # (after publish: a restore's sweep is owed there before the rows are
            # recorded; and the row publish inserts for a new slot is recorded too)
            Q.RECORD_TABLE.sql,
            sql.SQL(";\n"),
            Q.REBUILD_GUARD.sql,
            sql.SQL("\n"),
            Q.TAKE_BACK_GRANTS.sql,
            sql.SQL("\n"),
            Q.INSTALL_DONE.sql,
            footer,
        ]
    )


def _text_array(items: list[str]) -> sql.Composed:
    return sql.SQL("ARRAY[{}]::text[]").format(sql.SQL(", ").join(sql.Literal(c) for c in items))


@dataclass(frozen=True, slots=True)
class NewSlot:
    lsn: str  # where it starts
    owed: str | None  # why the listener must sweep first: an earlier slot was lost


def create_slot(conn: psycopg.Connection[Any], slot: str) -> NewSlot | None:
    """Create the slot unless it exists, recording where it starts. SlotBusy if a slot
    of that name exists and is not one we can use; Fatal if PostgreSQL did not say where
    the new slot starts."""
    verdict = SlotState.read(conn, slot).classify()
    if verdict.kind is SlotClass.FOREIGN:
        raise SlotBusy(f"{verdict.reason}: set slot_name to a name of our own")
    if verdict.kind not in (SlotClass.MISSING_FIRST_USE, SlotClass.GONE):
        # Ours, whatever its state: the listener acts on it when it starts (LOST: it
        # drops and re-creates it; IN_USE, AHEAD: as the listener's rules say).
        return None
    waited = _waits_for(conn, slot)
    if waited is not None:
        # Said before the wait, which may be long (a prepared transaction's lasts until
        # its coordinator acts): install sat silent behind one (a review).
        log.warning(
            "slot_creation_waits",
            slot=slot,
            detail=f"{waited}; install returns once it has ended (COMMIT or ROLLBACK "
            "PREPARED ends a prepared one), and the listener sweeps every watched table "
            "first",
        )
    started = time.monotonic()
    row = returned(
        conn.execute(Q.CREATE_SLOT.sql, {"slot": slot}).fetchone(),
        f"position for new slot {slot!r}",
    )
    took = time.monotonic() - started
    if waited is None and took > SLOT_WAIT_S:
        # A transaction the check could not see or did not count (prepared or begun
        # less than a second before it, another role's without pg_read_all_stats): the
        # wait itself says one ran (a review).
        waited = (
            f"install made replication slot {slot!r} in {took:.1f} s, waiting for "
            "transactions running then: what committed meanwhile is in no slot"
        )
    state = conn.execute(Q.RECORD_SLOT.sql, {"slot": slot, "lsn": row[0]})
    recorded = state.fetchone()
    owed = recorded[0] if recorded else None
    if owed is None and waited is not None:
        conn.execute(Q.SET_RESYNC.sql, {"slot": slot, "reason": waited, "lsn": None})
        owed = waited
    return NewSlot(str(row[0]), owed)


def _waits_for(conn: psycopg.Connection[Any], slot: str) -> str | None:
    """Why the listener must sweep before it streams a slot made now, or None: making it
    waits for every transaction running on the server to end (PostgreSQL builds the
    slot's first snapshot from them), a prepared one for as long as its coordinator
    takes, and what commits meanwhile, after the script made the publication, is in no
    slot. Told as the listener tells it when it makes the slot itself (slot_blockers.sql:
    one holding a transaction id for over a second, or prepared that long ago), which
    sweeps then; `install` waited in its statement and swept nothing (a review: a write
    committed while install waited for a prepared transaction was never invalidated, nor
    was the prepared transaction itself)."""
    found = conn.execute(Q.SLOT_BLOCKERS.sql, {"before": None}).fetchone()
    if found is None:
        return None
    pid, gid, database, role, since, _ = found
    who = (
        f"prepared transaction {gid!r}" if gid is not None else f"the transaction of backend {pid}"
    )
    return (
        f"install made replication slot {slot!r} while {who} (database {database}, role "
        f"{role}, since {since}) was running: the slot starts once it ended, and what "
        "committed meanwhile is in no slot"
    )


# Why every watched table is swept when `install` drops a slot of ours (a switch to
# trigger capture, a slot of an earlier slot_name), or finds one gone or never made: a
# slot holds what no listener has confirmed, and nothing else has those changes. The
# sweep is queued (or emitted) before the drop: a drop that then fails leaves a sweep
# done for nothing, never a slot dropped without its sweep.
DROPPED_SLOT = (
    "install dropped (or found gone) a replication slot of ours, with whatever changes it "
    "had not handed out"
)


def unswept(conn: psycopg.Connection[Any], keep: str | None) -> list[str]:
    """Slots recorded as ours that are gone or owe a sweep, but `keep`
    (slots_unswept.sql): install sweeps for them, then forget_swept()."""
    return [row[0] for row in conn.execute(Q.SLOTS_UNSWEPT.sql, {"keep": keep})]


def forget_swept(conn: psycopg.Connection[Any], names: list[str]) -> None:
    """The sweep for `names` is queued: the gone ones' records go, the others owe nothing."""
    conn.execute(Q.FORGET_SLOTS.sql, {"names": names})


def sweep_before_drops(
    conn: psycopg.Connection[Any],
    sweep: Q,
    leftovers: list[Leftover],
    unswept_slots: list[str],
    *,
    dropping: bool = False,
) -> str:
    """Before any slot of ours is dropped (`dropping`, or a droppable leftover), or for
    one gone or owing a sweep (`unswept_slots`): one sweep of every watched table, the
    mode's way (`sweep`: queued, or emitted through the slot), and those records
    forgotten. What install says of it, or ''."""
    if not (dropping or unswept_slots or any(left.droppable for left in leftovers)):
        return ""
    conn.execute(sweep.sql, {"reason": DROPPED_SLOT})
    forget_swept(conn, unswept_slots)
    return f"; every watched table is swept once: {DROPPED_SLOT}"


def drop_swept_leftovers(
    conn: psycopg.Connection[Any], slot: str, leftovers: list[Leftover]
) -> tuple[str, list[str]]:
    """drop_leftovers(), after sweep_before_drops(): what install says of them, and the
    names of those dropped, whose records are then forgotten (or the next install would
    sweep again)."""
    said = drop_leftovers(conn, slot, leftovers)
    dropped = [left.slot_name for left, (gone, _) in zip(leftovers, said, strict=True) if gone]
    return "".join(f"; {line}" for _, line in said), dropped


class SlotLeftToListener(Exception):
    """Installed, but the installing role may not create replication slots: the
    listener makes the slot on its first start, and sweeps then (capture/logical.py)."""


class SlotBusy(Exception):
    """The slot cannot be used or dropped now: a listener streams it, or it is not ours."""


def our_slot(conn: psycopg.Connection[Any], slot: str) -> bool:
    """Whether the slot exists and is ours (registered by install); SlotBusy if a
    listener is streaming it."""
    row = conn.execute(Q.OUR_SLOT.sql, {"slot": slot}).fetchone()
    if row is None:
        return False
    if row[0] is not None:
        raise SlotBusy(
            f"replication slot {slot!r} is in use by process {row[0]}: stop the listener first"
        )
    return True


def drop_slot(conn: psycopg.Connection[Any], slot: str) -> None:
    conn.execute(Q.DROP_SLOT.sql, {"slot": slot})


@dataclass(frozen=True, slots=True)
class Leftover:
    """A slot recorded as ours (slot_state_v1) on this database, pgoutput, that is not
    the configured one: left when slot_name changed (leftover_slots.sql)."""

    slot_name: str
    active_pid: int | None
    wal_status: str | None
    two_phase: bool
    held_bytes: int | None  # WAL it keeps
    confirmed_flush_lsn: str | None
    acked_lsn: str | None  # the last position a listener of ours saved for it

    @property
    def droppable(self) -> bool:
        """Install may drop it: nobody streams it, and nobody moved it past the last
        position our listener saved (the listener saves before it tells the slot, so a
        slot re-created or consumed by someone else since is past it). Anything else
        could be someone else's now: it is reported, never dropped."""
        if self.active_pid is not None or self.two_phase or self.acked_lsn is None:
            return False
        if self.confirmed_flush_lsn is None:
            return False
        return parse_lsn(self.confirmed_flush_lsn) <= parse_lsn(self.acked_lsn)

    def describe(self) -> str:
        held = f"keeps {self.held_bytes} bytes of WAL" if self.held_bytes is not None else ""
        if self.wal_status == "lost":
            held = "was invalidated (wal_status lost)"
        by = f"streamed by pid {self.active_pid}" if self.active_pid else "not streamed"
        return f"replication slot {self.slot_name!r} ({by}; {held or 'no WAL position'})"


def leftover_slots(conn: psycopg.Connection[Any], slot: str | None) -> list[Leftover]:
    with conn.cursor(row_factory=class_row(Leftover)) as cur:
        return cur.execute(Q.LEFTOVER_SLOTS.sql, {"slot": slot}).fetchall()


def has_slot_state(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(Q.HAS_SLOT_STATE.sql).fetchone()
    return bool(row and row[0])


def drop_leftovers(
    conn: psycopg.Connection[Any], slot: str, leftovers: list[Leftover] | None = None
) -> list[tuple[bool, str]]:
    """Drop the slots left from an earlier slot_name that are surely ours (droppable):
    `leftovers` as read before (uninstall reads them while our schema is there), else
    read now. Per slot: whether it was dropped, and what was done or why not."""
    said: list[tuple[bool, str]] = []
    for left in leftover_slots(conn, slot) if leftovers is None else leftovers:
        drop = drop_by_hand(left.slot_name)
        if not left.droppable:
            why = (
                f"left {left.describe()}, recorded as ours but not the configured slot "
                f"{slot!r}: it may be in use by someone else, so it is not dropped; if it "
                f"is not, drop it: {drop}"
            )
            said.append((False, why))
            continue
        try:
            done = conn.execute(
                Q.DROP_LEFTOVER_SLOT.sql, {"slot": left.slot_name, "acked": left.acked_lsn}
            ).fetchone()
        except psycopg.Error as exc:
            why = (
                f"could not drop {left.describe()}, left from an earlier slot_name: "
                f"{exc.diag.message_primary or exc}; drop it: {drop}"
            )
            said.append((False, why))
            continue
        if done is None:  # taken, moved or dropped since it was read
            why = (
                f"left replication slot {left.slot_name!r} of an earlier slot_name: it "
                f"changed meanwhile (taken, moved or dropped); if it is still there: {drop}"
            )
            said.append((False, why))
            continue
        said.append(
            (True, f"dropped replication slot {left.slot_name!r}, left from an earlier slot_name")
        )
    return said


def slot_left(conn: psycopg.Connection[Any], slot: str) -> bool:
    """Whether a pgoutput slot of that name exists on this database, whoever's (read
    without our schema: after uninstall, or when it is gone)."""
    return conn.execute(Q.SLOT_LEFT.sql, {"slot": slot}).fetchone() is not None


def drop_by_hand(slot: str) -> str:
    """The statement that drops the slot, for a message (a superuser or a role with
    REPLICATION runs it)."""
    return sql.SQL("SELECT pg_drop_replication_slot({})").format(sql.Literal(slot)).as_string(None)
