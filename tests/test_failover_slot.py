"""slot_failover: a failover slot (PostgreSQL 17+), which a standby keeps in step, so that
after a failover to it the listener goes on where it was instead of sweeping every
watched table. Before 17, install, check and the listener refuse the setting.

Real servers: the session's PostgreSQL (15 in the first run of `make test`, 18 in the
second), a standby made by pg_basebackup, promoted."""

from __future__ import annotations

import signal
import time
from typing import Any

import psycopg
import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env, pg_of
from tests.support.faults import (
    SLOT,
    TEMPLATES,
    cache,
    insert_users,
    keys_of,
    setup_users,
    write,
)
from tests.support.listener import Spawn
from tests.support.servers import PostgresServer
from tests.support.waits import wait_until

pytestmark = [pytest.mark.usefixtures("capture"), pytest.mark.parametrize("capture", ["logical"])]

FAILOVER_SLOTS = 170000


def _slot_failover(env_or_dsn: Env | str) -> bool | None:
    dsn = env_or_dsn if isinstance(env_or_dsn, str) else env_or_dsn.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", [SLOT]
        ).fetchone()
    return None if row is None else bool(row[0])


def _refused_before_17(env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str]) -> None:
    """install refuses slot_failover and changes nothing; check and the listener say why."""
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    config = env.config({"public.users": ["user:{id}"]}, slot_failover=True)
    capsys.readouterr()
    assert main(["install", "--config", str(config)]) != 0
    said = capsys.readouterr().err
    assert "install refused, nothing was changed" in said, said
    assert "slot_failover needs PostgreSQL 17 or later" in said, said
    assert env.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'cdc_invalidator'") == 0
    assert main(["check", "--config", str(config)]) != 0
    assert "slot_failover needs PostgreSQL 17" in capsys.readouterr().err
    # Installed without it, then set: the listener refuses to start, and says why.
    plain = env.config({"public.users": ["user:{id}"]}, name="plain.toml")
    assert main(["install", "--config", str(plain)]) == 0
    listener = spawn(config)
    assert listener.wait() != 0
    assert any("slot_failover needs PostgreSQL 17" in str(line) for line in listener.lines()), (
        listener.lines()
    )


def test_install_makes_a_failover_slot_and_the_listener_sets_or_unsets_an_existing_one(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    if int(env.scalar("SHOW server_version_num")) < FAILOVER_SLOTS:
        _refused_before_17(env, spawn, capsys)
        return
    config = setup_users(env, slot_failover=True)
    assert _slot_failover(env) is True
    capsys.readouterr()
    assert main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "a failover slot" in out
    # (No standby here: none could copy it.)
    assert "slot_failover is true, but no physical replication slot exists" in out
    # Turned off: check says the slot is still one; the listener unsets it as it starts.
    plain = env.config({"public.users": TEMPLATES}, name="plain.toml")
    main(["check", "--config", str(plain)])
    assert "is a failover slot, and slot_failover is false" in capsys.readouterr().out
    listener = spawn(plain)
    wait_until(lambda: listener.logged("slot_failover_set"), what="the slot unset")
    assert listener.logged("slot_failover_set")[0]["failover"] is False
    assert _slot_failover(env) is False
    r = env.redis()
    cache(r, [1])
    insert_users(env, 1, 1)
    wait_until(lambda: r.exists(*keys_of(1)) == 0, what="a change's keys deleted")
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0
    # And on again.
    listener = spawn(config)
    wait_until(lambda: listener.logged("slot_failover_set"), what="the slot set")
    assert _slot_failover(env) is True
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


def _copied(env: Env, standby: psycopg.Connection[Any], lsn: str) -> bool:
    """The standby's copy of the slot (sync_replication_slots' worker) is persistent and
    confirmed at `lsn` or past it. The worker keeps its first copy temporary until the
    slot's catalog_xmin has passed what the copy reserved: the listener's confirming a
    change past a later snapshot of the running transactions moves it (logged here at
    once, then a change; the server logs a snapshot every 15 s while WAL is written)."""
    env.sql("SELECT pg_log_standby_snapshot()")
    env.sql("UPDATE users SET email = email WHERE id = 3")
    row = standby.execute(
        "SELECT confirmed_flush_lsn >= %s::pg_lsn AND synced AND NOT temporary"
        " FROM pg_replication_slots WHERE slot_name = %s",
        [lsn, SLOT],
    ).fetchone()
    return bool(row and row[0])


def _replayed(standby: PostgresServer, dbname: str) -> bool:
    """The standby has the change to user 2 (committed, replayed)."""
    with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
        row = conn.execute("SELECT email FROM users WHERE id = 2").fetchone()
    return row == ("two@x",)


def test_a_failover_to_a_standby_loses_no_change_and_is_swept_only_without_a_failover_slot(
    own_env: Env, spawn: Spawn
) -> None:
    """The listener, given both servers in its URL, goes on against the promoted standby
    from the position it saved there: a change it had not read before the primary went
    has its keys deleted, and so has a later one. With slot_failover (PostgreSQL 17+)
    the standby kept the slot: nothing is swept. Without it (before 17) the new primary
    has no slot: it is made again, and every watched table swept."""
    env = own_env
    failover = int(env.scalar("SHOW server_version_num")) >= FAILOVER_SLOTS
    primary = pg_of(env)
    dbname = env.dsn.rsplit("/", 1)[1]
    env.sql("SELECT pg_create_physical_replication_slot('standby1')")
    standby = PostgresServer.standby_of(
        primary,
        {
            "primary_slot_name": "'standby1'",
            "hot_standby_feedback": "on",
            "sync_replication_slots": "on" if failover else "off",
            # The slot's database, for the standby's own reads of the primary's slots.
            "primary_conninfo": f"'host=127.0.0.1 port={primary.port} user=postgres "
            f"dbname={dbname}'",
        },
    )
    try:
        both = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/{dbname}"
            "?target_session_attrs=read-write"
        )
        config = setup_users(env, rows=3, database_url=both, slot_failover=failover)
        r = env.redis()
        listener = spawn(config)
        cache(r, [1])
        one = write(env, "UPDATE users SET email = 'one@x' WHERE id = 1", ids=range(1, 2))
        wait_until(lambda: r.exists(*keys_of(1)) == 0, what="a change's keys deleted")
        if failover:
            with psycopg.connect(standby.dsn(dbname), autocommit=True) as copying:
                wait_until(
                    lambda: _copied(env, copying, one.last_change), timeout_s=60, what="the copy"
                )
        # A change the listener does not read before the primary goes: it is stopped.
        cache(r, [2])
        listener.signal(signal.SIGSTOP)
        env.sql("UPDATE users SET email = 'two@x' WHERE id = 2")
        wait_until(lambda: _replayed(standby, dbname), what="the standby replaying it")
        # (A fast stop would wait for the stopped listener to confirm what it was sent.)
        primary.stop("immediate")
        standby.promote()
        listener.signal(signal.SIGCONT)
        wait_until(lambda: r.exists(*keys_of(2)) == 0, timeout_s=30, what="the unread change")
        cache(r, [3])
        with psycopg.connect(standby.dsn(dbname), autocommit=True) as conn:
            conn.execute("UPDATE users SET email = 'three@x' WHERE id = 3")
        wait_until(lambda: r.exists(*keys_of(3)) == 0, what="a change on the new primary")
        missed = listener.logged("changes_may_have_been_missed")
        if failover:
            assert not missed, missed
            assert not listener.logged("slot_created")
        else:
            assert missed, "the slot is gone on the new primary: a sweep"
            assert "is gone" in missed[0]["reason"], missed
            wait_until(lambda: listener.logged("missed_changes_swept"), what="the sweep")
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        standby.destroy()


def _saved_then_told(env: Env, lsn: str) -> tuple[float, float]:
    """When slot_state_v1, then the slot, were first seen at `lsn` or past it (polled)."""
    saved_at: float | None = None
    deadline = time.monotonic() + 15
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT st.acked_lsn >= %(lsn)s::pg_lsn, s.confirmed_flush_lsn >= %(lsn)s::pg_lsn"
                " FROM cdc_invalidator.slot_state_v1 st"
                " JOIN pg_replication_slots s USING (slot_name)",
                {"lsn": lsn},
            ).fetchone()
            assert row is not None
            now = time.monotonic()
            if row[0] and saved_at is None:
                saved_at = now
            if row[1]:
                assert saved_at is not None, "the slot passed a position never saved"
                return saved_at, now
            time.sleep(0.01)
    raise AssertionError(f"the slot did not pass {lsn} (saved: {saved_at is not None})")


def test_the_slot_is_told_a_position_only_once_its_save_is_a_second_old(
    env: Env, spawn: Spawn
) -> None:
    """The listener's saves commit asynchronously. Told at once, the slot could be on
    disk (or on a standby, copied) ahead of a save that a crash (or a failover) lost:
    found ahead, it costs a sweep of every watched table. Seen from outside: the slot
    passes a change at least half a second after the save has (a second, less the
    delay of the polls). Both seen in one poll (the test stalled) proves nothing: a
    change again, three times at most."""
    config = setup_users(env, rows=1)
    listener = spawn(config)
    seen = []
    for n in range(3):
        w = write(env, f"UPDATE users SET email = '{n}@y' WHERE id = 1", ids=range(1, 2))
        saved_at, told_at = _saved_then_told(env, w.last_change)
        seen.append(told_at - saved_at)
        if told_at > saved_at:
            break
    assert seen[-1] >= 0.5, seen
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0
