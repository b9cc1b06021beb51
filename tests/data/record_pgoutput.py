"""Record real pgoutput messages for tests/test_pgoutput.py. A script, run by hand:

    .venv/bin/python -m tests.data.record_pgoutput

It starts a throwaway PostgreSQL, creates the tables, a publication and a pgoutput slot,
runs each scenario in its own transaction(s) and reads what the slot decoded with
pg_logical_slot_get_binary_changes (protocol version 1). Each `data` row is exactly one
pgoutput message, what an XLogData message carries. Every read starts a new decoding
context, so every scenario carries its own Relation (and Type) messages.

Output, tests/data/pgoutput.json: {scenario: [message as hex, in order]}, plus "_values":
{"pages_full.slug": the TOASTed value the toast_full scenario must give back}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
from tests.support.servers import PostgresServer

OUT = Path(__file__).with_name("pgoutput.json")

SCHEMA = """
CREATE TABLE users (id int PRIMARY KEY, email text, name text);
CREATE TABLE users_full (id int PRIMARY KEY, email text, name text);
ALTER TABLE users_full REPLICA IDENTITY FULL;

-- slug is the column a key template would use; EXTERNAL: stored out of line, uncompressed.
CREATE TABLE pages (id int PRIMARY KEY, slug text, title text);
ALTER TABLE pages ALTER COLUMN slug SET STORAGE EXTERNAL;
CREATE TABLE pages_full (id int PRIMARY KEY, slug text, title text);
ALTER TABLE pages_full ALTER COLUMN slug SET STORAGE EXTERNAL;
ALTER TABLE pages_full REPLICA IDENTITY FULL;

CREATE TABLE authors (id int PRIMARY KEY, name text);
CREATE TABLE books (id int PRIMARY KEY, author_id int REFERENCES authors, title text);

CREATE TABLE measurements (region text, id int, v text, PRIMARY KEY (region, id))
    PARTITION BY LIST (region);
CREATE TABLE measurements_eu PARTITION OF measurements FOR VALUES IN ('eu');
CREATE TABLE measurements_us PARTITION OF measurements FOR VALUES IN ('us');

CREATE SCHEMA "My Schema";
CREATE TABLE "My Schema"."Order""s" ("Key Col" int PRIMARY KEY, "Note" text);

CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE moods (id int PRIMARY KEY, m mood);

CREATE PUBLICATION pub
    FOR TABLE users, users_full, pages, pages_full, authors, books, measurements,
        "My Schema"."Order""s", moods
    WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = true);
"""

# 625 md5 digests of random strings: 20000 characters, no use compressing them.
BIG_VALUE = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 625))"

ROWS = "VALUES (1, 'ann@example.com', 'Ann'), (2, NULL, 'Bob')"


class Recorder:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.recorded: dict[str, Any] = {}

    def _changes(self, messages: bool = False) -> list[str]:
        options = ", 'messages', 'true'" if messages else ""
        rows = self.conn.execute(
            "SELECT lsn, xid, data FROM pg_logical_slot_get_binary_changes('s', NULL, NULL, "
            f"'proto_version', '1', 'publication_names', 'pub'{options})".encode()
        ).fetchall()
        return [bytes(data).hex() for _lsn, _xid, data in rows]

    def setup(self, *transactions: str) -> None:
        """Run SQL whose changes are not a scenario (they are read and dropped)."""
        self._run(transactions)
        self._changes()

    def record(self, name: str, *transactions: str, messages: bool = False) -> None:
        self._run(transactions)
        self.recorded[name] = self._changes(messages)

    def _run(self, transactions: tuple[str, ...]) -> None:
        for sql in transactions:
            with self.conn.transaction():
                self.conn.execute(sql.encode())


def record_all(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    conn.execute(SCHEMA.encode())
    # Not in the same (implicit) transaction as the DDL: PostgreSQL refuses that.
    conn.execute(b"SELECT pg_create_logical_replication_slot('s', 'pgoutput')")
    r = Recorder(conn)

    r.record("insert", f"INSERT INTO users {ROWS}")
    # DEFAULT identity (the primary key).
    r.record("default_update_name", "UPDATE users SET name = 'Anna' WHERE id = 1")
    r.record("default_update_email", "UPDATE users SET email = 'ann@example.org' WHERE id = 1")
    r.record("default_update_pk", "UPDATE users SET id = 10 WHERE id = 1")
    r.record("default_delete", "DELETE FROM users WHERE id = 10")
    # FULL identity: the same changes.
    r.setup(f"INSERT INTO users_full {ROWS}")
    r.record("full_update_name", "UPDATE users_full SET name = 'Anna' WHERE id = 1")
    r.record("full_update_email", "UPDATE users_full SET email = 'ann@example.org' WHERE id = 1")
    r.record("full_update_pk", "UPDATE users_full SET id = 10 WHERE id = 1")
    r.record("full_delete", "DELETE FROM users_full WHERE id = 10")

    # An UPDATE that leaves a TOASTed slug alone: the new tuple says 'u' (unchanged).
    r.setup(
        f"INSERT INTO pages_full VALUES (1, {BIG_VALUE}, 'A')",
        f"INSERT INTO pages VALUES (1, {BIG_VALUE}, 'A')",
    )
    slug = conn.execute(b"SELECT slug FROM pages_full WHERE id = 1").fetchone()
    assert slug is not None
    r.record("toast_full", "UPDATE pages_full SET title = 'B' WHERE id = 1")
    r.record("toast_default", "UPDATE pages SET title = 'B' WHERE id = 1")

    r.record("truncate_two", "TRUNCATE users, users_full")
    r.setup("INSERT INTO authors VALUES (1, 'Ann'); INSERT INTO books VALUES (1, 1, 'Book')")
    r.record("truncate_cascade", "TRUNCATE authors CASCADE")

    # Written through the parent; publish_via_partition_root names the parent.
    r.record(
        "partition",
        "INSERT INTO measurements VALUES ('eu', 1, 'x'), ('us', 2, 'y')",
        "UPDATE measurements SET v = 'z' WHERE id = 2",
        # Moves the row to another partition: a DELETE and an INSERT.
        "UPDATE measurements SET region = 'us' WHERE id = 1",
    )

    r.record(
        "quoted",
        """INSERT INTO "My Schema"."Order""s" VALUES (7, 'seven')""",
        """DELETE FROM "My Schema"."Order""s" WHERE "Key Col" = 7""",
    )

    # A column of a user-defined type: a Type message ('Y') precedes the Relation.
    r.record("enum_type", "INSERT INTO moods VALUES (1, 'happy')")

    # A transaction replayed from elsewhere: an Origin message ('O') after Begin.
    conn.execute(b"SELECT pg_replication_origin_create('upstream')")
    conn.execute(b"SELECT pg_replication_origin_session_setup('upstream')")
    r.record(
        "origin",
        "SELECT pg_replication_origin_xact_setup('0/12345678', now()); "
        "INSERT INTO users VALUES (3, 'c@example.com', 'Cy')",
    )
    conn.execute(b"SELECT pg_replication_origin_session_reset()")

    # A logical decoding message ('M'), sent only when asked for.
    r.record(
        "message",
        "SELECT pg_logical_emit_message(true, 'cdc', 'hello')",
        messages=True,
    )

    r.recorded["_values"] = {"pages_full.slug": slug[0]}
    return r.recorded


def main() -> None:
    with (
        PostgresServer.create({"fsync": "off"}) as pg,
        psycopg.connect(pg.dsn("postgres"), autocommit=True) as conn,
    ):
        recorded = record_all(conn)
    OUT.write_text(json.dumps(recorded, indent=1) + "\n")
    for name, messages in recorded.items():
        if name != "_values":
            kinds = " ".join(chr(int(m[:2], 16)) for m in messages)
            print(f"{name:22} {kinds}")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
