"""A connection pooler between cdc-invalidator and PostgreSQL (docs/operations.md,
"Connection poolers"), with a real PgBouncer.

A review put the listener and the commands behind PgBouncer's transaction pool, as
platform teams put their applications: one `status` left search_path = pg_catalog on a
server connection the applications then got (their unqualified SQL failed); a stopped
listener's lock stayed held there; two listeners consumed at once; notifications never
came. Logical mode retried forever a replication connection PgBouncer refuses. They are
refused at connect, naming the pooler; a pool in session mode works in trigger mode.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import psycopg
import pytest

from cdc_invalidator.cli import main
from cdc_invalidator.pg import connect
from cdc_invalidator.pg.connect import CLI, PgConnector
from tests.support.env import Env
from tests.support.faults import cache, keys_of, setup_users
from tests.support.listener import Spawn
from tests.support.pooler import pgbouncer
from tests.support.waits import wait_until

pytestmark = pytest.mark.servers

REFUSED = "reaches PostgreSQL through a connection pooler or a proxy"
MOVED = "moves a session between server connections"


def through_pool(env: Env, config: Path, through: str, *, session_pool: bool = True) -> Path:
    """The configuration, its database_url through the pooler, said to be a session
    pool (session_pool) or not."""
    pooled = config.with_name("pooled.toml")
    said = f"session_pool = {str(session_pool).lower()}\n"
    pooled.write_text(said + config.read_text().replace(env.dsn, through))
    return pooled


@contextmanager
def busy(dsn: str) -> Iterator[None]:
    """An application holding the pool's one server connection in transactions of
    2.5 s (longer than the probe waits for one), one after another, until the block
    ends."""
    done = threading.Event()

    def work() -> None:
        with psycopg.connect(dsn, autocommit=True) as app:
            while not done.is_set():
                with app.transaction():
                    app.execute("SELECT pg_sleep(2.5)")

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join(10)


@pytest.mark.parametrize(
    "pool", ["transaction, not said", "transaction", "transaction, busy", "statement"]
)
def test_a_transaction_pool_is_refused_before_a_setting_reaches_it(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str], pool: str
) -> None:
    """Any pooler is refused unless session_pool says it keeps sessions whole; said so
    wrongly, it is checked. A busy pool too: the session watching ours then waited for a
    server connection, and the second review saw a pool of one let through as if no
    server were to spare in a session pool (search_path = pg_catalog then reached the
    application). A statement pool closed the watching session, and the listener took
    that for PostgreSQL down and retried (third review)."""
    config = setup_users(env, rows=1)
    mode, *how = pool.split(", ")
    with pgbouncer(env.dsn, mode, 1 if "busy" in how else 5) as bouncer:
        through = bouncer.dsn
        pooled = through_pool(env, config, through, session_pool="not said" not in how)
        capsys.readouterr()
        with busy(through) if "busy" in how else nullcontext():
            assert main(["status", "--config", str(pooled)]) == 1
        said = capsys.readouterr().err
        assert (REFUSED if "not said" in how else MOVED) in said, said
        assert "Connection poolers" in said, said
        # What the applications sharing the pool get: nothing of ours.
        with psycopg.connect(through, autocommit=True) as app:
            for _ in range(5):  # (each statement may take another server connection)
                assert app.execute("SHOW search_path").fetchone() == ('"$user", public',)
        if "busy" in how:
            return
        listener = spawn(pooled)
        assert listener.wait() == 1
        (fatal,) = listener.logged("cannot_consume")
        assert (REFUSED if "not said" in how else MOVED) in fatal["error"], fatal


def test_a_session_pool_carries_the_listener_in_trigger_mode(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    """Said to be one (session_pool), and checked: let through. Not said: refused."""
    config = setup_users(env, rows=2)
    r = env.redis()
    with pgbouncer(env.dsn, "session") as bouncer:
        through = bouncer.dsn
        capsys.readouterr()
        assert (
            main(
                ["status", "--config", str(through_pool(env, config, through, session_pool=False))]
            )
            == 1
        )
        assert REFUSED in capsys.readouterr().err
        pooled = through_pool(env, config, through)
        listener = spawn(pooled)
        cache(r, [1, 2])
        env.sql("UPDATE users SET email = 'new@x' WHERE id = 1")
        wait_until(lambda: r.exists(*keys_of(1)) == 0, what="the change through the pool")
        assert r.exists(*keys_of(2)) == len(keys_of(2))
        assert listener.logged("cannot_consume") == []
        listener.kill()


@pytest.mark.usefixtures("capture")
@pytest.mark.parametrize("capture", ["logical"])
def test_logical_capture_through_a_pooler_is_refused_not_retried(
    env: Env, spawn: Spawn, capsys: pytest.CaptureFixture[str]
) -> None:
    """The listener retried PgBouncer's refusal of its replication connection once a
    second, as `postgres_unavailable`, and `check` said ok: it opened none."""
    config = setup_users(env, rows=1)
    with pgbouncer(env.dsn, "session") as bouncer:
        through = bouncer.dsn
        pooled = through_pool(env, config, through)
        capsys.readouterr()
        assert main(["check", "--config", str(pooled)]) == 1
        out, err = capsys.readouterr()
        assert "refuses the replication connection" in out + err, out + err
        listener = spawn(pooled)
        assert listener.wait() == 1
        (fatal,) = listener.logged("cannot_consume")
        assert "refuses the replication connection" in fatal["error"], fatal


def test_a_session_pool_is_watched_once_per_connector(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby connects again every poll_interval_ms: through a session pool each
    connect watched the session again, opening three more sessions a second."""
    with pgbouncer(env.dsn, "session") as bouncer:
        through = bouncer.dsn
        pg = PgConnector(
            through, application_name="cdc-invalidator", connect_timeout_s=5, session_pool=True
        )
        pg.connect(CLI).close()
        monkeypatch.setattr(connect, "_moved", lambda *_: pytest.fail("watched again"))
        with pg.connect(CLI) as conn:
            assert conn.execute("SHOW search_path").fetchone() == ("pg_catalog",)


def test_a_session_pool_switched_to_transactions_is_found_at_a_later_connect(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checked once and then trusted for good, a session pool switched to transaction
    mode by a RELOAD went on carrying the listener's reconnects, its settings reaching
    the applications (third review). It is checked again after POOLER_RECHECK_S."""
    with pgbouncer(env.dsn, "session") as bouncer:
        pg = PgConnector(
            bouncer.dsn, application_name="cdc-invalidator", connect_timeout_s=5, session_pool=True
        )
        pg.connect(CLI).close()
        bouncer.switch("transaction")
        monkeypatch.setattr(connect, "POOLER_RECHECK_S", 0.0)
        with pytest.raises(connect.PoolerInTheWay, match=MOVED):
            pg.connect(CLI)
