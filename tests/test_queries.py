"""The registry of our SQL (cdc_invalidator.pg.queries.Q) against the files in sql/."""

from __future__ import annotations

from pathlib import Path

from cdc_invalidator.pg.queries import Q, missing

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"


def test_every_registered_query_has_its_file() -> None:
    assert missing() == []
    for query in Q:
        assert (SQL_DIR / query.value).is_file(), query
        assert query.text.strip(), f"{query.value} is empty"


def test_every_sql_file_is_registered() -> None:
    on_disk = {path.name for path in SQL_DIR.glob("*.sql")}
    registered = {query.value for query in Q}
    assert on_disk - registered == set(), "files in sql/ that no member of Q names"
    assert registered <= on_disk


def test_the_text_is_the_file_as_written() -> None:
    assert Q.SLOT_INFO.text == (SQL_DIR / "slot_info.sql").read_text("utf-8")
    assert Q.SLOT_INFO.sql.as_string(None) == Q.SLOT_INFO.text


# psycopg parses a query's placeholders once and caches that only for a text of at most
# this many bytes (psycopg._queries.MAX_CACHED_STATEMENT_LENGTH, private).
PSYCOPG_CACHED_LENGTH = 4096


def test_the_compact_text_drops_whole_line_comments_only() -> None:
    compact = Q.FETCH_BATCH.compact
    kept = [line for line in Q.FETCH_BATCH.text.splitlines() if not line.lstrip().startswith("--")]
    assert compact.splitlines() == kept
    assert "%(limit)s" in compact
    # The trigger queue's read, run at every batch: its parsing stays cached.
    assert len(compact.encode()) <= PSYCOPG_CACHED_LENGTH < len(Q.FETCH_BATCH.text.encode())
