"""Build the Redis client from settings: a URL, TLS options, or a master found by Sentinel.

One place for what every client of ours has in common (timeouts, one quick retry, the
client name), so that the listener, `check` and the tests connect the same way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

if TYPE_CHECKING:
    from cdc_invalidator.settings import Settings

# Through Sentinel, how often (at most) the sentinels are asked who the master is.
MASTER_CHECK_S = 1.0

# CLIENT SETNAME on every connection: CLIENT LIST shows who we are. An ACL user needs
# +client|setname for it (docs/redis.md, "The minimal ACL"); redis_client_name = ""
# turns it off.
CLIENT_NAME = "cdc-invalidator"


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """How to reach Redis. With sentinels, `url` gives the scheme (rediss:// for TLS),
    the ACL user and password and the db of the master connection; its host and port
    are not used."""

    url: str
    timeout_s: float = 5.0
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: Literal["required", "none"] = "required"
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = ""
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    client_name: str | None = CLIENT_NAME

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisOptions:
        def path(value: object) -> str | None:
            return None if value is None else str(value)

        return cls(
            url=settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            tls_ca_file=path(settings.redis_tls_ca_file),
            tls_cert_file=path(settings.redis_tls_cert_file),
            tls_key_file=path(settings.redis_tls_key_file),
            tls_verify=settings.redis_tls_verify,
            sentinels=tuple(split_host_port(s) for s in settings.redis_sentinels),
            sentinel_master=settings.redis_sentinel_master,
            sentinel_username=settings.redis_sentinel_username or None,
            sentinel_password=settings.redis_sentinel_password or None,
            client_name=settings.redis_client_name or None,
        )

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss://")

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's ssl_* arguments (empty without TLS)."""
        if not self.tls:
            return {}
        kwargs: dict[str, Any] = {"ssl_cert_reqs": self.tls_verify}
        if self.tls_verify == "none":
            kwargs["ssl_check_hostname"] = False
        if self.tls_ca_file:
            kwargs["ssl_ca_certs"] = self.tls_ca_file
        if self.tls_cert_file:
            kwargs["ssl_certfile"] = self.tls_cert_file
        if self.tls_key_file:
            kwargs["ssl_keyfile"] = self.tls_key_file
        return kwargs

    def client_kwargs(self) -> dict[str, Any]:
        """What every client of ours is built with, a Redis, its master through Sentinel
        or a RedisCluster: timeouts, one quick retry, the client name, TLS."""
        return {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            # One immediate retry covers a pooled connection that died with a Redis
            # restart; longer outages are the runner's business (backoff, one log line).
            "retry": Retry(NoBackoff(), 1),
            "client_name": self.client_name,
            **self.tls_kwargs(),
        }


def split_host_port(address: str) -> tuple[str, int]:
    """ "host:port" (settings validated it) -> (host, port); "[::1]:26379" -> ("::1", ...)."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def url_db(url: str) -> int:
    """The logical database a Redis URL selects (0 when it names none); ValueError when
    it cannot be read."""
    return int(parse_url(url).get("db") or 0)


def redis_client(options: RedisOptions) -> redis.Redis:
    """A client for the URL's Redis, or for the master the sentinels name.

    Through Sentinel the client follows failovers: each new connection asks the
    sentinels for the current master, and a connection to a server that became a
    replica fails (READONLY, or the connection killed by Sentinel's reconfiguration)
    with a ConnectionError, which the runner retries with back-off.
    """
    common = options.client_kwargs()
    if not options.sentinels:
        return redis.Redis.from_url(options.url, **common)
    url_kwargs: dict[str, Any] = parse_url(options.url)
    master_kwargs: dict[str, Any] = {
        key: url_kwargs[key] for key in ("username", "password", "db") if key in url_kwargs
    }
    # The sentinels are asked over the same transport as the master (TLS with the same
    # CA and client certificate when the URL is rediss://), with their own user and
    # password.
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": options.timeout_s,
        "socket_connect_timeout": options.timeout_s,
        # No retry: a sentinel that does not answer is passed over for the next one at
        # once. redis-py's default (10 retries, exponential back-off) spent about 4.5 s
        # on each dead sentinel at every master lookup, that is at every new connection.
        "retry": Retry(NoBackoff(), 0),
        **options.tls_kwargs(),
    }
    if options.tls:
        sentinel_kwargs["ssl"] = True
    if options.sentinel_username:
        sentinel_kwargs["username"] = options.sentinel_username
    if options.sentinel_password:
        sentinel_kwargs["password"] = options.sentinel_password
    sentinel = Sentinel(list(options.sentinels), sentinel_kwargs=sentinel_kwargs)
    sentinel.sentinels = [
        SentinelClient(host, port, **sentinel.sentinel_kwargs) for host, port in options.sentinels
    ]
    client: redis.Redis = sentinel.master_for(
        options.sentinel_master, ssl=options.tls, **common, **master_kwargs
    )
    return client


class SentinelClient(redis.Redis):
    """A sentinel's client, named by its address. When no sentinel names a master,
    redis-py's MasterNotFoundError lists each sentinel that failed by its client's repr:
    some thirty connection options (pool handlers, object addresses) for each, around
    the one thing an operator needs, which sentinel it was and what it said."""

    def __repr__(self) -> str:
        kwargs = self.connection_pool.connection_kwargs
        host = str(kwargs.get("host"))
        return f"sentinel {f'[{host}]' if ':' in host else host}:{kwargs.get('port')}"

    def sentinel_masters(self) -> Any:
        """SENTINEL MASTERS (what redis-py asks for the master); a refused user or
        password says which setting it is. Redis' own words did not: a wrong one is "invalid
        username-password pair", as for redis_url's user, and none, to a sentinel
        with requirepass, answers redis-py's HELLO with "HELLO must be called with the
        client already authenticated, otherwise the HELLO AUTH <user> <pass> option
        can be used ..."."""
        try:
            return super().sentinel_masters()
        except redis.AuthenticationError as exc:
            kwargs = self.connection_pool.connection_kwargs
            if kwargs.get("username"):
                hint = "the sentinel refused redis_sentinel_username and redis_sentinel_password"
            elif kwargs.get("password"):
                hint = "the sentinel refused redis_sentinel_password"
            else:
                hint = "the sentinel asks for a password: set redis_sentinel_password"
            raise type(exc)(f"{exc} ({hint})") from exc


def other_db(client: redis.Redis, db: int) -> redis.Redis:
    """A client for logical database `db` of the same server, connecting as `client`
    does (TLS, ACL user, timeouts; through Sentinel, to whatever master it names)."""
    pool = client.connection_pool
    kwargs: dict[str, Any] = {**pool.connection_kwargs, "db": db}
    new_pool: redis.ConnectionPool
    if isinstance(pool, SentinelConnectionPool):
        kwargs.pop("connection_pool", None)  # the old pool's proxy: the new one has its own
        new_pool = SentinelConnectionPool(
            pool.service_name,
            pool.sentinel_manager,
            connection_class=pool.connection_class,
            **kwargs,
        )
    else:
        new_pool = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    return redis.Redis(connection_pool=new_pool)


class MasterWatch:
    """Through Sentinel: ask the sentinels who the master is, at most every `every_s`,
    for every connection pool of the process (the loop's, each `redis_db`'s, the
    sweeper's: one watch, shared).

    A pooled connection stays with the server it was opened to. After a failover that
    server is dropped only when Sentinel demotes it, which for a forced failover (the
    old master still up) takes Sentinel up to some 20 s, and until then it accepts our
    deletes, which its resync from the new master then discards. Called before each
    delete, this moves the pools to the new master within `every_s` of the sentinels
    naming it, and the identity check forces it (`force`) before it asks who Redis is:
    once it sees the new master and replays, no pool is left on the old one. (Each
    pool followed on its own clock, a review saw a `redis_db` table's deletes and the
    replay's own go to the old master for up to a second after the replay: lost.) What
    reached the old master before is the replay's business: the new master has another
    run_id. Without sentinels it does nothing.
    """

    def __init__(self, every_s: float = MASTER_CHECK_S) -> None:
        self._pools: list[SentinelConnectionPool] = []
        self._every_s = every_s
        self._next = 0.0
        self._lock = threading.Lock()  # (the loop and the sweeper's thread)

    def add(self, client: redis.Redis) -> None:
        """Follow `client`'s pool too (nothing unless it goes through Sentinel)."""
        pool = client.connection_pool
        if isinstance(pool, SentinelConnectionPool):
            with self._lock:
                self._pools.append(pool)

    def __call__(self, force: bool = False) -> None:
        if not self._pools or (not force and time.monotonic() < self._next):
            return
        # One ask for every pool, outside the lock (the sentinels may be a zone away):
        # asked once per pool, in turn, under the lock, each identity check cost 170 ms
        # with sentinels 20 ms away and two redis_db tables (a review), and two pools
        # could be told two masters while the sentinels disagreed. Raises
        # MasterNotFoundError (a ConnectionError) when no sentinel names one.
        first = self._pools[0]
        address = first.sentinel_manager.discover_master(first.service_name)
        with self._lock:
            for pool in self._pools:
                # As pool.get_master_address() does with its own answer: a pool told of
                # another master drops its idle connections (in-use ones finish first;
                # a sweep's pass asks again as it ends: scan_pass.py).
                if pool.proxy.master_address != address:
                    pool.proxy.master_address = address
                    pool.disconnect(inuse_connections=False)
            # Set after: a failed ask is asked again on the retry.
            self._next = time.monotonic() + self._every_s
