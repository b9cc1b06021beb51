"""What `install` does in either capture mode: one script in one transaction, then the
replication slot (created in logical mode; in trigger mode one left from logical mode is
dropped, since an abandoned slot keeps WAL forever)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from cdc_invalidator.capture import logical_sql, trigger_sql
from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.settings import Settings


class SlotStepFailed(Exception):
    """The script was installed, but the slot step after it failed; says why."""


def install_script(settings: Settings) -> sql.Composed:
    mapper = settings.mapper()
    if settings.capture == "logical":
        keep = {t: s.replica_identity == "keep" for t, s in settings.table_settings().items()}
        return logical_sql.install_script(
            mapper, keep, settings.publication_name, settings.slot_name
        )
    return trigger_sql.install_script(mapper, settings.publication_name)


def install(conn: psycopg.Connection[Any], settings: Settings) -> str:
    """Install; return what was done, in one line. psycopg.Error: the script failed and
    nothing was changed. SlotStepFailed: installed, but the slot step failed."""
    trigger_sql.apply(conn, install_script(settings))
    tables = ", ".join(sorted(str(t) for t in settings.mapper().tables))
    version = trigger_sql.SCHEMA_VERSION
    slot = settings.slot_name
    try:
        if settings.capture == "logical":
            new = logical_sql.create_slot(conn, slot)
            made = f"created slot {slot!r} at {new.lsn}" if new else f"slot {slot!r} exists"
            if new and new.owed:
                made += f" (the listener sweeps every watched table first: {new.owed})"
            return (
                f"installed cdc_invalidator v{version} (logical); {made}; "
                f"publication {settings.publication_name!r} holds {tables}"
            )
        done = f"installed cdc_invalidator v{version}; watching {tables}"
        if logical_sql.our_slot(conn, slot):
            logical_sql.drop_slot(conn, slot)
            done += f"; dropped replication slot {slot!r} left from logical capture"
    except (logical_sql.SlotBusy, Fatal) as exc:
        raise SlotStepFailed(str(exc)) from None
    except psycopg.Error as exc:
        raise SlotStepFailed(f"the replication slot step failed: {exc}") from None
    return done
