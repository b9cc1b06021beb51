"""A long key prints in time: `keys`, `tail` and `explain` print through the password
scrubber (cdc_invalidator.redact), whose URL pattern was tried from every letter of a
long word to its end. By hand on PostgreSQL 15 and Redis 7.0, `keys --where` of a row
keyed by a 100 kB value took 12 s (20 kB: 1.8 s; 1 MB: some 20 minutes), and `tail`
showed that row's invalidation 9.7 s late."""

from __future__ import annotations

import time

import pytest

from cdc_invalidator.cli import main
from cdc_invalidator.redact import Scrubber
from tests.support.env import Env
from tests.support.listener import run_cli

pytestmark = pytest.mark.servers

LONG = 150_000  # characters of one word: no space, no "://"


def test_keys_prints_a_long_key_in_time(env: Env) -> None:
    env.sql(
        "CREATE TABLE docs (id int PRIMARY KEY, body text);"
        f"INSERT INTO docs VALUES (1, repeat('a', {LONG}))"
    )
    config = env.config({"public.docs": ["doc:{id}", "docb:{body}"]})
    assert main(["install", "--config", str(config)]) == 0
    started = time.monotonic()
    result = run_cli("keys", "public.docs", "--where", "id = 1", "--config", str(config))
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert f"docb:{'a' * LONG}" in result.stdout.split()
    assert took < 10, f"{took:.1f} s"  # 27 s before the fix, ~1 s after


def test_the_scrubber_is_linear_and_still_masks() -> None:
    scrub = Scrubber()
    started = time.monotonic()
    assert scrub("k" * LONG) == "k" * LONG
    assert time.monotonic() - started < 1
    assert scrub("at postgresql://app:s3cret@db/app") == "at postgresql://app:***@db/app"
    assert scrub("1x://u:pw@h") == "1x://u:***@h"  # (no scheme need be read)
