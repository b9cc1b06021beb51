"""Trigger mode: the sweep owed on a server that is not the one the listener last ran on
(capture/lineage.py), against real servers. A real failover is in
test_physical_standbys; here the recorded lineage is set by hand, as a promoted standby
or a restore would leave it, to show what the listener does with it: sweeps every
watched table once, records the new lineage and forgets the sweep only once it is done
(a listener stopped before then sweeps again), and with sweep_after_failover = false
only says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import make_conninfo

from tests.support.config import write_config
from tests.support.env import Env
from tests.support.faults import TEMPLATES, cache, changed_and_deleted, keys_of, setup_users
from tests.support.listener import Spawn, stop_listener
from tests.support.roles import login_role
from tests.support.waits import wait_until

pytestmark = pytest.mark.servers

STATE = "SELECT server_lineage, resync_reason FROM cdc_invalidator.listener_state_v1"
LINEAGE = "SELECT cdc_invalidator.server_lineage_v1()"
OTHER = "7000000000000000000 timeline 1"  # another cluster's


def test_install_records_the_lineage_and_a_listener_on_it_sweeps_nothing(
    env: Env, spawn: Spawn
) -> None:
    config = setup_users(env, rows=3)
    here = env.scalar(LINEAGE)
    assert " timeline " in here
    assert env.scalar(STATE.replace(", resync_reason", "")) == here
    r = env.redis()
    cache(r, [1, 2, 3])
    listener = spawn(config)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert r.exists(*keys_of(2), *keys_of(3)) == 4, "nothing swept"
    assert not listener.logged("changes_may_have_been_missed")
    stop_listener(listener)


def test_a_listener_on_another_lineage_sweeps_every_table_once(env: Env, spawn: Spawn) -> None:
    config = setup_users(env, rows=3)
    env.sql(f"UPDATE cdc_invalidator.listener_state_v1 SET server_lineage = '{OTHER}'")
    r = env.redis()
    cache(r, [1, 2, 3])
    listener = spawn(config)
    wait_until(lambda: listener.logged("missed_changes_swept"), what="the sweep done")
    assert r.exists(*keys_of(1), *keys_of(2), *keys_of(3)) == 0
    (missed,) = listener.logged("changes_may_have_been_missed")
    assert missed["level"] == "error"
    assert OTHER in missed["reason"]
    here = env.scalar(LINEAGE)
    assert here in missed["reason"]
    with env.connect() as conn:
        assert conn.execute(STATE).fetchone() == (here, None)
    changed_and_deleted(r, env.dsn, 2, "a change's keys deleted after the sweep")
    stop_listener(listener)
    # Started again on the same server: nothing more.
    cache(r, [3])
    again = spawn(config)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert r.exists(*keys_of(3)) == 2
    assert not again.logged("changes_may_have_been_missed")
    stop_listener(again)


def test_a_sweep_owed_and_not_done_is_done_at_the_next_start(env: Env, spawn: Spawn) -> None:
    """Recorded with the lineage, cleared once swept: a listener stopped (or killed)
    after it saw the new server and before the sweep was done sweeps at its next start."""
    config = setup_users(env, rows=2)
    env.sql(
        "UPDATE cdc_invalidator.listener_state_v1 SET resync_reason = 'a failover, seen before'"
    )
    r = env.redis()
    cache(r, [1, 2])
    listener = spawn(config)
    wait_until(lambda: listener.logged("missed_changes_swept"), what="the sweep owed done")
    assert r.exists(*keys_of(1), *keys_of(2)) == 0
    (swept,) = listener.logged("missed_changes_swept")
    assert swept["reason"] == "a failover, seen before"
    assert env.scalar(STATE.replace("server_lineage, ", "")) is None
    stop_listener(listener)


def test_sweep_after_failover_false_records_the_new_lineage_and_sweeps_nothing(
    env: Env, spawn: Spawn
) -> None:
    config = setup_users(env, rows=2, sweep_after_failover=False)
    env.sql(f"UPDATE cdc_invalidator.listener_state_v1 SET server_lineage = '{OTHER}'")
    r = env.redis()
    cache(r, [1, 2])
    listener = spawn(config)
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert r.exists(*keys_of(2)) == 2, "nothing swept"
    (said,) = listener.logged("postgres_lineage_changed")
    assert (said["previous"], said["now"]) == (OTHER, env.scalar(LINEAGE))
    assert not listener.logged("changes_may_have_been_missed")
    with env.connect() as conn:
        assert conn.execute(STATE).fetchone() == (env.scalar(LINEAGE), None)
    stop_listener(listener)


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


def test_a_listener_granted_least_privilege_sees_another_lineage_and_sweeps(
    env: Env, spawn: Spawn
) -> None:
    """grant_listener gives what the lineage needs, also where EXECUTE on functions was
    revoked from PUBLIC."""
    setup_users(env, rows=2)
    env.sql(
        f"UPDATE cdc_invalidator.listener_state_v1 SET server_lineage = '{OTHER}';"
        "REVOKE EXECUTE ON FUNCTION cdc_invalidator.server_lineage_v1() FROM PUBLIC"
    )
    r = env.redis()
    cache(r, [1, 2])
    try:
        with login_role(env, "lineage_") as role:
            listener = spawn(listener_as(env, role))
            wait_until(lambda: listener.logged("missed_changes_swept"), what="the sweep done")
            assert r.exists(*keys_of(1), *keys_of(2)) == 0
            assert env.scalar(STATE.replace(", resync_reason", "")) == env.scalar(LINEAGE)
            stop_listener(listener)
    finally:
        env.sql("GRANT EXECUTE ON FUNCTION cdc_invalidator.server_lineage_v1() TO PUBLIC")


def test_a_server_that_withholds_its_lineage_is_said_and_nothing_is_swept(
    env: Env, spawn: Spawn
) -> None:
    """pg_control_system() withheld (as a managed service may): the lineage is NULL, the
    listener says a failover cannot be told, and invalidates as usual."""
    setup_users(env, rows=2)
    env.sql("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    r = env.redis()
    cache(r, [2])
    try:
        with login_role(env, "lineage_") as role:
            listener = spawn(listener_as(env, role))
            changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
            (said,) = listener.logged("postgres_lineage_unknown")
            assert said["level"] == "warning"
            assert r.exists(*keys_of(2)) == 2, "nothing swept"
            stop_listener(listener)
    finally:
        env.sql("GRANT EXECUTE ON FUNCTION pg_control_system() TO PUBLIC")
