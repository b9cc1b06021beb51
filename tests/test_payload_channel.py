"""Trigger mode with `notify_payload = true`: the wake-up that goes with a payload.

The payloads go on a channel whose name only the installing role reads
(payload_channel_v1, sql/schema.sql). A listener that does not LISTEN there must still
be woken by a one-row change, on cdc_invalidator_v1: an earlier release's (this
revision still lets it start, and it LISTENs on cdc_invalidator_v1 alone), and this
release's while the channel's row is gone or replaced (docs/DBA.md: to draw a new
name, DELETE the row, `install`, restart the listener). Without the wake-up such a
change's keys stayed in Redis until the next poll (poll_interval_ms), and without the
row the listener could not connect at all (listen_v1() raised).
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.faults import (
    cache,
    forged_payload,
    keys_of,
    listener_quiet,
    setup_users,
    users_config,
    write,
)
from tests.support.listener import listening
from tests.support.roles import login_role
from tests.support.waits import wait_until

CHANNEL = "cdc_invalidator_v1"
POLL_MS = 60_000  # a change's keys gone well before this: a wake-up, not a poll
PROMPT_S = 5.0


def gone(env: Env, i: int) -> bool:
    r = env.redis()
    return not any(r.exists(k) for k in keys_of(i))


def settle(env: Env, warm_up: int) -> None:
    """A first change deleted (the listener connected and read the queue), then the
    listener quiet again: a one-row change now sends its payload, and only a
    notification wakes the listener before its poll."""
    cache(env.redis(), [warm_up])
    write(
        env,
        f"UPDATE users SET email = 'w{warm_up}@x' WHERE id = {warm_up}",
        ids=range(warm_up, warm_up + 1),
    )
    wait_until(
        lambda: gone(env, warm_up), what=f"the warm-up change's (user {warm_up}) keys deleted"
    )
    wait_until(lambda: listener_quiet(env), what="the listener quiet")


def deleted_promptly(env: Env, i: int) -> None:
    cache(env.redis(), [i])
    env.sql(f"UPDATE users SET email = 'n{i}@x' WHERE id = {i}")
    wait_until(
        lambda: gone(env, i), timeout_s=PROMPT_S, what=f"user {i}'s keys deleted on a wake-up"
    )


def installed(env: Env) -> Path:
    return setup_users(
        env, rows=6, notify_payload=True, poll_interval_ms=POLL_MS, second_delete_ms=0
    )


def test_a_one_row_change_wakes_a_session_listening_on_the_wake_up_channel_alone(env: Env) -> None:
    """As an earlier release's listener LISTENs (on cdc_invalidator_v1 only): it hears
    the empty wake-up, and no row."""
    installed(env)
    with env.connect() as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        assert listener_quiet(env)
        env.sql("UPDATE users SET email = 'x@x' WHERE id = 2")
        heard = [n.payload for n in conn.notifies(timeout=3, stop_after=1)]
    assert heard == [""]


def test_without_the_channels_row_the_listener_connects_and_is_woken(env: Env) -> None:
    """The row deleted (the first step of drawing a new name): the listener still
    connects, LISTENing on the wake-up's channel, and a one-row change (which sends no
    payload then) wakes it."""
    config = installed(env)
    env.sql("DELETE FROM cdc_invalidator.payload_channel_v1")
    with listening(config):
        settle(env, 1)
        deleted_promptly(env, 2)


def test_a_listener_on_the_replaced_name_is_still_woken(env: Env) -> None:
    """A new name drawn (DELETE, `install`) while the listener runs: until it LISTENs
    again, it is on the old name, where nothing is sent any more."""
    config = installed(env)
    with listening(config):
        settle(env, 1)
        env.sql("DELETE FROM cdc_invalidator.payload_channel_v1")
        assert main(["install", "--config", str(config)]) == 0
        wait_until(lambda: listener_quiet(env), what="the listener quiet after install")
        deleted_promptly(env, 4)


def test_a_listener_role_that_may_not_call_listen_v1_counts_no_payload_on_the_wake_up_channel(
    env: Env,
) -> None:
    """The install has the payload channel, but the listener's role may not call
    listen_v1() (revoked by hand; not granted by grant_listener): it LISTENs on the
    wake-up's channel alone, where any role may NOTIFY. A payload there must only wake it,
    as for a listener that may: it deleted that payload's keys (any role's, on demand),
    as against an earlier release's install. A one-row change is still deleted at once."""
    installed(env)
    with login_role(env, "cdc_listener_") as role, login_role(env, "plain_") as plain:
        env.sql("SELECT cdc_invalidator.grant_listener(%s, 'trigger')", [role])
        env.sql(
            sql.SQL("REVOKE EXECUTE ON FUNCTION cdc_invalidator.listen_v1() FROM {}")
            .format(sql.Identifier(role))
            .as_string()
        )
        config = users_config(
            env,
            name="listener.toml",
            role=role,
            notify_payload=True,
            poll_interval_ms=POLL_MS,
            second_delete_ms=0,
        )
        with listening(config):
            settle(env, 1)
            cache(env.redis(), [4])
            xid = env.scalar("SELECT txid_current()")  # committed
            with psycopg.connect(make_conninfo(env.dsn, user=plain), autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, forged_payload(xid, 4)])
            deleted_promptly(env, 3)  # (after the forged payload: it was read by then)
            assert all(env.redis().exists(k) for k in keys_of(4))
