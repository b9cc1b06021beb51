"""Every file of sql/ that the code reads, named once: the one list of our SQL.

The files are the SQL a DBA reviews; they ship inside the wheel as the package
cdc_invalidator.sql. Code names a file only through a member of `Q` (never a name built
at run time), so this list is complete, a file named twice is an error at import
(`enum.unique`), and one missing is an error at import too. A file's text is read on
first use and kept.
"""

from __future__ import annotations

import enum
from functools import cache
from importlib.resources import files
from typing import LiteralString

from psycopg.sql import SQL

PACKAGE = "cdc_invalidator.sql"


@enum.unique
class Q(enum.Enum):
    """A file of sql/: `.sql` to execute or compose, `.text` as written."""

    _value_: str

    # --- install and uninstall scripts: parts, some with {placeholders} to format -------
    GUARD = "guard.sql"  # the start of every script: search_path pinned, squatting refused
    VERSION_CHECK = "version_check.sql"  # after it in install scripts: too old a server refused
    REFUSE_NESTED = "refuse_nested.sql"  # then: a configured table inside another refused
    REFUSE_SUBSCRIBED = "refuse_subscribed.sql"  # trigger: one a subscription writes refused
    SCHEMA = "schema.sql"  # both modes' shared objects and the trigger queue
    GRANTS = "grants.sql"  # grant_listener()
    LOGICAL = "logical.sql"  # logical mode's objects and the DDL guard
    INSTALLING = "installing.sql"
    TAKE_BACK_GRANTS = "take_back_grants.sql"  # install's last: grants no role should hold
    INSTALL_DONE = "install_done.sql"  # the event triggers stand aside while install works
    REBUILD_GUARD = "rebuild_guard.sql"  # a watched table dropped or replaced
    LEAVE_TRIGGER = "leave_trigger.sql"  # logical mode: our triggers go
    LOCK_FOR_WATCH = "lock_for_watch.sql"  # {tables}: before the watch() calls
    WATCH_TABLE = "watch_table.sql"
    UNWATCH_OTHERS = "unwatch_others.sql"
    LEAVE_LOGICAL = "leave_logical.sql"
    RECORD_PUBLISHED = "record_published.sql"
    RECORD_FILTER = "record_filter.sql"  # logical mode: a table's column filter
    ENSURE_REPLICA_IDENTITY = "ensure_replica_identity.sql"
    REQUIRE_REPLICA_IDENTITY = "require_replica_identity.sql"
    LOGICAL_INSTALL = "logical_install.sql"  # the publication
    LOGICAL_DRIFT_SWEEP = "logical_drift_sweep.sql"  # before it: a drift found is swept
    UNINSTALL = "uninstall.sql"
    LOCK_WAIT = "lock_wait.sql"  # after the guard, in either script
    RECORD_MAPPING = "record_mapping.sql"  # {fingerprint}, {tables}: either install's end
    RECORD_BOUNDARY = "record_boundary.sql"  # trigger install's step after its commit
    RESET_AFTER_RESTORE = "reset_after_restore.sql"  # run by a DBA by hand (docs/DBA.md)

    # --- is it installed -----------------------------------------------------------------
    CHECK_INSTALLED = "check_installed.sql"
    SCHEMA_VERSION = "schema_version.sql"
    SCHEMA_REVISION = "schema_revision.sql"  # only where check_installed.sql saw it
    LOGICAL_INSTALLED = "logical_installed.sql"
    MAPPING_STATE = "mapping_state.sql"
    # tables install stops watching, and whether their templates are recorded
    INSTALL_RECORDS = "install_records.sql"  # which of our records are there, before install
    REMOVED_RECORDED = "removed_recorded.sql"  # removed_unrecorded.sql's {recorded}
    REMOVED_UNRECORDED = "removed_unrecorded.sql"
    RETIRED_TABLE = "retired_table.sql"  # a table the listener's configuration lacks
    RETIRED_ANCESTORS = "retired_ancestors.sql"  # by name: a partition's tables, for that
    RETIRED_TABLES_LIST = "retired_tables_list.sql"  # every table a mapping named: resync
    MAY_CALL = "may_call.sql"  # a function of ours an earlier install may lack
    MAPPING_ERAS_LIST = "mapping_eras_list.sql"  # templates an install replaced, by queue id

    # --- trigger mode: the listener --------------------------------------------------------
    TAKE_LOCK = "take_lock.sql"
    LOCK_HOLDER = "lock_holder.sql"
    LOAD_PROGRESS = "load_progress.sql"
    PROGRESS_AHEAD = "progress_ahead.sql"
    NOTE_SERVER = "note_server.sql"  # a promoted standby, a restore, a crash: a sweep queued
    SERVER_LINEAGE = "server_lineage.sql"  # logical mode: compared with the last session's
    CHECK_LINEAGE = "check_lineage.sql"  # `check`: what the next start will find
    FETCH_BATCH = "fetch_batch.sql"
    BUSY = "busy.sql"  # capture functions send no wake-up while it is held
    QUIET = "quiet.sql"
    LISTEN_PAYLOADS = "listen_payloads.sql"  # the payloads' channel, its name not read by us
    WRITERS_SEEN = "writers_seen.sql"  # after quiet.sql: no writer that sent none is open
    SYNC_STANDBYS = "sync_standbys.sql"  # writers that wait for one send no wake-up
    CHECK_SLOT_LINEAGE = "check_slot_lineage.sql"  # logical: compared with the slot's
    DEAD_LETTER = "dead_letter.sql"
    RESOLVE_RENAMED = "resolve_renamed.sql"  # a row under a name the mapping lacks
    SAVE_PROGRESS = "save_progress.sql"
    PRUNE = "prune.sql"

    # --- logical mode: the slot ----------------------------------------------------------
    SLOT_INFO = "slot_info.sql"  # read into capture.slot.SlotState
    CREATE_SLOT = "create_slot.sql"
    SLOT_BLOCKERS = "slot_blockers.sql"  # what making a slot will wait for
    RECORD_SLOT = "record_slot.sql"
    RECORD_RUN = "record_run.sql"  # logical mode: the server's run, per slot
    RECORD_TABLE = "record_table.sql"  # logical mode: the table slot_state_v1's rows are in
    RECORD_STATE_TABLE = "record_state_table.sql"  # a switch to trigger mode, swept for
    DROP_SLOT = "drop_slot.sql"
    OUR_SLOT = "our_slot.sql"
    LEFTOVER_SLOTS = "leftover_slots.sql"  # ours, left when slot_name changed
    DROP_LEFTOVER_SLOT = "drop_leftover_slot.sql"
    SLOTS_UNSWEPT = "slots_unswept.sql"  # ours, gone or owing a sweep
    FORGET_SLOTS = "forget_slots.sql"  # after install swept for them
    SWEEP_ALL_LOGICAL = "sweep_all_logical.sql"  # after install dropped a slot of ours
    SWEEP_ALL_TRIGGER = "sweep_all_trigger.sql"  # the same, trigger mode
    HAS_SLOT_STATE = "has_slot_state.sql"
    SLOT_LEFT = "slot_left.sql"  # uninstall: a pgoutput slot of that name, whoever's
    SLOT_HOLDER = "slot_holder.sql"  # who streams a slot found in use
    SET_RESYNC = "set_resync.sql"
    CLEAR_RESYNC = "clear_resync.sql"
    CAN_REPLICATE = "can_replicate.sql"

    # --- logical mode: the listener ------------------------------------------------------
    SERVER_CLOCK = "server_clock.sql"
    IN_RECOVERY = "in_recovery.sql"  # a listener's session on a standby waits
    SERVER_PID = "server_pid.sql"  # a connection pooler between us and the server
    PUBLISHED_RECORDED = "published_recorded.sql"
    LOGICAL_RESOLVE = "logical_resolve.sql"
    LOGICAL_RESOLVE_BY_NAME = "logical_resolve_by_name.sql"
    PUBLISHED_TABLES = "published_tables.sql"
    PARTITION_ANCESTORS = "partition_ancestors.sql"
    RELATION_COLUMNS = "relation_columns.sql"
    RELATIONS_GONE = "relations_gone.sql"  # dropped since resolved: forgotten once read past
    RELATION_NAMES = "relation_names.sql"
    UNSENT_COLUMNS = "unsent_columns.sql"  # generated (lacked before 18), or dropped since
    BASE_TYPES = "base_types.sql"
    SAVE_ACK = "save_ack.sql"
    SLOT_TOOK = "slot_took.sql"  # a clean stop waits for the last status update
    RECORD_HISTORY = "record_history.sql"
    PRUNE_HISTORY = "prune_history.sql"
    HEARTBEAT = "heartbeat.sql"
    LOGICAL_DEAD_LETTER = "logical_dead_letter.sql"

    # --- replay --------------------------------------------------------------------------
    HISTORY_TRIGGER = "history_trigger.sql"
    REDO_TRIGGER = "redo_trigger.sql"  # history_trigger.sql's rows already processed
    HISTORY_LOGICAL = "history_logical.sql"
    LAST_ACKNOWLEDGED_TRIGGER = "last_acknowledged_trigger.sql"
    LAST_ACKNOWLEDGED_LOGICAL = "last_acknowledged_logical.sql"
    LOAD_REDIS_IDENTITY = "load_redis_identity.sql"
    SAVE_REDIS_IDENTITY = "save_redis_identity.sql"
    SOURCE_IDENTITY = "source_identity.sql"  # the source mark (redis_guard/source.py)

    # --- the operator's tools (tools/) ----------------------------------------------------
    KEYS_WHERE = "keys_where.sql"  # {columns}, {table}, {where} to format
    KEYS_CASTS = "keys_casts.sql"
    EXPLAIN_TRIGGER = "explain_trigger.sql"
    EXPLAIN_REACH_TRIGGER = "explain_reach_trigger.sql"
    EXPLAIN_LOGICAL = "explain_logical.sql"
    EXPLAIN_REACH_LOGICAL = "explain_reach_logical.sql"

    # --- status and check ----------------------------------------------------------------
    STATUS = "status.sql"
    LOGICAL_STATUS = "logical_status.sql"
    CHECK_TABLE = "check_table.sql"
    CHECK_UNCONFIGURED = "check_unconfigured.sql"
    CHECK_TWO_PHASE = "check_two_phase.sql"  # trigger mode: PREPARE refused after NOTIFY
    CHECK_WAKE_LOCKS = "check_wake_locks.sql"  # trigger mode: the wake-up's locks, held elsewhere
    CHECK_ASYNC_COMMITS = "check_async_commits.sql"  # check, listener: commits a crash loses
    CHECK_ALL_TABLES = "check_all_tables.sql"  # trigger mode: FOR ALL TABLES publications
    CHECK_WATCH = "check_watch.sql"
    CHECK_PUBLISHED = "check_published.sql"
    CHECK_IDENTITY = "check_identity.sql"
    CHECK_UNPUBLISHED_HEIRS = "check_unpublished_heirs.sql"  # inheritance children
    CHECK_GENERATED = "check_generated.sql"  # logical mode before PostgreSQL 18
    CHECK_DRIFT = "check_drift.sql"
    CHECK_NESTED = "check_nested.sql"  # a configured table inside another
    CHECK_SUBSCRIBED = "check_subscribed.sql"  # trigger mode: one a subscription writes
    CHECK_LOGICAL_SERVER = "check_logical_server.sql"
    CHECK_DDL_GUARD = "check_ddl_guard.sql"
    CHECK_PUBLICATION_DRIFT = "check_publication_drift.sql"
    CHECK_REBUILD_GUARD = "check_rebuild_guard.sql"
    CHECK_DETACH_PENDING = "check_detach_pending.sql"
    CHECK_UNRECORDED_PARTS = "check_unrecorded_parts.sql"
    CHECK_STAND_IN = "check_stand_in.sql"

    @property
    def text(self) -> LiteralString:
        return _read(self.value)

    @property
    def sql(self) -> SQL:
        return SQL(_read(self.value))

    @property
    def compact(self) -> LiteralString:
        """The text less its whole-line comments, for a query run at every batch:
        psycopg parses a query's placeholders again at each execute once its text is
        over 4,096 bytes (the comments a DBA reads would cost it that)."""
        return _compact(self.value)


@cache
def _read(name: str) -> LiteralString:
    # Trusted text shipped with the package, never built from input: a LiteralString.
    content: LiteralString = files(PACKAGE).joinpath(name).read_text("utf-8")
    return content


@cache
def _compact(name: str) -> LiteralString:
    text = _read(name)
    kept: LiteralString = ""
    for line in text.splitlines(keepends=True):
        if not line.lstrip().startswith("--"):
            kept += line
    return kept


def missing() -> list[str]:
    """The registered files that are not there (a broken checkout or wheel)."""
    root = files(PACKAGE)
    return [q.value for q in Q if not root.joinpath(q.value).is_file()]


if _missing := missing():
    raise ImportError(f"{PACKAGE} lacks {', '.join(_missing)}: a broken installation")
