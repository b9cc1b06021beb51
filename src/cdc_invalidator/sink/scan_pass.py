"""A sweep's SCAN pass over one server, pipelined and resumed after a failed connection:
the single server's (RedisSink.sweep) and each Cluster primary's (ClusterSink).

Pipelined: a page's UNLINKs go in one write with the next page's SCAN, and their replies
are read once that page is matched and packed, so Redis deletes one page while we
prepare the next. A 2M-key sweep of one server took 3.6-4.3 s that way, against
5.0-5.8 s one command at a time (five rounds each, Redis's CPU 3.4-4.2 s either way: the
wall time is now about Redis's own); a client's GET beside it, p99 3.3-4.0 ms against
2.9-6.1 ms.

A connection that fails is replaced and the pass resumes where it was (the SCAN's cursor
again, the page's UNLINKs again: they are idempotent), if the server is the same one: a
cursor means nothing to another (a failover, a restart, an endpoint that now names a new
primary), where the pass starts over. A second failure without a page done in between
raises, and the sweeper tries the whole sweep again. A pass that ends is done only if
the server is still the one it began on: else it starts over on the one there now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import redis
from redis.exceptions import AskError, MovedError, NoPermissionError, TryAgainError

from cdc_invalidator.sink.glob import GlobSet
from cdc_invalidator.sink.protocol import raise_if_stopped
from cdc_invalidator.sink.refused import keys_of, narrowed, refused

# A page's matching keys (bytes: the client never decodes replies) -> the UNLINK
# commands that delete them, each packed alone (one reply each).
UnlinksOf = Callable[[list[bytes]], list[bytes]]


@dataclass(slots=True)
class ScanPass:
    """A pass, as far as it went: what a new connection resumes from."""

    cursor: int | None = 0  # the next SCAN's; None: the last page was scanned
    # The last page's UNLINKs, unconfirmed: sent after that SCAN (or to be, with it).
    unlinks: list[bytes] = field(default_factory=list)
    deleted: int = 0
    pages: int = 0


@dataclass(frozen=True, slots=True)
class ServerSweep:
    """SCAN over the server `pool` connects to, UNLINKing what `globs` match.
    `identity()` tells one server from another (run_id and master_replid)."""

    pool: redis.ConnectionPool
    identity: Callable[[], str]
    globs: GlobSet
    scan_count: int
    unlinks_of: UnlinksOf
    # A Cluster node's: the slots of UNLINKs answered MOVED or ASK (-1: TRYAGAIN), which
    # the pass goes on past, for the caller to judge (ClusterSink.sweep). None: such a
    # reply raises.
    redirected: set[int] | None = None

    def run(self, stopped: Callable[[], bool] | None = None) -> int:
        """One pass; how many keys existed. `stopped` is asked between pages: True
        raises SweepStopped."""
        server = self.identity()
        sweep = ScanPass()
        pages_at_failure = -1
        while True:
            conn = self.pool.get_connection()
            try:
                self._carry_on(conn, sweep, stopped)
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
                if sweep.pages == pages_at_failure:
                    raise
                pages_at_failure = sweep.pages
                now = self.identity()
                if now != server:
                    server, sweep.cursor = now, 0
            except BaseException:
                conn.disconnect()  # replies may be left unread
                raise
            else:
                now = self.identity()
                if now == server:
                    return sweep.deleted
                # Another server now (through Sentinel: a failover during the pass, whose
                # connection stayed on the old master to its end, and whose deletes
                # its resync discards; a review lost a TRUNCATE's sweep so): again, on it.
                conn.disconnect()
                server, pages_at_failure = now, -1
                sweep = ScanPass()  # (what the old one found is not counted)
            finally:
                self.pool.release(conn)

    def _carry_on(
        self, conn: redis.Connection, sweep: ScanPass, stopped: Callable[[], bool] | None
    ) -> None:
        """Carry `sweep` on over `conn` from where it is to its end."""
        raise_if_stopped(stopped)
        globs = self.globs
        match = () if globs.match is None else ("MATCH", globs.match)

        def send() -> None:
            sends = list(sweep.unlinks)
            if sweep.cursor is not None:
                sends[:0] = conn.pack_command(
                    "SCAN", sweep.cursor, "COUNT", self.scan_count, *match
                )
            if sends:
                conn.send_packed_command([b"".join(sends)])

        send()
        while sweep.cursor is not None:
            raw_cursor, found = conn.read_response()
            page = globs.scanned(cast("list[bytes]", found))
            unlinks = self.unlinks_of(page)
            sweep.deleted += self._unlinked(conn, sweep.unlinks)
            sweep.cursor = int(raw_cursor) or None
            sweep.unlinks = unlinks
            sweep.pages += 1
            raise_if_stopped(stopped)
            send()
        sweep.deleted += self._unlinked(conn, sweep.unlinks)
        sweep.unlinks = []

    def _unlinked(self, conn: redis.Connection, unlinks: list[bytes]) -> int:
        """Read the replies of `unlinks`; how many keys existed. One the ACL refuses
        raises once they are all read, naming its keys and the patterns they matched."""
        existed = 0
        failure: NoPermissionError | None = None
        denied: list[bytes] = []  # the keys of the UNLINKs refused
        for unlink in unlinks:
            try:
                existed += int(conn.read_response())
            except NoPermissionError as exc:
                failure = failure or exc
                denied += keys_of(unlink)
            except (MovedError, AskError) as exc:
                if self.redirected is None:
                    raise
                self.redirected.add(exc.slot_id)
            except TryAgainError:
                if self.redirected is None:
                    raise
                self.redirected.add(-1)
        if failure is not None:
            raise refused(failure, narrowed(conn, denied) or denied, self.globs.patterns)
        return existed
