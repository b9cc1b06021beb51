"""The sweeper's tickets: what a caller of Sweeper.again() (a replay) learns of its sweep.

The sweep is scripted (these are the thread's bookkeeping; test_sweeps runs sweeps
against real servers, a replay's among them)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from cdc_invalidator.capture.holds import Hold
from cdc_invalidator.mapping import Invalidation, Routed
from cdc_invalidator.metrics import Metrics
from cdc_invalidator.sweeper import Sweeper, SweepJob
from tests.support.waits import wait_until

WAIT_S = 10


class Scripted:
    """A sweep that fails while `failing` is set, then finds `existed` keys; each try
    is recorded with its patterns."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.tried: list[set[str]] = []
        self.existed = 3

    def __call__(self, works: Routed, _stopped: Callable[[], bool]) -> int:
        self.tried.append(set().union(*(work.patterns for work in works.values())))
        if self.failing.is_set():
            raise ConnectionError("Redis refused")
        return self.existed


@pytest.fixture
def scripted() -> Scripted:
    return Scripted()


@pytest.fixture
def sweeper(scripted: Scripted) -> Iterator[Sweeper]:
    sweeper = Sweeper(sweep=scripted, metrics=Metrics(), retry_initial_s=0.01, retry_max_s=0.01)
    yield sweeper
    sweeper.stop()


def patterns(*globs: str) -> Routed:
    return {None: Invalidation(patterns=set(globs))}


def test_a_ticket_is_done_with_the_keys_its_sweep_found(
    sweeper: Sweeper, scripted: Scripted
) -> None:
    ticket = sweeper.again(patterns("order:*"))
    assert ticket.done.wait(WAIT_S)
    assert (ticket.existed, ticket.error) == (3, None)
    assert scripted.tried == [{"order:*"}]


def test_a_sweep_failing_ahead_tells_the_tickets_behind_it_then_they_are_done(
    sweeper: Sweeper, scripted: Scripted
) -> None:
    """A batch's sweep that fails is tried again first: a replay's sweep queued behind
    it is not tried meanwhile, and its ticket says why it waits."""
    scripted.failing.set()
    hold = Hold()
    sweeper.add(patterns("user:*"), hold, None, None)
    wait_until(lambda: scripted.tried, what="the first try")
    ticket = sweeper.again(patterns("order:*"))
    wait_until(lambda: ticket.error is not None, what="the ticket told")
    assert ticket.error == "ConnectionError: Redis refused"
    assert not ticket.done.is_set()
    assert {"order:*"} not in scripted.tried
    scripted.failing.clear()
    assert ticket.done.wait(WAIT_S)
    assert hold.released
    assert ticket.existed == 3


@pytest.mark.parametrize(
    ("first", "second", "merged"),
    [(105.0, 103.0, 105.0), (103.0, 105.0, 105.0), (103.0, None, None), (None, 103.0, None)],
)
def test_a_sweep_absorbing_another_is_seen_visible_when_the_later_was(
    first: float | None, second: float | None, merged: float | None
) -> None:
    """Two sweeps in one pass: its second sweep goes by the later time either was
    visible (None, unknown: from the sweep itself). Taking the absorbed one's made the
    second sweep early when that one was seen visible first (a review)."""
    job = SweepJob(patterns("user:*"), [], None, first)
    job.absorb(SweepJob(patterns("order:*"), [], None, second))
    assert job.visible_at == merged
