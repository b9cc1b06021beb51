"""What `install` does in either capture mode: one script in one transaction, then the
mode's step after it (modes/: the replication slot created in logical mode; in trigger
mode one left from logical mode is dropped, since an abandoned slot keeps WAL forever)."""

from __future__ import annotations

from typing import Any

import psycopg

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
