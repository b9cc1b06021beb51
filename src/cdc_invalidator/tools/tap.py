"""The listener's side of `tail`: after a batch is acknowledged, and only while someone
tails, each event's keys are published with its commit time (tools/tail_message.py).

Nobody tailing costs a batch one clock read, and the listener one PUBSUB NUMSUB a
second while batches flow (sink/pubsub.py). Tailing costs mapping the batch's events
again one by one (for each event's own keys) and one PUBLISH per batch, after the
acknowledgement: the deletes are never held up, and a failure is the channel's to log.
"""

from __future__ import annotations

import time
from typing import Protocol, assert_never, runtime_checkable

from cdc_invalidator.events import ChangeEvent, InvalidEvent, StandInKind, stand_in
from cdc_invalidator.mapping import Invalidation, Mapper
from cdc_invalidator.runner import Batch
from cdc_invalidator.sink.pubsub import TailChannel
from cdc_invalidator.tools.tail_message import MAX_EVENTS, TailEvent, encode


@runtime_checkable
class AllEvents(Protocol):
    """A batch whose `events` may leave changes out (mapped without events: a trigger
    batch's packs); all_events() has them all, in the order origins() follows."""

    def all_events(self) -> list[ChangeEvent]: ...


class Tap:
    """The runner's Tap: publishes acknowledged batches while someone tails."""

    def __init__(self, channel: TailChannel, mapper: Mapper) -> None:
        self._channel = channel
        self._mapper = mapper

    def after(self, batch: Batch) -> None:
        if not self._channel.wanted():
            return
        at = time.time()
        # Every change: a trigger batch's packs mapped column-wise are no `events`.
        every = batch.all_events() if isinstance(batch, AllEvents) else batch.events
        shown = every[:MAX_EVENTS]
        origins = batch.origins()
        events = []
        for event, origin in zip(shown, origins, strict=False):
            work = Invalidation()
            error = batch.dead.get(event.position)
            if error is None:
                try:
                    self._mapper.add(event, work)
                except InvalidEvent as exc:
                    error = str(exc)
            shown_as, why = _stands_for(event)
            events.append(
                TailEvent(
                    table=str(event.table),
                    op=event.op.value,
                    keys=sorted(work.keys),
                    patterns=sorted(work.patterns),
                    error=error,
                    commit=origin.committed_at,
                    txn=origin.transaction,
                    shown_as=shown_as,
                    why=why,
                )
            )
        self._channel.publish(encode(at, events, len(every) - len(shown)))

    def close(self) -> None:
        self._channel.close()


def _stands_for(event: ChangeEvent) -> tuple[str | None, str | None]:
    """How `tail` shows a TRUNCATE event that stands for something else (events.py),
    instead of a TRUNCATE nobody ran, and why; (None, None) for any other event."""
    stands_for = stand_in(event)
    if stands_for is None:
        return None, None
    kind, detail = stands_for
    if kind is StandInKind.UNRENDERABLE:
        return "UNRENDERABLE", detail
    if kind is StandInKind.BULK:
        return "BULK", f"a statement of {detail} rows or more: bulk_sweep_rows"
    if kind is StandInKind.RESYNC:
        return "RESYNC", f"{detail}: every watched table swept"
    assert_never(kind)
