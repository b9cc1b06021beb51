"""PostgreSQL's notification queue full (trigger mode): a session that LISTENs and then
sits in a transaction holds the queue's tail for the whole server; once the queue is
full every commit that sent a NOTIFY fails. The wake-up is only a wake-up (the queue
table is the record, the listener polls), so a capture function sends none while the
queue is half full or more, and the writes go on.

The queue is 8 GB unless `max_notify_queue_pages` (PostgreSQL 17+) says less: the test
shrinks it to its minimum, 64 pages (512 kB): it runs on 17 and later (`make test` runs
this module on 18 too).
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.support.env import Env, pg_of
from tests.support.faults import cache, keys_of, setup_users
from tests.support.listener import ListenerThread
from tests.support.waits import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.servers]

POLL_MS = 200


def fill_the_queue(env: Env) -> Iterator[psycopg.Connection]:
    """A session that LISTENs and idles in a transaction (its queue position stays),
    then notifications from another until PostgreSQL refuses more."""
    holder = psycopg.connect(env.dsn)
    holder.execute("LISTEN some_channel")
    holder.commit()
    holder.execute("SELECT 1")  # idle in transaction from here on
    with env.connect() as conn:
        conn.autocommit = True
        for i in range(1000):
            try:
                conn.execute(
                    "SELECT pg_notify('some_channel', %s || n || repeat('x', 7000))"
                    " FROM generate_series(1, 20) n",
                    [str(i)],
                )
            except psycopg.errors.ProgramLimitExceeded:
                break
        else:
            raise AssertionError("the notification queue never filled")
    assert env.scalar("SELECT pg_notification_queue_usage()") >= 0.9
    yield holder
    holder.close()


def test_a_full_notification_queue_fails_no_watched_write(own_env: Env) -> None:
    if own_env.scalar("SELECT current_setting('server_version_num')::int") < 170000:
        # (no setting to shrink the queue before 17: 8 GB to fill; `make test` runs this
        # module on 18 too)
        with pytest.raises(psycopg.errors.UndefinedObject):
            own_env.sql("SHOW max_notify_queue_pages")
        return
    own_env.sql("ALTER SYSTEM SET max_notify_queue_pages = 64")
    pg_of(own_env).restart()
    config = setup_users(own_env, rows=10, poll_interval_ms=POLL_MS)
    r = own_env.redis()
    listener = ListenerThread.from_file(config)
    listener.start()
    try:
        for holder in fill_the_queue(own_env):
            cache(r, range(1, 11))
            # One-row and many-row statements, each in a transaction of its own, with
            # the listener quiet (it would be sent the wake-up).
            with own_env.connect() as conn:
                conn.autocommit = True
                for i in range(1, 6):
                    conn.execute("UPDATE users SET email = email || 'y' WHERE id = %s", [i])
                conn.execute("UPDATE users SET email = email || 'y' WHERE id > 5")
            wait_until(
                lambda: r.exists(*[k for i in range(1, 11) for k in keys_of(i)]) == 0,
                what="every written row's keys deleted (by the poll)",
            )
            assert holder.execute("SELECT 1").fetchone() == (1,)
    finally:
        listener.stop()
