"""Phase 2b, `--cluster`: the backlog drain of phase 2 into a Redis Cluster of 3 masters,
the listener given one node's URL, against a floor on that cluster: the same reads as
phase 2's floor (the table, or a pgoutput slot of its own in logical mode), then one
hiredis pipeline per node of one UNLINK per hash slot over the whole backlog (the
listener groups per slot too, but within each batch of batch_size changes)."""

from __future__ import annotations

from floors import cluster_drain_floor
from harness import DRAIN, Bench, ClusterKeys, Listener, Target
from phases.drain import (
    DRAIN_TARGET,
    Drain,
    DrainRun,
    best_drain,
    drain_ours,
    prepare_backlog,
)
from report import Row, fmt_ratio


def measure_cluster_drain(
    bench: Bench, keys: ClusterKeys, target: Target, *, rows: int, repeats: int
) -> Drain:
    """The drain of measure_drain(), into the cluster: the listener is given one node."""
    on_cluster = Target(
        target.mode,
        target.dsn,
        target.admin,
        target.config.with_stem(target.config.stem + "-cluster"),
    )
    # The target's own file (with the tables later phases added and installed), but for
    # the Redis: with another mapping than the one installed, the listener would stop
    # (configuration_superseded).
    bench.write_config_like(on_cluster, target, redis_url=keys.url)
    meet(bench, on_cluster, "cluster")
    floors: list[float] = []
    runs: list[DrainRun] = []
    ids = range(1, rows + 1)
    for n in range(repeats):
        keys.flushall()
        prepare_backlog(bench, DRAIN, rows, target)
        keys.set_keys(ids)
        floors.append(cluster_drain_floor(keys, target, DRAIN, rows))
        keys.set_keys(ids)
        run = drain_ours(
            bench, f"{target.mode}-cluster-drain-{rows}-{n}", rows, on_cluster, keys.dbsize
        )
        runs.append(run)
        print(
            f"  [{target.mode}] cluster drain {rows}: floor {floors[-1]:.3f} s, ours "
            f"{run.keys_gone_s:.3f} s, listener CPU {run.cpu_s:.2f} s, peak RSS "
            f"{run.peak_rss_mb:.1f} MB",
            flush=True,
        )
    meet(bench, target, "single node")  # back, before the next phase times anything
    return best_drain(rows, floors, runs)


def meet(bench: Bench, target: Target, what: str) -> None:
    """The same database switches between two Redis deployments here: its listener's
    first start on the other one replays the recent history (a Redis it has not seen may
    have lost deletes). That is right, and not what a drain measures: it is done first,
    untimed."""
    listener = Listener(bench, f"{target.mode}-meet-{what.replace(' ', '-')}", target)
    try:
        listener.wait_redis_met()
    finally:
        listener.stop()


def cluster_rows(single: Drain, d: Drain) -> list[Row]:
    """The cluster drain's rows, beside the single-node drain's."""
    label = f"{d.rows // 1000}k changes / {2 * d.rows // 1000}k keys"
    rows = [
        Row(
            f"cluster drain {label} (3 masters)",
            f"{d.ours_s:.3f} s",
            f"{d.floor_s:.3f} s",
            fmt_ratio(d.ours_s / d.floor_s),
            f"≤ {DRAIN_TARGET:g}x floor",
            d.ours_s <= DRAIN_TARGET * d.floor_s,
        ),
        Row(
            "cluster drain: rate, listener CPU, peak RSS",
            f"{d.rows / d.ours_s:,.0f} changes/s, {d.listener_cpu_s:.2f} s, {d.peak_rss_mb:.1f} MB",
            "",
            "",
            "",
            None,
        ),
    ]
    rows.append(
        Row(
            "cluster drain vs the single-node drain",
            f"{d.ours_s:.3f} s",
            f"{single.ours_s:.3f} s",
            fmt_ratio(d.ours_s / single.ours_s),
            "",
            None,
        )
    )
    return rows
