"""`install` refuses a squatted schema: a role that may create schemas in the database
puts our schema, a table with a trigger of its own, a function or the publication there
before the DBA installs as a superuser. Install must stop before it creates or reuses
anything, name the object and its owner, and leave the squatter's code unrun (the
squatter's trigger here makes it a superuser). Both capture modes, where it applies.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc_invalidator.capture import trigger_sql
from cdc_invalidator.modes.choose import mode_for
from cdc_invalidator.settings import load_settings
from tests.support.config import write_config
from tests.support.env import Env
from tests.support.listener import run_cli
from tests.support.roles import login_role

pytestmark = pytest.mark.usefixtures("capture")

USERS = {"public.users": ["user:{id}", "user:email:{email}"]}

# What install could change, and what a squatter made: compared before and after a
# refused install.
STATE = """
    SELECT 'schema', n.nspname, pg_get_userbyid(n.nspowner),
           coalesce(obj_description(n.oid, 'pg_namespace'), '')
    FROM pg_namespace n WHERE n.nspname = 'cdc_invalidator'
    UNION ALL
    SELECT 'relation', c.relname || ':' || c.relkind::text, pg_get_userbyid(c.relowner),
           (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid)::text
    FROM pg_class c WHERE c.relnamespace = to_regnamespace('cdc_invalidator')
    UNION ALL
    SELECT 'function', p.oid::regprocedure::text, pg_get_userbyid(p.proowner),
           p.prosecdef::text || md5(p.prosrc)
    FROM pg_proc p WHERE p.pronamespace = to_regnamespace('cdc_invalidator')
    UNION ALL
    SELECT 'trigger', tgrelid::regclass::text || ':' || tgname, '', tgfoid::regproc::text
    FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL
    SELECT 'rule', ev_class::regclass::text || ':' || rulename, '', ''
    FROM pg_rewrite WHERE ev_class >= 16384
    UNION ALL
    SELECT 'publication', pubname, pg_get_userbyid(pubowner),
           (SELECT count(*) FROM pg_publication_rel r WHERE r.prpubid = p.oid)::text
    FROM pg_publication p
    UNION ALL
    SELECT 'identity', relname, '', relreplident::text FROM pg_class WHERE relname = 'users'
    ORDER BY 1, 2"""


def state(env: Env) -> list[tuple[Any, ...]]:
    with env.connect() as conn:
        return conn.execute(STATE.encode()).fetchall()


def _role(env: Env, prefix: str, options: LiteralString = "") -> Iterator[str]:
    """A login role, no superuser, that may create schemas (and publications) in the
    test's database."""
    with login_role(env, prefix, options) as role:
        with env.connect() as conn:
            conn.execute(
                sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                    sql.Identifier(conn.info.dbname), sql.Identifier(role)
                )
            )
        yield role


@pytest.fixture
def mallory(env: Env) -> Iterator[str]:
    yield from _role(env, "mallory_")


@pytest.fixture
def alice(env: Env) -> Iterator[str]:
    """The application's table owner, who installs without being a superuser (logical
    mode: with REPLICATION, to create the slot)."""
    yield from _role(env, "alice_", "REPLICATION" if env.logical else "")


@pytest.fixture
def bob(env: Env) -> Iterator[str]:
    yield from _role(env, "bob_")


def as_role(env: Env, role: str) -> psycopg.Connection[Any]:
    return psycopg.connect(make_conninfo(env.dsn, user=role), autocommit=True)


def run_as(env: Env, role: str, statements: str) -> None:
    with as_role(env, role) as conn:
        conn.execute(statements.encode())  # bytes: our own test SQL, many statements


def tables(env: Env, owner: str | None = None) -> None:
    env.sql(
        "CREATE TABLE users (id int PRIMARY KEY, email text);"
        "INSERT INTO users VALUES (1, 'a@x'), (2, 'b@x')"
    )
    if owner is not None:
        env.sql(
            sql.SQL("ALTER TABLE users OWNER TO {}").format(sql.Identifier(owner)).as_string(None)
        )


def config(env: Env, role: str | None = None, name: str = "config.toml") -> Path:
    mode: dict[str, object] = {"capture": "logical"} if env.logical else {}
    url = make_conninfo(env.dsn, user=role) if role else env.dsn
    return write_config(
        env.tmp_path / name, database_url=url, redis_url=env.redis_url, tables=USERS, **mode
    )


def install(env: Env, role: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as the DBA runs it: a process of its own (a superuser unless `role`)."""
    return run_cli("install", "--config", str(config(env, role, f"{role or 'dba'}.toml")))


def is_superuser(env: Env, role: str) -> bool:
    return bool(env.scalar("SELECT rolsuper FROM pg_roles WHERE rolname = %s", [role]))


def assert_refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1, one error line naming the culprit and a hint line, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    error, hint = lines
    assert error.startswith(
        "cdc-invalidator: error: install failed, nothing was changed: "
        "cdc_invalidator: refusing to install: "
    ), error
    assert hint.startswith("hint: "), hint
    for needle in needles:
        assert needle in error, error
    return result.stderr


def superuser(env: Env) -> str:
    return str(env.scalar("SELECT current_user"))


# --- the squats: each as the role that may create schemas --------------------------------

# The queue table as install would make it, with the squatter's trigger that runs in
# the capture function's INSERT, as whoever owns that function.
QUEUE = """
CREATE TABLE cdc_invalidator.queue_v1 (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    schema_name text NOT NULL,
    table_name  text NOT NULL,
    op          text NOT NULL,
    old_row     json,
    new_row     json);
"""
PROMOTE = """
CREATE FUNCTION cdc_invalidator.promote() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    EXECUTE format('ALTER ROLE %I SUPERUSER', '{role}');
    RETURN NULL;
END $f$;
CREATE TRIGGER promote AFTER INSERT ON cdc_invalidator.queue_v1
FOR EACH STATEMENT EXECUTE FUNCTION cdc_invalidator.promote();
"""
WATCH = """
CREATE FUNCTION cdc_invalidator.watch(tbl regclass, key_columns text[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER AS $f$
BEGIN
    EXECUTE format('ALTER ROLE %I SUPERUSER', '{role}');
END $f$;
"""
# A function install itself creates (CREATE OR REPLACE), the one bulk_sweep_rows added:
# replaced by a superuser, it would keep its owner, who could change it later.
BULK_SWEEP = """
CREATE FUNCTION cdc_invalidator.queue_bulk_sweep_v1(names text, bulk_sweep_rows integer)
RETURNS text LANGUAGE sql AS $f$ SELECT 'ALTER ROLE {role} SUPERUSER' $f$;
"""
RULE = """
CREATE RULE keep_a_copy AS ON INSERT TO cdc_invalidator.queue_v1
DO ALSO NOTIFY mallory_listens;
"""

# name -> (the squatter's SQL, what else the error line's detail names)
SQUATS = {
    "schema": ("CREATE SCHEMA cdc_invalidator;", []),
    "queue_with_trigger": (
        "CREATE SCHEMA cdc_invalidator;" + QUEUE + PROMOTE,
        [
            'table cdc_invalidator.queue_v1 (role "{role}")',
            'function cdc_invalidator.promote() (role "{role}")',
            "trigger promote on table cdc_invalidator.queue_v1 "
            '(calling cdc_invalidator.promote() of role "{role}")',
        ],
    ),
    "watch": (
        "CREATE SCHEMA cdc_invalidator;" + WATCH,
        ['function cdc_invalidator.watch(regclass,text[]) (role "{role}")'],
    ),
    # The NOTIFY payloads' channel, its name the squatter's: it would read them.
    "payload_channel": (
        "CREATE SCHEMA cdc_invalidator;"
        "CREATE TABLE cdc_invalidator.payload_channel_v1 (singleton boolean PRIMARY KEY"
        " DEFAULT true CHECK (singleton), channel text NOT NULL);"
        "INSERT INTO cdc_invalidator.payload_channel_v1 VALUES (true, 'known_to_mallory');",
        ['table cdc_invalidator.payload_channel_v1 (role "{role}")'],
    ),
    "rule": (
        "CREATE SCHEMA cdc_invalidator;" + QUEUE + RULE,
        [
            'table cdc_invalidator.queue_v1 (role "{role}")',
            "rule keep_a_copy on table cdc_invalidator.queue_v1",
        ],
    ),
}


@pytest.mark.parametrize("squat", list(SQUATS))
def test_install_refuses_a_squatted_schema(env: Env, mallory: str, squat: str) -> None:
    tables(env)
    statements, also = SQUATS[squat]
    run_as(env, mallory, statements.replace("{role}", mallory))
    before = state(env)

    result = install(env)

    stderr = assert_refused(
        result,
        f'schema cdc_invalidator is owned by role "{mallory}", '
        f'not by the installing role "{superuser(env)}" '
        "(drop or reassign it after checking what it does)",
    )
    detail = stderr.partition("(Also: ")[2]
    for needle in also:  # the rest, in the same line's detail
        assert needle.replace("{role}", mallory) in detail, stderr
    assert f'REASSIGN OWNED BY "{mallory}"' in stderr
    assert state(env) == before, "nothing created, nothing reused"
    # An application write, as the superuser: nothing of the squatter's runs.
    env.sql("INSERT INTO users VALUES (3, 'c@x'); UPDATE users SET email = 'd@x'")
    assert not is_superuser(env, mallory)


@pytest.mark.parametrize("capture", ["trigger"])  # logical mode's writes do not touch the queue
def test_without_the_guard_the_squatted_queue_would_promote_its_owner(
    env: Env, mallory: str
) -> None:
    """The control: the queue squat above is a real attack. The same install script
    without its guard succeeds, and the next write makes the squatter a superuser."""
    tables(env)
    statements, _ = SQUATS["queue_with_trigger"]
    run_as(env, mallory, statements.replace("{role}", mallory))
    settings = load_settings(config(env))
    script = trigger_sql.render(mode_for(settings).install_script())
    guard = trigger_sql.render(trigger_sql.guard(None))
    assert guard in script
    unguarded = script.replace(guard, "")
    with env.connect() as conn, conn.transaction():
        conn.execute(unguarded.encode())
    env.sql("UPDATE users SET email = 'd@x' WHERE id = 1")
    assert is_superuser(env, mallory)
    env.sql(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(mallory)).as_string(None))


@pytest.mark.parametrize(
    ("definition", "function"),
    [(WATCH, "watch(regclass,text[])"), (BULK_SWEEP, "queue_bulk_sweep_v1(text,integer)")],
    ids=["watch", "queue_bulk_sweep_v1"],
)
def test_install_refuses_a_function_put_into_a_schema_prepared_for_it(
    env: Env, mallory: str, definition: str, function: str
) -> None:
    """The DBA made the schema and let another role create in it: the function that
    role put there is named, not the schema."""
    tables(env)
    env.sql(
        sql.SQL("CREATE SCHEMA cdc_invalidator; GRANT CREATE ON SCHEMA cdc_invalidator TO {}")
        .format(sql.Identifier(mallory))
        .as_string()
    )
    run_as(env, mallory, definition.replace("{role}", mallory))
    before = state(env)

    result = install(env)

    assert_refused(
        result,
        f"function cdc_invalidator.{function} is owned by role "
        f'"{mallory}", not by the installing role "{superuser(env)}"',
    )
    assert state(env) == before
    env.sql("INSERT INTO users VALUES (3, 'c@x')")
    assert not is_superuser(env, mallory)


@pytest.mark.parametrize("capture", ["logical"])  # trigger mode reuses no publication
def test_logical_install_refuses_a_publication_of_another_role(env: Env, mallory: str) -> None:
    tables(env)
    run_as(env, mallory, "CREATE PUBLICATION cdc_invalidator")
    before = state(env)

    result = install(env)

    assert_refused(
        result,
        f'publication cdc_invalidator is owned by role "{mallory}", '
        f'not by the installing role "{superuser(env)}"',
    )
    assert state(env) == before
    slots = "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
    assert env.scalar(slots) == 0, "no slot either"


def test_install_refuses_triggers_and_policies_on_its_own_tables(env: Env) -> None:
    """Even made by a superuser: install attaches nothing to our tables, and whatever
    is attached runs in the application's writes."""
    tables(env)
    assert install(env).returncode == 0
    env.sql(
        "CREATE FUNCTION public.audit() RETURNS trigger LANGUAGE plpgsql AS "
        "$f$ BEGIN RETURN NULL; END $f$;"
        "CREATE TRIGGER audit AFTER INSERT ON cdc_invalidator.dead_letter_v1 "
        "FOR EACH STATEMENT EXECUTE FUNCTION public.audit();"
        "CREATE POLICY hide ON cdc_invalidator.watched_v1 USING (false)"
    )
    before = state(env)

    result = install(env)

    stderr = assert_refused(
        result,
        "table cdc_invalidator.dead_letter_v1 carries trigger audit calling public.audit() "
        f'of role "{superuser(env)}", which install does not create '
        "(drop it after checking what it does)",
    )
    assert "(Also: policy hide on table cdc_invalidator.watched_v1.)" in stderr
    assert "DROP TRIGGER" in stderr
    assert state(env) == before


# --- who may install again ----------------------------------------------------------------


def test_clean_install_then_second_install_succeed(env: Env) -> None:
    tables(env)
    first = install(env)
    assert first.returncode == 0, first.stderr
    before = state(env)
    second = install(env)
    assert second.returncode == 0, second.stderr
    assert state(env) == before


def test_table_owner_installs_without_superuser_and_only_it_may_again(
    env: Env, alice: str, bob: str
) -> None:
    tables(env, owner=alice)
    first = install(env, alice)
    assert first.returncode == 0, first.stderr
    assert (
        env.scalar(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'cdc_invalidator'"
        )
        == alice
    )
    installed = state(env)
    again = install(env, alice)
    assert again.returncode == 0, again.stderr
    assert state(env) == installed
    # Its capture works.
    with as_role(env, alice) as conn:
        conn.execute("UPDATE users SET email = 'z@x' WHERE id = 1")
    if not env.logical:
        assert env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") == 1

    # Another plain role, and a superuser, are refused: the objects are alice's.
    for role, name in ((bob, bob), (None, superuser(env))):
        stderr = assert_refused(
            install(env, role),
            f'schema cdc_invalidator is owned by role "{alice}", '
            f'not by the installing role "{name}"',
        )
        assert f'run install as "{alice}"' in stderr
        assert state(env) == installed


@pytest.mark.parametrize("capture", ["trigger"])  # logical mode has no capture functions
def test_a_member_of_the_tables_owner_installs_without_superuser(
    env: Env, alice: str, bob: str
) -> None:
    """docs/DBA.md: install runs as the tables' owner, a member of it, or a superuser.
    As a member (alice, of bob who owns the table), giving the capture function to bob
    failed with "permission denied for schema cdc_invalidator": a function's new owner
    needs CREATE on its schema. Bob gets it for that ALTER only, never after."""
    tables(env, owner=bob)
    env.sql(
        sql.SQL("GRANT {} TO {}").format(sql.Identifier(bob), sql.Identifier(alice)).as_string(None)
    )
    first = install(env, alice)
    assert first.returncode == 0, first.stderr
    oid = env.scalar("SELECT 'users'::regclass::oid")
    assert (
        env.scalar(
            f"SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE proname = 'capture_{oid}_v1'"
        )
        == bob
    )
    with env.connect() as conn:
        assert conn.execute(
            "SELECT has_schema_privilege(%s, 'cdc_invalidator', 'CREATE'),"
            " has_schema_privilege(%s, 'cdc_invalidator', 'USAGE'),"
            " has_schema_privilege(%s, 'cdc_invalidator', 'CREATE')",
            [bob, bob, alice],
        ).fetchone() == (False, True, True)
    assert install(env, alice).returncode == 0  # again: nothing refused, nothing granted
    with as_role(env, bob) as conn:
        conn.execute("UPDATE users SET email = 'z@x' WHERE id = 1")
    assert env.scalar("SELECT count(*) FROM cdc_invalidator.queue_v1") == 1


@pytest.mark.parametrize("capture", ["trigger"])  # logical mode has no capture functions
def test_a_capture_function_may_belong_to_its_tables_owner(env: Env, alice: str, bob: str) -> None:
    """Trigger mode may give each table's capture function to the table's owner:
    install accepts that owner, and no other."""
    tables(env)
    assert install(env).returncode == 0
    oid = env.scalar("SELECT 'users'::regclass::oid")
    capture = f"cdc_invalidator.capture_{oid}_v1"

    def give(owner: str) -> None:
        env.sql(
            sql.SQL("ALTER FUNCTION {}() OWNER TO {}")
            .format(sql.SQL(capture), sql.Identifier(owner))
            .as_string(None)
        )

    env.sql(sql.SQL("ALTER TABLE users OWNER TO {}").format(sql.Identifier(alice)).as_string(None))
    give(alice)
    result = install(env)
    assert result.returncode == 0, result.stderr

    give(bob)
    assert_refused(
        install(env),
        f'function {capture}() is owned by role "{bob}", '
        f'not by the installing role "{superuser(env)}"',
    )


# --- the script a DBA reviews ---------------------------------------------------------------


def test_sql_output_starts_with_the_guard_and_psql_refuses_too(env: Env, mallory: str) -> None:
    tables(env)
    shown = run_cli("sql", "--config", str(config(env)))
    assert shown.returncode == 0, shown.stderr
    script = shown.stdout
    pinned = script.index("SET LOCAL search_path = pg_catalog, pg_temp;")
    assert pinned < script.index("DO $guard$") < script.index("CREATE SCHEMA IF NOT EXISTS")
    before_pin = script[:pinned].splitlines()
    assert all(line == "" or line.startswith("--") for line in before_pin), "nothing runs first"

    run_as(env, mallory, "CREATE SCHEMA cdc_invalidator;")
    before = state(env)
    result = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-d", env.dsn],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "refusing to install: schema cdc_invalidator is owned by role" in result.stderr
    assert "HINT:" in result.stderr
    assert state(env) == before


def test_uninstall_refuses_a_function_another_role_put_in_our_schema(
    env: Env, mallory: str
) -> None:
    """Uninstall calls our unwatch(): a squatter's would run with the uninstaller's
    rights. It starts with the same guard as install, and stops."""
    tables(env)
    assert install(env).returncode == 0
    env.sql(
        sql.SQL("GRANT CREATE ON SCHEMA cdc_invalidator TO {}")
        .format(sql.Identifier(mallory))
        .as_string()
    )
    run_as(
        env,
        mallory,
        "CREATE FUNCTION cdc_invalidator.unwatch_v0() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    )
    before = state(env)

    result = run_cli("uninstall", "--config", str(config(env, None, "dba.toml")))

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "refusing to uninstall: function cdc_invalidator.unwatch_v0() is owned by role" in (
        result.stderr
    )
    assert state(env) == before
