"""Settings: one TOML file, overridden per scalar by CDC_INVALIDATOR_<NAME> variables.

Built once by the CLI and passed down; nothing reads settings at import time.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import structlog
from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from redis.connection import parse_url

from cdc_invalidator.durations import parse_duration
from cdc_invalidator.events import TableName
from cdc_invalidator.mapping import KeyTemplate, Mapper, TemplateError
from cdc_invalidator.mapping.columns import ColumnFilter, Judge
from cdc_invalidator.mapping.mapper import RetiredLookup
from cdc_invalidator.redact import Scrubber, secrets_of

log = structlog.get_logger(__name__)

# Added to every replay window (redis_guard/window.py), and so to the history kept for
# one: the clock of the commit and of the check, a snapshot being written while the
# server went down, and the replication lag of a promoted replica.
REPLAY_MARGIN_S = 5.0

ENV_PREFIX = "CDC_INVALIDATOR_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the culprit,
    and holds no password."""


# Settings that hold passwords: their values are never echoed in an error, and their
# passwords are scrubbed from every message about the configuration.
_URL_SETTINGS = ("database_url", "redis_url")
# The libpq parameters whose values are one of a few words (libpq's documentation).
_LIBPQ_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "gssencmode": ("disable", "prefer", "require"),
}
_PASSWORD_SETTINGS = ("redis_sentinel_password",)


# Seconds, written as "15m", "90s", "1h30m" (a bare number is seconds).
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
# The longest wait a setting may ask for: select() and sleep() refuse one longer than
# about 292 years, and the listener died of it (OverflowError) at its first wait.
_DAY_S = 86_400
_DAY_MS = _DAY_S * 1000


def _auto_or_duration(value: object) -> float | None:
    """replay_window: "auto" (None: from the server's persistence) or a duration."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    return parse_duration(value)  # type: ignore[arg-type]  # it names a wrong type


# Names of our replication slot and publication: what PostgreSQL allows for a slot.
_SLOT_NAME = r"^[a-z0-9_]{1,63}$"
_MAX_PORT = 65535
# The least bulk_sweep_rows (0 aside): a pack's rows (pack_rows_v1() in sql/schema.sql);
# watch() refuses less too.
BULK_SWEEP_MIN_ROWS = 1000
# A configuration error echoes the wrong value unless it is longer than this.
_ECHOED_MAX_LENGTH = 200


def _host_port(value: str) -> str:
    """A sentinel's address: "host:port" (an IPv6 host in brackets: "[::1]:26379")."""
    if "@" in value:
        # (not echoed: what comes before the "@" is a user and password)
        raise ValueError(
            "an address holds user info (…@host:port): the sentinels' user and password "
            "go in redis_sentinel_username and redis_sentinel_password"
        )
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= _MAX_PORT:
        raise ValueError(f"{value!r} is not host:port")
    return value


def _comma_list(value: object) -> object:
    # From the environment a list comes as text: "h1:26379,h2:26379" or a JSON list.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise ValueError('neither a JSON list nor "host:port,host:port"') from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _existing_file(value: Path | None) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError("no such file")
    return value


TlsFile = Annotated[Path | None, AfterValidator(_existing_file)]


class TableSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: Annotated[list[str], Field(min_length=1)]
    # Logical mode: "full" lets install set REPLICA IDENTITY FULL where the key columns
    # are not all in the table's replica identity (UPDATE and DELETE then carry their
    # old values); "keep" leaves the table alone, and old values of those columns
    # cannot be invalidated (check warns).
    replica_identity: Literal["full", "keep"] = "full"
    # Put before every template of the table: for apps that namespace their keys
    # ("app1:") and share the templates' shape across tables.
    key_prefix: str = ""
    # The Redis logical database this table's keys live in, if not the one redis_url
    # names (apps that cache different tables in different databases). Not in Cluster.
    redis_db: Annotated[int, Field(ge=0)] | None = None
    # Column filters (one or the other): an UPDATE that changes only columns listed in
    # ignore_columns, or none of those listed in columns, invalidates nothing. The
    # templates' columns always count. Names as the catalog stores them (case matters).
    # An empty ignore_columns judges every row with nothing ignored: an UPDATE that
    # changes no value at all invalidates nothing. Neither: every UPDATE invalidates.
    ignore_columns: list[Annotated[str, Field(min_length=1)]] | None = None
    columns: list[Annotated[str, Field(min_length=1)]] | None = None

    @model_validator(mode="after")
    def _one_filter(self) -> TableSettings:
        if self.ignore_columns is not None and self.columns is not None:
            raise ValueError(
                "ignore_columns and columns are mutually exclusive: set one of them "
                "(ignore_columns: every other column counts; columns: only these count)"
            )
        return self

    def column_filter(self) -> ColumnFilter | None:
        """The table's column filter, or None: every UPDATE invalidates."""
        listed = self.ignore_columns if self.ignore_columns is not None else self.columns
        if listed is None:
            return None
        judge = Judge.IGNORE if self.ignore_columns is not None else Judge.COLUMNS
        fields = sorted({f for k in self.keys for f in KeyTemplate.parse(k).fields})
        return ColumnFilter(judge, tuple(dict.fromkeys(listed)), tuple(fields))

    @field_validator("key_prefix")
    @classmethod
    def _prefix_is_literal(cls, prefix: str) -> str:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"key_prefix {prefix!r} is put before the templates as is: no braces")
        return prefix

    @field_validator("keys")
    @classmethod
    def _templates_parse(cls, keys: list[str]) -> list[str]:
        for source in keys:
            for column in KeyTemplate.parse(source).fields:  # raises TemplateError naming it
                _refuse_unnameable(f"template {source!r}: column {column!r}", column)
        return keys

    @field_validator("ignore_columns", "columns")
    @classmethod
    def _columns_named(cls, columns: list[str] | None) -> list[str] | None:
        for column in columns or []:
            _refuse_unnameable(f"column {column!r}", column)
        return columns


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, case_sensitive=False
    )

    # libpq fills what the URL leaves out from PG* variables (PGHOST, PGPASSWORD, ...).
    database_url: str = ""
    # database_url reaches PostgreSQL through a connection pooler in session mode (or a
    # proxy that keeps each session on one server connection): let through, after a
    # check that it does. Any other pooler is refused (pg/connect.py).
    session_pool: bool = False
    redis_url: str = "redis://localhost:6379/0"
    # TLS (a rediss:// URL): the CA that signed the server's certificate (default: the
    # system's), and a client certificate and key for servers with tls-auth-clients.
    redis_tls_ca_file: TlsFile = None
    redis_tls_cert_file: TlsFile = None
    redis_tls_key_file: TlsFile = None
    # "required": the server's certificate must be valid for its host name; "none": not
    # checked at all (encrypted, but open to a man in the middle).
    redis_tls_verify: Literal["required", "none"] = "required"
    # Sentinel: where to ask for the master of redis_sentinel_master (then redis_url's
    # host and port are not used; its scheme, user, password and db still are).
    redis_sentinels: Annotated[
        list[Annotated[str, AfterValidator(_host_port)]], NoDecode, BeforeValidator(_comma_list)
    ] = Field(default_factory=list)
    redis_sentinel_master: str = ""
    # CLIENT SETNAME on every Redis connection, for CLIENT LIST; "" sends none (an ACL
    # user then needs no +client|setname).
    redis_client_name: Annotated[str, Field(pattern=r"^[!-~]*$")] = "cdc-invalidator"
    # The sentinels' own user and password, when they ask for one: the password alone
    # for their default user (`requirepass` in sentinel.conf), or an ACL user of
    # sentinel.conf (`user ...` lines) by name.
    redis_sentinel_username: str = ""
    redis_sentinel_password: str = ""
    # "trigger": a queue table filled by triggers, woken by NOTIFY. "logical": the WAL,
    # decoded by pgoutput through a replication slot; no triggers.
    capture: Literal["trigger", "logical"] = "trigger"
    tables: dict[str, TableSettings] = Field(min_length=1)
    # Trigger mode: a transaction's first one-row statement also sends that row's key
    # columns in its NOTIFY payload, on a channel only the installing role may name, and
    # the listener deletes its keys before it reads the queue. Off by default: while the
    # listener is quiet it costs each such writer (docs/DBA.md, "Why it is off by
    # default"). `install` compiles it into the capture functions: a change needs it.
    notify_payload: bool = False
    # Trigger mode: a statement that changed at least this many rows queues one sweep of
    # its table's templates instead of its rows (0: never). The writer then pays little
    # more than PostgreSQL's own transition table, and every cached key of the table goes
    # (a cold cache instead of a slow write). Compiled in by `install`, like the payload.
    bulk_sweep_rows: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    # Trigger mode: on a server that is not the one the listener last ran on (a standby
    # promoted, a restore), sweep every watched table once: it may lack transactions
    # whose rows readers cached (capture/lineage.py). False only where no reader could
    # see a commit the new server lacks (synchronous replication, never turned down).
    sweep_after_failover: bool = True
    # Both modes: on a server that came up from a crash since the listener last noted it
    # (a crash of PostgreSQL or of any backend), sweep every watched table once: a commit
    # made with synchronous_commit = off is visible before it is durable, and a crash
    # loses it after readers may have cached its row (capture/lineage.py). "always":
    # after every crash (no session sees another's own SET); "auto": only where the
    # server's, the database's or a role's settings have this database's writers commit
    # so, as seen at the reconnect (what `check` warns of); "never".
    sweep_after_crash: Literal["auto", "always", "never"] = "always"
    # Logical mode: the replication slot and the publication `install` creates.
    slot_name: Annotated[str, Field(pattern=_SLOT_NAME)] = "cdc_invalidator"
    publication_name: Annotated[str, Field(pattern=_SLOT_NAME)] = "cdc_invalidator"
    # Logical mode: how often the slot is told how far the listener got (and so how much
    # is re-delivered after a crash); a keepalive that asks is answered at once.
    status_interval_ms: Annotated[int, Field(ge=10, le=30_000)] = 1000
    # Logical mode: write a tiny WAL message this often (0: never), so that the slot
    # advances even when only other databases of the server are written to.
    heartbeat_interval_ms: Annotated[int, Field(ge=0)] = 0

    # Replay after Redis restarts or fails over (its run_id or replication id changes):
    # every key invalidated within this window is deleted again, since a snapshot or a
    # lagging replica may have brought it back. "auto": what the server's persistence
    # can bring back (CONFIG GET save / appendonly / appendfsync); "0s": off. None is
    # "auto".
    replay_window: Annotated[float | None, BeforeValidator(_auto_or_duration)] = None
    # How long what was invalidated is kept for replay (and `replay --since`): queue rows
    # in trigger mode, a compact history table in logical mode. Kept at least as long as
    # an explicit replay_window.
    replay_history: Duration = 7200.0
    # How often the listener asks Redis who it is (INFO), besides on every reconnect.
    redis_check_interval_ms: Annotated[int, Field(ge=100)] = 1000
    # Which database Redis was last invalidated from, kept in Redis and compared at each
    # connect (redis_guard/source.py): what tells a primary gone back to after a
    # failover, or a database renamed back into place. False: no such key is read or
    # written (an ACL that refuses it: Redis 6 has no selector to allow this key alone).
    source_mark: bool = True
    # The longest a cache-aside reader may take from its database read to its SET: every
    # key is deleted again this long after its change was visible (up to twice this while
    # a backlog drains in full batches; 0: off), undoing a reader that read the old row
    # before the commit and SETs it after our delete. On by default: readers are that
    # slow in practice (a GC pause, a slow request), and a stale value set then stays
    # until the row's next change.
    second_delete_ms: Annotated[int, Field(ge=0, le=600_000)] = 300

    # Most events read, mapped and deleted in one round.
    batch_size: Annotated[int, Field(ge=1, le=100_000)] = 5000
    # Under load, how long a batch may gather after the previous one started (0: off).
    batch_linger_ms: Annotated[float, Field(ge=0, le=1000)] = 20.0
    # How often the listener looks at the queue with no NOTIFY (NOTIFY is lost while
    # disconnected, so it is a wake-up, never the only trigger).
    poll_interval_ms: Annotated[int, Field(ge=10, le=_DAY_MS)] = 1000
    # How often processed rows are deleted from the queue table (in chunks, when idle).
    prune_every_ms: Annotated[int, Field(ge=0)] = 1000
    # Reconnect and retry back-off: exponential from the first to the max, ±10 % jitter.
    # The max is short: each second a back-off sleeps past a server's return is a second
    # of stale reads (a Redis restored from an old snapshot serves its stale keys until
    # the replay; a PostgreSQL back takes writes whose keys wait in the queue or slot),
    # and a try a second costs a server that is down nothing.
    retry_initial_ms: Annotated[int, Field(ge=1, le=_DAY_MS)] = 100
    retry_max_ms: Annotated[int, Field(ge=1, le=_DAY_MS)] = 1000
    # Keys per UNLINK command; a batch's commands go to Redis in one pipeline.
    unlink_chunk: Annotated[int, Field(ge=1, le=100_000)] = 500
    # SCAN's COUNT for sweeps: how long one SCAN holds Redis (measured on 2 vCPUs, Redis
    # 7.0: ~0.75 ms at 1000, ~0.19 ms at 250) against a sweep's round trips (2M keys:
    # 3.3 s at 1000, 4.6 s at 250). No pause between pages: Redis serves other clients
    # between two SCANs, and its p99 follows one SCAN's length, not the sweep's share.
    # (At most what Redis reads as a COUNT, a signed 64-bit integer: a larger one was
    # taken, and every sweep failed, 'value is not an integer or out of range'.)
    scan_count: Annotated[int, Field(ge=10, le=2**63 - 1)] = 1000
    # At most a day: an infinite or huge timeout crashed every command (it becomes a
    # whole number of seconds for libpq, a select() or socket timeout for Redis).
    connect_timeout_s: Annotated[float, Field(gt=0, le=_DAY_S)] = 5.0
    redis_timeout_s: Annotated[float, Field(gt=0, le=_DAY_S)] = 5.0
    # Serve /metrics (Prometheus), /healthz and /readyz on this port (0: off), on this
    # address: loopback by default, so that nothing outside the host reaches them unless
    # asked for ("0.0.0.0" or "::" for every interface; the container image sets
    # "0.0.0.0", its network being the boundary). Never empty: "" would mean every one.
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    metrics_address: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    # /readyz fails while an active listener is further behind than this (seconds from
    # the commit of the last transaction it finished), or a store does not answer.
    ready_max_lag_s: Annotated[float, Field(gt=0)] = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    application_name: str = "cdc-invalidator"

    @field_validator("tables")
    @classmethod
    def _table_names_parse(cls, tables: dict[str, TableSettings]) -> dict[str, TableSettings]:
        seen: dict[TableName, str] = {}
        for name, table in tables.items():
            if "\x00" in name:  # (before parsing: named whole)
                _refuse_unnameable(f"table {name!r}", name)
            parsed = TableName.parse(name)
            _refuse_truncated(name, parsed)
            if parsed in seen:
                raise ValueError(f"tables {seen[parsed]!r} and {name!r} name the same table")
            seen[parsed] = name
            for source in table.keys:
                _refuse_broad_sweep(name, parsed, table.key_prefix, source)
        return tables

    @field_validator("metrics_address")
    @classmethod
    def _address_has_no_nul(cls, address: str) -> str:
        # (socket.bind() raises TypeError, not OSError, for one: run ended in a traceback)
        if "\x00" in address:
            raise ValueError(f"{address!r} holds a NUL character: give a host name or address")
        return address

    @field_validator("bulk_sweep_rows")
    @classmethod
    def _bulk_sweep_rows_bulk(cls, rows: int) -> int:
        # Below a pack's thousand rows, ordinary multi-row statements would sweep: a whole
        # SCAN of Redis each, and a cold table, for what a pack or two delete exactly.
        if 0 < rows < BULK_SWEEP_MIN_ROWS:
            raise ValueError(f"must be 0 (off) or at least {BULK_SWEEP_MIN_ROWS} rows")
        return rows

    @field_validator("database_url")
    @classmethod
    def _libpq_reads(cls, url: str) -> str:
        # Found here rather than at the first connection: libpq's complaint then comes
        # as a configuration error, and its echo of the text is scrubbed (load_settings).
        if url:
            try:
                params = conninfo_to_dict(url)
            except ProgrammingError as exc:
                raise ValueError(
                    f"libpq cannot read it ({str(exc).strip()}): write a postgresql:// URL "
                    "(percent-encode special characters of the password) or key=value pairs "
                    "(a value with spaces in single quotes)"
                ) from None
            # libpq checks these values only as it connects: a wrong one would be an
            # error each start, which a restart cannot fix (exit 2, not 1).
            for name, allowed in _LIBPQ_CHOICES.items():
                value = params.get(name)
                if value is not None and str(value) not in allowed:
                    raise ValueError(f"{name}={value!r}: must be one of {', '.join(allowed)}")
            port = params.get("port")
            if port is not None and not all(p.isdigit() for p in str(port).split(",") if p):
                raise ValueError(f"port={port!r}: must be a number (or numbers, for several hosts)")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
        try:
            options = parse_url(url)
        except ValueError:
            # The reason is not given: it may quote part of the password.
            raise ValueError(
                "not a Redis URL: redis://host:port/db, rediss://... or unix:///path, with "
                "user:password@ before the host (percent-encode special characters)"
            ) from None
        if options.get("decode_responses"):
            # (redis-py lets the URL's query override what the listener asks for.)
            raise ValueError(
                "sets decode_responses: the listener reads Redis's replies as bytes "
                "(keys need not be text); remove it from the URL's query"
            )
        return url

    @model_validator(mode="after")
    def _redis_consistent(self) -> Settings:
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            raise ValueError(
                "redis_sentinels and redis_sentinel_master go together: "
                "set both (Sentinel) or neither"
            )
        tls_files = [
            name
            for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
            if getattr(self, name) is not None
        ]
        if tls_files and not self.redis_url.startswith("rediss://"):
            raise ValueError(
                f"{tls_files[0]} is set but redis_url does not start with rediss:// "
                "(TLS is asked for by the URL's scheme)"
            )
        if self.redis_tls_key_file is not None and self.redis_tls_cert_file is None:
            raise ValueError("redis_tls_key_file is set without redis_tls_cert_file")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment wins over them.
        return (env_settings, init_settings)

    def secrets(self) -> list[str]:
        """Every password these settings hold, for a Scrubber."""
        return [
            *secrets_of(*(getattr(self, name) for name in _URL_SETTINGS)),
            *(getattr(self, name) for name in _PASSWORD_SETTINGS),
        ]

    @property
    def history_s(self) -> float:
        """How long invalidations are kept for replay: replay_history, or longer, what a
        replay_window reaches back (with the margin every window gets)."""
        window = self.replay_window + REPLAY_MARGIN_S if self.replay_window else 0.0
        return max(self.replay_history, window)

    def table_settings(self) -> dict[TableName, TableSettings]:
        return {TableName.parse(name): table for name, table in self.tables.items()}

    def column_filters(self) -> dict[TableName, ColumnFilter]:
        """The tables with a column filter (ignore_columns or columns), and theirs."""
        filters = {t: s.column_filter() for t, s in self.table_settings().items()}
        return {t: f for t, f in filters.items() if f is not None}

    # When the file was last written (its mtime, seconds since the epoch), as loaded:
    # a mapping never installed is behind an install made after it (sql/schema.sql,
    # mapping_state_v1). None: not read from a file.
    _written_at: float | None = PrivateAttr(default=None)

    @property
    def written_at(self) -> float | None:
        return self._written_at

    def mapping_fingerprint(self) -> str:
        """The tables' settings as a short hash, order aside: `install` records it, and a
        listener whose mapping a later install replaced stops (sql/schema.sql)."""
        return _fingerprint(self.tables)

    def mapping_record(self) -> str:
        """What the tables render, as JSON: `install` records it with the fingerprint
        (mapping_v1.tables), for a listener that meets a change of a table a later
        install no longer watches (mapper.retired_table())."""
        return json.dumps(
            {
                TableName.parse(name).qualified: {
                    "keys": [table.key_prefix + k for k in table.keys],
                    "redis_db": table.redis_db,
                }
                for name, table in self.tables.items()
            },
            sort_keys=True,
        )

    def mapper(self, retired: RetiredLookup | None = None) -> Mapper:
        """The configured tables' templates as a Mapper. `retired`: how it looks up a
        table the configuration lacks, to render that table's changes (the listener's and
        replay's: listener.retired_lookup()); None, the default: such a table's changes
        are not rendered (install, check, explain, keys and sweeps of the configured
        tables name only these)."""
        return Mapper(
            {
                TableName.parse(name): [KeyTemplate.parse(table.key_prefix + k) for k in table.keys]
                for name, table in self.tables.items()
            },
            {
                TableName.parse(name): table.redis_db
                for name, table in self.tables.items()
                if table.redis_db is not None
            },
            retired,
        )


def _refuse_unnameable(what: str, name: str) -> None:
    """A table or column name holding a NUL character (TOML's "\\u0000") names nothing
    PostgreSQL can hold: refused here, named. It reached the server, and `sql`, `check`
    and `install` said only "PostgreSQL text fields cannot contain NUL (0x00) bytes".
    A name over 63 bytes likewise (see _NAME_MAX_BYTES), with the name it keeps."""
    if "\x00" in name:
        raise ValueError(f"{what}: holds a NUL character, which no PostgreSQL name can")
    encoded = name.encode(errors="surrogatepass")
    if len(encoded) > _NAME_MAX_BYTES:
        kept = encoded[:_NAME_MAX_BYTES].decode(errors="ignore")
        raise ValueError(
            f"{what}: is {len(encoded)} bytes long, and PostgreSQL keeps only the first "
            f"{_NAME_MAX_BYTES} of a name: write it as the catalog holds it, {kept!r}"
        )


# PostgreSQL keeps the first 63 bytes of a longer name (NAMEDATALEN - 1), cut at a
# character's boundary, with a NOTICE: CREATE TABLE and install's lookup of the
# configured name both do, and the table was watched; but its changes are queued and
# decoded under the name the catalog holds, which the configuration did not name, and
# every one of them went to the dead letters, its keys left in Redis.
_NAME_MAX_BYTES = 63


def _refuse_truncated(name: str, table: TableName) -> None:
    for part in table:
        _refuse_unnameable(f"table {name!r}: {part!r}", part)


def _refuse_broad_sweep(name: str, table: TableName, key_prefix: str, source: str) -> None:
    """A TRUNCATE sweeps each template as a glob: one that could match other tables' and
    apps' keys (sessions, locks) is refused here, not found out in production."""
    template = KeyTemplate.parse(key_prefix + source)
    why = template.too_broad()
    if why is None:
        return
    written = f"{source!r} (with key_prefix {key_prefix!r})" if key_prefix else repr(source)
    raise TemplateError(
        f"table {name!r}: template {written} is too broad: {why}, so a TRUNCATE of the "
        f"table would sweep {template.glob()!r}, deleting other tables' and apps' keys "
        "(sessions, locks). A template with fields must begin with literal text holding a "
        f"letter or digit: give it a literal prefix such as {table.name + ':' + source!r} "
        "(or set the table's key_prefix)"
    )


def config_path(path: str | Path | None = None) -> Path:
    """The configuration file: `path`, or the one CONFIG_ENV names."""
    if path is None:
        path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"no configuration file: pass --config PATH or set {CONFIG_ENV}")
    return Path(path)


def load_settings(path: str | Path | None = None) -> Settings:
    """Read and validate the configuration, or raise ConfigError naming the culprit."""
    path = config_path(path)
    try:
        written_at = path.stat().st_mtime  # (before the read: an edit between is newer)
        # utf-8-sig: a byte-order mark (Notepad and some editors write one) is skipped;
        # tomllib reads it as text, and said only "Invalid statement (at line 1, column 1)".
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    scrub = Scrubber(_raw_secrets(data))
    misspelt = _misspelt_variables()
    if misspelt:
        raise ConfigError(f"{path}: invalid configuration\n" + "\n".join(misspelt))
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(scrub(_describe(path, exc))) from None
    except SettingsError as exc:  # a variable's JSON (tables) does not parse
        field = re.search(r'field "(\w+)"', str(exc))
        what = f"{ENV_PREFIX}{field[1].upper()}" if field else "a variable"
        raise ConfigError(scrub(f"invalid configuration: {what}: {exc.__cause__ or exc}")) from None
    settings._written_at = written_at  # (set where the file is read)
    return settings


# CDC_INVALIDATOR_* variables that are no setting, and names that may be near one by
# chance: a Kubernetes Service named cdc-invalidator gives every pod of its namespace
# CDC_INVALIDATOR_SERVICE_HOST, _PORT, _PORT_9100_TCP_ADDR, ...
_NOT_SETTINGS = {CONFIG_ENV.removeprefix(ENV_PREFIX).lower(), "pg_bindir"}
# Kubernetes' service links, which a Service of any name starting so gives (one named
# cdc-invalidator-redis-sentinel: CDC_INVALIDATOR_REDIS_SENTINEL_PORT, which difflib
# finds near redis_sentinel_password): <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT[_<port
# name>], <NAME>_PORT_<n>_<TCP|UDP|SCTP>[_PROTO|_PORT|_ADDR], and <NAME>_PORT holding
# "tcp://host:port". Never a reason to refuse to start.
_SERVICE_LINK = re.compile(
    r"(_service_host|_service_port(_\w+)?|_port_\d+_(tcp|udp|sctp)(_(proto|port|addr))?)$"
)
_SERVICE_LINK_PORT = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)
_NEAR = 0.85


def _misspelt_variables() -> list[str]:
    """A message line for each CDC_INVALIDATOR_* variable that names no setting but
    nearly names one (CDC_INVALIDATOR_BATCHSIZE, ..._DATABASE_ULR): it was meant for
    that setting, and ignored it would leave the setting at the file's value or the
    default, unsaid. (One that names nothing near a setting is left alone: see
    _NOT_SETTINGS.)"""
    names = list(Settings.model_fields)
    lines = []
    for variable in sorted(os.environ):
        if not variable.upper().startswith(ENV_PREFIX):
            continue
        name = variable[len(ENV_PREFIX) :].lower()
        if name in names or name in _NOT_SETTINGS:
            continue
        if _SERVICE_LINK.search(name):
            continue
        if name.endswith("_port") and _SERVICE_LINK_PORT.match(os.environ[variable]):
            continue
        near = difflib.get_close_matches(name, names, n=1, cutoff=_NEAR)
        if near:
            lines.append(
                f"  - unknown setting from variable {variable}: did you mean "
                f"{ENV_PREFIX}{near[0].upper()} (setting {near[0]!r})?"
            )
    return lines


def _raw_secrets(data: dict[str, Any]) -> list[str]:
    """The passwords in the file's and the environment's values, before validation: a
    message about a bad configuration must not show them either."""
    values: dict[str, list[str]] = {name: [] for name in (*_URL_SETTINGS, *_PASSWORD_SETTINGS)}
    for name, value in data.items():
        if name in values:
            values[name].append(str(value))
    for variable, value in os.environ.items():
        name = variable.lower().removeprefix(ENV_PREFIX.lower())
        if variable.upper().startswith(ENV_PREFIX) and name in values:
            values[name].append(value)
    # A sentinel written with user info ("user:password@host:port"), refused, is read as
    # a URL's to find it.
    sentinels = data.get("redis_sentinels") or os.environ.get(f"{ENV_PREFIX}REDIS_SENTINELS")
    if not isinstance(sentinels, list):
        sentinels = re.split(r"[\s,\[\]\"]+", str(sentinels or ""))
    return [
        *(s for name in _URL_SETTINGS for s in secrets_of(*values[name])),
        *(s for name in _PASSWORD_SETTINGS for s in values[name]),
        *secrets_of(*(f"redis://{entry}" for entry in sentinels if "@" in str(entry))),
    ]


def _describe(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            what = f"unknown setting {loc!r}"
        elif err["type"] == "missing":
            what = f"missing setting {loc!r}"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            what = f"{loc}: {msg}" if loc else msg
            secret = err["loc"][:1] in {(name,) for name in (*_URL_SETTINGS, *_PASSWORD_SETTINGS)}
            if not secret and "input" in err and _is_scalar(err["input"]):
                what += f" (got {err['input']!r})"
            # The environment wins over the file: say where a bad value came from (its
            # names are read in any case: cdc_invalidator_capture counts too).
            wanted = f"{ENV_PREFIX}{err['loc'][0]!s}".upper() if err["loc"] else ""
            named = [variable for variable in os.environ if variable.upper() == wanted]
            if wanted and named:
                what += f" (from {named[0]})"
        lines.append(f"  - {what}")
    return "\n".join(lines)


def _is_scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool) and not (
        isinstance(value, str) and len(value) > _ECHOED_MAX_LENGTH
    )


class ConfigFile:
    """The file a running listener's settings came from, read again on demand.

    `install` of a new mapping compiles capture functions (or publishes tables) whose
    changes a listener still running the old one cannot render: a table it does not
    name, a template's column. The runner asks mapping_changed() before each batch
    acknowledges and before a replay renders, and when it meets such a change: if the
    file now holds other tables, the listener is behind
    the file and stops to start again with it, rather than losing those changes' keys.
    Likewise when the file's capture mode changed: after `install` of the other mode, a
    trigger listener would read a queue nothing writes any more (alive, ready, and
    deleting nothing), and a logical one would keep the slot that install must drop.
    And when any other setting changed: a listener that went on with the one it started
    with deleted from the Redis the file no longer names (`redis_url` edited: a change's
    key stayed cached in the new one), read another database than the file's, or kept
    streaming the slot `slot_name` no longer names (install left it, and the new one
    kept WAL unread), alive and ready all the while.
    """

    def __init__(self, path: Path, settings: Settings) -> None:
        self._path = path
        self._mapping = _meaning(settings.tables)
        self._capture = settings.capture
        self._others = _others(settings)
        # Not stat()ed here: `settings` were loaded earlier, and an edit in between would
        # be taken for what they hold. The first call reads the file.
        self._stamp: tuple[int, ...] | None = ()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = self._path.stat()  # (through a symlink: a mounted ConfigMap swaps its target)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def mapping_changed(self) -> bool:
        """Whether the file's tables (or capture mode) differ from those loaded; the
        file is read only when it changed since it was last read. A file that cannot be
        read or is invalid now (caught mid-write) counts as unchanged, logged once, until
        it is written again: a listener restarted for it would stop at its
        configuration."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            fresh = load_settings(self._path)
        except ConfigError as exc:
            log.warning("configuration_unreadable", error=str(exc))
            return False
        if _meaning(fresh.tables) != self._mapping or fresh.capture != self._capture:
            return True
        others = _others(fresh)
        if changed := sorted(
            k for k in others.keys() | self._others.keys() if others.get(k) != self._others.get(k)
        ):
            # Names only: a value may be a secret (a password in a URL).
            log.warning("configuration_settings_changed", settings=changed)
            return True
        return False


def _others(settings: Settings) -> dict[str, object]:
    """Every setting but the tables (and capture, compared on its own), as loaded: the
    file's, or the environment's where it wins. Not those only `install` reads, which
    it compiles into the capture functions (the listener deletes from whatever payload
    or bulk sweep comes): a listener restarted for them would change nothing."""
    return settings.model_dump(exclude={"tables", "capture", "notify_payload", "bulk_sweep_rows"})


def _fingerprint(tables: dict[str, TableSettings]) -> str:
    """What the tables' settings mean (_meaning), as a short hash: tables by the table
    their name names (`[tables.users]` is `[tables."public.users"]`)."""
    canonical = {
        TableName.parse(name).qualified: {
            field: sorted(value) if isinstance(value, frozenset) else value
            for field, value in meaning.items()
        }
        for name, meaning in _meaning(tables).items()
    }
    text = json.dumps(canonical, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _meaning(tables: dict[str, TableSettings]) -> dict[str, dict[str, object]]:
    """What the tables' settings mean: their lists (templates, filters' columns) in any
    order. A listener restarted for a reordered list would change nothing."""
    return {
        name: {
            field: frozenset(value) if isinstance(value, list) else value
            for field, value in table.model_dump().items()
        }
        for name, table in tables.items()
    }
