"""`cdc-invalidator tail [--table T]`: print invalidations as the listener makes them.

It only subscribes to the channel the listener publishes on (tools/tap.py): it takes
nothing from the queue or the slot, so the listener consumes as before, wherever it
runs. A lost connection to Redis is said once and subscribed again; Ctrl-C ends it. A
password or an ACL Redis refuses before the first subscription ends it with the error.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cdc_invalidator.events import TableName
from cdc_invalidator.sink import REDIS_ERRORS, REDIS_REFUSED, RedisOptions
from cdc_invalidator.sink.pubsub import subscribe
from cdc_invalidator.tools.tail_message import decode, line

RESUBSCRIBE_S = 1.0


def tail(
    options: RedisOptions,
    channel: str,
    table: TableName | None,
    out: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """Print each invalidation (of `table`, if given) until interrupted."""
    wanted = None if table is None else str(table)
    down = False
    subscribed = False
    while True:
        try:
            for text in subscribe(options, channel):
                subscribed = True
                if down:
                    warn(f"Redis is back: tailing {channel} again")
                    down = False
                if text is None:
                    continue
                try:
                    batch = decode(text)
                except ValueError as exc:
                    warn(f"warning: skipped a message on {channel}: {exc}")
                    continue
                for event in batch.events:
                    if wanted is None or event.table == wanted:
                        out(line(batch.at, event))
                if batch.more:
                    out(f"... and {batch.more} more invalidations of that batch, not shown")
        except REDIS_ERRORS as exc:
            if not subscribed and isinstance(exc, REDIS_REFUSED):
                raise  # (a wrong password would be retried forever)
            if not down:
                warn(f"Redis: {type(exc).__name__}: {exc}: subscribing again every second")
                down = True
            time.sleep(RESUBSCRIBE_S)
