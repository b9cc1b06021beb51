"""Broken listeners for the chaos controls (tests/test_chaos.py): the real
`cdc-invalidator` with one function replaced, from the test side, to show that the
chaos run's checks catch the bug it stands for. Nothing in the product can switch them on.

    python -m tests.support.mutants NAME run --config chaos.toml

- `ack_before_unlink`: each batch is acknowledged (the queue position or the slot's,
  saved at once) before its keys are deleted. Killed, or failing to reach Redis, in
  between, it loses those invalidations. (Trigger mode's early batches, which delete
  ahead of any acknowledgement, are off: they would hide the bug.)
- `no_sweep`: logical mode resumes on a new slot after the old one was lost without
  sweeping the templates (the changes committed meanwhile are never invalidated).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from cdc_invalidator.capture.early import EarlyBatch
from cdc_invalidator.capture.logical import LogicalStream
from cdc_invalidator.capture.trigger_queue import TriggerQueue
from cdc_invalidator.cli import main as cli_main
from cdc_invalidator.mapping import merge
from cdc_invalidator.runner import Runner, Source, premapped_of


def _acknowledge_now(source: Source) -> None:
    """Make the acknowledgement durable now, as a listener that acknowledged first would:
    the trigger queue's progress saved, the slot's position saved and confirmed."""
    save: Callable[[], None] | None = getattr(source, "_save", None)
    if save is not None:
        save()
        return
    status: Callable[..., None] | None = getattr(source, "_status_if_due", None)
    if status is not None:
        status(force=True)


def ack_before_unlink() -> None:
    def process_batch(self: Runner, source: Source) -> int:
        with source.batch(self._config.batch_size) as batch:
            if not batch.size:
                return 0
            works, failed = self._mapper.map_all(batch.events)
            if premapped := premapped_of(batch):  # packs, mapped column-wise
                merge(works, premapped)
            for event, exc in failed:
                batch.dead_letter(event.position, str(exc))
        # The bug: acknowledged, durably, before Redis deleted anything.
        _acknowledge_now(source)
        deleted = self._sink.delete_routed(works)
        self._later.add(works)
        self._observe(batch, deleted)
        return batch.size

    def no_early_batches(
        self: TriggerQueue, payloads: list[tuple[int, str | bytes]], limit: int
    ) -> EarlyBatch:
        # A one-row statement's keys would be deleted from its NOTIFY payload before
        # anything is acknowledged, and the queue read after that deletes nothing more.
        return EarlyBatch([], [], [], [])

    Runner._process_batch = process_batch  # type: ignore[method-assign]
    TriggerQueue._early_batch = no_early_batches  # type: ignore[method-assign]


def no_sweep() -> None:
    original = LogicalStream.__init__

    def init(self: LogicalStream, *args: Any, **kwargs: Any) -> None:
        kwargs["resync"] = None  # the bug: the sweep owed after a lost slot is dropped
        original(self, *args, **kwargs)

    LogicalStream.__init__ = init  # type: ignore[method-assign]


MUTANTS: dict[str, Callable[[], None]] = {
    "ack_before_unlink": ack_before_unlink,
    "no_sweep": no_sweep,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in MUTANTS:
        print(f"usage: python -m tests.support.mutants {{{','.join(MUTANTS)}}} ARGS...")
        return 2
    MUTANTS[argv[0]]()
    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
