"""Delete keys from Redis: pipelined UNLINK for keys, SCAN + UNLINK for patterns (all of
them in one SCAN pass, matched on our side where MATCH cannot: sink/glob.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from itertools import islice

import redis
from redis.exceptions import NoPermissionError
from redis.sentinel import SentinelConnectionPool

from cdc_invalidator.mapping import Invalidation, Routed
from cdc_invalidator.sink.connect import MasterWatch, other_db
from cdc_invalidator.sink.glob import GlobSet
from cdc_invalidator.sink.oversize import bulk_limit, storable, too_long
from cdc_invalidator.sink.protocol import (
    NO_KEY,
    REDIS_ERRORS,
    Persistence,
    ServerState,
    as_text,
    identity_of,
)
from cdc_invalidator.sink.refused import keys_of, refused
from cdc_invalidator.sink.scan_pass import ServerSweep
from cdc_invalidator.sink.slots import Key, pack_unlinks

# What persistence() reads: how much of the server's data a restart can lose.
PERSISTENCE_SETTINGS = ("appendonly", "appendfsync", "save")
# Calls of delete_routed(later=True) whose replies may be unread on return: with one,
# the loop waits for Redis to finish a share before it prepares the one after next.
OWED_SENDS = 2


class RedisSink:
    def __init__(
        self,
        client: redis.Redis,
        *,
        unlink_chunk: int = 500,
        scan_count: int = 1000,
        follow_master: MasterWatch | None = None,
    ):
        self._client = client
        # Shared by every sink of the process (listener.py); a no-op without Sentinel.
        self._follow_master = follow_master or MasterWatch()
        self._follow_master.add(client)
        self._unlink_chunk = unlink_chunk
        self._scan_count = scan_count
        self._dbs: dict[int, RedisSink] = {}  # other logical databases (redis_db)
        self._kept = KeptConnection(client.connection_pool)
        # UNLINKs sent on the kept connection whose replies are read by a later send
        # (delete_routed(later=True)), a list per call, oldest first; `_resend`: that
        # connection failed since, so they go again (UNLINK is idempotent) on the next.
        self._owed: list[list[bytes]] = []
        self._resend = False
        self._last_refused: set[Key] = set()  # by the ACL, at the last NOPERM (_refused)

    @property
    def client(self) -> redis.Redis:
        return self._client

    def for_db(self, db: int | None) -> RedisSink:
        """The same server's logical database `db` (None: this one), same settings."""
        if db is None:
            return self
        sink = self._dbs.get(db)
        if sink is None:
            sink = self._dbs[db] = RedisSink(
                other_db(self._client, db),
                unlink_chunk=self._unlink_chunk,
                scan_count=self._scan_count,
                follow_master=self._follow_master,
            )
        return sink

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        """delete() for each Redis database's share; how many keys existed.

        `later`: Redis may confirm these deletes with a later call's (Sink.delete_routed):
        they are sent, and their replies read by a later send on the same connection
        (OWED_SENDS), which sends them again if that connection failed meanwhile. The
        count is then of the deletes confirmed by this call, whichever batch's they were."""
        existed = sum(
            self.for_db(db).delete(work, later=later) for db, work in works.items() if work
        )
        if not later:
            existed += sum(sink.confirm() for sink in (self, *self._dbs.values()))
        return existed

    def sweep_routed(self, works: Routed, stopped: Callable[[], bool] | None = None) -> int:
        """sweep() of each Redis database's patterns, all again if the server is another
        once they are done: a pass checks its own server as it ends, but one that ended
        before the sentinels named a new master, beside one that saw it, left the first
        database's deletes on the old master (a review: a TRUNCATE of two tables routed
        to two databases, its batch acknowledged)."""
        swept = [(db, work.patterns) for db, work in works.items() if work.patterns]
        if len(swept) <= 1:  # (one pass: it checks its own server as it ends)
            return sum(self.for_db(db).sweep(patterns, stopped) for db, patterns in swept)
        while True:
            server = self.identity()
            existed = sum(self.for_db(db).sweep(patterns, stopped) for db, patterns in swept)
            if self.identity() == server:
                return existed

    def delete(self, work: Invalidation, later: bool = False) -> int:
        """Delete every key and every key matching a pattern; return how many existed.

        Returns only once Redis confirmed all of it (but with `later`, see
        delete_routed()): the caller acknowledges after.
        """
        self._follow_master()
        deleted = self.unlink(work.keys, later=later)
        if work.patterns:
            deleted += self.sweep(work.patterns)
        return deleted

    def unlink(self, keys: Collection[str | bytes], later: bool = False) -> int:
        """UNLINK every key, `unlink_chunk` per command, all commands sent at once; how
        many existed. Returns once Redis confirmed every command (`later`: see
        delete_routed()).

        Straight on a pooled connection, not through redis-py's command machinery: for
        the small batches of a busy database, its per-command bookkeeping (pool, retry
        wrapper, argument encoding, observability hooks) cost more CPU than the UNLINK
        (profiled under pgbench, 2 writers, ~3,000 changes/s: 28% of the listener's CPU
        was redis-py's, for one UNLINK of ~30 keys per batch).
        """
        if not keys:
            return 0
        # Packed by sink/slots.py (C where built): 0.3 ms for a batch of 10,000 keys,
        # where hiredis.pack_command took 1.5 ms.
        commands = [pack_unlinks([chunk]) for chunk in _chunks(keys, self._unlink_chunk)]
        if any(too_long(command) for command in commands):
            keys = storable(keys, bulk_limit(self._client), self._client)
            commands = [pack_unlinks([chunk]) for chunk in _chunks(keys, self._unlink_chunk)]
        try:
            try:
                return self._send(commands, later)
            except (redis.ConnectionError, redis.TimeoutError):
                # One immediate retry, as the client is configured for: a pooled
                # connection that died with a Redis restart. UNLINK is idempotent.
                return self._send(commands, later)
        except NoPermissionError as exc:
            raise self._named(exc, keys) from exc

    def _named(self, exc: NoPermissionError, keys: Collection[Key]) -> NoPermissionError:
        """`exc` naming the keys refused among `keys` and those of the UNLINKs still
        owed (sent with `later`: the refusal read may be one of theirs)."""
        owed = [key for sent in self._owed for command in sent for key in keys_of(command)]
        return refused(exc, self._refused([*owed, *keys]))

    def _refused(self, keys: Collection[Key]) -> list[Key]:
        """Which of `keys` the ACL refuses, UNLINKed alone `unlink_chunk` at a time
        (what it allows is deleted meanwhile) until a chunk holds one: those of that
        chunk. The keys refused last time go first, so a batch retried while the ACL is
        not fixed tries one chunk (a batch of 10,000 keys tried whole every retry cost
        8% of a core and 10,000 UNLINKs a second while it waited). None where that
        cannot be told (Redis failing again)."""
        last = self._last_refused
        ordered = [k for k in keys if k in last] + [k for k in keys if k not in last]
        for chunk in _chunks(ordered, self._unlink_chunk):
            pipe = self._client.pipeline(transaction=False)
            for key in chunk:
                pipe.unlink(key)
            try:
                replies = pipe.execute(raise_on_error=False)
            except REDIS_ERRORS:
                return []
            found = [key for key, reply in zip(chunk, replies, strict=True) if _refusal(reply)]
            if found:
                self._last_refused = set(found)
                return found
        return []

    def confirm(self) -> int:
        """Read the replies of UNLINKs sent with `later` (sending them again first if
        their connection failed); how many of their keys existed."""
        if not self._owed:
            return 0
        try:
            return self._send([])
        except NoPermissionError as exc:
            raise self._named(exc, ()) from exc

    def _send(self, commands: list[bytes], later: bool = False) -> int:
        """Send packed UNLINKs on one connection (the loop's own, or a pooled one) and
        sum their replies, and those of the UNLINKs owed before them.

        `later` (on the loop's own connection only): their replies are left unread, up
        to OWED_SENDS calls' worth, the oldest read first. Thus Redis works on one
        batch's deletes while the loop prepares the next (a streamed transaction's 2M
        keys handed out: 3.1-3.9 s with each batch confirmed before the next was
        prepared, 2.1-2.6 s overlapped, which is Redis's own CPU for them on this 2-vCPU
        VM)."""
        pool = self._client.connection_pool
        conn = self._kept.get()
        pooled = conn is None
        if conn is None:
            conn = pool.get_connection()
        # Replies owed on the kept connection (none on a pooled one): read first, since
        # they were sent first, or the UNLINKs sent again if the connection failed, or
        # was closed by another hand, since.
        owed = [] if pooled else [command for sent in self._owed for command in sent]
        resend = bool(owed) and (self._resend or not conn.is_connected)
        try:
            # One write for all of them (redis-py writes each item of a list on its own:
            # 20 send calls for a batch of 10,000 keys; joined, 445 -> 345 us of CPU per
            # batch in a loop against a local Redis, the same wall time). A disconnected
            # connection connects again here. No health check (a PING when it was idle
            # for the client's health_check_interval) while replies are owed on it: it
            # would read one of them as its PONG.
            payload = owed + commands if resend else commands
            if payload:
                conn.send_packed_command(
                    [b"".join(payload)], check_health=resend or not owed
                )  # (a list: bytes would iterate)
            # An error reply raises (ResponseError), leaving the replies after it unread.
            if pooled:
                return sum(int(conn.read_response()) for _ in commands)
            if commands:
                self._owed.append(commands)
            self._resend = False
            return self._read_owed(conn, OWED_SENDS if later else 0)
        except BaseException:
            conn.disconnect()  # nothing of it is left to read: a clean start next time
            if not pooled and commands and self._owed and self._owed[-1] is commands:
                del self._owed[-1]  # (this call's own: its caller sends them again)
            if not pooled and self._owed:
                self._resend = True  # the replies owed are lost with it: send them again
            raise
        finally:
            if pooled:
                pool.release(conn)

    def _read_owed(self, conn: redis.Connection, keep: int) -> int:
        """Read the replies owed on `conn`, oldest first, until `keep` sends' are left;
        how many of their keys existed."""
        existed = 0
        while len(self._owed) > keep:
            existed += sum(int(conn.read_response()) for _ in self._owed[0])
            del self._owed[0]  # (read whole: a failure above leaves it to send again)
        return existed

    def sweep(self, patterns: Collection[str], stopped: Callable[[], bool] | None = None) -> int:
        """SCAN once for every glob of `patterns` and UNLINK page by page what matches
        (TRUNCATE has no rows to render); how many keys existed. One pattern goes to the
        server as MATCH; several share one pass (a pass per pattern cost a full SCAN
        each), their common literal prefix, if any, as MATCH, each page matched here
        unless that MATCH is one of them (sink/glob.py). Pipelined, and resumed after a
        failed connection on the same server (sink/scan_pass.py).
        `stopped` is asked between pages: True raises SweepStopped (shutdown)."""
        if not patterns:
            return 0
        chunk = self._unlink_chunk
        return ServerSweep(
            self._client.connection_pool,
            self.identity,  # (follows a Sentinel's master first)
            GlobSet(patterns),
            self._scan_count,
            lambda page: [pack_unlinks([keys]) for keys in _chunks(page, chunk)],
        ).run(stopped)

    def identity(self) -> str:
        """Who this Redis is: run_id (new on every start) and master_replid (new when a
        replica is promoted). Either changing means its data may be older than ours."""
        return identity_of(self.states())

    def persistence(self) -> list[Persistence]:
        return [server_persistence(self._client)]

    def states(self) -> list[ServerState]:
        # Through Sentinel: ask who the master is now, so that a quiet listener notices
        # a failover (and replays) even while the old master is still up; every pool
        # moved before the answer is read (MasterWatch).
        self._follow_master(force=True)
        return [server_state(self._client)]

    def ping(self) -> str:
        self._client.ping()
        self._client.scan(0, match=NO_KEY, count=1)  # (Sink.ping: SCAN as the sweeps need)
        return "reachable"

    def read_mark(self, key: str) -> str | None:
        value = self._client.get(key)
        return as_text(value)

    def write_mark(self, key: str, value: str) -> None:
        self._client.set(key, value)

    def close(self) -> None:
        for sink in self._dbs.values():
            sink.close()
        self._kept.close()  # (a client given its pool leaves the pool open on close)
        self._client.close()


class KeptConnection:
    """The connection the first thread to send (the runner's loop) keeps for its
    UNLINKs, instead of taking one from the pool and giving it back per batch: redis-py's
    pool does bookkeeping, a readiness poll and metrics on each (12 us a batch, measured
    warm in a loop). Other threads (sweeps, replays from the CLI) use the pool.

    Not through Sentinel: its pool moves to a new master only the connections it is
    given back (MasterWatch)."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = None if isinstance(pool, SentinelConnectionPool) else pool
        self._conn: redis.Connection | None = None
        self._holder: int | None = None
        self._lock = threading.Lock()

    def get(self) -> redis.Connection | None:
        """The kept connection, for the thread that keeps it; None for any other (or
        Sentinel). A connection that failed was disconnected by its user: it connects
        again on its next send."""
        if self._pool is None:
            return None
        me = threading.get_ident()
        if self._holder is None:
            with self._lock:
                if self._holder is None:
                    # (Redis down: raises, and the next send asks again.)
                    self._conn = self._pool.get_connection()
                    self._holder = me
        return self._conn if me == self._holder else None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()


def server_identity(client: redis.Redis) -> str:
    """One server's `run_id/master_replid` (see RedisSink.identity)."""
    return server_state(client).identity


def server_state(client: redis.Redis) -> ServerState:
    """One server's ServerState, in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.info("server")
    pipe.info("persistence")
    pipe.info("replication")
    server, persistence, replication = pipe.execute()
    saves = persistence.get("rdb_saves")
    loaded = persistence.get("rdb_last_load_keys_loaded")
    saved_at = float(persistence.get("rdb_last_save_time", 0))
    if (took := int(persistence.get("rdb_last_bgsave_time_sec", -1))) >= 0:
        # A BGSAVE writes the data as it was when it forked; rdb_last_save_time is when
        # it finished, as long after as the data is big (a review: deletes made while
        # a 15 s BGSAVE was writing were older than that time, and a restart onto the
        # dump brought their keys back unreplayed). Its duration, in whole seconds: one
        # more. (That of the last BGSAVE tried: a SAVE's data is of its own time, and
        # reaching further back only deletes more.)
        saved_at -= took + 1
    if (there := server.get("server_time_usec")) is not None:
        # Redis's clock: the save's age on it, put on ours, which the replay's reach is
        # counted on (a review: a listener whose clock was 30 s behind Redis's replayed
        # 25 s too little after a restart from that dump, and its keys stayed stale).
        saved_at = time.time() - (int(there) / 1e6 - saved_at)
    return ServerState(
        run_id=str(server["run_id"]),
        master=replication.get("role") == "master",
        replid=str(replication.get("master_replid", "")),
        offset=int(replication.get("master_repl_offset", 0)),
        replid2=str(replication.get("master_replid2", "")),
        second_offset=int(replication.get("second_repl_offset", -1)),
        aof=bool(int(persistence.get("aof_enabled", 0))),
        aof_ok=persistence.get("aof_last_write_status", "ok") == "ok",
        saved_at=saved_at,
        unsaved=int(persistence.get("rdb_changes_since_last_save", 0)),
        saves=None if saves is None else int(saves),
        loaded_keys=None if loaded is None else int(loaded),
        started_at=(
            None
            if (uptime := server.get("uptime_in_seconds")) is None
            else time.time() - int(uptime) - 1
        ),
    )


def server_persistence(client: redis.Redis) -> Persistence:
    """One server's persistence settings, or why CONFIG GET refused them; and the keys
    it loaded as it started."""
    loaded = client.info("persistence").get("rdb_last_load_keys_loaded")
    loaded_keys = None if loaded is None else int(loaded)
    config: dict[str, str] = {}
    try:
        for name in PERSISTENCE_SETTINGS:
            for key, value in client.config_get(name).items():
                config[_text(key)] = _text(value)
    except redis.ResponseError as exc:  # NOPERM, or CONFIG renamed away
        return Persistence({}, refused=str(exc), loaded_keys=loaded_keys)
    return Persistence(config, loaded_keys=loaded_keys)


def _refusal(reply: object) -> bool:
    return isinstance(reply, NoPermissionError)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _chunks(items: Iterable[Key], size: int) -> Iterator[list[Key]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk
