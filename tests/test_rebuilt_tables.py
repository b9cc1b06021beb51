"""Trigger mode: migrations that rebuild a watched table instead of altering it (DROP and
CREATE again, or a copy swapped in by RENAME, as online-migration tools do). The rebuild
guard (sql/rebuild_guard.sql) sweeps the table's keys at the drop and at the swap, and
gives the table that took the name a stand-in that sweeps for each transaction that
writes it, until install compiles its capture function again."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.support.env import Env
from tests.support.listener import listening, run_cli
from tests.support.logical import install as logical_install
from tests.support.logical import logical_config, running
from tests.support.sync import install, settle, users_table
from tests.support.waits import wait_until

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}
OURS = (
    "SELECT array_agg(tg.tgname::text ORDER BY tg.tgname) FROM pg_trigger tg"
    " JOIN pg_proc p ON p.oid = tg.tgfoid"
    " WHERE tg.tgrelid = 'users'::regclass AND p.pronamespace = 'cdc_invalidator'::regnamespace"
)
GUARDS = (
    "SELECT array_agg(evtname::text ORDER BY evtname) FROM pg_event_trigger"
    " WHERE evtname LIKE 'cdc\\_invalidator\\_%'"
)
REBUILD_GUARD = [
    "cdc_invalidator_dropped",
    "cdc_invalidator_enum_labels",
    "cdc_invalidator_enum_renamed",
    "cdc_invalidator_parts_dropped",
    "cdc_invalidator_parts_moved",
    "cdc_invalidator_rebuilt",
    "cdc_invalidator_rewritten",
]
STAND_IN = ["cdc_invalidator_stand_in_v1"]
CAPTURE = [f"cdc_invalidator_{op}_v1" for op in ("del", "ins", "trunc", "upd")]


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("check", "--config", str(config))


@pytest.fixture
def owner(env: Env) -> Iterator[str]:
    """A role that owns the table and runs the migrations, as an application's does: not
    a superuser, no privilege on our schema."""
    role = f"migrator_{env.dsn.rsplit('/', 1)[1]}"
    env.sql(f"CREATE ROLE {role}; GRANT CREATE ON SCHEMA public TO {role}")
    yield role
    env.sql(f"DROP OWNED BY {role} CASCADE; DROP ROLE {role}")


def as_role(role: str, statements: str) -> str:
    return f"SET ROLE {role}; {statements}; RESET ROLE"


def seed(r: redis.Redis) -> None:
    r.mset({"user:1": "cached", "user:email:u1@x": "1", "user:2": "cached"})


SWAP = "ALTER TABLE users RENAME TO users_old; ALTER TABLE users_new RENAME TO users"


def rebuild_by_copy(env: Env, owner: str, into_place: str) -> None:
    """A migration as pg-osc or a hand-made one does it, in one transaction: a copy with a
    changed column, filled, then put in place by `into_place` (SWAP, or a DROP and a
    rename)."""
    env.sql(
        as_role(
            owner,
            "BEGIN;"
            "CREATE TABLE users_new (LIKE users INCLUDING ALL);"
            "INSERT INTO users_new SELECT id, upper(email), name FROM users;"
            f"{into_place}; COMMIT",
        )
    )


def wait_swept(r: redis.Redis) -> None:
    """Every key seed() cached is gone, user:2 included, which no row written renders."""
    wait_until(lambda: r.exists("user:1", "user:email:u1@x", "user:2") == 0, what="swept")


def test_a_copy_swapped_in_by_rename_is_swept_until_install(env: Env, owner: str) -> None:
    env.sql(as_role(owner, "CREATE TABLE users (id int PRIMARY KEY, email text, name text)"))
    env.sql("INSERT INTO users (id, email) VALUES (1, 'u1@x'), (2, 'u2@x')")
    config = install(env, USERS)
    r = env.redis()
    with listening(config):
        seed(r)
        rebuild_by_copy(env, owner, SWAP)
        # Every cached row may differ from the copy's: the swap swept them.
        wait_swept(r)
        assert env.scalar(OURS) == STAND_IN
        # The copy's writes are captured, as sweeps, until install.
        seed(r)
        env.sql(as_role(owner, "UPDATE users SET name = 'x' WHERE id = 1"))
        wait_swept(r)
        seed(r)
        env.sql(as_role(owner, "TRUNCATE users"))
        wait_swept(r)
        settle(env, r)
        result = check(config)
        assert result.returncode == 1
        assert "table public.users was created, or renamed to this name, after install" in (
            result.stderr
        )
        assert "table public.users_old was renamed from public.users, a name another" in (
            result.stdout
        )
        # Installed again: the capture triggers replace the stand-in, keys are exact.
        install(env, USERS)
        assert env.scalar(OURS) == CAPTURE
        assert check(config).returncode == 0, check(config).stderr
        seed(r)
        env.sql(as_role(owner, "INSERT INTO users (id, email) VALUES (1, 'u1@x')"))
        wait_until(lambda: r.exists("user:1", "user:email:u1@x") == 0, what="the exact keys")
        settle(env, r)
        assert r.get("user:2") == "cached"


@pytest.mark.parametrize("kind", ["plain", "partitioned", "inherited"])
def test_a_capture_function_dropped_by_drop_owned_sweeps_until_install(
    env: Env, owner: str, kind: str
) -> None:
    """The capture function belongs to the table's owner at install. After ALTER TABLE
    ... OWNER TO, the old owner's DROP OWNED BY ... CASCADE (a role's usual clean-up)
    took it, and every capture trigger of the table and its partitions with it: writes
    went by uncaptured. Now each of those tables gets the stand-in, which sweeps, until
    install compiles the function again."""
    heir = f"{owner}_heir"
    env.sql(f"CREATE ROLE {heir}")
    try:
        partitioned = kind == "partitioned"
        create = "CREATE TABLE users (id int PRIMARY KEY, email text, name text)"
        if partitioned:
            create += (
                " PARTITION BY RANGE (id);"
                "CREATE TABLE users_a PARTITION OF users FOR VALUES FROM (1) TO (100)"
            )
        if kind == "inherited":  # (users_a: row 2, an inheritance child's)
            create += "; CREATE TABLE users_a () INHERITS (users)"
        env.sql(as_role(owner, create))
        env.sql("INSERT INTO users (id, email) VALUES (1, 'u1@x')")
        into = "users_a" if kind == "inherited" else "users"
        env.sql(f"INSERT INTO {into} (id, email) VALUES (2, 'u2@x')")
        # No second deletes: a sweep done again 300 ms later would pass for the next one.
        config = install(env, USERS, second_delete_ms=0)
        env.sql(f"ALTER TABLE users OWNER TO {heir}")
        if kind != "plain":
            env.sql(f"ALTER TABLE users_a OWNER TO {heir}")
        env.sql(f"DROP OWNED BY {owner} CASCADE")
        # (a partitioned table's row trigger, for partitions made later, calls a function
        # of ours and stays)
        part = ["cdc_invalidator_part_v1"] if partitioned else []
        assert env.scalar(OURS) == sorted([*part, *STAND_IN])
        r = env.redis()
        with listening(config):
            seed(r)
            env.sql(as_role(heir, "UPDATE users SET name = 'x' WHERE id = 1"))
            wait_swept(r)
            if kind != "plain":  # a statement that names users_a fires its triggers only
                seed(r)
                env.sql(as_role(heir, "UPDATE users_a SET name = 'y' WHERE id = 2"))
                wait_swept(r)
            seed(r)
            env.sql(as_role(heir, "TRUNCATE users"))
            wait_swept(r)
            settle(env, r)
            result = check(config)
            assert result.returncode == 1
            assert "was dropped since install (by DROP OWNED BY its owner CASCADE?)" in (
                result.stderr
            )
            assert "the rebuild guard's stand-in sweeps all of the table's key" in result.stderr
            assert "after install and have no capture triggers" not in result.stderr
            # Installed again, as the new owner's: exact keys, the stand-in gone.
            install(env, USERS, second_delete_ms=0)
            assert env.scalar(OURS) == sorted([*part, *CAPTURE])
            assert check(config).returncode == 0, check(config).stderr
            seed(r)
            env.sql(as_role(heir, "INSERT INTO users (id, email) VALUES (1, 'u1@x')"))
            wait_until(lambda: r.exists("user:1", "user:email:u1@x") == 0, what="the exact keys")
            settle(env, r)
            assert r.get("user:2") == "cached"
    finally:
        env.sql(
            f"DROP TABLE IF EXISTS users_a, users;DROP OWNED BY {heir} CASCADE; DROP ROLE {heir}"
        )


@pytest.mark.parametrize("kind", ["plain", "partitioned", "create_as"])
def test_a_dropped_table_is_swept_and_one_created_in_its_place_too(
    env: Env, owner: str, kind: str
) -> None:
    users_table(env, [(1, "u1@x"), (2, "u2@x")])
    env.sql(f"ALTER TABLE users OWNER TO {owner}")
    config = install(env, USERS)
    r = env.redis()
    with listening(config):
        seed(r)
        env.sql(as_role(owner, "DROP TABLE users"))
        # Its rows are gone: so are their keys.
        wait_swept(r)
        if kind == "partitioned":
            created = (
                "CREATE TABLE users (id int, email text, name text) PARTITION BY RANGE (id);"
                "CREATE TABLE users_low PARTITION OF users FOR VALUES FROM (0) TO (100)"
            )
            write = "INSERT INTO users_low (id, email) VALUES (1, 'u1@x')"  # names the partition
        elif kind == "create_as":
            created = "CREATE TABLE users AS SELECT 1 AS id, 'u1@x'::text AS email, '' AS name"
            write = "UPDATE users SET name = 'x'"
        else:
            created = "CREATE TABLE users (id int PRIMARY KEY, email text, name text)"
            write = "INSERT INTO users (id, email) VALUES (1, 'u1@x')"
        env.sql(as_role(owner, created))
        assert env.scalar(OURS) == (
            ["cdc_invalidator_stand_in_row_v1", *STAND_IN] if kind == "partitioned" else STAND_IN
        )
        settle(env, r)
        seed(r)
        env.sql(as_role(owner, write))
        wait_swept(r)
        settle(env, r)
    assert "table public.users was dropped since install" in check(config).stdout
    # The dropped table's capture function belonged to its owner, not to the installer:
    # install again takes it away (and gives the new table its triggers).
    install(env, USERS)
    partitioned = ["cdc_invalidator_part_v1"] if kind == "partitioned" else []
    assert env.scalar(OURS) == sorted(CAPTURE + partitioned)


def test_rebuilds_the_guard_sees_in_replica_mode_by_schema_and_by_alter_index(env: Env) -> None:
    """Not only CREATE TABLE and ALTER TABLE ... RENAME: DDL run with
    session_replication_role = replica, a schema swapped in by ALTER SCHEMA ... RENAME,
    and ALTER INDEX ... RENAME TO (PostgreSQL lets it rename a table)."""
    env.sql(
        "CREATE SCHEMA app; CREATE TABLE app.users (id int PRIMARY KEY, email text);"
        "CREATE TABLE public.users (id int PRIMARY KEY, email text)"
    )
    install(env, {"app.users": ["user:{id}"], "public.users": ["puser:{id}"]})
    stand_ins = (
        "SELECT array_agg(tgrelid::regclass::text ORDER BY tgrelid::regclass::text) FROM pg_trigger"
        " WHERE tgname = 'cdc_invalidator_stand_in_v1'"
    )
    env.sql(
        "SET session_replication_role = replica; DROP TABLE public.users;"
        "CREATE TABLE public.users (id int PRIMARY KEY, email text)"
    )
    assert env.scalar(stand_ins) == ["users"]
    env.sql(
        "CREATE SCHEMA app_new; CREATE TABLE app_new.users (id int PRIMARY KEY, email text);"
        "ALTER SCHEMA app RENAME TO app_old; ALTER SCHEMA app_new RENAME TO app"
    )
    assert env.scalar(stand_ins) == ["app.users", "users"]
    env.sql(
        "CREATE TABLE users_next (id int PRIMARY KEY, email text);"
        "ALTER TABLE users RENAME TO users_gone; ALTER INDEX users_next RENAME TO users"
    )
    assert env.scalar(stand_ins) == ["app.users", "users", "users_gone"]
    # Install gives the tables that bear the names their triggers, and takes the stand-in
    # off the table renamed away (it would sweep public.users' keys on every write).
    install(env, {"app.users": ["user:{id}"], "public.users": ["puser:{id}"]})
    assert env.scalar(stand_ins) is None
    assert (
        env.scalar(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'users_gone'::regclass"
            " AND tgname LIKE 'cdc\\_invalidator%'"
        )
        == 0
    )


def test_a_rebuild_that_rolls_back_leaves_the_cache_and_the_table_alone(
    env: Env, owner: str
) -> None:
    users_table(env, [(1, "u1@x")])
    env.sql(f"ALTER TABLE users OWNER TO {owner}")
    config = install(env, USERS)
    r = env.redis()
    with listening(config):
        seed(r)
        env.sql(
            as_role(
                owner,
                "BEGIN;"
                "ALTER TABLE users RENAME TO users_old;"
                "CREATE TABLE users (id int PRIMARY KEY, email text, name text);"
                "DROP TABLE users_old;"
                "ROLLBACK",
            )
        )
        settle(env, r)
        assert r.exists("user:1", "user:email:u1@x", "user:2") == 3
    assert check(config).returncode == 0


def test_logical_install_takes_the_stand_in_away_and_keeps_the_guard(env: Env) -> None:
    users_table(env, [(1, "u1@x")])
    install(env, USERS)
    assert env.scalar(GUARDS) == REBUILD_GUARD
    env.sql("DROP TABLE users; CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    assert env.scalar(OURS) == STAND_IN
    install(env, USERS, name="logical.toml", capture="logical")
    assert env.scalar(OURS) is None
    # The rebuild guard serves both modes; logical mode adds its DDL guard.
    ddl_guard = [
        "cdc_invalidator_guard",
        "cdc_invalidator_guard_drops",
        "cdc_invalidator_guard_index",
    ]
    assert env.scalar(GUARDS) == sorted([*REBUILD_GUARD, *ddl_guard])
    install(env, USERS)  # and back
    assert env.scalar(GUARDS) == REBUILD_GUARD
    assert len(env.scalar(OURS)) == 4


def test_check_warns_when_the_rebuild_guard_is_off(env: Env) -> None:
    users_table(env, [(1, "u1@x")])
    config = install(env, USERS)
    assert "rebuild guard" not in check(config).stdout
    env.sql("ALTER EVENT TRIGGER cdc_invalidator_parts_dropped DISABLE")
    assert "the rebuild guard (event triggers cdc_invalidator_rebuilt," in check(config).stdout


def test_check_says_a_dropped_table_does_not_exist(env: Env) -> None:
    users_table(env, [(1, "u1@x")])
    config = install(env, USERS)
    env.sql("DROP TABLE users")
    checked = check(config)
    said = checked.stdout + checked.stderr
    assert "table public.users does not exist" in said
    assert "table public.users was dropped since install" in said
    assert "None" not in said, said


# --- both modes: a partition that leaves a watched table, or joins it with rows ---------

PARTITIONED = (
    "CREATE TABLE users (id int, email text, name text) PARTITION BY RANGE (id);"
    "CREATE TABLE users_low PARTITION OF users FOR VALUES FROM (0) TO (100);"
    "CREATE TABLE users_mid PARTITION OF users FOR VALUES FROM (100) TO (200);"
    "CREATE TABLE users_old PARTITION OF users FOR VALUES FROM (200) TO (300);"
    # a partition whose own partition key uses a function: DROP FUNCTION ... CASCADE
    # takes it
    "CREATE FUNCTION bucket(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 / 10';"
    "CREATE TABLE users_fn PARTITION OF users FOR VALUES FROM (500) TO (600)"
    " PARTITION BY RANGE (bucket(id));"
    "CREATE TABLE users_fn_5 PARTITION OF users_fn FOR VALUES FROM (50) TO (60)"
)


def test_a_partition_dropped_detached_or_attached_with_rows_is_swept(
    env: Env, owner: str, capture: str
) -> None:
    """Its rows leave (or join) the table with no row change a trigger sees or that is
    decoded: the command sweeps the table's keys, in its own transaction."""
    env.sql(as_role(owner, PARTITIONED))
    # (a partition in a schema of its own, dropped with it)
    env.sql(
        f"CREATE SCHEMA gone AUTHORIZATION {owner}; CREATE TABLE gone.users_gone PARTITION OF users"
        " FOR VALUES FROM (400) TO (500)"
    )
    env.sql(
        "INSERT INTO users (id, email)"
        " VALUES (1, 'u1@x'), (2, 'u2@x'), (150, 'm@x'), (250, 'o@x'), (450, 'g@x'), (550, 'f@x')"
    )
    # (no second deletes: a sweep repeated 300 ms later would take the next step's keys)
    config = install(env, USERS, second_delete_ms=0)
    r = env.redis()
    with running(env, config) if env.logical else listening(config):
        # Made after install, inside a CREATE SCHEMA: recorded all the same. (Its insert is
        # decoded before the drop below: decoded after it, it would be a dead letter, the
        # partition being gone from the catalog.)
        env.sql(
            f"CREATE SCHEMA made AUTHORIZATION {owner}"
            " CREATE TABLE users_made PARTITION OF public.users FOR VALUES FROM (800) TO (900);"
            "INSERT INTO users (id, email) VALUES (850, 'made@x')"
        )
        settle(env, r)
        for command in (
            as_role(owner, "DROP TABLE made.users_made"),
            as_role(owner, "DROP TABLE users_old"),
            as_role(owner, "ALTER TABLE users DETACH PARTITION users_mid"),
            as_role(
                owner, "ALTER TABLE users ATTACH PARTITION users_mid FOR VALUES FROM (100) TO (200)"
            ),
            # (in three transactions: the last one sweeps)
            "ALTER TABLE users DETACH PARTITION users_mid CONCURRENTLY",
            as_role(owner, "DROP SCHEMA IF EXISTS gone CASCADE"),
            as_role(owner, "DROP FUNCTION bucket(int) CASCADE"),
        ):
            seed(r)
            env.sql(command)
            wait_swept(r)
            settle(env, r)
        # Nothing left the table, or joined it: nothing is swept. An empty partition
        # attached (as partition managers premake them), a drop rolled back, a partition
        # of a table not watched.
        seed(r)
        env.sql(
            as_role(
                owner,
                "CREATE TABLE users_next (LIKE users);"
                "ALTER TABLE users ATTACH PARTITION users_next FOR VALUES FROM (300) TO (400)",
            )
        )
        env.sql(
            as_role(
                owner, "CREATE TABLE users_new PARTITION OF users FOR VALUES FROM (600) TO (700)"
            )
        )
        env.sql(as_role(owner, "BEGIN; DROP TABLE users_low; ROLLBACK"))
        if not env.logical:  # (logical mode sweeps it: test_migrations_logical)
            env.sql(as_role(owner, "ALTER TABLE users DETACH PARTITION users_next"))  # empty
        env.sql(
            as_role(
                owner,
                "CREATE TABLE other (id int) PARTITION BY RANGE (id);"
                "CREATE TABLE other_1 PARTITION OF other FOR VALUES FROM (0) TO (10);"
                "INSERT INTO other VALUES (1); DROP TABLE other_1",
            )
        )
        assert env.scalar("SELECT count(*) FROM users_next") == 0
        env.sql("UPDATE users SET name = 'x' WHERE id = 1")
        wait_until(lambda: r.exists("user:1", "user:email:u1@x") == 0, what="the exact keys")
        settle(env, r)
        assert r.get("user:2") == "cached"
        # A partition created after install is recorded too: its drop sweeps.
        env.sql(as_role(owner, "DROP TABLE users_new"))
        wait_swept(r)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0, env.scalar(
        "SELECT json_agg(d)::text FROM cdc_invalidator.dead_letter_v1 d"
    )


def test_a_partition_moved_to_another_watched_table_sweeps_that_one_when_truncated(
    env: Env, owner: str
) -> None:
    """A partition detached from one watched table and attached to another holds rows of
    the second: a TRUNCATE naming it, before `install` gives it the second's triggers,
    sweeps the second's keys. Made before install, it kept the first's capture triggers
    (its TRUNCATE queued the first's sweep only); made after, the TRUNCATE trigger the
    guard gave it (which named the first, no longer its table: nothing was queued)."""
    columns = "(id int, email text, name text) PARTITION BY RANGE (id)"
    env.sql(
        as_role(
            owner,
            f"CREATE TABLE users {columns}; CREATE TABLE accounts {columns};"
            "CREATE TABLE users_early PARTITION OF users FOR VALUES FROM (0) TO (100);"
            "CREATE TABLE accounts_1 PARTITION OF accounts FOR VALUES FROM (1000) TO (2000)",
        )
    )
    config = install(env, {**USERS, "public.accounts": ["account:{id}"]}, second_delete_ms=0)
    r = env.redis()
    with listening(config):
        env.sql(
            as_role(
                owner, "CREATE TABLE users_late PARTITION OF users FOR VALUES FROM (100) TO (200)"
            )
        )
        env.sql("INSERT INTO users (id, email) VALUES (1, 'u1@x'), (150, 'u150@x')")
        for part, bounds in (("users_early", "(0) TO (100)"), ("users_late", "(100) TO (200)")):
            env.sql(
                as_role(
                    owner,
                    f"ALTER TABLE users DETACH PARTITION {part};"
                    f"ALTER TABLE accounts ATTACH PARTITION {part} FOR VALUES FROM {bounds}",
                )
            )
        settle(env, r)
        cached = ["account:1", "account:150", "account:1500"]
        for part in ("users_early", "users_late"):
            r.mset(dict.fromkeys(cached, "cached"))
            env.sql(as_role(owner, f"TRUNCATE {part}"))
            wait_until(lambda: r.exists(*cached) == 0, what=f"accounts swept at TRUNCATE {part}")
            settle(env, r)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


@pytest.mark.parametrize("then", ["uninstall", "install_without_the_first"])
def test_a_partition_moved_to_another_watched_table_leaves_with_its_triggers(
    env: Env, owner: str, then: str
) -> None:
    """A partition moved from one watched table to another before `install` keeps the
    first's capture triggers, outside the first's tree: unwatching the first (uninstall,
    or an install whose mapping dropped it) drops them with the first's function, rather
    than refusing because they still use it."""
    columns = "(id int, email text, name text) PARTITION BY RANGE (id)"
    env.sql(
        as_role(
            owner,
            f"CREATE TABLE users {columns}; CREATE TABLE accounts {columns};"
            "CREATE TABLE users_early PARTITION OF users FOR VALUES FROM (0) TO (100)",
        )
    )
    accounts = {"public.accounts": ["account:{id}"]}
    config = install(env, {**USERS, **accounts}, second_delete_ms=0)
    env.sql(
        as_role(
            owner,
            "CREATE TABLE users_late PARTITION OF users FOR VALUES FROM (100) TO (200);"
            "ALTER TABLE users DETACH PARTITION users_early;"
            "ALTER TABLE accounts ATTACH PARTITION users_early FOR VALUES FROM (0) TO (100);"
            "ALTER TABLE users DETACH PARTITION users_late;"
            "ALTER TABLE accounts ATTACH PARTITION users_late FOR VALUES FROM (100) TO (200)",
        )
    )
    ours = (
        "SELECT count(*) FROM pg_trigger tg JOIN pg_proc p ON p.oid = tg.tgfoid "
        "WHERE p.pronamespace = to_regnamespace('cdc_invalidator') "
        "AND p.proname = 'capture_' || 'public.users'::regclass::oid || '_v1'"
    )
    assert env.scalar(ours) > 0, "the moved partitions kept the first table's triggers"
    if then == "uninstall":
        result = run_cli("uninstall", "--config", str(config))
        assert result.returncode == 0, result.stderr
        assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
        assert env.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cdc%'") == 0
    else:
        install(env, accounts, second_delete_ms=0)
        assert env.scalar(ours) == 0
        r = env.redis()
        with listening(config):
            r.set("account:150", "cached")
            env.sql(as_role(owner, "INSERT INTO accounts (id) VALUES (150)"))
            wait_until(lambda: r.exists("account:150") == 0, what="account:150 deleted")
    env.sql(as_role(owner, "INSERT INTO accounts (id) VALUES (1), (151); TRUNCATE accounts"))


def test_check_names_partitions_made_while_the_guard_was_off_until_install(
    env: Env, capture: str
) -> None:
    """A partition made while parts_moved was disabled is not recorded: its DROP would
    not be swept. check names it; install records it."""
    env.sql(PARTITIONED)
    config = install(env, USERS, second_delete_ms=0)
    assert "does not know them" not in check(config).stdout
    env.sql(
        "ALTER EVENT TRIGGER cdc_invalidator_parts_moved DISABLE;"
        "CREATE TABLE users_new PARTITION OF users FOR VALUES FROM (600) TO (700);"
        "ALTER EVENT TRIGGER cdc_invalidator_parts_moved ENABLE ALWAYS"
    )
    result = check(config)
    assert (
        "partitions public.users_new of watched table public.users were made while the "
        "rebuild guard was disabled or missing, and it does not know them"
    ) in result.stdout, result.stdout
    install(env, USERS, second_delete_ms=0)
    assert "does not know them" not in check(config).stdout
    r = env.redis()
    with running(env, config) if env.logical else listening(config):
        settle(env, r)
        seed(r)
        env.sql("DROP TABLE users_new")
        wait_swept(r)


def test_a_ddl_command_leaves_partitions_it_does_not_hold_alone(env: Env) -> None:
    """The guard gives a partition made since install a TRUNCATE trigger, looking under
    the table the command named: for an ATTACH or DETACH, the root, and so every other
    session's partition lacking one (made while the guard was off, or under a partition
    being detached). It waited on their writers' locks, and printed a partition another
    session dropped meanwhile as a bare OID. Only what the transaction holds is its."""
    env.sql(PARTITIONED)
    install(env, USERS, second_delete_ms=0)
    env.sql(
        "ALTER EVENT TRIGGER cdc_invalidator_rebuilt DISABLE;"
        "CREATE TABLE users_new PARTITION OF users FOR VALUES FROM (600) TO (700);"
        "ALTER EVENT TRIGGER cdc_invalidator_rebuilt ENABLE ALWAYS"
    )
    notices: list[str] = []
    with env.connect() as writer, env.connect(options="-c lock_timeout=1s") as ddl:
        writer.execute("BEGIN")
        # What a writer of that partition alone holds (its row trigger would lock the
        # table too, and so hold the DETACH back whatever the guard does).
        writer.execute("LOCK TABLE users_new IN ROW EXCLUSIVE MODE")
        ddl.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        ddl.execute("ALTER TABLE users DETACH PARTITION users_old")
        writer.execute("COMMIT")
    assert notices == []
    trunc = "SELECT count(*) FROM pg_trigger WHERE tgname = 'cdc_invalidator_part_trunc_v1'"
    assert env.scalar(trunc + " AND tgrelid = 'users_new'::regclass") == 0  # install's
    # What a command makes is its own: a partition created now gets its trigger.
    env.sql("CREATE TABLE users_top PARTITION OF users FOR VALUES FROM (700) TO (800)")
    assert env.scalar(trunc + " AND tgrelid = 'users_top'::regclass") == 1


def test_a_detach_that_stopped_half_way_is_reported_and_swept_at_finalize(env: Env) -> None:
    """DETACH ... CONCURRENTLY commits its first transaction, then waits for older
    snapshots; cancelled there, the partition is left detach-pending: its rows are no
    longer read through the table, and nothing sweeps until FINALIZE. check says so."""
    env.sql(PARTITIONED)
    env.sql("INSERT INTO users (id, email) VALUES (1, 'u1@x'), (150, 'm@x')")
    config = install(env, USERS, second_delete_ms=0)
    r = env.redis()
    with env.connect() as reader, listening(config):
        reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        reader.execute("SELECT count(*) FROM users")  # an old snapshot: the detach waits
        detacher = env.connect(options="-c statement_timeout=1s")
        with detacher, pytest.raises(psycopg.errors.QueryCanceled):
            detacher.execute("ALTER TABLE users DETACH PARTITION users_mid CONCURRENTLY")
        reader.execute("COMMIT")
        result = check(config)
        assert (
            "partition public.users_mid of watched table public.users is being detached"
            " concurrently and the detach stopped" in result.stdout
        ), result.stdout
        assert "ALTER TABLE public.users DETACH PARTITION public.users_mid FINALIZE" in (
            result.stdout
        )
        settle(env, r)
        seed(r)
        env.sql("ALTER TABLE users DETACH PARTITION users_mid FINALIZE")
        wait_swept(r)
    assert "being detached concurrently" not in check(config).stdout


def test_the_guard_never_runs_a_table_owners_code(env: Env, owner: str) -> None:
    """The guard runs as the superuser who installed it. It must not query a partition
    it is told of: planning the query would run the owner's functions (an index
    predicate here) as that superuser. This one fails there, as it could have done
    anything else; the attach is swept all the same."""
    env.sql(as_role(owner, PARTITIONED))
    config = install(env, USERS, second_delete_ms=0)
    env.sql(
        as_role(
            owner,
            "CREATE FUNCTION mine(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN"
            " IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN"
            "  RAISE EXCEPTION 'my code ran as a superuser'; END IF; RETURN $1; END $$;"
            "CREATE TABLE users_new (LIKE users);"
            "CREATE INDEX ON users_new (id) WHERE mine(1) = 1;"
            "INSERT INTO users_new (id, email) VALUES (350, 'n@x')",
        )
    )
    r = env.redis()
    with listening(config):
        seed(r)
        env.sql(
            as_role(
                owner, "ALTER TABLE users ATTACH PARTITION users_new FOR VALUES FROM (300) TO (400)"
            )
        )
        wait_swept(r)


# --- logical mode: the table that takes the name is published, the sweeps are messages --


def published(env: Env) -> list[str] | None:
    value: list[str] | None = env.scalar(
        "SELECT array_agg(prrelid::regclass::text ORDER BY prrelid::regclass::text)"
        " FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid"
        " WHERE p.pubname = 'cdc_invalidator'"
    )
    return value


@pytest.mark.parametrize("swap", [False, True], ids=["drop_and_create", "rename"])
def test_logical_a_rebuilt_table_is_swept_then_published(env: Env, owner: str, swap: bool) -> None:
    env.sql(as_role(owner, "CREATE TABLE users (id int PRIMARY KEY, email text, name text)"))
    env.sql("INSERT INTO users (id, email) VALUES (1, 'u1@x'), (2, 'u2@x')")
    config = logical_config(env, USERS)
    logical_install(config)
    r = env.redis()
    with running(env, config):
        seed(r)
        rebuild_by_copy(
            env, owner, SWAP if swap else "DROP TABLE users; ALTER TABLE users_new RENAME TO users"
        )
        wait_swept(r)  # every row may differ in the copy
        assert published(env) == (["users", "users_old"] if swap else ["users"])
        # The copy's changes are decoded from now on: exact keys, no sweep.
        r.mset({"user:1": "cached", "user:email:U1@X": "1", "user:2": "cached"})
        env.sql(as_role(owner, "UPDATE users SET name = 'x' WHERE id = 1"))
        wait_until(lambda: r.exists("user:1", "user:email:U1@X") == 0, what="the copy's exact keys")
        if not swap:
            # Dropped: its keys go too (the drop asked for a sweep).
            seed(r)
            env.sql(as_role(owner, "DROP TABLE users"))
            wait_swept(r)
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0
    if swap:
        # The configuration is right: install, not an edit of it, follows the newcomer.
        said = check(config)
        assert "is another table than install recorded" in said.stderr, said.stderr
        assert "edit the configuration" not in said.stderr


def test_logical_a_table_rebuilt_partitioned_is_published_with_its_partitions(
    env: Env,
) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
    config = logical_config(env, USERS)
    logical_install(config)
    r = env.redis()
    with running(env, config):
        env.sql(
            "DROP TABLE users;"
            "CREATE TABLE users (id int, email text, name text) PARTITION BY RANGE (id);"
            "CREATE TABLE users_low PARTITION OF users FOR VALUES FROM (0) TO (100)"
        )
        assert published(env) == ["users"]
        # The first change comes from the partition (published under its own name): the
        # listener finds the configured table it belongs to.
        r.mset({"user:1": "cached", "user:email:u1@x": "1", "user:2": "cached"})
        env.sql("INSERT INTO users_low (id, email) VALUES (1, 'u1@x')")
        wait_until(lambda: r.exists("user:1", "user:email:u1@x") == 0, what="the exact keys")
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.dead_letter_v1") == 0


def test_logical_a_rebuild_that_rolls_back_is_not_swept(env: Env, owner: str) -> None:
    env.sql(as_role(owner, "CREATE TABLE users (id int PRIMARY KEY, email text, name text)"))
    config = logical_config(env, USERS)
    logical_install(config)
    r = env.redis()
    with running(env, config):
        seed(r)
        env.sql(
            as_role(
                owner,
                "BEGIN; DROP TABLE users;"
                "CREATE TABLE users (id int PRIMARY KEY, email text, name text); ROLLBACK",
            )
        )
        env.sql("INSERT INTO users (id, email) VALUES (2, 'u2@x')")
        wait_until(lambda: r.exists("user:2") == 0, what="the next change")
        assert r.exists("user:1", "user:email:u1@x") == 2
    assert published(env) == ["users"]
