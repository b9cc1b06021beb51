"""A sweep when the server is not the one the listener last ran on (trigger mode's
note_server(); logical mode's slot tells most of it, lineage_of() the rest).

A standby promoted after a failover lacks the transactions the old primary had not sent
it yet (asynchronous replication, the default), and a database brought back to a point
in time lacks those after it. Readers may have cached their rows: no change will ever
come for them, and they stayed cached for good. The queue and the saved position came
along with the data, consistent with it, so nothing *left* is missed; what is *gone* can
only be swept. At each connect the listener has note_server_v1() (sql/schema.sql)
compare the server's lineage (its system identifier and WAL timeline, both new after a
promotion, a point-in-time recovery, or in another cluster) with the one recorded, and
queue a sweep of every watched table with the new lineage, in one transaction: the queue
then holds it until it is done, as any TRUNCATE, and replay finds it in the history.

The lineage recorded came with the data: a primary gone back to after a standby was
promoted and used (a failover undone) holds its own, and lacks what was written on the
other. The listener compares with the lineage its previous session saw too, which tells
that one while it runs (not after a restart); logical mode, whose slot on the old
primary still exists, does the same (lineage_of()).

A crash with asynchronous commits loses readable transactions too, on the same timeline:
this cannot tell it from a clean restart, and docs/DBA.md says to sweep by hand there.
"""

from __future__ import annotations

from typing import Any, cast

import psycopg
import structlog

from cdc_invalidator.pg.queries import Q

log = structlog.get_logger("cdc_invalidator.capture")


def note_server(conn: psycopg.Connection[Any], *, sweep: bool, seen: str | None) -> str | None:
    """Record this server's lineage, queueing a sweep of every watched table if it is
    another than the last, or than `seen` (the one this listener's previous session
    saw); `sweep`: sweep_after_failover. Say what was found; return the lineage (None:
    unknown)."""
    previous, current, swept = cast(
        "tuple[str | None, str | None, bool]",
        conn.execute(Q.NOTE_SERVER.sql, {"sweep": sweep, "seen": seen}).fetchone(),
    )
    if current is None:
        log.warning(
            "postgres_lineage_unknown",
            detail="the server withholds its system identifier or WAL timeline "
            "(server_lineage_v1() is NULL): a failover or a restore cannot be told, and "
            "is not swept for; sweep by hand after one (docs/DBA.md, After restoring the "
            "database), or let the role that installed cdc_invalidator call "
            "pg_control_system() and pg_walfile_name() (GRANT EXECUTE ON FUNCTION ...)",
        )
        return None
    if previous is None or previous == current:
        return current
    if swept:
        log.error(
            "changes_may_have_been_missed",
            reason=f"the server is not the one the listener last ran on ({previous}; now "
            f"{current}): a standby promoted or a restore, which may lack transactions "
            "whose rows readers cached",
            action="sweeping every key template of every watched table (queued)",
        )
    else:
        log.warning(
            "postgres_lineage_changed",
            previous=previous,
            now=current,
            detail="sweep_after_failover = false: nothing is swept (right only where no "
            "reader could see a commit the new server lacks: synchronous replication)",
        )
    return current


def gone_back(seen: str | None, current: str | None) -> bool:
    """Whether a server of lineage `current` lacks what was written where the listener's
    previous session ran (`seen`): another system, or an older timeline of this one (the
    old primary, a failover undone). A newer one is a promotion the previous session did
    not see: another listener took it meanwhile, and the slot (logical mode) or the
    lineage recorded (trigger mode: note_server_v1(), the same rule) tells that. None:
    unknown, no."""
    if seen is None or current is None or seen == current:
        return False
    return another_system(seen, current) or _timeline(seen) > _timeline(current)


def another_system(lineage: str, other: str) -> bool:
    """Whether two lineages are of two systems (a cluster and a dump restored elsewhere,
    or pg_upgrade's), not two timelines of one: what no replication keeps."""
    return lineage.split(maxsplit=1)[0] != other.split(maxsplit=1)[0]


def _timeline(lineage: str) -> int:
    """A lineage's timeline (server_lineage_v1(): 'SYSTEM timeline N')."""
    return int(lineage.split()[2])


def lineage_of(conn: psycopg.Connection[Any]) -> str | None:
    """The server's lineage (logical mode: compared with its previous session's), None
    where it withholds it, or the listener's role may not ask (EXECUTE revoked from
    PUBLIC and not granted: a grant_listener of an older release)."""
    try:
        row = conn.execute(Q.SERVER_LINEAGE.sql).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    return None if row is None else cast("str | None", row[0])
