"""The demo's story, scene by scene: an app caching rows, an admin editing them in psql,
and what the listener does about it, timed from COMMIT to the key being gone."""

from __future__ import annotations

import json
import statistics
import time

from cdc_invalidator.demo.actors import Read
from cdc_invalidator.demo.common import DemoError, ms, say
from cdc_invalidator.demo.stage import TEMPLATES, USERS, Cast, Stage
from cdc_invalidator.modes.choose import mode_for

# Single-row updates timed for the closing figures.
TIMED_UPDATES = 100


class Demo:
    def __init__(self, capture: str = "trigger") -> None:
        self.stage = Stage(capture)

    def run(self) -> None:
        say(
            "cdc-invalidator demo: a throwaway PostgreSQL and Redis, a users table, the "
            "listener,\nan app that caches rows in Redis and an admin who edits them in psql."
        )
        say()
        cast = self.stage.setup()
        say(f"Config ({self.stage.config_path()}):")
        say('    [tables."public.users"]')
        say(f"    keys = {json.dumps(TEMPLATES)}")
        say(mode_for(cast.settings).installs)
        say("The listener is running (in a thread here; `cdc-invalidator run` in production).")
        self._scene_cache_aside(cast)
        self._scene_admin_update(cast)
        self._scene_email_change(cast)
        self._scene_rollback(cast)
        self._scene_truncate(cast)
        self._scene_timed_updates(cast)
        self.stage.stop_listener()
        runner = cast.runner
        say()
        say(
            f"The listener processed {runner.events_processed} events and deleted "
            f"{runner.keys_deleted} keys that existed; {runner.dead_letters} dead letters."
        )

    def cleanup(self, keep: bool) -> None:
        """Stop and remove everything started, whatever state the run ended in."""
        self.stage.cleanup(keep)

    # -- the scenes -----------------------------------------------------------------

    def _scene_cache_aside(self, cast: Cast) -> None:
        _section("1. The app reads user 1, cache-aside")
        _show_read(cast.app.read_user(1))
        _show_read(cast.app.read_user(1))

    def _scene_admin_update(self, cast: Cast) -> None:
        _section("2. An admin fixes the name in psql, behind the app's back")
        psql, cache, app = cast.psql, cast.cache, cast.app
        psql.run("BEGIN")
        psql.run("UPDATE users SET name = 'Ada Lovelace' WHERE id = 1")
        if cache.exists("user:1") != 1:
            raise DemoError("user:1 was deleted before COMMIT")
        say("    -- user:1 is still cached: nothing is invalidated before COMMIT")
        committed = psql.run("COMMIT")
        gone = self.stage.deletes().wait(["user:1"], committed)
        say(f"  => user:1 deleted {ms(gone['user:1'] - committed)} after COMMIT was sent.")
        read = app.read_user(1)
        _show_read(read)
        if read.hit or read.value is None or read.value["name"] != "Ada Lovelace":
            raise DemoError(f"the app did not read the new name: {read}")
        say("  The app serves the new name: no stale cache, and the app changed nothing.")

    def _scene_email_change(self, cast: Cast) -> None:
        _section("3. The email changes: the old email's key must go too")
        psql, app = cast.psql, cast.app
        found = app.user_id_by_email("ada@lovelace.dev")
        say(f'  The app looked up ada@lovelace.dev: no such user, cached as "{found}".')
        keys = ["user:1", "user:email:ada@example.com", "user:email:ada@lovelace.dev"]
        _show_cached(cast, keys)
        sent = psql.run("UPDATE users SET email = 'ada@lovelace.dev' WHERE id = 1")
        times = self.stage.deletes().wait(keys, sent)
        say(
            "  => all three deleted (the old row's keys and the new row's), the last "
            f"{ms(max(times.values()) - sent)}\n     after the statement was sent."
        )
        if app.user_id_by_email("ada@lovelace.dev") != "1":
            raise DemoError("the lookup by the new email did not find user 1")
        say("  The app's lookup of ada@lovelace.dev now finds user 1.")

    def _scene_rollback(self, cast: Cast) -> None:
        _section("4. A change that rolls back invalidates nothing")
        psql, cache, app = cast.psql, cast.cache, cast.app
        app.read_user(2)
        app.read_user(3)
        psql.run("BEGIN")
        psql.run("UPDATE users SET name = 'Oops' WHERE id = 2")
        psql.run("ROLLBACK")
        sent = psql.run("UPDATE users SET name = 'Edsger W. Dijkstra' WHERE id = 3")
        self.stage.deletes().wait(["user:3"], sent)
        if cache.exists("user:2") != 1:
            raise DemoError("user:2 was deleted by a rolled-back UPDATE")
        say("  => user:3 deleted; user:2 is still cached, as it should be.")

    def _scene_truncate(self, cast: Cast) -> None:
        _section("5. TRUNCATE: no rows to name, so each template is swept as a glob")
        psql, cache, app = cast.psql, cast.cache, cast.app
        for user_id, _email, _name in USERS:
            app.read_user(user_id)
        cache.set("session:42", "not ours")
        ours = sorted(str(k) for k in cache.scan_iter(match="user:*"))
        say(f"  Cached: {len(ours)} user keys, and session:42 (not a users key).")
        sent = psql.run("TRUNCATE users")
        times = self.stage.deletes().wait(ours, sent)
        # Done, not only its keys deleted: a sweep tried again (a Redis timeout on a
        # loaded machine) could delete a key the next scene caches, and the listener's
        # delete of it would then find nothing to delete and send no keyspace event.
        self.stage.until(lambda: cast.runner.sweeper.pending == 0, "the TRUNCATE's sweep")
        if cache.exists("session:42") != 1:
            raise DemoError("session:42 was swept with the users keys")
        say(
            f"  => SCAN + UNLINK of user:* and user:email:* deleted all {len(ours)} within "
            f"{ms(max(times.values()) - sent)};\n     session:42 is untouched."
        )

    def _scene_timed_updates(self, cast: Cast) -> None:
        _section(f"6. {TIMED_UPDATES} more single-row updates, each timed from its COMMIT")
        conn, cache = cast.psql.connection, cast.cache
        # A cached "no such user" that the INSERT must delete: once it is gone, the
        # listener has caught up (changes are processed in commit order). Seen gone
        # through the keyspace watch, the clock every wait below reads, not by EXISTS:
        # the watch stamps a delete as its thread reads the notification, which may be
        # after EXISTS found the key gone. The first update's wait then took the
        # INSERT's delete for its own, and each later one its predecessor's.
        cache.set("user:1", "-")
        sent = time.perf_counter()
        conn.execute("INSERT INTO users VALUES (%s, %s, %s)", USERS[0])
        self.stage.deletes().wait(["user:1"], sent)
        lags: list[float] = []
        for i in range(TIMED_UPDATES):
            cache.set("user:1", "cached")
            conn.execute("BEGIN")
            conn.execute("UPDATE users SET name = %s WHERE id = 1", (f"Ada #{i}",))
            committed = time.perf_counter()
            conn.execute("COMMIT")
            lags.append(self.stage.deletes().wait(["user:1"], committed)["user:1"] - committed)
        lags.sort()
        p99 = lags[min(len(lags) - 1, round(0.99 * (len(lags) - 1)))]
        say(
            f"  COMMIT -> key deleted: p50 {ms(statistics.median(lags))}, p99 {ms(p99)}, "
            f"max {ms(lags[-1])}."
        )
        say(f"  {mode_for(cast.settings).delivery}")


def _section(title: str) -> None:
    say()
    say(f"== {title}")


def _show_read(read: Read) -> None:
    if read.hit:
        say(f"    GET {read.key}  -> hit: {json.dumps(read.value)}")
        return
    say(f"    GET {read.key}  -> (nil), a miss")
    if read.value is None:
        say("    SELECT ... FROM users  -> no row")
        return
    query = "SELECT id, email, name FROM users WHERE id = "
    say(f"    {query}{read.value['id']}  -> {read.value['name']!r}")
    say(f"    SET {read.key}, SET user:email:{read.value['email']}  (cache refilled)")


def _show_cached(cast: Cast, keys: list[str]) -> None:
    values = cast.cache.mget(keys)
    say("  Cached now:")
    for key, value in zip(keys, values, strict=True):
        say(f"    {key} = {value!r}")
