"""Logical mode: opening the stream. Before it streams, the listener looks at the slot
(capture/slot.py classifies it) and at the server (capture/lineage.py): it resumes from
the position it saved, makes the slot on first use, drops one that is lost, waits
(Standby) while another streams it or while making it would wait for a long
transaction, and owes a sweep of every watched table where changes may have been
missed. Then START_REPLICATION, and a LogicalStream (capture/logical.py) reads it.
"""

from __future__ import annotations

from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc_invalidator.capture.errors import (
    Fatal,
    NotInstalled,
    Standby,
    missing_privilege,
    returned,
)
from cdc_invalidator.capture.lineage import (
    RESTORED,
    after_crash,
    crash_missed,
    crashed_since,
    gone_back,
    promoted_since,
    say_not_swept,
    server_of,
)
from cdc_invalidator.capture.logical import LogicalConfig, LogicalStream
from cdc_invalidator.capture.slot import SlotClass, SlotState, Verdict
from cdc_invalidator.capture.trigger_sql import (
    require_current_mapping,
    require_installed,
)
from cdc_invalidator.capture.walstream import (
    SlotInUse,
    WalStream,
    parse_lsn,
)
from cdc_invalidator.pg.connect import BOOKKEEPING, CLI, REPLICATION, PgConnector
from cdc_invalidator.pg.queries import Q

# (the stream's logger: its lines are one capture's, whichever module says them)
log = structlog.get_logger("cdc_invalidator.capture.logical")


class LogicalCapture:
    """Opens the stream, after looking at the slot (creating it on first use)."""

    def __init__(self, pg: PgConnector, config: LogicalConfig) -> None:
        self._pg = pg
        self._config = config
        self._last: WalStream | None = None  # the stream started last, and how it ended
        self._may_stream = False  # a replication connection of this role was accepted
        # The next transaction id when a new slot was first found waiting for a long
        # transaction: only those with an id before it are waited for in the loop
        # (_wait_for_long_transactions). Forgotten once a turn gets past it, the slot
        # made or found made (a later wait starts anew: second review).
        self._slot_wait_from: int | None = None
        self._lineage: str | None = None  # the server's, as the last session saw it
        # The missed changes last logged (changes_may_have_been_missed): a slot that
        # cannot be made again (every one of max_replication_slots taken) logged the same
        # error at every reconnect, once a second, never why (a review).
        self._missed_told: str | None = None

    def connect(self) -> LogicalStream:
        side = self._pg.connect(BOOKKEEPING)
        try:
            try:
                acked, resync = self._prepare(side)
            except Standby:
                self._try_streaming(side)
                raise
            except psycopg.errors.InsufficientPrivilege as exc:
                _explain_refusal(side, exc)  # creating the slot needs REPLICATION
                raise missing_privilege(side.info.user, "logical", exc) from None
            self._slot_wait_from = None
            try:
                repl = self._pg.connect(REPLICATION)
            except psycopg.OperationalError as exc:
                _explain_refusal(side, exc)
                raise
            try:
                options = {"proto_version": "1", "publication_names": self._config.publication}
                if self._config.mapper is not None:
                    # PostgreSQL 14 on (logical mode needs 15: pg/versions.py); our
                    # event triggers' sweeps come as logical decoding messages.
                    options.update(proto_version="2", streaming="on", messages="true")
                # From the position saved, not the slot's: that one may be older (before
                # PostgreSQL 17 a restart puts it back to its last checkpoint, and a
                # status update can go unread), and what lies between was done. (A slot
                # ahead of it was found so above, and resumes where it is.)
                stream = self._last = WalStream.start(
                    repl, self._config.slot, options, start_lsn=acked
                )
            except SlotInUse as exc:
                repl.close()
                raise Standby(str(exc)) from None
            except BaseException:
                repl.close()
                raise
            try:
                return LogicalStream(stream, side, self._config, acked=acked, resync=resync)
            except BaseException:
                # (It reads from `side` as it starts: a session lost there must not leave
                # the stream, and the slot, held through the reconnect's back-off.)
                stream.close()
                raise
        except BaseException:
            side.close()
            raise

    def _lost_here(
        self,
        side: psycopg.Connection[Any],
        state: SlotState,
        seen: str | None,
        lineage: str | None,
        run: str | None,
    ) -> str | None:
        """Why this server, whose slot is the one the listener confirmed, may lack
        commits that readers cached (capture/lineage.py), or None: a primary gone back
        to after a standby was promoted and used (told by the lineage this listener's
        previous session saw, `seen`, while it runs), a database restored from a dump
        in the same cluster (slot_state_v1 made again) or copied from another (its rows
        recorded in that one), or one that came up from a crash since the run recorded
        (`run`, now), where sweep_after_crash says so; or a server of another lineage
        than the one recorded for the slot at the last connect (a standby promoted with
        the slot synced to it, found by a listener started afresh)."""
        lost = _other_lineage(seen, state.server_lineage, lineage)
        if lost is not None:
            return lost
        if state.restored:
            return RESTORED
        if not crashed_since(state.server_run, run):
            return None
        crash = after_crash(side, self._config.sweep_after_crash)
        if crash.sweeps:
            return crash_missed(state.server_run, run, crash)
        say_not_swept(state.server_run, run, crash)
        return None

    def _prepare(self, side: psycopg.Connection[Any]) -> tuple[int, str | None]:
        """Check the install and the slot; return where to resume and a sweep owed."""
        cfg = self._config
        require_installed(side)
        if cfg.mapping is not None:
            require_current_mapping(side, cfg.mapping)
        published = side.execute(
            Q.LOGICAL_INSTALLED.sql, {"publication": cfg.publication}
        ).fetchone()
        if not published or not published[0]:
            raise NotInstalled(
                f"database {side.info.dbname!r} has no publication {cfg.publication!r}: run "
                '`cdc-invalidator install` with capture = "logical"'
            )
        state = SlotState.read(side, cfg.slot)
        if not state.registered:
            raise NotInstalled(
                f"slot {cfg.slot!r} is not registered in database {side.info.dbname!r}: "
                "run `cdc-invalidator install` with this configuration"
            )
        verdict = self._undecodable() or state.classify()
        kind = verdict.kind
        if kind is SlotClass.FOREIGN:
            raise Fatal(f"{verdict.reason}: set slot_name to a slot of our own")
        if kind is SlotClass.IN_USE:
            raise _in_use(side, cfg.slot, verdict.reason)
        if kind.create:
            self._wait_for_long_transactions(side)
        if kind is SlotClass.LOST:
            side.execute(Q.DROP_SLOT.sql, {"slot": cfg.slot})
        owed = state.resync_reason
        missed = verdict.reason if kind.missed_changes else None
        seen, (lineage, run) = self._lineage, server_of(side)
        missed = missed or self._lost_here(side, state, seen, lineage, run)
        if kind is SlotClass.MISSING_FIRST_USE:
            # `install` makes the slot as it commits; it is missing when install could
            # not (its role had no REPLICATION) or the script was applied by hand. The
            # publication has held the tables since, and what was written meanwhile is
            # in no slot.
            missed = (
                f"{verdict.reason}: it is made now, by the listener, and what was written "
                "to the watched tables between install and now was not captured"
            )
        if missed is not None:
            if missed != self._missed_told:
                log.error(
                    "changes_may_have_been_missed",
                    reason=missed,
                    action="sweeping every key template of every watched table before resuming",
                )
            self._missed_told = missed
            # Owed until done: a crash during the sweep sweeps again.
            side.execute(Q.SET_RESYNC.sql, {"slot": cfg.slot, "reason": missed, "lsn": None})
            owed = missed
        _record(side, state, run, lineage)  # (after the sweep it owes is recorded)
        self._lineage = lineage or seen
        if kind.create:
            return self._make_slot(side), owed
        if state.acked is None or kind is SlotClass.AHEAD:
            # A slot created outside `install` (e.g. by the DBA), on its first start; or
            # one moved past our position: resume where it is (after the sweep).
            confirmed = returned(state.confirmed_flush_lsn, f"confirmed position of {state.where}")
            side.execute(Q.RECORD_SLOT.sql, {"slot": cfg.slot, "lsn": confirmed})
            return parse_lsn(confirmed), owed
        return state.acked, owed

    def _make_slot(self, side: psycopg.Connection[Any]) -> int:
        """The slot made, recorded; where it starts."""
        slot = self._config.slot
        try:
            created = side.execute(Q.CREATE_SLOT.sql, {"slot": slot})
        except psycopg.errors.DuplicateObject:
            # Another listener (or install) made it meanwhile: a standby waiting for the
            # same slot exited 1 here (second review). Its turn comes again.
            raise Standby(f"replication slot {slot!r} was just made by another") from None
        except psycopg.errors.ConfigurationLimitExceeded as exc:
            # Retried (a server down for the listener): said as what it is, and what to do.
            raise psycopg.OperationalError(
                f"replication slot {slot!r} cannot be made: {' '.join(str(exc).split())} "
                "(max_replication_slots): the listener retries, and sweeps every watched "
                "table once it is made; until then no change is invalidated"
            ) from None
        self._missed_told = None  # (a slot lost again later is told again)
        start = returned(created.fetchone(), f"position for new slot {slot!r}")
        side.execute(Q.RECORD_SLOT.sql, {"slot": slot, "lsn": start[0]})
        log.info("slot_created", slot=slot, lsn=start[0])
        return parse_lsn(start[0])

    def _wait_for_long_transactions(self, side: psycopg.Connection[Any]) -> None:
        """Making a slot waits, in one silent statement, for every transaction running
        then to end. Behind a long one a review's listener sat 51 s with its loop still (a
        liveness probe restarts it, which restarts the wait) and /readyz saying PostgreSQL
        was down. While one has run for over a second, the listener waits in its loop
        instead (Standby: not ready, the oldest named), then makes the slot. Only those
        given an id before it first looked are waited for so (by id, not start: a
        transaction prepared later is one of them, third review): on a server where long
        ones overlap without end, the statement's own wait is the shorter (it waits for
        those running when it starts, not for later ones)."""
        found = side.execute(Q.SLOT_BLOCKERS.sql, {"before": self._slot_wait_from}).fetchone()
        if found is None:
            self._slot_wait_from = None
            return
        pid, gid, database, role, since, before = found
        self._slot_wait_from = before
        if gid is not None:
            held = (
                f"prepared transaction {gid!r} (database {database}, role {role}), prepared "
                f"at {since}: nothing is invalidated until it is committed or rolled back "
                f"(COMMIT PREPARED or ROLLBACK PREPARED {sql.Literal(gid).as_string(side)})"
            )
        else:
            held = (
                f"backend {pid} (database {database}, role {role}), in a transaction since "
                f"{since}: nothing is invalidated until it ends (SELECT "
                f"pg_terminate_backend({pid}) ends it, if it may be)"
            )
        slot = self._config.slot
        raise Standby(
            f"making slot {slot!r} waits until every transaction running on the server has ended",
            foreign=f"{held}; what was written meanwhile is swept then",
            event="slot_creation_waits",
        )

    def _try_streaming(self, side: psycopg.Connection[Any]) -> None:
        """A standby that could not stream when its turn comes says so now (Fatal), not
        at the takeover: it was ready on /readyz all along, and the takeover it stood
        for failed (a review: a role without REPLICATION). Tried once per process:
        managed services grant replication by role membership, which only a replication
        connection tells."""
        if self._may_stream:
            return
        try:
            self._pg.connect(REPLICATION).close()
        except psycopg.OperationalError as exc:
            _explain_refusal(side, exc)
            return  # (another failure: its turn comes again)
        self._may_stream = True

    def _undecodable(self) -> Verdict | None:
        """The last stream ended because the publication did not exist at the changes the
        slot holds: it was dropped and made again (by `install` where no DDL guard
        refused the DROP), and decoding reads the catalog as it was at each change. It
        fails there at every start, forever: the slot is dropped and made again, and
        every watched table swept (changes between the two were never published)."""
        ended = self._last.ended_with if self._last is not None else None
        name = self._config.publication
        # (undefined_object, naming it: the message itself may be in another language)
        if ended is None or ended[0] != "42704" or name not in ended[1]:
            return None
        self._last = None
        return Verdict(
            SlotClass.LOST,
            f"slot {self._config.slot!r} holds changes made while publication {name!r} did "
            f"not exist (it was dropped and made again), which cannot be decoded: {ended[1]}",
        )


def _other_lineage(seen: str | None, recorded: str | None, lineage: str | None) -> str | None:
    """Why a server of `lineage` may lack commits that readers cached, by the lineage
    this listener's previous session saw (`seen`) or the one recorded for the slot at the
    last connect (`recorded`), or None."""
    if gone_back(seen, lineage):
        return (
            f"the listener's previous session ran on another server ({seen}; now "
            f"{lineage}): a primary gone back to after a standby was promoted lacks "
            "the transactions written on that one"
        )
    if promoted_since(seen, lineage):
        return (
            f"the slot survived a promotion (a failover slot; the listener's previous "
            f"session ran on {seen}, now {lineage}): a standby promoted lacks the "
            "transactions asynchronous replication had not sent it, which readers of "
            "the old primary may have cached"
        )
    if recorded is not None and lineage is not None and recorded != lineage:
        # (a listener started afresh has no previous session to compare with, but
        # the lineage recorded at the last connect came with the data: a review's
        # listener resumed from a failover slot and a lost commit stayed cached)
        return (
            f"the server is not the one the listener last ran on ({recorded}; now "
            f"{lineage}): a standby promoted with the slot synced to it (a failover "
            "slot), a point-in-time recovery or pg_upgrade, which may lack the "
            "transactions asynchronous replication had not sent it, or that came "
            "after the recovery's target, and readers may have cached their rows"
        )
    return None


def _in_use(side: psycopg.Connection[Any], slot: str, reason: str) -> Standby:
    """The slot is streamed: by a listener like this one (its role and application_name),
    or by something else (Standby.foreign), which keeps every listener waiting."""
    holder = side.execute(Q.SLOT_HOLDER.sql, {"slot": slot}).fetchone()
    mine = (side.info.user, side.info.parameter_status("application_name"))
    # (ours: this one's role and application_name, or `install` making the slot, with
    # the commands' suffix: exactly, or a `cdc-invalidator-orders` would pass for ours)
    ours = {mine, (mine[0], f"{mine[1]}{CLI.suffix}")}
    if holder is None or (holder[1], holder[2]) in ours:
        return Standby(reason)
    pid, role, application_name = holder
    return Standby(
        "another client streams the replication slot",
        foreign=f"backend {pid} (role {role}, application_name {application_name!r}) streams "
        f"slot {slot!r}, not a listener like this one (role {mine[0]}, application_name "
        f"{mine[1]!r}): if it is no listener of yours, nothing is invalidated until it "
        f"stops (SELECT pg_terminate_backend({pid})); what it consumed meanwhile is swept "
        "then",
    )


def _explain_refusal(side: psycopg.Connection[Any], exc: psycopg.Error) -> None:
    """A replication connection or slot refused to a role without REPLICATION is for
    good: say so (Fatal) instead of retrying forever. (Managed services may grant
    replication by role membership instead; there, it is not refused in the first place.)"""
    row = side.execute(Q.CAN_REPLICATE.sql).fetchone()
    if row is not None and not row[0]:
        raise Fatal(
            f"role {side.info.user!r} cannot use replication ({exc}): grant it "
            "REPLICATION (ALTER ROLE ... REPLICATION) or run the listener as a role that has it"
        ) from None


def _record(
    side: psycopg.Connection[Any], state: SlotState, run: str | None, lineage: str | None
) -> None:
    """What the listener found at connect, recorded once a sweep it owes is: the server's
    run and lineage for the slot, and every row of slot_state_v1 as recorded in this
    table (a restore's rows, the sweep for which is owed now)."""
    if state.restored:
        side.execute(Q.RECORD_TABLE.sql)
    if run is not None or lineage is not None:
        side.execute(Q.RECORD_RUN.sql, {"slot": state.slot_name, "run": run, "lineage": lineage})
