"""Command line: sql, install, uninstall, run, check, status, replay, keys, tail, explain,
demo.

Exit codes: 0 all well; 1 the command ran and failed (check found problems, the
database refused); 2 the configuration or the command line is wrong.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict

from cdc_invalidator import __version__, logs, runtime
from cdc_invalidator.capture import logical_sql, trigger_sql
from cdc_invalidator.capture.errors import (
    Fatal,
    MappingSuperseded,
    NotInstalled,
    missing_privilege,
)
from cdc_invalidator.checks import check_database, check_redis, check_templates, source_of
from cdc_invalidator.database import DatabaseError, connect
from cdc_invalidator.durations import format_duration, parse_duration
from cdc_invalidator.install import (
    SlotStepFailed,
    UnsupportedServer,
    install,
    removed_unrecorded,
    unguarded,
)
from cdc_invalidator.listener import build_listener, retired_lookup
from cdc_invalidator.mapping import Mapper
from cdc_invalidator.metrics import BacklogCollector, Metrics
from cdc_invalidator.modes.choose import mode_for
from cdc_invalidator.pg.connect import METRICS, REPLAY, PgConnector
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.probes import ProbeServer
from cdc_invalidator.redact import Scrubber, redact_url
from cdc_invalidator.replay import replay
from cdc_invalidator.runner import ConfigurationChanged
from cdc_invalidator.settings import (
    CONFIG_ENV,
    ConfigError,
    ConfigFile,
    Settings,
    config_path,
    load_settings,
)
from cdc_invalidator.shutdown import Stopper, interrupted_by_signals
from cdc_invalidator.sink import REDIS_ERRORS, REDIS_UNAVAILABLE, RedisOptions, open_sink
from cdc_invalidator.sink.lookup import KeyState, key_state
from cdc_invalidator.status import NotInstalledHere
from cdc_invalidator.tools import UsageError, explain
from cdc_invalidator.tools import keys as keys_tool
from cdc_invalidator.tools.tail import tail
from cdc_invalidator.tools.tail_message import channel_name

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

# What a query of the listener meets when our objects were dropped after it connected
# (a table, a function, logical mode's publication).
GONE_WHILE_RUNNING = (
    psycopg.errors.UndefinedTable,
    psycopg.errors.UndefinedFunction,
    psycopg.errors.UndefinedObject,
)

# What a command may end with: one line on stderr (never a traceback), exit 2 for the
# configuration, 1 for the rest.
_ENDS_A_COMMAND: tuple[type[Exception], ...] = (
    ConfigError,
    UsageError,
    DatabaseError,
    Fatal,
    psycopg.Error,
    *REDIS_ERRORS,
)


class Console:
    """What a command prints, with every password scrubbed: the settings' passwords once
    they are loaded, and any URL's password before. The one place output is formatted,
    so that no error path (a libpq or redis-py message, a configuration error) can show
    a secret."""

    def __init__(self) -> None:
        self.scrub = Scrubber()

    def out(self, text: str) -> None:
        print(self.scrub(text))

    def warn(self, text: str) -> None:
        print(self.scrub(text), file=sys.stderr)

    def error(self, message: str) -> None:
        print(f"cdc-invalidator: error: {self.scrub(message)}", file=sys.stderr)


Command = Callable[[argparse.Namespace, Settings, Console], int]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return cmd_demo(args)
    console = Console()
    command: Command = args.func
    try:
        settings = load_settings(args.config)
        console.scrub = Scrubber(settings.secrets())
        if args.command != "run":
            # One-shot commands print their result on stdout: library log lines (a
            # warning at most) go to stderr.
            logs.configure("warning", "console", console.scrub, to="stderr")
        return command(args, settings, console)
    except _ENDS_A_COMMAND as exc:
        console.error(_explain(exc))
        return EXIT_CONFIG if isinstance(exc, ConfigError | UsageError) else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:
        # `cdc-invalidator sql | head`: the reader left. Point stdout at /dev/null so
        # that the interpreter's final flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _explain(exc: Exception) -> str:
    """One line for an error that ends a command (Console scrubs it)."""
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return _explain_privilege(exc)
    if isinstance(exc, psycopg.Error):  # the server went away or refused, mid-command
        message = _pg_message(exc)
        if "compression method lz4 not supported" in message:
            # (a review: after pg_upgrade to a build without lz4, every start exited so)
            return (
                f"PostgreSQL: {message}: rows install had compressed with lz4, on a server "
                "built with it, were carried to a server built without it, which cannot "
                'read them (docs/DBA.md, "Upgrading, reinstalling, switching modes")'
            )
        return f"PostgreSQL: {message}"
    if isinstance(exc, ConfigError | DatabaseError | Fatal | UsageError):
        return str(exc)
    return f"Redis: {type(exc).__name__}: {exc}"


def _explain_privilege(exc: psycopg.errors.InsufficientPrivilege) -> str:
    """A privilege a command's role lacks, and where to get it."""
    message = _pg_message(exc)
    schema = re.search(r'permission denied for schema "?([^"\s:]+)"?', message)
    if schema and schema.group(1) != "cdc_invalidator":
        # (an application's schema: grant_listener() grants only ours)
        return (
            f"{message}: `check` looks the configured tables up by name, which needs "
            f"USAGE on their schema: GRANT USAGE ON SCHEMA {schema.group(1)} TO the "
            "listener's role (docs/DBA.md)"
        )
    if schema:  # ours
        return (
            f"{message}: `status`, `check` and `replay` need what "
            "cdc_invalidator.grant_listener() grants the listener's role (docs/DBA.md)"
        )
    # Another object, or the server's messages in another language (lc_messages:
    # a review's German server had the advice above given for an application's
    # schema, which grant_listener() does not grant): both.
    return (
        f"{message}: `status`, `check` and `replay` need what "
        "cdc_invalidator.grant_listener() grants the listener's role, and USAGE on the "
        "configured tables' schemas (docs/DBA.md)"
    )


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH", help=f"TOML configuration file (default: ${CONFIG_ENV})"
    )
    parser = argparse.ArgumentParser(
        prog="cdc-invalidator",
        description="Delete the Redis keys that cache a PostgreSQL row when the row changes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[..., int], help_: str, *, configured: bool = True
    ) -> argparse.ArgumentParser:
        # (demo makes its own servers and configuration: it takes no --config)
        p = sub.add_parser(
            name, parents=[common] if configured else [], help=help_, description=help_
        )
        p.set_defaults(func=func)
        return p

    add("sql", cmd_sql, "print the SQL that `install` runs (review it, or pipe it into psql)")
    add("install", cmd_install, "install or update our schema and triggers, in one transaction")
    add("uninstall", cmd_uninstall, "remove every object `install` created, in one transaction")
    add("run", cmd_run, "run the listener in the foreground until SIGTERM/SIGINT")
    add("check", cmd_check, "validate the configuration against the live database and Redis")
    status = add(
        "status", cmd_status, "how far behind: backlog or slot lag, dead letters, last batch"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    replay_cmd = add(
        "replay",
        cmd_replay,
        "delete again every key invalidated in the last DURATION (after Redis was restored "
        "from a backup or snapshot)",
    )
    replay_cmd.add_argument(
        "--since",
        required=True,
        metavar="DURATION",
        help="how far back: 90s, 15m, 1h30m, 2d (at most replay_history)",
    )
    keys_cmd = add(
        "keys",
        cmd_keys,
        "print the keys a row maps to: from COLUMN=VALUE offline, or from the rows --where selects",
    )
    keys_cmd.add_argument("table", metavar="TABLE", help="a configured table")
    keys_cmd.add_argument(
        "values",
        nargs="*",
        metavar="COLUMN=VALUE",
        help="the row's values as PostgreSQL prints them (offline: no database is touched)",
    )
    keys_cmd.add_argument(
        "--where", metavar="SQL", help="read live rows: SELECT ... FROM TABLE WHERE SQL"
    )
    keys_cmd.add_argument(
        "--limit",
        type=int,
        default=keys_tool.DEFAULT_LIMIT,
        metavar="N",
        help=f"--where: read at most N rows (default {keys_tool.DEFAULT_LIMIT})",
    )
    tail_cmd = add(
        "tail",
        cmd_tail,
        "print invalidations as the listener makes them (time, table, operation, keys, "
        "commit → delete), until Ctrl-C",
    )
    tail_cmd.add_argument("--table", metavar="TABLE", help="only this configured table's")
    explain_cmd = add(
        "explain",
        cmd_explain,
        "why is this key stale? which tables and templates produce it, the recent changes "
        "that invalidated it, and whether Redis holds it now",
    )
    explain_cmd.add_argument("key", metavar="KEY", help="a Redis key")
    demo = add(
        "demo",
        cmd_demo,
        "start throwaway PostgreSQL and Redis and show an invalidation",
        configured=False,
    )
    demo.add_argument("--keep", action="store_true", help="leave the servers' directories")
    demo.add_argument(
        "--capture",
        choices=["trigger", "logical"],
        default="trigger",
        help="the capture mode to show (default: trigger)",
    )
    return parser


def cmd_sql(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    # Not scrubbed: built from table names and templates alone, and a short password
    # that is also a word of the script would break it.
    print(trigger_sql.render(mode_for(settings).install_script()))
    return EXIT_OK


def cmd_install(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with connect(settings) as conn:
        # What the script warns of (a publication put right and swept, a partition it
        # could not give a trigger): said, not lost with the session.
        conn.add_notice_handler(
            lambda diag: (
                console.warn(f"warning: {diag.message_primary}")
                if diag.severity_nonlocalized == "WARNING"
                else None
            )
        )
        done: str | None = None
        try:
            unrecorded = removed_unrecorded(conn, [t.qualified for t in settings.mapper().tables])
            done = install(conn, mode_for(settings))
        except logical_sql.SlotLeftToListener as exc:
            # (a least-privilege installer's way, documented: nothing is lost by it)
            console.warn(f"warning: installed, but {exc}")
        except SlotStepFailed as exc:
            console.error(f"installed, but {exc}")
            return EXIT_FAILED
        except UnsupportedServer as exc:
            console.error(f"install refused, nothing was changed: {exc}")
            return EXIT_FAILED
        except trigger_sql.LocksBusy as exc:
            console.error(f"install failed, nothing was changed: {exc}")
            return EXIT_FAILED
        except psycopg.Error as exc:
            console.error(f"install failed, nothing was changed: {_pg_message(exc)}")
            # What to do about it, where the script says (a squatted schema, a table
            # without replica identity).
            hint = exc.diag.message_hint
            if hint:
                console.warn(f"hint: {hint}")
            return EXIT_FAILED
        if (missing := unguarded(conn)) is not None:
            console.warn(f"warning: {missing}")
        for table in unrecorded:
            console.warn(
                f"warning: table {table} is no longer watched, and no earlier install "
                "recorded its key templates (it was last installed by a release before "
                "revision 10): its changes still queued or in the slot, read from now on, "
                "are dead letters and their keys stay cached: run `install` with the "
                "file that still names it first, then remove it (docs/DBA.md, Upgrading)"
            )
    if done is not None:
        console.out(done)
    return EXIT_OK


def cmd_uninstall(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    slot = settings.slot_name
    dropped = False
    drop_refused = False
    with connect(settings) as conn:
        try:
            # While a listener streams the slot, nothing is removed.
            ours = logical_sql.our_slot(conn, slot)
            # Slots of an earlier slot_name, read while slot_state_v1 says they are ours:
            # dropped after the script commits, where surely ours (as install does).
            leftovers = (
                logical_sql.leftover_slots(conn, slot) if logical_sql.has_slot_state(conn) else []
            )
            if not ours:
                trigger_sql.apply(conn, mode_for(settings).uninstall_script())
            else:
                # The slot cannot be dropped in a transaction that has written: the
                # script runs first and commits last, and a second session drops the
                # slot in between. A drop that fails (a listener took the slot, a role
                # without REPLICATION) rolls the script back: nothing was changed. A
                # listener that looks for its slot meanwhile waits for the script's locks
                # on our schema, and then finds it gone: it cannot re-create the slot.
                with connect(settings) as side:

                    def drop() -> None:
                        nonlocal dropped, drop_refused
                        try:
                            logical_sql.drop_slot(side, slot)
                        except psycopg.errors.InsufficientPrivilege:
                            drop_refused = True  # (known so in any lc_messages)
                            raise
                        dropped = True

                    trigger_sql.apply(
                        conn, mode_for(settings).uninstall_script(), before_commit=drop
                    )
        except logical_sql.SlotBusy as exc:
            console.error(f"uninstall refused, nothing was changed: {exc}")
            return EXIT_FAILED
        except trigger_sql.LocksBusy as exc:
            console.error(f"uninstall failed, nothing was changed: {exc}")
            return EXIT_FAILED
        except psycopg.Error as exc:
            console.error(_uninstall_failed(exc, slot, dropped=dropped, refused=drop_refused))
            if hint := exc.diag.message_hint:  # (as install says it)
                console.warn(f"hint: {hint}")
            return EXIT_FAILED
        left = logical_sql.slot_left(conn, slot)
        earlier = logical_sql.drop_leftovers(conn, slot, leftovers)
    gone = "triggers, functions, publication and the cdc_invalidator schema are gone"
    if dropped:
        gone += f"; replication slot {slot!r} dropped"
    gone += "".join(f"; {line}" for done, line in earlier if done)
    console.out(f"uninstalled: {gone}")
    for done, line in earlier:
        if not done:
            console.warn(f"warning: {line} (nothing records it as ours any more)")
    if left:
        # Not ours to drop, as far as anything left says: a listener still running
        # re-created it, or an earlier uninstall left it. It keeps WAL forever.
        console.warn(
            f"warning: replication slot {slot!r} (pgoutput, this database) is left, and "
            "nothing consumes it: it keeps WAL until it is dropped. If it was "
            "cdc-invalidator's, stop its listener and drop it (as a superuser or a role "
            f"with REPLICATION): {logical_sql.drop_by_hand(slot)}"
        )
    return EXIT_OK


def _uninstall_failed(exc: psycopg.Error, slot: str, *, dropped: bool, refused: bool) -> str:
    """What failed; `refused`: the slot's drop was refused a privilege (its role lacks
    REPLICATION)."""
    if not dropped:
        why = _pg_message(exc)
        if isinstance(exc, psycopg.errors.ObjectInUse):
            why += ": stop the listener first"
        elif refused:
            why += (
                " (run uninstall as a role with REPLICATION, or have one drop the slot "
                f"first: {logical_sql.drop_by_hand(slot)}; then run uninstall again)"
            )
        return f"uninstall failed, nothing was changed: {why}"
    # Only the commit was left: the slot is gone, our objects are not. A listener that
    # runs re-creates the slot and sweeps every watched table (the safe side).
    return (
        f"uninstall failed after replication slot {slot!r} was dropped; nothing else was "
        f"changed (the schema, publication and triggers are still there): {_pg_message(exc)}. "
        "A listener started now re-creates the slot and sweeps every watched table; run "
        "uninstall again to remove the rest"
    )


def cmd_check(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    config_name = str(args.config or "configuration")
    templates = check_templates(settings, config_name)
    with connect(settings) as conn:
        report = check_database(conn, settings, mode_for(settings), config_name)
        source = source_of(conn, settings)
    report.warnings[:0] = templates.warnings
    sink = open_sink(RedisOptions.from_settings(settings))
    try:
        where = settings.redis_url
        if settings.redis_sentinels:
            where = (
                f"{settings.redis_url} (master {settings.redis_sentinel_master!r} "
                f"named by sentinels {', '.join(settings.redis_sentinels)})"
            )
        redis_report = check_redis(sink, where, settings, source)
    finally:
        sink.close()
    for line in report.ok + redis_report.ok:
        console.out(f"ok: {line}")
    for line in report.warnings + redis_report.warnings:
        console.out(f"warning: {line}")
    errors = report.errors + redis_report.errors
    for line in errors:
        console.warn(f"error: {line}")
    return EXIT_OK if not errors else EXIT_FAILED


def cmd_status(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    with connect(settings) as conn:
        try:
            status = mode_for(settings).status(conn)
        except psycopg.errors.UndefinedTable:
            console.error(
                "cdc_invalidator is not installed in this database: run `cdc-invalidator install`"
            )
            return EXIT_FAILED
        except NotInstalledHere as exc:
            console.error(str(exc))
            return EXIT_FAILED
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # (logical mode reads the server's WAL position, which a standby has none of:
            # "recovery is in progress" told nothing of what to do)
            standby = conn.execute(Q.IN_RECOVERY.sql).fetchone()
            if not (standby and standby[0]):
                raise
            console.error(
                f"the server ({conn.info.host}:{conn.info.port}) is a standby, in recovery: "
                "the slot's lag is the primary's to tell; point database_url at the primary"
            )
            return EXIT_FAILED
    if args.json:
        console.out(json.dumps(status.as_json()))
    else:
        console.out("\n".join(status.lines()))
    return EXIT_OK


def cmd_replay(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    try:
        since_s = parse_duration(args.since)
    except ValueError as exc:
        console.error(f"--since: {exc}")
        return EXIT_CONFIG
    if since_s > settings.history_s:
        console.warn(
            f"warning: history is kept for {format_duration(settings.history_s)} "
            "(replay_history): keys invalidated before that are not replayed"
        )
    sink = open_sink(
        RedisOptions.from_settings(settings),
        unlink_chunk=settings.unlink_chunk,
        scan_count=settings.scan_count,
    )
    # A change of a table the file no longer names, deleted by the listener with the
    # templates the last install that named it recorded, is replayed with them too.
    mapper = settings.mapper(retired_lookup(settings))
    try:
        with connect(settings, kind=REPLAY) as conn:
            result = replay(conn, mode_for(settings), mapper, sink, since_s)
    except psycopg.errors.UndefinedTable:
        console.error(
            "cdc_invalidator is not installed in this database: run `cdc-invalidator install`"
        )
        return EXIT_FAILED
    except REDIS_UNAVAILABLE as exc:
        console.error(f"Redis at {redact_url(settings.redis_url)}: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
    finally:
        sink.close()
    console.out(
        f"replayed {result.events} invalidations of the last {format_duration(since_s)}: "
        f"{result.existed} keys were back and are deleted again "
        f"({result.keys} keys and patterns deleted, in {result.seconds:.2f} s)"
    )
    if result.skipped:
        console.warn(
            f"warning: {result.skipped} rows or events skipped (logged as replay_skipped): "
            "they cannot be decoded, or no longer map to keys (their table left the "
            "configuration, a column is missing, a value cannot render)"
        )
    return EXIT_OK


def cmd_keys(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    mapper = settings.mapper()
    ask = keys_tool.request(mapper, args.table, args.values, args.where, args.limit)
    if ask.where is None:
        return _keys_offline(ask, mapper, console)
    with connect(settings) as conn:
        try:
            live = keys_tool.read_rows(
                conn, ask.table, mapper.columns(ask.table), ask.where, ask.limit
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            console.error(
                f"PostgreSQL: {_pg_message(exc)}: --where reads {ask.table} as the configured "
                "role, which needs SELECT on it (or give COLUMN=VALUE: offline)"
            )
            return EXIT_FAILED
        except psycopg.errors.QueryCanceled:
            console.error(
                f"--where: the query ran longer than {keys_tool.STATEMENT_TIMEOUT} "
                "(statement_timeout): narrow the condition"
            )
            return EXIT_FAILED
        except psycopg.OperationalError:
            raise  # the server went away: one line, exit 1 (main)
        except psycopg.Error as exc:
            if exc.sqlstate is None:
                raise
            # The server refused the condition (syntax, types, a write): the command
            # line's fault.
            console.error(f"--where {ask.where!r}: PostgreSQL: {_pg_message(exc)}")
            return EXIT_CONFIG
    printed: set[str] = set()
    for row in live.rows:
        for key in keys_tool.row_keys(mapper.tables[ask.table], row).keys:
            if key not in printed:
                printed.add(key)
                console.out(key)
    if not live.rows:
        console.warn(f"no row of {ask.table} matches --where {ask.where!r}")
    if live.limited:
        console.warn(f"note: more rows match: only the first {ask.limit} were read (--limit)")
    return EXIT_OK


def _keys_offline(ask: keys_tool.Request, mapper: Mapper, console: Console) -> int:
    """The keys of the values given: exit 2 if a template lacks one of its columns."""
    for column in keys_tool.unused(mapper, ask.table, ask.values):
        console.warn(
            f"warning: no template of {ask.table} uses column {column!r} "
            f"(they use {', '.join(mapper.columns(ask.table))})"
        )
    found = keys_tool.row_keys(mapper.tables[ask.table], ask.values)
    for key in found.keys:
        console.out(key)
    for source, columns in found.missing.items():
        console.warn(
            f"template {source!r} needs {', '.join(columns)}: give "
            + " ".join(f"{c}=VALUE" for c in columns)
        )
    return EXIT_CONFIG if found.missing else EXIT_OK


def cmd_tail(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    table = None if args.table is None else keys_tool.find_table(settings.mapper(), args.table)
    channel = channel_name(settings.database_url)
    console.warn(
        f"tailing {channel} on {redact_url(settings.redis_url)} (the listener publishes "
        "while someone tails); Ctrl-C to stop"
    )

    def out(text: str) -> None:
        console.out(text)
        sys.stdout.flush()  # each line as it happens, into a pipe or a file too

    try:
        with interrupted_by_signals():
            tail(RedisOptions.from_settings(settings), channel, table, out, console.warn)
    except KeyboardInterrupt:
        return EXIT_OK
    return EXIT_OK  # pragma: no cover - tail() returns only when interrupted


def cmd_explain(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    key: str = args.key
    dbs = {table: ts.redis_db for table, ts in settings.table_settings().items()}
    mapper = settings.mapper()
    found = explain.candidates(mapper, dbs, key)
    for line in explain.candidate_lines(key, found):
        console.out(line)
    sink = open_sink(RedisOptions.from_settings(settings))
    try:
        for db in sorted({c.db for c in found} or {None}, key=lambda d: -1 if d is None else d):
            state: KeyState | None = None
            error = None
            try:
                state = key_state(sink, key, db)
            except REDIS_ERRORS as exc:
                error = f"Redis: {type(exc).__name__}: {exc}"
            console.out(explain.redis_line(state, error, db))
    finally:
        sink.close()
    if not found:
        return EXIT_OK
    tables = sorted({c.table for c in found})
    mode = mode_for(settings).name
    read = explain.read_logical if mode == "logical" else explain.read_trigger
    with connect(settings) as conn:
        try:
            history, reach = read(conn, mapper, tables, key)
        except psycopg.errors.UndefinedTable:
            console.error(
                "cdc_invalidator is not installed in this database: run `cdc-invalidator install`"
            )
            return EXIT_FAILED
    for line in explain.history_lines(history, reach, mode, format_duration(settings.history_s)):
        console.out(line)
    return EXIT_OK


def cmd_run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    runtime.tune_malloc()  # before the listener allocates anything large
    logs.configure(settings.log_level, settings.log_format, console.scrub)
    mode = mode_for(settings)
    log = structlog.get_logger("cdc_invalidator.cli")
    log.info(
        "config_loaded",
        database_url=redact_url(settings.database_url),
        redis_url=redact_url(settings.redis_url),
        **({"redis_sentinels": settings.redis_sentinels} if settings.redis_sentinels else {}),
        capture=mode.name,
    )
    stopper = Stopper()
    stopper.install_signal_handlers()
    metrics = Metrics()
    config_file = ConfigFile(config_path(args.config), settings)
    runner, sink = build_listener(settings, stopper, metrics, config_file)
    probes: ProbeServer | None = None
    backlog: BacklogCollector | None = None
    if settings.metrics_port:
        backlog = BacklogCollector(PgConnector.from_settings(settings).factory(METRICS), mode)
        metrics.watch_database(backlog)
        # A stuck loop: no turn for this long (longer than any wait or back-off).
        stall_s = max(60.0, 3 * settings.retry_max_ms / 1000, 3 * settings.poll_interval_ms / 1000)
        try:
            probes = ProbeServer(
                settings.metrics_address,
                settings.metrics_port,
                metrics,
                lambda: runner.health(stall_s, settings.ready_max_lag_s),
            ).start()
        except OSError as exc:
            log.error(
                "probes_failed",
                error=f"cannot listen on {settings.metrics_address}:{settings.metrics_port}: "
                f"{exc.strerror}",
            )
            sink.close()
            stopper.close()
            return EXIT_FAILED
    runtime.tune_gc()
    try:
        runner.run()
    except LISTENER_ENDS as exc:
        _log_end(exc, settings, mode.name)
        return EXIT_FAILED
    finally:
        if probes is not None:
            probes.close()
        if backlog is not None:
            backlog.close()
        sink.close()
        stopper.close()
    return EXIT_OK


# What ends a running listener with exit 1, each logged by _log_end().
LISTENER_ENDS = (
    NotInstalled,
    *GONE_WHILE_RUNNING,
    ConfigurationChanged,
    Fatal,
    psycopg.errors.InsufficientPrivilege,
)


def _log_end(exc: Exception, settings: Settings, mode: str) -> None:
    """The listener's last log line for an error that ends it (LISTENER_ENDS)."""
    log = structlog.get_logger("cdc_invalidator.cli")
    if isinstance(exc, NotInstalled):
        log.error("not_installed", error=str(exc))
    elif isinstance(exc, GONE_WHILE_RUNNING):
        # Checked at every connect: gone since, `uninstall` ran under this listener.
        log.error(
            "not_installed",
            error=f"{_pg_message(exc)}: cdc_invalidator's objects went while the listener "
            "ran (`uninstall`?): run `cdc-invalidator install`, then start the listener",
        )
    elif isinstance(exc, MappingSuperseded):
        # Exit 1 too: restarted, it stops again until its file holds the mapping
        # installed, while a listener that has it (a standby given the file) consumes.
        log.error(
            "configuration_superseded",
            error=str(exc),
            action="exiting, nothing acknowledged since the install: give this listener "
            "the configuration file `install` last ran with (every listener of a database "
            "must run the same one)",
        )
    elif isinstance(exc, ConfigurationChanged):
        # Exit 1: a service manager restarts the listener (deploy/, docker-compose.yml),
        # which then reads the file; the batch is read again through it.
        log.warning(
            "configuration_changed",
            change=str(exc),
            action="the configuration file holds another mapping than this listener was "
            "started with (`install` of it may have run): exiting, nothing of the batch "
            "acknowledged, to be started again with the file",
        )
    elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
        # Refused after the start (a grant revoked meanwhile): a person must act too.
        user = conninfo_to_dict(settings.database_url).get("user") or os.environ.get(
            "PGUSER", getpass.getuser()
        )
        log.error("cannot_consume", error=str(missing_privilege(str(user), mode, exc)))
    else:
        log.error("cannot_consume", error=str(exc))


def cmd_demo(args: argparse.Namespace) -> int:  # throwaway servers: no secrets, no settings
    from cdc_invalidator.demo import run_demo  # noqa: PLC0415 - only the demo needs it

    return run_demo(keep=args.keep, capture=args.capture)


def _pg_message(exc: psycopg.Error) -> str:
    diag: Any = exc.diag
    text = diag.message_primary or str(exc)
    if diag.message_detail:
        text += f" ({diag.message_detail})"
    return str(text)
