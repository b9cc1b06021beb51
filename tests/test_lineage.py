"""Trigger mode: a sweep queued on a server that is not the one the listener last ran on
(capture/lineage.py, note_server_v3() in sql/schema.sql), against real servers. A real
failover is in test_physical_standbys; here the recorded lineage is set by hand, as a
promoted standby or a restore would leave it, to show what the listener does with it:
queues one sweep of every watched table with the new lineage, in one transaction (the
queue holds the sweep until it is done, and replay finds it); with
sweep_after_failover = false, not for a newer timeline of the same system; and `check`
says so before it happens."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from cdc_invalidator.cli import main
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.faults import TEMPLATES, cache, changed_and_deleted, keys_of, setup_users
from tests.support.listener import Spawn, stop_listener
from tests.support.roles import login_role
from tests.support.waits import wait_until

pytestmark = pytest.mark.servers

RECORDED = "SELECT server_lineage FROM cdc_invalidator.listener_state_v1"
LINEAGE = "SELECT cdc_invalidator.server_lineage_v1()"
OTHER = "7000000000000000000 timeline 1"  # another cluster's
SWEEPS = "SELECT count(*) FROM cdc_invalidator.queue_v1 WHERE new_row::jsonb ? 'resync'"


def another_lineage(env: Env) -> None:
    env.sql(f"UPDATE cdc_invalidator.listener_state_v1 SET server_lineage = '{OTHER}'")


def test_a_listener_on_another_lineage_sweeps_every_table_once(env: Env, spawn: Spawn) -> None:
    """Once, and in the history: a replay since before it sweeps again."""
    config = setup_users(env, rows=3, replay_history="1h")
    another_lineage(env)
    r = env.redis()
    cache(r, [1, 2, 3])
    listener = spawn(config)
    wait_until(lambda: r.exists(*keys_of(1), *keys_of(2), *keys_of(3)) == 0, what="every key swept")
    (missed,) = listener.logged("changes_may_have_been_missed")
    assert missed["level"] == "error"
    here = env.scalar(LINEAGE)
    assert OTHER in missed["reason"]
    assert here in missed["reason"]
    assert env.scalar(RECORDED) == here
    assert env.scalar(SWEEPS) == 1, "one sweep queued (kept as history: replay_history)"
    changed_and_deleted(r, env.dsn, 2, "a change's keys deleted after the sweep")
    stop_listener(listener)
    # Started again on the same server: no other sweep queued. (A sweep of the last
    # seconds before a stop may be done again as the predecessor's second deletes.)
    again = spawn(config)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert not again.logged("changes_may_have_been_missed")
    assert env.scalar(SWEEPS) == 1
    stop_listener(again)
    cache(r, [3])
    assert main(["replay", "--since", "10m", "--config", str(config)]) == 0
    assert r.exists(*keys_of(3)) == 0, "the sweep replayed"


def test_sweep_after_failover_false_records_a_promotion_and_sweeps_nothing(
    env: Env, spawn: Spawn
) -> None:
    """A newer timeline of the same system (a promoted standby, as synchronous
    replication may make safe): said, recorded, not swept."""
    config = setup_users(env, rows=2, sweep_after_failover=False)
    here = env.scalar(LINEAGE)
    older = here.split()[0] + " timeline 0"
    env.sql(f"UPDATE cdc_invalidator.listener_state_v1 SET server_lineage = '{older}'")
    r = env.redis()
    cache(r, [1, 2])
    listener = spawn(config)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert r.exists(*keys_of(2)) == 2, "nothing swept"
    (said,) = listener.logged("postgres_lineage_changed")
    assert (said["previous"], said["now"]) == (older, here)
    assert not listener.logged("changes_may_have_been_missed")
    assert env.scalar(RECORDED) == here
    assert env.scalar(SWEEPS) == 0
    stop_listener(listener)


NOTE = "SELECT swept FROM cdc_invalidator.note_server_v3(%s, %s, false)"


@pytest.mark.parametrize(
    ("recorded", "seen", "sweep", "swept"),
    [
        # Another system (a dump restored elsewhere, pg_upgrade): whatever the setting.
        (OTHER, None, False, True),
        # A newer timeline of this system (a promotion, a point-in-time recovery).
        ("older", None, True, True),
        ("older", None, False, False),
        # The caller's previous session saw a newer timeline: back on the old primary
        # (its own lineage recorded), whatever the setting.
        ("here", "newer", False, True),
        # It saw an older one, and waited while another listener noted this one.
        ("here", "older", True, False),
        # Not a lineage: ignored.
        ("here", "x'; DROP TABLE users; --", True, False),
        ("here", None, True, False),
    ],
)
def test_what_note_server_sweeps_for(
    env: Env, recorded: str, seen: str | None, sweep: bool, swept: bool
) -> None:
    setup_users(env)
    here = env.scalar(LINEAGE)
    system, _, timeline = here.split()
    shapes = {
        "here": here,
        "older": f"{system} timeline {int(timeline) - 1}",
        "newer": f"{system} timeline {int(timeline) + 1}",
    }
    recorded = shapes.get(recorded, recorded)
    env.sql(f"UPDATE cdc_invalidator.listener_state_v1 SET server_lineage = '{recorded}'")
    assert env.scalar(NOTE, [sweep, shapes.get(seen or "", seen)]) is swept
    assert env.scalar(SWEEPS) == (1 if swept else 0)
    assert env.scalar(RECORDED) == here


RUN = "SELECT server_run FROM cdc_invalidator.listener_state_v1"
NOTE_RUN = "SELECT swept FROM cdc_invalidator.note_server_v3(%s, NULL, %s)"
RESYNC = "SELECT new_row->>'resync' FROM cdc_invalidator.queue_v1 WHERE new_row::jsonb ? 'resync'"


@pytest.mark.parametrize(
    ("server", "run", "sweep_crashed", "swept"),
    [
        # Came up from a crash since, where writers commit asynchronously.
        (("here", True), "other", True, True),
        # Elsewhere (or sweep_after_crash = never): recorded, not swept.
        (("here", True), "other", False, False),
        (("here", True), "here", True, False),
        # None recorded (a release before it): nothing compared.
        (("here", True), None, True, False),
        # A promoted standby's run is its own: the lineage decides, and
        # sweep_after_failover = false is not overridden by it.
        (("older", False), "other", True, False),
        (("older", True), "other", True, True),
    ],
)
def test_what_note_server_sweeps_for_after_a_crash(
    env: Env, server: tuple[str, bool], run: str | None, sweep_crashed: bool, swept: bool
) -> None:
    """note_server_v3(): the run recorded (server_run_v1()) against the server's,
    on the same lineage; one sweep at most, and the run recorded either way."""
    lineage, sweep = server
    setup_users(env)
    here, now = env.scalar(LINEAGE), env.scalar("SELECT cdc_invalidator.server_run_v1()")
    assert now is not None
    system, _, timeline = here.split()
    recorded = {"here": here, "older": f"{system} timeline {int(timeline) - 1}"}[lineage]
    env.sql(
        "UPDATE cdc_invalidator.listener_state_v1 SET server_lineage = %s, server_run = %s",
        [recorded, {"here": now, "other": "1000", None: None}[run]],
    )
    assert env.scalar(NOTE_RUN, [sweep, sweep_crashed]) is swept
    assert env.scalar(SWEEPS) == (1 if swept else 0)
    assert env.scalar(RUN) == now
    assert env.scalar(RECORDED) == here
    if swept and lineage == "here":
        reason = env.scalar(RESYNC)
        assert "PostgreSQL crashed since" in reason, reason


IN_TABLE = (
    "SELECT recorded_in = 'cdc_invalidator.listener_state_v1'::regclass"
    " AND recorded_in_database = cdc_invalidator.database_oid_v1()"
    " FROM cdc_invalidator.listener_state_v1"
)
NOTE_RESTORED = "SELECT swept, restored FROM cdc_invalidator.note_server_v3(false, NULL, false)"


@pytest.mark.parametrize("lineage", ["here", "older", None])
@pytest.mark.parametrize("mark", ["recorded_in", "recorded_in_database"])
def test_a_row_recorded_in_another_table_or_database_is_swept_for_whatever_the_settings(
    env: Env, lineage: str | None, mark: str
) -> None:
    """note_server_v3(): listener_state_v1's row recorded in another table than itself
    (a dump restored: the table made again, the row copied), or in another database (a
    copy made by CREATE DATABASE ... TEMPLATE, which keeps the table's oid) is swept
    for, with sweep_after_failover and sweep_after_crash off, on the same lineage, a
    newer timeline or none recorded; once, and the table and database recorded."""
    setup_users(env)
    assert env.scalar(IN_TABLE) is True, "install recorded it"
    here = env.scalar(LINEAGE)
    system, _, timeline = here.split()
    recorded = {"here": here, "older": f"{system} timeline {int(timeline) - 1}", None: None}
    env.sql(
        f"UPDATE cdc_invalidator.listener_state_v1 SET {mark} = 1, server_lineage = %s",
        [recorded[lineage]],
    )
    with env.connect() as conn:
        assert conn.execute(NOTE_RESTORED).fetchone() == (True, True)
    assert env.scalar(SWEEPS) == 1
    assert "restored from a dump" in env.scalar(RESYNC)
    assert env.scalar(IN_TABLE) is True
    with env.connect() as conn:
        assert conn.execute(NOTE_RESTORED).fetchone() == (False, False)
    assert env.scalar(SWEEPS) == 1


def listener_as(env: Env, role: str, **settings: object) -> Path:
    """A configuration of the users table for the listener `role`, granted trigger mode."""
    env.sql("SELECT cdc_invalidator.grant_listener(%s, 'trigger')", [role])
    return write_config(
        env.tmp_path / "as-role.toml",
        database_url=make_conninfo(env.dsn, user=role),
        redis_url=env.redis_url,
        tables={"public.users": TEMPLATES},
        **settings,
    )


def test_a_listener_granted_least_privilege_queues_the_sweep(env: Env, spawn: Spawn) -> None:
    """grant_listener gives EXECUTE on note_server_v3(), which queues the sweep as its
    owner (the listener's role may not write the queue), and that is all it may write
    there; EXECUTE revoked from PUBLIC changes nothing."""
    setup_users(env, rows=2)
    another_lineage(env)
    env.sql("REVOKE EXECUTE ON FUNCTION cdc_invalidator.server_lineage_v1() FROM PUBLIC")
    r = env.redis()
    cache(r, [1, 2])
    try:
        with login_role(env, "lineage_") as role:
            assert not env.scalar(
                "SELECT has_table_privilege(%s, 'cdc_invalidator.queue_v1', 'INSERT')", [role]
            )
            note = "cdc_invalidator.note_server_v3(boolean, text, boolean)"
            assert not env.scalar(f"SELECT has_function_privilege('public', '{note}', 'EXECUTE')")
            listener = spawn(listener_as(env, role))
            wait_until(lambda: r.exists(*keys_of(1), *keys_of(2)) == 0, what="every key swept")
            assert env.scalar(RECORDED) == env.scalar(LINEAGE)
            stop_listener(listener)
    finally:
        env.sql("GRANT EXECUTE ON FUNCTION cdc_invalidator.server_lineage_v1() TO PUBLIC")


def test_a_server_that_withholds_its_lineage_is_said_and_nothing_is_swept(
    env: Env, spawn: Spawn
) -> None:
    """pg_control_system() withheld (as a managed service may): the lineage is NULL, the
    listener says a failover cannot be told, and invalidates as usual."""
    setup_users(env, rows=2)
    another_lineage(env)
    r = env.redis()
    cache(r, [2])
    note = "cdc_invalidator.note_server_v3(boolean, text, boolean)"
    with login_role(env, "lineage_") as role:
        # note_server_v3() runs as its owner: here a role without the privilege.
        env.sql(
            f"REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC;"
            f"ALTER FUNCTION {note} OWNER TO {role}"
        )
        try:
            listener = spawn(listener_as(env, role))
            changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
            (said,) = listener.logged("postgres_lineage_unknown")
            assert said["level"] == "warning"
            assert r.exists(*keys_of(2)) == 2, "nothing swept"
            assert env.scalar(RECORDED) == OTHER
            stop_listener(listener)
        finally:
            env.sql(
                "GRANT EXECUTE ON FUNCTION pg_control_system() TO PUBLIC;"
                f"ALTER FUNCTION {note} OWNER TO CURRENT_USER"
            )


def test_check_says_the_next_start_sweeps_and_how_to_keep_the_cache(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before the listener's first start on another server (a pg_upgrade, a switchover
    done): `check` warns that it will sweep, with the statement that keeps the cache warm
    where nothing was lost; run, that statement leaves nothing to sweep."""
    config = setup_users(env)
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"server lineage: {env.scalar(LINEAGE)}, the one the listener last ran on" in out
    another_lineage(env)
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"is not the one the listener last ran on ({OTHER})" in out
    assert "its next start sweeps every watched table once" in out
    statement = out.split("as the installing role: ", 1)[1].split("\n", 1)[0]
    env.sql(statement)
    assert env.scalar(RECORDED) == env.scalar(LINEAGE)
