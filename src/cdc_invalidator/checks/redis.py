"""`check` against Redis: reachable, allowed to delete, the source mark, the replay
window, and the C extension that computes Cluster slots."""

from __future__ import annotations

from typing import Any

import psycopg
import redis

from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.checks.report import Report
from cdc_invalidator.durations import format_duration
from cdc_invalidator.mapping import Invalidation, KeyTemplate
from cdc_invalidator.redact import redact_url
from cdc_invalidator.redis_guard.source import KEY_PREFIX as SOURCE_KEY_PREFIX
from cdc_invalidator.redis_guard.source import Source, lost_since, read_source
from cdc_invalidator.redis_guard.window import MARGIN_S, persistence_window
from cdc_invalidator.settings import Settings
from cdc_invalidator.sink import REDIS_ERRORS, REDIS_REFUSED, Sink
from cdc_invalidator.sink.slots import NATIVE_SLOTS


def check_slots(report: Report, *, native: bool) -> None:
    """Whether UNLINKs are packed, and a cluster's hash slots found, in C (an optional
    extension)."""
    if native:
        report.ok.append("UNLINKs are packed and hash slots found in C (sink/_slots.c)")
    else:
        report.warnings.append(
            "UNLINKs are packed and hash slots found in Python: sink/_slots.c was not built "
            "(no C compiler when the package was installed), and a Redis Cluster's deletes "
            "take about a third more of the listener's time; reinstall the package where "
            "gcc is"
        )


# What `check` reports as Redis failing (Fatal: redis_url selects a database on a cluster).
_REDIS_FAILED: tuple[type[Exception], ...] = (*REDIS_ERRORS, Fatal)


def source_of(conn: psycopg.Connection[Any], settings: Settings) -> Source | None:
    """The database as the listener's source mark names it (redis_guard/source.py); None
    with source_mark = false, or where it cannot be read (check_database says why)."""
    if not settings.source_mark:
        return None
    try:
        return read_source(conn, settings.mapping_fingerprint())
    except psycopg.Error:
        return None


def check_redis(sink: Sink, url: str, settings: Settings, source: Source | None = None) -> Report:
    """Reachable; for a cluster, every primary (the listener talks to each); and what
    the source mark says of `source`, the database."""
    report = Report()
    try:
        what = sink.ping()
        replicas = [s for s in sink.states() if not s.master]
    except _REDIS_FAILED as exc:
        report.errors.append(f"redis at {redact_url(url)}: {exc}")
        return report
    if replicas:
        report.errors.append(
            f"redis at {redact_url(url)}: {what}, but a replica: its deletes fail "
            "(READONLY) or, on a writable replica, reach no other server. Point redis_url "
            "at the master, or use redis_sentinels"
        )
        return report
    report.ok.append(f"redis at {redact_url(url)}: {what}")
    check_slots(report, native=NATIVE_SLOTS)
    _check_may_delete(sink, settings, report)
    if settings.source_mark:
        _check_source_mark(sink, report, source)
    _check_replay(sink, settings, report)
    return report


def _check_source_mark(sink: Sink, report: Report, source: Source | None) -> None:
    """Whether Redis lets the listener read and write its source mark
    (redis_guard/source.py), on a key of its shape taken away after: refused, what only
    the mark tells is not swept for. And whether the mark owes `source` a sweep at the
    listener's next start: said before it happens, when a DBA can still keep the cache
    warm where nothing was lost."""
    probe = f"{SOURCE_KEY_PREFIX}check"
    try:
        sink.read_mark(probe)
        sink.write_mark(probe, "check")
        sink.delete_routed({None: Invalidation(keys={probe})})
        if source is not None:
            _say_owed(sink.read_mark(source.key), source, report)
    except redis.exceptions.ResponseError as exc:  # NOPERM; OOM under noeviction
        report.warnings.append(
            f"redis: the listener's source mark is refused ({type(exc).__name__}: {exc}): "
            "a primary gone back to after a failover, or a database renamed back into "
            f"place, is not swept for. Give the user GET and SET on the keys "
            f"'{SOURCE_KEY_PREFIX}*' (docs/redis.md), or set source_mark = false"
        )
    except _REDIS_FAILED:
        return  # (said by the checks above, or by the listener)


# A key no application holds, in each template's shape: what `check` deletes to learn
# whether the Redis user may (ACL key patterns, ~user:*): a NUL no PostgreSQL text holds.
_PROBE_VALUE = "\0cdc-invalidator-check"


def _check_may_delete(sink: Sink, settings: Settings, report: Report) -> None:
    """That the Redis user may UNLINK keys of every template: one it may not (an ACL
    whose key patterns leave a table out) holds every later change until it may."""
    for name, table in settings.tables.items():
        for source in table.keys:
            template = KeyTemplate.parse(table.key_prefix + source)
            probe = _PROBE_VALUE.join(template.literals)
            try:
                sink.delete_routed({table.redis_db: Invalidation(keys={probe})})
            except REDIS_REFUSED as exc:  # NOPERM
                # Redis's own words (the sink's names the probe key, ours), which name
                # the command it refused: SELECT for a db other than 0.
                said = exc.__cause__ or exc
                fix = (
                    "+select in its ACL (a database other than 0)"
                    if "'select'" in str(said)
                    else "those keys in its ACL"
                )
                report.errors.append(
                    f"redis: this user may not delete keys of table {name}'s template "
                    f"{source!r} ({said}): the listener would wait at its first change, and "
                    f"every change after it with it. Give the user {fix} (docs/redis.md)"
                )
                break
            except _REDIS_FAILED:
                return  # (said by the checks above, or by the listener)


def _say_owed(recorded: str | None, source: Source, report: Report) -> None:
    """The sweep the source mark `recorded` owes `source` at the listener's next start."""
    if recorded is not None and (reason := lost_since(recorded, source)):
        report.warnings.append(
            f"the listener's next start sweeps every watched table once: {reason}. Where "
            "Redis was flushed or restored with the database, record this one first to keep "
            f"the cache warm: SET {source.key} '{source.mark}'"
        )


def _check_replay(sink: Sink, settings: Settings, report: Report) -> None:
    """What a restart of this Redis could bring back, and whether history covers it."""
    if settings.replay_window == 0:
        report.warnings.append(
            "replay_window is 0s: keys a Redis restart or failover brings back stay stale"
        )
        return
    if settings.replay_window is None:
        window, why = persistence_window(sink.persistence())
    else:
        window, why = settings.replay_window, "replay_window"
    line = f"replay after a Redis restart reaches back {format_duration(window)} ({why})"
    if window + MARGIN_S > settings.history_s:
        report.warnings.append(
            f"{line}, but replay_history keeps only {format_duration(settings.history_s)}: "
            "raise replay_history"
        )
    else:
        report.ok.append(line)
