"""PgBouncer in front of a test database: a pooler as platform teams put one there
(tests/test_poolers.py). It refuses to run as root: started as PostgreSQL's user then."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc_invalidator.demo.servers import PG_USER_WHEN_ROOT, ServerError, free_port
from tests.support.waits import wait_until


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(p).exists()), None
    )
    if found is None:
        raise ServerError("pgbouncer not found: install the pgbouncer package")
    return found


@dataclass(frozen=True)
class Bouncer:
    dsn: str  # the database, through it
    ini: Path
    process: subprocess.Popen[bytes]

    def switch(self, pool_mode: str) -> None:
        """Another pool_mode, as an operator's RELOAD sets it: sessions open stay."""
        text = re.sub(r"(?m)^pool_mode = .*$", f"pool_mode = {pool_mode}", self.ini.read_text())
        self.ini.write_text(text)
        self.process.send_signal(signal.SIGHUP)
        log = self.ini.with_name("pgbouncer.log")
        wait_until(
            lambda: (
                "RELOAD command issued" in log.read_text(errors="replace")
                or "got SIGHUP" in log.read_text(errors="replace")
            ),
            what="pgbouncer reloaded",
        )


@contextmanager
def pgbouncer(dsn: str, pool_mode: str, pool_size: int = 5) -> Iterator[Bouncer]:
    """A PgBouncer with `pool_mode` and `pool_size` server connections in front of the
    database `dsn` names (trust, its user)."""
    target = conninfo_to_dict(dsn)
    port = free_port()
    directory = Path(tempfile.mkdtemp(prefix="cdc-invalidator-pgbouncer-"))
    user = PG_USER_WHEN_ROOT if os.geteuid() == 0 else None
    (directory / "users.txt").write_text(f'"{target["user"]}" ""\n')
    ini = directory / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n* = host={target['host']} port={target['port']}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {directory / 'users.txt'}\n"
        f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    if user is not None:
        shutil.chown(directory, user)
        for path in directory.iterdir():
            shutil.chown(path, user)
    process = subprocess.Popen(
        [find_pgbouncer(), str(ini)],
        user=user,
        stdout=subprocess.DEVNULL,
        stderr=(directory / "stderr").open("wb"),
    )
    through = make_conninfo(dsn, host="127.0.0.1", port=str(port))
    try:
        wait_until(lambda: _answers(through, process), what=f"pgbouncer on port {port}")
        yield Bouncer(through, ini, process)
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
            process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def _answers(dsn: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise ServerError(f"pgbouncer exited ({process.returncode})")
    try:
        with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True
