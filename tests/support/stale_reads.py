"""Stale reads in the chaos run (tests/support/chaos.py): what the app's readers got from
the cache, compared with what the database had committed when they asked.

The writers record every row state they commit (`Truth.commit`, the time the COMMIT
returned to them); every version is unique. A cache hit is compared with the states
committed before its GET was sent:

- a stale read is a hit whose value is not the row's latest committed state (a row
  version since superseded; `null` for a row that exists; for `user:email:{email}`, the
  row that has that email, or `null` while a row has it);
- it went stale at the commit of the first state after the cached one (for `null`: the
  commit that made the row, or the email, appear);
- an episode is one key holding one stale value: from the commit that made it stale to
  the last read that still saw it. That is how long the stale value was served at least
  (a key nobody read again may have stayed stale longer: the end checks catch those);
- a race episode is one whose value a reader SET after that commit (it read the row
  before the commit, SET it after: the stale-set race, which the listener's first delete
  cannot undo and `second_delete_ms` bounds); the others waited for a delete (listener
  lag, or a fault);
- an episode is "during a fault" when it overlaps a fault's window (from the fault until
  the listener acknowledged a write made after it recovered); otherwise it is quiet;
- a stale read is "still wrong" when its GET was sent STILL_WRONG_AFTER_S (50 ms) or more
  after the commit that made it stale (Polaris's question: is the cache still
  inconsistent some time after the write? The listener's lag alone stays below that);
- a stale SET is a reader's SET of a value a commit had superseded before the SET was
  sent: the stale-set race's last step, whether a delete then undoes it or not.

Commit times are the writer's, taken just after COMMIT returned: a read in the
moment between the commit and that record is compared with the older state (not
counted), and a value not yet recorded is not compared. A COMMIT that failed (the
server went away) is looked up on the writer's next connection (pg_xact_status) and,
if it happened, recorded from then. A row's states are ordered by the WAL position
before each COMMIT, which follows the commit order of transactions that change the same
row.
"""

from __future__ import annotations

import bisect
import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# A stale read this long after the commit that made it stale is "still wrong".
STILL_WRONG_AFTER_S = 0.05


def id_of_key(key: str) -> int:
    """user:42 and user:email:u42.3@x both belong to id 42."""
    tail = key.removeprefix("user:email:u") if key.startswith("user:email:") else key[5:]
    return int(tail.split(".")[0])


@dataclass(frozen=True, slots=True)
class RowState:
    order: int  # the WAL position at the end of its transaction: commit order per row
    at: float  # time.monotonic() when the commit returned to its writer
    began: float  # when its writer sent the COMMIT (the state is not visible before)
    version: int | None  # None: no row
    email: str | None


class Truth:
    """Every committed state of every row, in commit order per id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[int, list[RowState]] = {}
        self._keys: dict[int, list[int]] = {}  # the states' `order`, for bisect

    def commit(self, order: int, began: float, at: float, changed: Iterable[Sequence[Any]]) -> None:
        """A committed transaction's rows (op, id, email, version), in statement order
        (the last state of an id is the committed one); the COMMIT was sent at `began`
        and returned at `at`. `order`: the WAL insert position before the COMMIT. Two
        transactions that change one row commit in the order their row locks allow,
        and the second one's position is past the first one's commit: the states of a
        row are kept in that order (the writers' clocks, read after COMMIT returned in
        threads that wait for the GIL, may not be)."""
        final: dict[int, RowState] = {}
        for op, row_id, email, version in changed:
            final[row_id] = (
                RowState(order, at, began, None, None)
                if op == "delete"
                else RowState(order, at, began, version, email)
            )
        with self._lock:
            for row_id, state in final.items():
                keys = self._keys.setdefault(row_id, [])
                i = bisect.bisect_right(keys, order)
                keys.insert(i, order)
                self._rows.setdefault(row_id, []).insert(i, state)

    def stale_since(self, key: str, value: str, at: float) -> RowState | None:
        """The committed state that made `value`, cached under `key`, stale, if one was
        committed by `at`; None while it is not (or when that cannot be told)."""
        row_id = id_of_key(key)
        with self._lock:
            # Committed before the GET was sent (and an earlier one of the row's, even
            # if its writer read the clock later).
            every = self._rows.get(row_id, [])
            last = max((i for i, state in enumerate(every) if state.at < at), default=-1)
            states = every[: last + 1]
        if not states:
            return None
        email = key.removeprefix("user:email:") if key.startswith("user:email:") else None
        cached: Any = json.loads(value)

        def matches(state: RowState) -> bool:
            if cached is None:  # a negative entry
                return state.version is None or (email is not None and state.email != email)
            return bool(state.version == cached[3])

        if matches(states[-1]):
            return None
        if cached is not None:
            # Versions are unique: stale from the first state after the cached one.
            for i, state in enumerate(states):
                if state.version == cached[3]:
                    return states[i + 1]
            return None  # a version not recorded yet: newer than what we know
        # `null`: stale since the row (or the email) last appeared.
        i = len(states) - 1
        while i > 0 and not matches(states[i - 1]):
            i -= 1
        return states[i]


@dataclass(slots=True)
class Episode:
    key: str
    since: float  # the commit that made the value stale
    last_read: float
    reads: int = 1
    race: bool = False  # a reader SET the value after that commit


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Durations:
    """Episodes of one kind: how many, and how long they lasted (ms)."""

    count: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0

    @classmethod
    def of(cls, episodes: Sequence[Episode]) -> Durations:
        ms = [(e.last_read - e.since) * 1000 for e in episodes]
        return cls(len(ms), percentile(ms, 0.5), percentile(ms, 0.99), max(ms, default=0.0))

    def __str__(self) -> str:
        if not self.count:
            return "0"
        return (
            f"{self.count} (p50 {self.p50_ms:.0f} ms, p99 {self.p99_ms:.0f} ms,"
            f" max {self.max_ms:.0f} ms)"
        )


@dataclass
class StaleReadSummary:
    compared: int = 0  # cache hits compared with the database
    stale_reads: int = 0
    still_wrong: int = 0  # of those, read STILL_WRONG_AFTER_S or more after the commit
    stale_sets: int = 0  # SETs of a value already superseded when they were sent
    quiet_races: Durations = field(default_factory=Durations)
    quiet_late: Durations = field(default_factory=Durations)
    fault_races: Durations = field(default_factory=Durations)
    fault_late: Durations = field(default_factory=Durations)
    longest_quiet: list[str] = field(default_factory=list)  # the worst few, explained
    longest_in_faults: list[str] = field(default_factory=list)

    @property
    def quiet_max_ms(self) -> float:
        return max(self.quiet_races.max_ms, self.quiet_late.max_ms)


class StaleReads:
    """The readers' hits and SETs, compared with the Truth as they happen."""

    def __init__(self, truth: Truth) -> None:
        self._truth = truth
        self._lock = threading.Lock()
        self._set_at: dict[tuple[str, str], float] = {}
        self._episodes: dict[tuple[str, str], Episode] = {}
        self.compared = 0
        self.stale_reads = 0
        self.still_wrong = 0
        self.stale_sets = 0

    def set(self, key: str, value: str, at: float, sent: float | None = None) -> None:
        """A reader SET `value` under `key` (`at`: when the SET returned; `sent`, when
        it was sent, if the SET is to be compared with the committed states)."""
        stale = sent is not None and self._truth.stale_since(key, value, sent) is not None
        with self._lock:
            self._set_at[key, value] = at
            self.stale_sets += stale

    def set_after(self, key: str, value: str, since: float) -> bool:
        """Whether a reader SET this value after `since`: the stale-set race."""
        with self._lock:
            return self._set_at.get((key, value), float("-inf")) >= since

    def hit(self, key: str, value: str, asked_at: float) -> None:
        """A reader's GET, sent at `asked_at`, found `value`."""
        made = self._truth.stale_since(key, value, asked_at)
        with self._lock:
            self.compared += 1
            if made is None:
                return
            self.stale_reads += 1
            self.still_wrong += asked_at - made.at >= STILL_WRONG_AFTER_S
            episode = self._episodes.get((key, value))
            if episode is None:
                # SET after the COMMIT was sent: the reader read the row before it.
                race = self._set_at.get((key, value), float("-inf")) >= made.began
                self._episodes[key, value] = Episode(key, made.at, asked_at, race=race)
            else:
                episode.last_read = max(episode.last_read, asked_at)
                episode.reads += 1

    def summary(self, faults: Sequence[tuple[float, float]]) -> StaleReadSummary:
        """`faults`: each fault's window (from, to), in time.monotonic()."""
        with self._lock:
            episodes = list(self._episodes.values())
            out = StaleReadSummary(
                self.compared, self.stale_reads, self.still_wrong, self.stale_sets
            )

        def in_fault(e: Episode) -> bool:
            return any(e.since <= to and e.last_read >= start for start, to in faults)

        quiet = [e for e in episodes if not in_fault(e)]
        fault = [e for e in episodes if in_fault(e)]
        out.quiet_races = Durations.of([e for e in quiet if e.race])
        out.quiet_late = Durations.of([e for e in quiet if not e.race])
        out.fault_races = Durations.of([e for e in fault if e.race])
        out.fault_late = Durations.of([e for e in fault if not e.race])
        out.longest_quiet = _longest(quiet)
        out.longest_in_faults = _longest(fault)
        return out


def _longest(episodes: Sequence[Episode], count: int = 3) -> list[str]:
    worst = sorted(episodes, key=lambda e: e.since - e.last_read)[:count]
    return [
        f"{e.key}: stale for {(e.last_read - e.since) * 1000:.0f} ms, {e.reads} reads"
        f" ({'set after the change' if e.race else 'cached before the change'})"
        for e in worst
    ]
