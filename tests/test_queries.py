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
