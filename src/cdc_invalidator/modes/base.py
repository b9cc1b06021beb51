"""What a capture mode is to the rest of the program: install, the source the runner
consumes, status, checks, the history replay reads and the metrics' database figures.

The modules below the modes each name the part they use (replay.History,
second_deletes.Acknowledged, checks.ModeChecks, metrics.DatabaseFigures): they never
import a mode, so the imports point one way (modes → those modules)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import psycopg
from psycopg import sql

from cdc_invalidator.capture.rows import Decoded, MapPack
from cdc_invalidator.capture.trigger_sql import MappingStamp, mapping_eras_of
from cdc_invalidator.checks import ModeChecks
from cdc_invalidator.mapping.mapper import Era, RetiredLookup
from cdc_invalidator.metrics import Figures
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.runner import Source
from cdc_invalidator.settings import Settings

# Events read and deleted per round of a replay: bounded memory whatever the window
# holds. A trigger queue row is one event (a pack: its rows); a history_v1 row gathers
# acknowledged batches (up to GATHER_BYTES of JSON, and the batch that passed it: more
# events than one batch), so logical mode fetches one row at a time and cuts its rounds
# by events. Every listener that starts replays the second deletes its predecessor may
# have died owing, so this is paid in every restart after a busy spell: measured on a
# listener started right after a 100k-change drain (a row per batch then), rounds of
# 20,000 events (4 rows a fetch) peaked at 104 MB, rounds of 5,000 at 72 MB; rounds that
# size are still 5,000 keys or more per pipeline.
HISTORY_CHUNK = 5_000
HISTORY_BATCH_ROWS = 1


class StatusReport(Protocol):
    """What `status` prints."""

    def as_json(self) -> dict[str, Any]: ...
    def lines(self) -> list[str]: ...


class CaptureMode(ModeChecks, Protocol):
    """A capture mode: its install, its listener's source, status and figures, history,
    and (ModeChecks) what `check` asks of it."""

    @property
    def name(self) -> str:
        """ "trigger" or "logical": the settings' value, what grant_listener() takes."""
        ...

    @property
    def history_table(self) -> str: ...

    # -- install ----------------------------------------------------------------------
    def install_script(self) -> sql.Composed:
        """What `install` runs (and `sql` prints), in one transaction."""
        ...

    def finish_install(self, conn: psycopg.Connection[Any]) -> str:
        """The step after the script (the replication slot); what install did, in one
        line."""
        ...

    def uninstall_script(self) -> sql.Composed:
        """What `uninstall` runs: every object of both modes (the slot is dropped apart)."""
        ...

    # -- the listener ---------------------------------------------------------------------
    def source(self, retired: RetiredLookup | None) -> Callable[[], Source]:
        """What the runner calls to open the capture, at start and after each outage.
        `retired`: the listener's lookup of tables its configuration lacks
        (listener.retired_lookup), for a capture that maps or decodes their changes
        itself; None: it renders none."""
        ...

    # -- status, metrics, check ---------------------------------------------------------
    def status(self, conn: psycopg.Connection[Any]) -> StatusReport: ...
    def figures(self, conn: psycopg.Connection[Any]) -> Figures: ...

    # -- what replay reads -------------------------------------------------------------------
    def history(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]: ...
    def acknowledged(
        self, conn: psycopg.Connection[Any], since_s: float, map_pack: MapPack | None = None
    ) -> Iterator[Decoded]: ...
    def last_acknowledged_s(self, conn: psycopg.Connection[Any]) -> float | None: ...
    def eras(self, conn: psycopg.Connection[Any]) -> list[Era]: ...

    # -- in words, for the demo ---------------------------------------------------------
    @property
    def installs(self) -> str:
        """What install puts in the database, in a sentence."""
        ...

    @property
    def delivery(self) -> str:
        """How a commit reaches the listener, in a sentence."""
        ...


def history_rows(
    conn: psycopg.Connection[Any],
    query: Q,
    since_s: float,
    per_fetch: int,
    *,
    count_at: int | None = None,
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of history query `query` for the last `since_s` seconds, `per_fetch` at a
    time. A server-side cursor: the window may hold millions. `count_at`: the column
    saying how many events a row holds (NULL: one): the first fetch takes one row, each
    next one about HISTORY_CHUNK events' worth of rows by the weight of the last, at most
    `per_fetch` (a trigger queue's packs hold a thousand events a row, its single changes
    one)."""
    with conn.transaction(), conn.cursor(name="cdc_invalidator_replay") as cur:
        cur.execute(query.sql, {"seconds": since_s})
        n = per_fetch if count_at is None else 1  # then as many as the rows weigh
        while rows := cur.fetchmany(n):
            yield rows
            if count_at is not None:
                events = sum(row[count_at] or 1 for row in rows)
                n = max(1, min(per_fetch, HISTORY_CHUNK * len(rows) // events))


def seconds_ago(conn: psycopg.Connection[Any], query: Q) -> float | None:
    """The one value of query `query`, seconds or NULL (last_acknowledged_*.sql)."""
    row = conn.execute(query.sql).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def mapping_stamp(settings: Settings) -> MappingStamp:
    """The configuration's mapping, as its listener asks about it (installed, its eras)."""
    return MappingStamp(
        settings.mapping_fingerprint(), settings.written_at, settings.mapping_record()
    )


def eras_of(conn: psycopg.Connection[Any], settings: Settings) -> list[Era]:
    """CaptureMode.eras(): what replay renders a table's changes with too."""
    return mapping_eras_of(conn, mapping_stamp(settings), settings.capture, quiet=True)
