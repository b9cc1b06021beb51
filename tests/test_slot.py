"""The slot rules (capture/slot.py): one classification for the listener, check, install.

Pure: states as slot_info.sql returns them. The listener's, check's and install's actions
on each class are tested against real servers in tests/test_logical.py and
tests/test_install.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cdc_invalidator.capture.slot import SlotClass, SlotState

# Ours, idle, confirmed where we saved it.
HEALTHY = SlotState(
    slot_name="cdc_invalidator",
    current_database="app",
    slot_exists=True,
    plugin="pgoutput",
    slot_type="logical",
    database="app",
    active_pid=None,
    wal_status="reserved",
    restart_lsn="0/1000",
    confirmed_flush_lsn="0/2000",
    acked_lsn="0/2000",
    resync_reason=None,
    registered=True,
)
NO_SLOT = {
    "slot_exists": False,
    "plugin": None,
    "slot_type": None,
    "database": None,
    "wal_status": None,
    "restart_lsn": None,
    "confirmed_flush_lsn": None,
}


@pytest.mark.parametrize(
    ("changes", "kind", "says"),
    [
        ({}, SlotClass.OK, "replication slot 'cdc_invalidator': wal_status reserved"),
        ({"acked_lsn": None}, SlotClass.OK, "wal_status reserved"),  # made by a DBA
        ({"acked_lsn": "0/3000"}, SlotClass.OK, "wal_status reserved"),  # behind us: fine
        ({**NO_SLOT, "acked_lsn": None}, SlotClass.MISSING_FIRST_USE, "does not exist yet"),
        (NO_SLOT, SlotClass.GONE, "is gone (dropped, or the server failed over"),
        ({"plugin": "wal2json"}, SlotClass.FOREIGN, "(logical slot of 'wal2json' on database"),
        ({"database": "other"}, SlotClass.FOREIGN, "on database 'other')"),
        ({"two_phase": True}, SlotClass.FOREIGN, "was created with two_phase"),
        (
            {"slot_type": "physical", "plugin": None, "database": None},
            SlotClass.FOREIGN,
            "belongs to something else (physical slot of None on database None)",
        ),
        ({"active_pid": 42}, SlotClass.IN_USE, "is in use by process 42"),
        # In use comes first: the listener stands by, whatever else is true of it.
        ({"active_pid": 42, "wal_status": "lost"}, SlotClass.IN_USE, "process 42"),
        ({"wal_status": "lost"}, SlotClass.LOST, "WAL it needed was removed (past max_slot"),
        (
            {"wal_status": "lost", "invalidation_reason": "idle_timeout"},
            SlotClass.LOST,
            "invalidated: it was unused for longer than idle_replication_slot_timeout",
        ),
        ({"wal_status": "lost", "invalidation_reason": "new"}, SlotClass.LOST, "reason new"),
        ({"restart_lsn": None}, SlotClass.LOST, "was invalidated"),
        (
            {"confirmed_flush_lsn": "0/2001"},
            SlotClass.AHEAD,
            "is at 0/2001, past 0/2000, the last position this listener saved",
        ),
        # Lost outranks ahead: the slot is re-created either way.
        ({"confirmed_flush_lsn": "1/0", "wal_status": "lost"}, SlotClass.LOST, "lost"),
    ],
)
def test_each_state_has_one_class(changes: dict[str, object], kind: SlotClass, says: str) -> None:
    # A case changes a few fields, each of its own type: the dict is typed as object.
    verdict = replace(HEALTHY, **changes).classify()  # type: ignore[arg-type]
    assert verdict.kind is kind
    assert says in verdict.reason


def test_what_each_class_calls_for() -> None:
    swept = {k for k in SlotClass if k.missed_changes}
    created = {k for k in SlotClass if k.create}
    assert swept == {SlotClass.GONE, SlotClass.LOST, SlotClass.AHEAD}
    assert created == {SlotClass.MISSING_FIRST_USE, SlotClass.GONE, SlotClass.LOST}
