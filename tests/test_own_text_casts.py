"""A key column whose type has a cast to text of its own (CREATE CAST ... WITH FUNCTION):
a key renders as `::text` gives it (docs/configuration.md), which runs that function.
Trigger mode's capture function does; logical mode receives the type's output function's
text from pgoutput and cannot run the function (it would run as the listener's role),
so it deleted another key than the app's and left the app's cached. Its changes are
swept instead: a cold cache, never a stale one. Both modes, real servers.
"""

from __future__ import annotations

import pytest

from tests.support.env import Env
from tests.support.listener import listening
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
        " AS $$ SELECT 'M_' || pg_catalog.enum_out($1)::text $$;"
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
