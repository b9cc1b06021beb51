"""A key column whose type has a cast to text of its own (CREATE CAST ... WITH FUNCTION):
a key renders as `::text` gives it (docs/configuration.md), which runs that function.
Trigger mode's capture function does; logical mode receives the type's output function's
text from pgoutput and cannot run the function (it would run as the listener's role),
so it deleted another key than the app's and left the app's cached. Its changes are
swept instead: a cold cache, never a stale one. Both modes, real servers.
"""

from __future__ import annotations

import psycopg
import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import listening, run_cli
from tests.support.sync import install, keys, settle

pytestmark = [pytest.mark.servers, pytest.mark.usefixtures("capture")]


def test_a_key_of_a_type_with_its_own_text_cast_is_never_left_cached(env: Env) -> None:
    """Reproduced before the fix: an enum `mood` with a cast to text giving `M_happy`;
    the app caches `en:M_happy` (`en::text`), and also under a domain over the enum
    (casts apply to a domain's base type). Trigger mode deleted `en:M_happy`; logical
    mode deleted `en:happy` and left `en:M_happy` cached."""
    env.sql(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');"
        "CREATE FUNCTION mood_text(mood) RETURNS text LANGUAGE sql IMMUTABLE"
        " SET search_path = pg_catalog AS $$ SELECT 'M_' || enum_out($1)::text $$;"
        "CREATE CAST (mood AS text) WITH FUNCTION mood_text(mood);"
        "CREATE DOMAIN dmood AS mood;"
        "CREATE TABLE k (id int PRIMARY KEY, en mood, dm dmood);"
        "INSERT INTO k VALUES (1, 'happy', 'sad'), (2, 'sad', 'sad');"
        "CREATE TABLE other (id int PRIMARY KEY)"
    )
    config = install(env, {"public.k": ["en:{en}", "dm:{dm}:{id}"], "public.other": ["other:{id}"]})
    assert env.scalar("SELECT en::text FROM k WHERE id = 1") == "M_happy"
    r = env.redis()
    r.mset({"en:M_happy": "-", "dm:M_sad:1": "-", "en:M_sad": "-", "other:1": "-"})
    with listening(config):
        env.sql("UPDATE k SET id = 3 WHERE id = 1")
        settle(env, r)
    left = keys(r)
    assert "en:M_happy" not in left
    assert "dm:M_sad:1" not in left
    assert "other:1" in left  # another table's keys stay


@pytest.mark.parametrize("capture", ["trigger"])
def test_install_refuses_a_text_cast_that_would_fail_under_the_pinned_search_path(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reproduced before the fix: a cast to text whose SQL function calls `mood_label()`
    of public without naming the schema. `install` succeeded, and then every write to the
    table failed: "function mood_label(public.mood) does not exist" (the capture function
    runs with search_path = pg_catalog, pg_temp). install refuses it now, naming the
    function; with a search_path of its own the function works, and its key goes."""
    env.sql(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');"
        "CREATE FUNCTION mood_label(mood) RETURNS text LANGUAGE sql IMMUTABLE"
        " AS $$ SELECT 'M_' || pg_catalog.enum_out($1)::text $$;"
        "CREATE FUNCTION mood_text(mood) RETURNS text LANGUAGE sql IMMUTABLE"
        " AS $$ SELECT mood_label($1) $$;"
        "CREATE CAST (mood AS text) WITH FUNCTION mood_text(mood);"
        "CREATE DOMAIN dmood AS mood; CREATE DOMAIN ddmood AS dmood;"
        "CREATE TABLE k (id int PRIMARY KEY, en mood, dd ddmood);"
        "CREATE TABLE sync (id int PRIMARY KEY);"
        "INSERT INTO k VALUES (1, 'happy', 'sad')"
    )
    config = env.config({"public.k": ["en:{en}"], "public.sync": ["sync:{id}"]})
    capsys.readouterr()
    # A domain over a domain over the type: its cast too (PostgreSQL casts the base type).
    only_dd = env.config({"public.k": ["dd:{dd}"], "public.sync": ["sync:{id}"]}, name="dd.toml")
    assert main(["install", "--config", str(only_dd)]) == 1
    assert "has columns dd (of type public.ddmood, which" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["install", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "table public.k has columns en (of type public.mood, which" in err, err
    assert "public.mood_text(public.mood) casts to text)" in err, err
    env.sql("UPDATE k SET id = 2")  # nothing installed: writes go on
    env.sql("ALTER FUNCTION mood_text(mood) SET search_path = public, pg_catalog")
    assert main(["install", "--config", str(config)]) == 0
    r = env.redis()
    r.set("en:M_happy", "-")
    with listening(config):
        env.sql("UPDATE k SET id = 3")
        settle(env, r)
    assert r.exists("en:M_happy") == 0


@pytest.mark.parametrize("capture", ["trigger"])
def test_check_names_a_text_cast_made_since_install_that_fails_writes(env: Env) -> None:
    """The cast of the test above, made after install: every write to the table fails
    ("function mood_label(public.mood) does not exist"), and check said all was well.
    It names the column and the function to pin."""
    env.sql(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');"
        "CREATE TABLE k (id int PRIMARY KEY, en mood);"
        "INSERT INTO k VALUES (1, 'happy')"
    )
    config = install(env, {"public.k": ["en:{en}"]})
    assert run_cli("check", "--config", str(config)).returncode == 0
    env.sql(
        "CREATE FUNCTION mood_label(mood) RETURNS text LANGUAGE sql IMMUTABLE"
        " AS $$ SELECT 'M_' || pg_catalog.enum_out($1)::text $$;"
        "CREATE FUNCTION mood_text(mood) RETURNS text LANGUAGE sql IMMUTABLE"
        " AS $$ SELECT mood_label($1) $$;"
        "CREATE CAST (mood AS text) WITH FUNCTION mood_text(mood);"
    )
    with pytest.raises(psycopg.errors.UndefinedFunction):
        env.sql("UPDATE k SET id = 2")
    said = run_cli("check", "--config", str(config))
    assert said.returncode == 1, said.stderr
    assert "column en is of type public.mood, which public.mood_text(public.mood)" in said.stderr
    env.sql("ALTER FUNCTION mood_text(mood) SET search_path = public, pg_catalog")
    env.sql("UPDATE k SET id = 2")
    assert run_cli("check", "--config", str(config)).returncode == 0


@pytest.mark.parametrize("capture", ["logical"])
def test_check_warns_that_a_text_cast_key_is_swept_in_logical_mode(env: Env) -> None:
    """Logical mode sweeps each change of a table keyed by such a type (above): check
    says so, as it does for generated key columns, rather than report the table fine."""
    env.sql(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');"
        "CREATE FUNCTION mood_text(mood) RETURNS text LANGUAGE sql IMMUTABLE"
        " SET search_path = pg_catalog AS $$ SELECT 'M_' || enum_out($1)::text $$;"
        "CREATE CAST (mood AS text) WITH FUNCTION mood_text(mood);"
        "CREATE TABLE k (id int PRIMARY KEY, en mood)"
    )
    config = install(env, {"public.k": ["en:{en}"]})
    said = run_cli("check", "--config", str(config))
    out = said.stdout + said.stderr
    said_so = (
        "key column en of public.k is of type public.mood, which "
        "public.mood_text(public.mood) casts to text"
    )
    assert said_so in out, out
