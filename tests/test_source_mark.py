"""The source mark's rule (redis_guard/source.py), as a pure function: what a mark found
in Redis says of the database the listener connected to. The servers' side is in
test_restore.py (a database renamed back) and test_physical_standbys.py (a failback)."""

from __future__ import annotations

import signal

import pytest

from cdc_invalidator.redis_guard.source import KEY_PREFIX, Source, lost_since
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.faults import TEMPLATES, changed_and_deleted, setup_users
from tests.support.listener import Spawn, check
from tests.support.waits import wait_until

HERE = Source(system="7001", timeline=2, name="app", oid=16384, scope="f00d")


def test_the_mark_names_the_system_database_and_mapping_and_holds_oid_and_timeline() -> None:
    assert HERE.key == "cdc_invalidator:source:7001:app:f00d"
    assert HERE.mark == "16384 timeline 2"
    assert HERE.owing == "16384 timeline 2 unswept"


@pytest.mark.parametrize(
    ("recorded", "said"),
    [
        ("16384 timeline 2", None),  # this database, this timeline
        ("16384 timeline 1", None),  # a failover since: the lineage rules judge it
        ("16384 timeline 3", "older than the one this Redis was last invalidated from"),
        ("16385 timeline 2", "is not the one this Redis was last invalidated from"),
        ("16385 timeline 1", "is not the one this Redis was last invalidated from"),
        ("16384 timeline 2 unswept", "is not known to be done"),
        ("16385 timeline 1 unswept", "is not known to be done"),
        # Not a mark of ours: no mark (overwritten)
        ("", None),
        ("16384", None),
        ("16384 timeline two", None),
        ("16384 epoch 3", None),
        ("16384 timeline 3 swept", None),
    ],
)
def test_what_a_mark_says(recorded: str, said: str | None) -> None:
    reason = lost_since(recorded, HERE)
    if said is None:
        assert reason is None
    else:
        assert reason is not None
        assert said in reason


@pytest.mark.usefixtures("capture")
def test_a_redis_user_refused_the_mark_is_told_once_and_invalidation_goes_on(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/redis.md's minimal ACL (no GET, no SET) with the source mark on: the listener
    says so once (`source_mark_refused`) and invalidates as ever; `check` warns, naming
    the keys to allow. Nothing of ours is written to Redis."""
    setup_users(env, rows=2)
    admin = env.redis()
    admin.acl_setuser(
        "cdc_nomark",
        enabled=True,
        passwords=["+pw"],
        keys=["*"],
        commands=["-@all", "+unlink", "+scan", "+info", "+ping", "+client|setname"],
    )
    try:
        mode: dict[str, object] = {"capture": env.capture} if env.logical else {}
        config = write_config(
            env.tmp_path / "nomark.toml",
            database_url=env.dsn,
            redis_url=env.redis_url.replace("redis://", "redis://cdc_nomark:pw@"),
            tables={"public.users": TEMPLATES},
            source_mark=True,
            **mode,
        )
        listener = spawn(config)
        changed_and_deleted(admin, env.dsn, 1, "a change's keys deleted")
        wait_until(lambda: listener.logged("source_mark_refused"), what="the refusal said")
        changed_and_deleted(admin, env.dsn, 2, "and the next change's")
        (refused,) = listener.logged("source_mark_refused")
        assert "cdc_invalidator:source:*" in refused["detail"]
        assert not list(admin.scan_iter("cdc_invalidator:*"))
        _, out, err = check(config, capsys)
        assert "the listener's source mark is refused (NoPermissionError" in out + err, out + err
        listener.signal(signal.SIGTERM)
        assert listener.wait() == 0
    finally:
        admin.acl_deluser("cdc_nomark")


@pytest.mark.usefixtures("capture")
def test_a_mark_another_client_spoiled_stops_nothing_and_is_written_over(
    env: Env, spawn: Spawn
) -> None:
    """Another client wrote a hash where the mark is: GET answers WRONGTYPE at the next
    connect. The listener says so once (`source_mark_failed`), writes its mark over it,
    and invalidates as ever (a review froze every invalidation that way, logged as
    redis_unavailable: any error Redis answers but for a lost connection went into the
    loop)."""
    config = setup_users(env, rows=2, source_mark=True)
    r = env.redis()
    listener = spawn(config)
    wait_until(lambda: list(r.scan_iter(f"{KEY_PREFIX}*")), what="the mark written")
    (key,) = r.scan_iter(f"{KEY_PREFIX}*")
    mark = r.get(key)
    assert mark is not None
    r.delete(key)
    r.hset(key, "spoiled", "1")
    env.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'cdc-invalidator' AND datname = current_database()"
    )
    wait_until(lambda: listener.logged("source_mark_failed"), what="the spoiled mark said")
    assert "WRONGTYPE" in listener.logged("source_mark_failed")[0]["error"]
    wait_until(lambda: r.type(key) == "string" and r.get(key) == mark, what="written over")
    changed_and_deleted(r, env.dsn, 1, "a change's keys deleted")
    assert not listener.logged("changes_may_have_been_missed")
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0


@pytest.mark.usefixtures("capture")
def test_check_says_what_the_mark_owes_and_how_to_keep_the_cache_warm(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check` reads the mark as the listener's next start will: another database's oid
    under this name owes a sweep, said before it happens, with the SET that records this
    database instead (where Redis was flushed or restored with it); followed, nothing is
    owed."""
    config = setup_users(env, rows=1, source_mark=True)
    r = env.redis()
    listener = spawn(config)
    wait_until(lambda: list(r.scan_iter(f"{KEY_PREFIX}*")), what="the mark written")
    listener.signal(signal.SIGTERM)
    assert listener.wait() == 0
    (key,) = r.scan_iter(f"{KEY_PREFIX}*")
    mark = str(r.get(key))
    _, out, err = check(config, capsys)
    assert "next start sweeps" not in out + err, out + err
    r.set(key, "1 timeline 1")  # (another database's oid under this name)
    _, out, err = check(config, capsys)
    said = out + err
    assert "next start sweeps every watched table once" in said, said
    assert "is not the one this Redis was last invalidated from" in said, said
    assert f"SET {key} '{mark}'" in said, said
    r.set(key, mark)  # (the advice followed)
    _, out, err = check(config, capsys)
    assert "next start sweeps" not in out + err, out + err
    assert not list(r.scan_iter(f"{KEY_PREFIX}check")), "check's probe taken away"
