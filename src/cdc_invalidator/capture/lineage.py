"""Trigger mode: the sweep owed when the server is not the one the listener last ran on.

A standby promoted after a failover lacks the transactions the old primary had not sent
it yet (asynchronous replication, the default), and a database brought back to a point
in time lacks those after it. Readers may have cached their rows: no change will ever
come for them, and they stayed cached for good. The queue and the saved position came
along with the data, consistent with it, so nothing *left* is missed; what is *gone* can
only be swept. The listener tells such a server by its lineage (sql/server_lineage.sql:
its system identifier and its WAL timeline, both new after a promotion, a point-in-time
recovery, or in another cluster), recorded at each connect, and sweeps every watched
table once (the trigger queue hands that sweep out first, as logical mode does after it
lost its slot).

A crash with asynchronous commits loses readable transactions too, on the same timeline:
this cannot tell it from a clean restart, and docs/DBA.md says to sweep by hand there.
"""

from __future__ import annotations

from typing import Any, cast

import psycopg
import structlog

from cdc_invalidator.pg.queries import Q

log = structlog.get_logger("cdc_invalidator.capture")


def owed_sweep(conn: psycopg.Connection[Any], *, sweep: bool) -> str | None:
    """The reason of the sweep of every watched table this server owes (None: none),
    with this server's lineage recorded first (and the sweep with it, until it is done:
    clear_swept()). `sweep` False (sweep_after_failover = false): a new lineage is
    logged and recorded, and nothing is swept."""
    lineage, last, owed = cast(
        "tuple[str | None, str | None, str | None]",
        conn.execute(Q.SERVER_LINEAGE.sql).fetchone(),
    )
    if lineage is None:
        log.warning(
            "postgres_lineage_unknown",
            detail="the server withholds its system identifier or WAL timeline "
            "(server_lineage_v1() is NULL): a failover or a restore cannot be told, and "
            "is not swept for; sweep by hand after one (docs/DBA.md, After restoring the "
            "database)",
        )
        return owed
    if lineage == last:
        return owed
    if last is not None and sweep:
        owed = (
            f"the server is not the one the listener last ran on (system {last}; now "
            f"{lineage}): a standby promoted or a restore, which may lack transactions "
            "whose rows readers cached"
        )
        log.error(
            "changes_may_have_been_missed",
            reason=owed,
            action="sweeping every key template of every watched table",
        )
    elif last is not None:
        log.warning(
            "postgres_lineage_changed",
            previous=last,
            now=lineage,
            detail="sweep_after_failover = false: nothing is swept (right only where no "
            "reader could see a commit the new server lacks: synchronous replication)",
        )
    conn.execute(Q.RECORD_LINEAGE.sql, {"lineage": lineage, "reason": owed})
    return owed


def clear_swept(conn: psycopg.Connection[Any], reason: str, tables: int) -> None:
    """The sweep owed for `reason` is done: no longer owed."""
    conn.execute(Q.CLEAR_RESYNC_TRIGGER.sql, {"reason": reason})
    log.warning("missed_changes_swept", tables=tables, reason=reason)
