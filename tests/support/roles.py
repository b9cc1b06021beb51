"""Login roles a test makes for itself: a name of its own, gone when the test is."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import LiteralString

from psycopg import sql

from tests.support.env import Env


@contextmanager
def login_role(
    env: Env, prefix: str, options: LiteralString | sql.Composable = ""
) -> Iterator[str]:
    """A login role named `prefix` and a random suffix (roles are the whole cluster's,
    and tests run against one), created with `options` (CREATE ROLE's, after LOGIN).
    Afterwards its sessions are ended, what it owns or was granted in the test's
    database dropped (CASCADE: our triggers may depend on a capture function it was
    given), and the role."""
    role = prefix + uuid.uuid4().hex[:8]
    ident = sql.Identifier(role)
    extra = sql.SQL(options) if isinstance(options, str) else options
    with env.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN {}").format(ident, extra))
    try:
        yield role
    finally:
        with env.connect() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                [role],
            )
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))
