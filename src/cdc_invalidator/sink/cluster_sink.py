"""Delete keys from a Redis Cluster: per-slot UNLINKs pipelined per node, sweeps on
every primary.

A multi-key UNLINK must stay within one hash slot (CROSSSLOT otherwise), so keys are
grouped by slot, and each node gets one pipeline holding the UNLINKs of its slots, from
redis-py's slot table. Measured on 3 local masters, 200k keys in batches of 10k
(2 vCPUs, shared): 0.8-1.1 s, against 2.5-2.8 s for RedisCluster.unlink() (the same
grouping through redis-py's ClusterPipeline); a ClusterPipeline of one UNLINK per key
took 1.7x as long as RedisCluster.unlink(). A batch of 10,000 keys is about 7,000 slots:
the slots are found and the UNLINKs packed in C (sink/slots.py), which took the
listener's cluster drain from 1.61-2.06 s to 1.35-1.54 s (trigger mode, 100k changes,
interleaved rounds, floors 0.93-1.25 s).

Redirections: an UNLINK answered MOVED (the slot has a new owner), ASK (the slot is being
migrated and the keys are already gone from this node) or TRYAGAIN (some of the keys
moved, some not) is sent again one key at a time, following MOVED (the slot table
updated) and ASK (with ASKING, to whichever node it names, known to the slot table or
not). A node that cannot be reached raises: the runner backs off and retries the whole
batch, and the slot table is read afresh first.

What of redis-py this drives beyond its documented API (NodesManager's slots_cache,
get_node_from_slot, move_slot and initialize; a node's ConnectionPool and its
connections' send_packed_command and read_response; how CLUSTER NODES is parsed) is
pinned by the redis version range in pyproject.toml and checked by the contract tests
in tests/test_cluster.py.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import structlog
from redis.cluster import PRIMARY, ClusterNode, RedisCluster
from redis.connection import Connection, ConnectionPool
from redis.exceptions import AskError, MovedError, NoPermissionError, TryAgainError

from cdc_invalidator.capture.errors import Fatal
from cdc_invalidator.mapping import Invalidation, Routed
from cdc_invalidator.sink.glob import GlobSet
from cdc_invalidator.sink.oversize import bulk_limit, storable, too_long
from cdc_invalidator.sink.protocol import NO_KEY, Persistence, ServerState, as_text, identity_of
from cdc_invalidator.sink.redis_sink import server_identity, server_persistence, server_state
from cdc_invalidator.sink.refused import named, refused
from cdc_invalidator.sink.scan_pass import ServerSweep
from cdc_invalidator.sink.slots import Key, group_by_slot, pack_unlinks

log = structlog.get_logger("cdc_invalidator.sink")

SLOTS = 16384
# Redirections followed for one key before giving up (ClusterChanging: retried later): a
# slot moves once, and an ASK leads to the node importing it.
REDIRECTIONS = 5


# Each primary's (node id, address, config epoch, slot ranges), sorted: ClusterSink._layout.
Layout = tuple[tuple[str, str, str, tuple[tuple[str, ...], ...]], ...]


class ClusterChanging(TryAgainError):
    """Slots were migrating or moved while a sweep ran: its result cannot be trusted.

    A TRYAGAIN, hence retryable: the runner backs off and sweeps again."""


class ClusterSink:
    def __init__(
        self, client: RedisCluster, *, unlink_chunk: int = 500, scan_count: int = 1000
    ) -> None:
        self._client = client
        self._unlink_chunk = unlink_chunk
        self._scan_count = scan_count
        self._stale = False  # a node failed: read the slot table again before the next try
        # Nodes an ASK named that redis-py's slot table does not know (_node_at), and
        # those of them used by the unlink() in progress: the others are closed and
        # forgotten when it ends (each migration to a new node added one, kept forever
        # with its connection, after the node was known or gone).
        self._asked: dict[tuple[str, int], ClusterNode] = {}
        self._asked_now: set[tuple[str, int]] = set()

    @property
    def client(self) -> RedisCluster:
        return self._client

    def delete_routed(self, works: Routed, later: bool = False) -> int:
        """delete() of every share; a cluster has only database 0 (redis_db). Confirmed
        at once, `later` or not: the nodes' replies are read as they come (per node)."""
        _only_db0(works)
        return sum(self.delete(work) for work in works.values() if work)

    def sweep_routed(self, works: Routed, stopped: Callable[[], bool] | None = None) -> int:
        """sweep() of every share's patterns, all in one pass per primary."""
        _only_db0(works)
        patterns = {p for work in works.values() for p in work.patterns}
        return self.sweep(patterns, stopped)

    def delete(self, work: Invalidation) -> int:
        """Delete every key and every key matching a pattern; return how many existed.

        Returns only once every node confirmed its part: the caller acknowledges after.
        """
        deleted = self.unlink(work.keys)
        if work.patterns:
            deleted += self.sweep(work.patterns)
        return deleted

    def unlink(self, keys: Collection[str | bytes]) -> int:
        if not keys:
            return 0
        if self._stale:
            self._client.nodes_manager.initialize()
            self._stale = False
        deleted, moved, again = self._unlink_per_node(self._by_node(keys))
        if moved:
            # The slot table names the new owners now: one more round, still grouped
            # (a resharding moves whole slots, often many of them).
            more, moved, asked = self._unlink_per_node(self._by_node(moved))
            deleted += more
            again += moved + asked
        if again:
            log.debug("redis_redirected", keys=len(again))
        # Still redirected: one key per UNLINK (a key is on one side of a migration or
        # the other; several keys may be split across both, which is what TRYAGAIN says).
        for key in again:
            deleted += self._unlink_one(key)
        self._forget_asked()
        return deleted

    def _forget_asked(self) -> None:
        """Close the connections of the nodes an ASK named that this unlink() did not
        use: the migration that named them is over (the node is in the slot table, or
        gone). One still under way names its node again, and it is made again."""
        for address in [a for a in self._asked if a not in self._asked_now]:
            node = self._asked.pop(address)
            if node.redis_connection is not None:
                node.redis_connection.close()
        self._asked_now.clear()

    def _unlink_one(self, key: Key) -> int:
        """UNLINK one key, following MOVED and ASK here rather than through
        RedisCluster.execute_command: the node an ASK names may be new to the cluster
        and own no slot yet (a resharding to a node just added), which CLUSTER SLOTS
        does not list; redis-py then failed on a node it did not know (AttributeError)."""
        node: ClusterNode = self._client.get_node_from_key(key)
        asking = False
        for _ in range(REDIRECTIONS):
            client = self._client.get_redis_connection(node)
            try:
                if not asking:
                    return int(client.execute_command("UNLINK", key))
                pipe = client.pipeline(transaction=False)
                pipe.execute_command("ASKING")
                pipe.execute_command("UNLINK", key)
                return int(pipe.execute()[1])
            except MovedError as exc:
                self._client.nodes_manager.move_slot(exc)
                node, asking = self._node_at(exc.host, exc.port), False
            except AskError as exc:
                node, asking = self._node_at(exc.host, exc.port), True
            except NoPermissionError as exc:
                # (the node redirected to may refuse what the first one allowed: ACLs
                # are per node)
                raise refused(exc, [key]) from exc
        self._stale = True
        slot = self._client.keyslot(key)
        raise ClusterChanging(f"an UNLINK was redirected {REDIRECTIONS} times in slot {slot}")

    def _node_at(self, host: str, port: int) -> ClusterNode:
        """The node at an address a redirection named: redis-py's, or one made as
        redis-py makes them (its connection created on first use), kept here."""
        node: ClusterNode | None = self._client.get_node(host=host, port=port)
        if node is None:
            node = self._asked.get((host, port))
            if node is None:
                node = self._asked[(host, port)] = ClusterNode(host, port, PRIMARY)
            self._asked_now.add((host, port))
        return node

    def _by_node(self, keys: Collection[Key]) -> list[tuple[ClusterNode, list[list[Key]]]]:
        """Each primary with its UNLINKs: one per slot (or per unlink_chunk keys)."""
        by_node: dict[str, tuple[ClusterNode, list[list[Key]]]] = {}
        nodes = self._client.nodes_manager
        table = nodes.slots_cache  # get_node_from_slot() costs 4 µs a call, most of it
        chunk = self._unlink_chunk  # checking for deprecated arguments
        # About 7,000 slots per batch of 10,000 keys: this loop runs per slot, so it
        # does no more than it must (a group is sliced only past unlink_chunk keys).
        for slot, group in group_by_slot(keys).items():
            owners = table.get(slot)
            node = owners[0] if owners else nodes.get_node_from_slot(slot)  # SlotNotCovered
            entry = by_node.get(node.name)
            if entry is None:
                entry = by_node[node.name] = (node, [])
            if len(group) <= chunk:
                entry[1].append(group)
            else:
                entry[1].extend(group[i : i + chunk] for i in range(0, len(group), chunk))
        return list(by_node.values())

    def _unlink_per_node(
        self, work: list[tuple[ClusterNode, list[list[Key]]]]
    ) -> tuple[int, list[Key], list[Key]]:
        """Write every node's UNLINKs, then read every node's replies (the nodes work
        while the next one is written to); return how many keys existed, the keys
        answered MOVED (the slot table is updated) and those answered ASK or TRYAGAIN.

        The commands are packed here, not through a redis-py Pipeline: its bookkeeping
        per command cost more than the deletes (one UNLINK per slot is one to two keys
        in a batch of 10,000 keys)."""
        deleted = 0
        moved: list[Key] = []
        again: list[Key] = []
        failure: redis.ResponseError | None = None
        sent: list[tuple[ConnectionPool, Connection, list[list[Key]]]] = []
        try:
            for node, given in work:
                client = self._client.get_redis_connection(node)
                commands, packed = given, pack_unlinks(given)
                if too_long(packed):
                    limit = bulk_limit(client)
                    commands = [kept for keys in given if (kept := storable(keys, limit, client))]
                    packed = pack_unlinks(commands)
                pool = client.connection_pool
                connection = pool.get_connection()
                sent.append((pool, connection, commands))
                connection.send_packed_command([packed])
            for _, connection, commands in sent:
                for command in commands:
                    try:
                        deleted += int(connection.read_response())
                    except MovedError as exc:
                        self._client.nodes_manager.move_slot(exc)
                        moved += command
                    except (AskError, TryAgainError):
                        again += command
                    except redis.ResponseError as exc:
                        # (read on: the connection stays in step; NOPERM: named)
                        failure = failure or named(exc, command)
        except BaseException as exc:
            # Replies may be left unread on any of them: none goes back to a pool usable.
            # Whatever the error: one raised while connecting to a node after another
            # was written to (NOPERM for CLIENT SETNAME on a node whose ACL differs, a
            # ResponseError) left that one's replies unread, not arrived yet, so the
            # pool's "Connection has data" check let it out, and the next batch read
            # them for its own (a review: an UNLINK refused NOPERM, its batch confirmed).
            for _, connection, _ in sent:
                connection.disconnect()
            # (a lost node: read the slot table again before the next try)
            self._stale |= isinstance(exc, (redis.ConnectionError, redis.TimeoutError))
            raise
        finally:
            for pool, connection, _ in sent:
                pool.release(connection)
        if failure is not None:
            raise failure
        return deleted, moved, again

    def sweep(self, patterns: Collection[str], stopped: Callable[[], bool] | None = None) -> int:
        """SCAN every primary once for all the globs and UNLINK what matches (TRUNCATE
        has no rows to render), the primaries in parallel, each on a thread with a
        connection of its own. A key moving between nodes while the SCANs run could be
        missed, so the slot layout is read before and after, and a sweep that saw slots
        migrate or move raises ClusterChanging (retryable) instead of returning. The
        layout holds each primary's config epoch: a slot moved away and back during the
        sweep (A to B while A's pass had not reached it and B's had passed it, then back
        to A) leaves the same slots where they were, but bumps the epoch of a node that
        imported it (a review: such a key survived a sweep that completed)."""
        if not patterns:
            return 0
        globs = GlobSet(patterns)
        before = self._layout()
        nodes = primaries(self._client)
        clients = [self._client.get_redis_connection(node) for node in nodes]
        redirected: list[set[int]] = [set() for _ in clients]
        with ThreadPoolExecutor(len(clients), thread_name_prefix="cdc-sweep-node") as pool:
            futures = [
                pool.submit(self._sweep_node, c, globs, stopped, r)
                for c, r in zip(clients, redirected, strict=True)
            ]
            # Every node's result (or error) is waited for before raising the first.
            results = [f.exception() or f.result() for f in futures]
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if self._layout() != before:
            self._stale = True
            raise ClusterChanging(
                "the cluster's slots moved during a sweep (or moved and came back: a "
                "primary's config epoch changed)"
            )
        self._judge_redirections(before, nodes, redirected)
        return sum(r for r in results if isinstance(r, int))

    def _sweep_node(
        self,
        client: redis.Redis,
        globs: GlobSet,
        stopped: Callable[[], bool] | None,
        redirected: set[int],
    ) -> int:
        """One primary's pass, as a single server's (sink/scan_pass.py: pipelined,
        resumed after a failed connection while the node is the same), its page's
        matches UNLINKed there grouped by slot. Every key SCAN returns is the node's
        own, unless slots move meanwhile or it is an orphan: the slots of UNLINKs
        redirected are gathered in `redirected` (_judge_redirections)."""
        return ServerSweep(
            client.connection_pool,
            lambda: server_identity(client),
            globs,
            self._scan_count,
            lambda page: [pack_unlinks([keys]) for keys in group_by_slot(page).values()],
            redirected,
        ).run(stopped)

    def _judge_redirections(
        self,
        layout: Layout,
        nodes: list[ClusterNode],
        redirected: list[set[int]],
    ) -> None:
        """After a sweep whose layout held (no slot moved or migrated from before it to
        after it): an UNLINK redirected in a slot its node did not own throughout was of
        an orphan, a key left on a node that does not own its slot (a migration given up
        with CLUSTER SETSLOT ... STABLE). No client reaches it there (every read is
        redirected to the owner, which the sweep scanned), so it is no stale cache: the
        sweep is complete, and says so. Any other redirection means keys moved during
        the sweep: ClusterChanging (retried), as before."""
        owned = {name: _slot_set(slots) for _, name, _, slots in layout}
        orphans: dict[str, list[int]] = {}
        for node, slots in zip(nodes, redirected, strict=True):
            for slot in sorted(slots):
                if slot < 0 or slot in owned.get(node.name, range(SLOTS)):
                    self._stale = True
                    raise ClusterChanging(f"a key moved during a sweep: slot {slot} on {node.name}")
                orphans.setdefault(node.name, []).append(slot)
        if orphans:
            log.warning(
                "sweep_orphan_keys",
                nodes=orphans,
                detail="keys on a node that does not own their slot (a slot migration "
                "given up); no client reads them there, and the sweep is complete "
                "without them",
            )

    def _layout(self) -> Layout:
        """Every primary's own account of itself (id, address, config epoch, slots), with
        the slot table read afresh; raise ClusterChanging while a slot is migrating or some slot
        has no primary we know of."""
        self._client.nodes_manager.initialize()
        layout = []
        covered = 0
        for node in primaries(self._client):
            view: dict[str, dict[str, Any]] = self._client.get_redis_connection(node).cluster(
                "nodes"
            )
            me = next(v for v in view.values() if "myself" in v["flags"])
            if me["migrations"]:
                raise ClusterChanging(f"slots migrating on {node.name}: {me['migrations']}")
            slots = tuple(tuple(r) for r in me["slots"])
            covered += sum(int(r[-1]) - int(r[0]) + 1 for r in slots)
            # The config epoch: a node that finishes importing a slot (CLUSTER SETSLOT
            # ... NODE on itself) takes a new one unless its own is the greatest, so of
            # a slot moved A -> B -> A at least one of A and B has a new epoch after.
            layout.append((me["node_id"], node.name, str(me["epoch"]), slots))
        if covered != SLOTS:
            raise ClusterChanging(f"the primaries serve {covered} of {SLOTS} slots")
        return tuple(sorted(layout))

    def identity(self) -> str:
        """Every primary's `run_id/master_replid`, sorted and joined with commas: changes
        when a node restarts or a replica takes over. Reads the slot table afresh."""
        return identity_of(self.states())

    def persistence(self) -> list[Persistence]:
        """Every primary's: each restarts from its own files."""
        clients = [self._client.get_redis_connection(n) for n in primaries(self._client)]
        return [server_persistence(client) for client in clients]

    def states(self) -> list[ServerState]:
        """Every primary's. Reads the slot table afresh."""
        self._client.nodes_manager.initialize()
        clients = [self._client.get_redis_connection(n) for n in primaries(self._client)]
        return [server_state(client) for client in clients]

    def ping(self) -> str:
        nodes = primaries(self._client)
        for node in nodes:
            connection = self._client.get_redis_connection(node)
            connection.ping()
            connection.scan(0, match=NO_KEY, count=1)  # (Sink.ping)
        return f"reachable, a Redis Cluster of {len(nodes)} primaries, each reachable"

    def read_mark(self, key: str) -> str | None:
        value = self._client.get(key)  # (routed by the key's slot)
        return as_text(value)

    def write_mark(self, key: str, value: str) -> None:
        self._client.set(key, value)

    def close(self) -> None:
        for node in self._asked.values():
            if node.redis_connection is not None:
                node.redis_connection.close()
        self._client.close()


def _only_db0(works: Routed) -> None:
    if dbs := sorted(db for db, work in works.items() if db and work):
        raise Fatal(
            f"redis_db = {dbs[0]} in the configuration, but a Redis Cluster has only database 0"
        )


def _slot_set(ranges: tuple[tuple[str, ...], ...]) -> set[int]:
    """The slots of CLUSTER NODES' ranges ("5461", "10922"; a single slot: "5461")."""
    return {slot for r in ranges for slot in range(int(r[0]), int(r[-1]) + 1)}


def primaries(client: RedisCluster) -> list[ClusterNode]:
    """The primaries of redis-py's slot table (typed: redis-py leaves it untyped)."""
    nodes: list[ClusterNode] = client.get_primaries()
    return nodes
