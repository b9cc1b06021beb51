"""A sweep when the server is not the one the listener last ran on, or came up from a
crash that lost what readers saw (trigger mode's note_server(); logical mode's slot
tells most of it, server_of() the rest).

A standby promoted after a failover lacks the transactions the old primary had not sent
it yet (asynchronous replication, the default), and a database brought back to a point
in time lacks those after it. Readers may have cached their rows: no change will ever
come for them, and they stayed cached for good. The queue and the saved position came
along with the data, consistent with it, so nothing *left* is missed; what is *gone* can
only be swept. At each connect the listener has note_server_v3() (sql/schema.sql)
compare the server's lineage (its system identifier and WAL timeline, both new after a
promotion, a point-in-time recovery, or in another cluster) with the one recorded, and
queue a sweep of every watched table with the new lineage, in one transaction: the queue
then holds it until it is done, as any TRUNCATE, and replay finds it in the history.

The lineage recorded came with the data: a primary gone back to after a standby was
promoted and used (a failover undone) holds its own, and lacks what was written on the
other. The listener compares with the lineage its previous session saw too, which tells
that one while it runs (not after a restart); logical mode, whose slot on the old
primary still exists, does the same (server_of()).

A dump restored on the same lineage (into another database of the cluster, or over the
same one) takes the database back to the dump's time: what was committed since is lost,
as a failover loses it. Trigger mode tells it by listener_state_v1 itself, made again by the
restore with another oid, where the row the dump carried recorded the old one
(recorded_in), and sweeps for it whatever the settings. A copy of another database
(CREATE DATABASE ... TEMPLATE, renamed into place or made over a database dropped) keeps
the table's oid but is another database: its row recorded the other's oid
(recorded_in_database), and is swept for the same way. Logical mode does the same with
slot_state_v1 (capture/logical.py, and its install).

A crash with asynchronous commits loses readable transactions too, on the same timeline:
a commit made with synchronous_commit = off is visible before its WAL is flushed, and
neither capture mode ever sees one a crash took (its queue row goes with it; logical
decoding reads flushed WAL only). The server's run (server_run_v1(): a mark in an
unlogged table, which crash recovery empties and a clean restart keeps) is recorded
beside the lineage and compared at each connect; another one is swept for as a
failover is, in both modes (sweep_after_crash: always by default, since no session sees
another's own SET; or only where settings have this database's writers commit
asynchronously, as `check` sees them). A clean restart loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

import psycopg
import structlog

from cdc_invalidator.pg.queries import Q

log = structlog.get_logger("cdc_invalidator.capture")


CrashSetting = Literal["auto", "always", "never"]

# Why a database restored from a dump in the same cluster, or copied from another, is
# swept for, in either mode.
RESTORED = (
    "the database was restored from a dump or copied from another (cdc_invalidator's "
    "tables were made again, or are another database's, since the listener last noted "
    "them): it went back to the time of the dump or copy, and rows readers cached since "
    "may be gone or older"
)


@dataclass(frozen=True, slots=True)
class AfterCrash:
    """Whether a server that came up from a crash is swept for (sweep_after_crash), and
    why: "always" (sessions may turn asynchronous commits on themselves, which no other
    session sees), "auto" where this database's writers commit asynchronously
    (`places`, as the SQL that set it: read for "auto" alone), "never"."""

    setting: CrashSetting
    places: tuple[str, ...] = ()

    @property
    def sweeps(self) -> bool:
        return self.setting == "always" or (self.setting == "auto" and bool(self.places))

    def said(self) -> str:
        """Why a crash is swept for, or not."""
        if self.setting == "always":
            return (
                "sweep_after_crash = always: any session may commit asynchronously by its "
                "own SET, which no other session sees"
            )
        if self.setting == "never":
            return "sweep_after_crash = never"
        if self.places:
            return f"this database's writers commit asynchronously ({'; '.join(self.places)})"
        return (
            "no setting of the server, the database or a role has this database's writers "
            "commit asynchronously"
        )


def async_commit_places(conn: psycopg.Connection[Any]) -> tuple[str, ...]:
    """Where this database's writers commit asynchronously, as the SQL that set it
    (sql/check_async_commits.sql): for `check` and the listener alike, read with this
    session's own setting put back to the one it started with (the listener's sessions
    turn it off for their own bookkeeping, which would hide the server's)."""
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit TO DEFAULT")
        return tuple(place for (place,) in conn.execute(Q.CHECK_ASYNC_COMMITS.sql).fetchall())


def after_crash(conn: psycopg.Connection[Any], setting: CrashSetting) -> AfterCrash:
    """sweep_after_crash, with where this database's writers commit asynchronously where
    it decides ("auto"): the trigger listener asks at every connect, and the others'
    answer would be read for nothing."""
    if setting != "auto":
        return AfterCrash(setting)
    return AfterCrash(setting, async_commit_places(conn))


def noted_at(run: str | None) -> str:
    """A run (server_run_v1(), an epoch's text) as the time it names."""
    if run is None:
        return "unknown"
    return datetime.fromtimestamp(float(run), UTC).isoformat(timespec="seconds")


def crashed_since(before: str | None, now: str | None) -> bool:
    """Whether the server came up from a crash since the run `before` was recorded: its
    mark is another (None before: none recorded, a first start; None now: a standby)."""
    return before is not None and now is not None and before != now


def _crashed(before: str | None, now: str | None) -> str:
    return (
        f"PostgreSQL crashed since the listener last noted it (the run it noted at "
        f"{noted_at(before)} is gone; this one was noted at {noted_at(now)})"
    )


def crash_missed(before: str | None, now: str | None, crash: AfterCrash) -> str:
    """Why a crash found since the run `before` was recorded is swept for."""
    return (
        f"{_crashed(before, now)}, and {crash.said()}: a crash loses such commits after "
        "readers may have cached their rows"
    )


def say_not_swept(before: str | None, now: str | None, crash: AfterCrash) -> None:
    """Log a crash found since the run recorded, not swept for, and why."""
    log.warning(
        "postgres_recovered",
        reason=f"{_crashed(before, now)}, and {crash.said()}",
        detail="nothing swept: with synchronous commits a crash loses nothing a reader saw "
        "(sweep_after_crash = always sweeps where sessions turn them off themselves)",
    )


def note_server(
    conn: psycopg.Connection[Any], *, sweep: bool, seen: str | None, crash: AfterCrash
) -> str | None:
    """Record this server's lineage and run, queueing a sweep of every watched table if
    it is another than the last, or than `seen` (the one this listener's previous session
    saw), or the database was restored from a dump or copied from another, or came up
    from a crash since where `crash` sweeps for one; `sweep`: sweep_after_failover. Say
    what was found; return the lineage (None: unknown)."""
    previous, current, swept, run_before, run, restored = cast(
        "tuple[str | None, str | None, bool, str | None, str | None, bool]",
        conn.execute(
            Q.NOTE_SERVER.sql,
            {"sweep": sweep, "seen": seen, "sweep_crashed": crash.sweeps},
        ).fetchone(),
    )
    if restored:
        # (swept whatever else was found: note_server_v3() queued it with this reason)
        log.error(
            "changes_may_have_been_missed",
            reason=RESTORED,
            action="sweeping every key template of every watched table (queued)",
        )
    elif crashed_since(run_before, run) and (
        previous is None or current is None or previous == current
    ):
        if swept:
            log.error(
                "changes_may_have_been_missed",
                reason=crash_missed(run_before, run, crash),
                action="sweeping every key template of every watched table (queued)",
            )
        else:
            say_not_swept(run_before, run, crash)
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
    if previous is None or previous == current or restored:
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
    lineage recorded (trigger mode: note_server_v3(), the same rule) tells that. None:
    unknown, no."""
    if seen is None or current is None or seen == current:
        return False
    return another_system(seen, current) or _timeline(seen) > _timeline(current)


def promoted_since(seen: str | None, current: str | None) -> bool:
    """Whether a server of lineage `current` is a newer timeline of the system the
    listener's previous session saw (`seen`): a standby promoted while the listener ran.
    In logical mode the slot is normally gone then (and swept for); one that survived
    (a failover slot, synced to the standby) resumes where the standby had it, without
    the transactions asynchronous replication lost. None: unknown, no."""
    if seen is None or current is None or seen == current:
        return False
    return not another_system(seen, current) and _timeline(current) > _timeline(seen)


def another_system(lineage: str, other: str) -> bool:
    """Whether two lineages are of two systems (a cluster and a dump restored elsewhere,
    or pg_upgrade's), not two timelines of one: what no replication keeps."""
    return lineage.split(maxsplit=1)[0] != other.split(maxsplit=1)[0]


def _timeline(lineage: str) -> int:
    """A lineage's timeline (server_lineage_v1(): 'SYSTEM timeline N')."""
    return int(lineage.split()[2])


def server_of(conn: psycopg.Connection[Any]) -> tuple[str | None, str | None]:
    """The server's lineage (logical mode: compared with its previous session's) and its
    run (compared with the one recorded for the slot), None where it withholds them, or
    the listener's role may not ask (EXECUTE revoked from PUBLIC and not granted: a
    grant_listener of an older release)."""
    try:
        row = conn.execute(Q.SERVER_LINEAGE.sql).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None, None
    if row is None:
        return None, None
    return cast("tuple[str | None, str | None]", tuple(row))
