"""capture/visibility.py's gate, as a unit: whether commits may wait for a synchronous
standby (the setting read with each snapshot), when a waiting batch is looked at again,
and what is logged. The behaviour against a real server, a commit a standby holds back:
tests/test_physical_standbys.py."""

from __future__ import annotations

from typing import Any

import pytest

from cdc_invalidator.capture import visibility
from cdc_invalidator.capture.logical import LogicalBatch, LogicalStream
from cdc_invalidator.capture.visibility import RECHECK_FIRST_S, RECHECK_MAX_S, Visibility
from tests.support.logs import captured_logs


class Side:
    """A bookkeeping connection whose snapshot query answers what it is given."""

    def __init__(self) -> None:
        self.snapshot = "100:100:"  # xmin:xmax:xip: everything before 100 complete
        self.names = ""

    def execute(self, _query: str) -> Side:
        return self

    def fetchone(self) -> tuple[float, str, str]:
        return (1_800_000_000.0, self.snapshot, self.names)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(visibility, "time", clock)
    return clock


def gate(side: Side) -> Visibility:
    side_conn: Any = side
    return Visibility(side_conn, "cdc-invalidator")


@pytest.mark.parametrize(
    ("names", "gated", "said"),
    [
        ("", False, []),
        ("  ", False, []),
        ("standby1", True, ["commits_seen_before_deletes"]),
        ("FIRST 1 (standby1, standby2)", True, ["commits_seen_before_deletes"]),
        # The listener may be chosen: its commits may wait for it (an error, said).
        ("ANY 1 (*)", False, ["synchronous_standby_candidate"]),
        ('"CDC-Invalidator"', False, ["synchronous_standby_candidate"]),
    ],
)
def test_commits_are_gated_while_a_synchronous_standby_other_than_the_listener_is_named(
    names: str, gated: bool, said: list[str], clock: Clock
) -> None:
    side = Side()
    side.names = names
    v = gate(side)
    with captured_logs() as logs:
        v.now()
        v.now()  # (said once)
    assert v.gated is gated
    assert [line["event"] for line in logs] == said
    side.names = ""
    with captured_logs() as logs:
        v.now()
    assert not v.gated
    assert [line["event"] for line in logs] == (["commits_deleted_as_streamed"] if gated else [])


def test_a_batch_not_visible_is_looked_at_again_sooner_then_later_and_told_after_a_while(
    clock: Clock,
) -> None:
    side = Side()
    side.snapshot = "100:105:101"  # 101 still running (held by the standby)
    v = gate(side)
    with captured_logs() as logs:
        assert v.seen([101]) is None
        assert v.recheck_at == pytest.approx(clock.now + RECHECK_FIRST_S)
        pauses = []
        for _ in range(12):
            clock.now = v.recheck_at or clock.now
            assert v.seen([101]) is None
            pauses.append((v.recheck_at or 0) - clock.now)
        assert pauses[0] == pytest.approx(2 * RECHECK_FIRST_S)
        assert pauses[-1] == pytest.approx(RECHECK_MAX_S)
        assert [line["event"] for line in logs] == ["commits_not_visible_yet"]
        clock.now += visibility.WARN_AFTER_S
        assert v.seen([100, 101]) is None
        assert v.seen([101]) is None  # (told once)
        side.snapshot = "102:105:"
        assert v.seen([100, 101]) == clock.now
    assert v.recheck_at is None
    events = [line["event"] for line in logs]
    assert events == ["commits_not_visible_yet", "commits_not_visible", "commits_visible"]
    assert logs[-1]["xids"] == [100, 101]


def test_transactions_before_the_snapshot_or_wrapped_around_are_seen(clock: Clock) -> None:
    side = Side()
    side.snapshot = "4294967290:5:4294967295"  # xids wrapped past 2^32
    v = gate(side)
    assert v.seen([4294967291, 1, 4]) == clock.now
    assert v.seen([4294967295]) is None
    assert v.seen([5]) is None  # (not begun when the snapshot was taken)


def test_a_batch_waiting_when_the_standby_is_no_longer_named_is_not_looked_at_again(
    clock: Clock,
) -> None:
    """synchronous_standby_names emptied while a batch waits (read by the periodic look,
    not by the batch's): the batch goes out as it is, and nothing is due to be looked at
    again (a recheck time left in the past made the loop's wait return at once)."""
    side = Side()
    side.names = "standby1"
    side.snapshot = "100:105:101"
    v = gate(side)
    assert v.seen([101]) is None
    assert recheck_of(v) is not None
    side.names = ""
    v.now()
    assert (v.gated, recheck_of(v)) == (False, None)


def recheck_of(v: Visibility) -> float | None:
    return v.recheck_at  # (read anew: not narrowed by an assert before a call)


def test_a_batch_goes_out_when_its_own_look_finds_the_standby_no_longer_named(
    clock: Clock,
) -> None:
    """The look that should see the batch's commits complete finds the setting emptied
    (or naming the listener) while they are still open: the batch goes out as it is,
    and nothing is left due (a recheck time left set, in the past, made the loop spin:
    a review)."""
    side = Side()
    side.names = "standby1"
    side.snapshot = "100:105:101"
    stream = LogicalStream.__new__(LogicalStream)  # (only the gate: a pure unit)
    stream._visibility = gate(side)
    stream._gate_read_at = float("inf")  # (the setting read by the gate's own looks only)
    stream._visibility.now()
    batch = LogicalBatch(size=1, events=[], transactions=[(1, 101, 0, 0)])
    assert stream._visible(batch) is False
    assert recheck_of(stream._visibility) is not None
    side.names = ""
    assert stream._visible(batch) is True
    assert batch.visible_at is None
    assert recheck_of(stream._visibility) is None


def test_a_batch_after_a_quiet_spell_reads_the_setting_first(clock: Clock) -> None:
    """The setting read more than GATE_READ_EVERY_S before: a batch reads it again
    before it goes out, so a standby named since holds the batch back (read once a
    second on the loop's turns, a commit made half a second after the setting was
    deleted before it was visible: a review's script, by hand)."""
    side = Side()
    side.snapshot = "100:105:101"  # 101 held by the standby
    stream = LogicalStream.__new__(LogicalStream)  # (only the gate: a pure unit)
    stream._visibility = gate(side)
    stream._visibility.now()  # read: no standby named
    stream._gate_read_at = 0.0  # (long ago)
    side.names = "standby1"  # named since
    batch = LogicalBatch(size=1, events=[], transactions=[(1, 101, 0, 0)])
    assert stream._visible(batch) is False
    assert stream._visibility.gated


def test_a_long_wait_ended_by_the_setting_does_not_mute_the_next(clock: Clock) -> None:
    """A batch that waited long enough to be told goes out because the standby is no
    longer named: the next wait is told anew after its own WARN_AFTER_S, and a batch
    that waits only a moment logs no commits_visible (the mark of the first wait, left
    set, muted the one and made up the other)."""
    side = Side()
    side.names = "standby1"
    side.snapshot = "100:105:101"
    v = gate(side)
    assert v.seen([101]) is None
    clock.now += visibility.WARN_AFTER_S
    with captured_logs() as logs:
        assert v.seen([101]) is None
    assert [line["event"] for line in logs] == ["commits_not_visible"]
    side.names = ""
    v.now()  # (the batch goes out as it is)
    side.names = "standby1"
    v.now()
    side.snapshot = "100:106:101,105"
    with captured_logs() as logs:
        assert v.seen([105]) is None
        clock.now += 0.01
        side.snapshot = "106:106:"
        assert v.seen([105]) == clock.now  # waited a moment: nothing to tell
        assert v.seen([106]) is None
        clock.now += visibility.WARN_AFTER_S
        assert v.seen([106]) is None
    assert [line["event"] for line in logs] == [
        "commits_not_visible_yet",
        "commits_not_visible_yet",
        "commits_not_visible",
    ]
