"""What `install` does in either capture mode: one script in one transaction, then the
mode's step after it (modes/: the replication slot created in logical mode; in trigger
mode one left from logical mode is dropped, since an abandoned slot keeps WAL forever)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from cdc_invalidator.capture import logical_sql, trigger_sql
from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.modes.base import CaptureMode
from cdc_invalidator.pg import versions
from cdc_invalidator.pg.queries import Q


class SlotStepFailed(Exception):
    """The script was installed, but the slot step after it failed; says why."""


class UnsupportedServer(Exception):
    """The server is older than the capture mode needs: nothing was done; says why."""


def install(conn: psycopg.Connection[Any], mode: CaptureMode) -> str:
    """Install; return what was done, in one line. UnsupportedServer: the server is too
    old, nothing was tried. psycopg.Error: the script failed and nothing was changed.
    SlotStepFailed: installed, but the slot step failed. logical_sql.SlotLeftToListener:
    installed, and the listener is to make the slot."""
    too_old = versions.refusal(conn.info.server_version, mode.name)
    if too_old:
        raise UnsupportedServer(too_old)
    trigger_sql.apply(conn, mode.install_script())
    try:
        return mode.finish_install(conn)
    except logical_sql.SlotLeftToListener:
        raise  # (installed: a least-privilege installer's way, said as a warning)
    except (logical_sql.SlotBusy, Fatal) as exc:
        raise SlotStepFailed(str(exc)) from None
    except psycopg.Error as exc:
        raise SlotStepFailed(f"the replication slot step failed: {exc}") from None


def removed_unrecorded(conn: psycopg.Connection[Any], configured: list[str]) -> list[str]:
    """Before install: the tables an earlier install watched or published that this
    configuration drops and whose templates no recorded mapping holds (the last mapping
    that named them was installed by a release before revision 10). Their changes still
    queued or in the slot, read after this install, are dead letters and their keys stay
    cached (a run: 26 of 59 such changes, under writes): said, not found later."""
    row = conn.execute(Q.INSTALL_RECORDS.sql).fetchone()
    if row is None:
        return []
    watched, published, mappings = row
    # (no mapping_v1, revision 5: no templates recorded for any table)
    recorded = Q.REMOVED_RECORDED.sql if mappings else sql.SQL("false")
    found: set[str] = set()
    for present, table in ((watched, "watched_v1"), (published, "published_v1")):
        if not present:
            continue
        query = Q.REMOVED_UNRECORDED.sql.format(
            records=sql.Identifier("cdc_invalidator", table), recorded=recorded
        )
        for name, known in conn.execute(query, {"tables": configured}):
            if not known:
                found.add(str(name))
    return sorted(found)


def unguarded(conn: psycopg.Connection[Any]) -> str | None:
    """What an install without our event triggers leaves to the DBA (only a superuser may
    make them): said at once, not only by `check` later."""
    row = conn.execute(Q.CHECK_REBUILD_GUARD.sql).fetchone()
    if row is not None and row[0]:
        return None
    return (
        "the DDL guards (our event triggers) are not installed: only a superuser may make "
        "them. Without them, a watched table dropped or rebuilt, a partition detached or "
        "dropped, leaves keys cached until the next install, and in logical mode a "
        "migration that drops a watched table's primary key makes its UPDATEs and DELETEs "
        'fail (docs/DBA.md, "Schema migrations"). Run install as a superuser to add them'
    )
