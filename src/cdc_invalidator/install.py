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


class SlotStepFailed(Exception):
    """The script was installed, but the slot step after it failed; says why."""


class SlotLeftToListener(SlotStepFailed):
    """Installed, but the installing role may not create replication slots: the
    listener makes the slot on its first start, and sweeps then (capture/logical.py)."""


class UnsupportedServer(Exception):
    """The server is older than the capture mode needs: nothing was done; says why."""


def install(conn: psycopg.Connection[Any], mode: CaptureMode) -> str:
    """Install; return what was done, in one line. UnsupportedServer: the server is too
    old, nothing was tried. psycopg.Error: the script failed and nothing was changed.
    SlotStepFailed: installed, but the slot step failed."""
    too_old = versions.refusal(conn.info.server_version, mode.name)
    if too_old:
        raise UnsupportedServer(too_old)
    trigger_sql.apply(conn, mode.install_script())
    try:
        return mode.finish_install(conn)
    except (logical_sql.SlotBusy, Fatal) as exc:
        raise SlotStepFailed(str(exc)) from None
    except psycopg.Error as exc:
        if exc.sqlstate == "42501":  # insufficient_privilege: a role without REPLICATION
            raise SlotLeftToListener(
                f"the replication slot was not made ({exc.diag.message_primary or exc}): the "
                "listener makes it on its first start (its role needs REPLICATION) and then "
                "sweeps every watched table once, since what is written until then is in no "
                "slot. Start it soon, or run install again as a role with REPLICATION"
            ) from None
        raise SlotStepFailed(f"the replication slot step failed: {exc}") from None
