"""Wiring: the listener that `run`, the demo and the tests start, built from settings."""

from __future__ import annotations

import psycopg
import structlog

from cdc_invalidator.events import TableName
from cdc_invalidator.mapping.mapper import Retired, RetiredLookup, retired_table
from cdc_invalidator.metrics import Metrics
from cdc_invalidator.modes.choose import mode_for
from cdc_invalidator.pg.connect import SIDE, PgConnector
from cdc_invalidator.pg.queries import Q
from cdc_invalidator.redis_guard.watch import RedisWatch
from cdc_invalidator.runner import Runner, RunnerConfig
from cdc_invalidator.settings import ConfigFile, Settings
from cdc_invalidator.shutdown import Stopper
from cdc_invalidator.sink import AutoSink, MasterWatch, RedisOptions, open_sink
from cdc_invalidator.sink.pubsub import TailChannel
from cdc_invalidator.tools.tail_message import channel_name
from cdc_invalidator.tools.tap import Tap

log = structlog.get_logger()


def retired_lookup(settings: Settings) -> RetiredLookup:
    """How the listener renders a change of a table its configuration lacks: with the
    templates of the last installed mapping that named it (a change committed before
    the `install` that stopped watching the table, read after it by a listener started
    with the new file). Given explicitly to whatever needs it (build_listener: the
    runner's mapper, and in logical mode the capture's mapper and its Relations, which
    decode such a table's template columns; `replay`), and to nothing else: install,
    check, explain, keys and the sweeps of the configured tables use Settings.mapper()
    without it. One query on a session of its own, once per table for all of them (the
    answer kept, found or not); an OperationalError goes to the caller (the runner reads
    the batch again), and the table is asked again next time."""
    connect = PgConnector.from_settings(settings).factory(SIDE)
    answers: dict[TableName, Retired | None] = {}

    def ask(table: TableName) -> Retired | None:
        with connect() as conn:
            try:
                row = conn.execute(Q.RETIRED_TABLE.sql, {"table": table.qualified}).fetchone()
            except psycopg.errors.InsufficientPrivilege as exc:
                # (EXECUTE revoked from PUBLIC by hand): its changes are dead letters.
                log.warning("retired_table_refused", table=str(table), error=str(exc))
                return None
        found = retired_table(row[0] if row else None)
        if found is not None:
            log.warning(
                "rendering_a_table_no_longer_configured",
                table=str(table),
                keys=[t.source for t in found.templates],
                earlier=[[t.source for t in ts] for ts, _db in found.earlier],
            )
        return found

    def lookup(table: TableName) -> Retired | None:
        if table not in answers:
            answers[table] = ask(table)
        return answers[table]

    return lookup


def runner_config(settings: Settings) -> RunnerConfig:
    return RunnerConfig(
        batch_size=settings.batch_size,
        poll_interval_s=settings.poll_interval_ms / 1000,
        retry_initial_s=settings.retry_initial_ms / 1000,
        retry_max_s=settings.retry_max_ms / 1000,
        linger_s=settings.batch_linger_ms / 1000,
        second_delete_s=settings.second_delete_ms / 1000,
    )


def build_listener(
    settings: Settings,
    stopper: Stopper,
    metrics: Metrics | None = None,
    config_file: ConfigFile | None = None,
) -> tuple[Runner, AutoSink]:
    """The runner and the Redis sink it writes to (the caller closes the sink); whether
    Redis is one server or a cluster is found out at first use. `config_file`: where
    `settings` came from, asked again when a change needs a mapping they lack."""
    # Through Sentinel, every pool of the loop's and the sweeper's sinks follows the
    # master together (MasterWatch).
    follow_master = MasterWatch()
    retired = retired_lookup(settings)
    sink = open_sink(
        RedisOptions.from_settings(settings),
        unlink_chunk=settings.unlink_chunk,
        scan_count=settings.scan_count,
        follow_master=follow_master,
    )
    mapper = settings.mapper(retired)
    metrics = metrics or Metrics()
    mode = mode_for(settings)
    watch = RedisWatch(
        sink=sink,
        mapper=mapper,
        history=mode,
        connect=PgConnector.from_settings(settings).factory(SIDE),
        window_s=settings.replay_window,
        check_every_s=settings.redis_check_interval_ms / 1000,
        second_delete_s=settings.second_delete_ms / 1000,
        source_scope=settings.mapping_fingerprint() if settings.source_mark else None,
    )
    runner = Runner(
        connect=mode.source(retired),
        mapper=mapper,
        sink=sink,
        config=runner_config(settings),
        stopper=stopper,
        watch=watch,
        metrics=metrics,
        tap=Tap(
            TailChannel(RedisOptions.from_settings(settings), channel_name(settings.database_url)),
            mapper,
        ),
        # The sweeper's own sink: its SCANs never share a connection (or a cluster's
        # slot table) with the loop's deletes.
        sweep_sink=open_sink(
            RedisOptions.from_settings(settings),
            unlink_chunk=settings.unlink_chunk,
            scan_count=settings.scan_count,
            follow_master=follow_master,
        ),
        mapping_changed=config_file.mapping_changed if config_file is not None else None,
    )
    return runner, sink
