"""Which PostgreSQL servers `check` and `install` accept (cdc_invalidator.pg.versions:
13 and later, logical capture 15 and later), and which one the suite runs on (`--pg`,
tests/support/pgversion.py). No server older than 15 runs here: the refusal is tested
on the version number, and through the CLI on a real server with the bar raised."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdc_invalidator.cli import main
from cdc_invalidator.pg import versions
from cdc_invalidator.pg.versions import format_version, oldest_for, refusal
from tests.support import pgversion
from tests.support.env import Env
from tests.support.pgversion import PgInstall
from tests.support.psql import psql
from tests.support.servers import ServerError

USERS = {"public.users": ["user:{id}"]}


@pytest.mark.parametrize(
    ("num", "text"),
    [(180006, "18.6"), (150018, "15.18"), (130000, "13.0"), (90624, "9.6.24")],
)
def test_format_version_prints_it_as_postgresql_does(num: int, text: str) -> None:
    assert format_version(num) == text


@pytest.mark.parametrize("capture", ["trigger", "logical"])
def test_a_server_older_than_13_is_refused_naming_both_versions(capture: str) -> None:
    why = refusal(120017, capture)
    assert why is not None
    assert "PostgreSQL 12.17" in why
    assert "the oldest supported, PostgreSQL 13" in why
    assert "xid8" in why


def test_logical_capture_needs_15_and_says_trigger_mode_would_do() -> None:
    assert refusal(130000, "trigger") is None
    assert refusal(140012, "trigger") is None
    why = refusal(140012, "logical")
    assert why is not None
    assert "PostgreSQL 14.12" in why
    assert "logical capture needs PostgreSQL 15 or later" in why
    assert 'capture = "trigger"' in why


@pytest.mark.parametrize("num", [150000, 150018, 160004, 170002, 180006, 190000])
@pytest.mark.parametrize("capture", ["trigger", "logical"])
def test_15_and_later_are_accepted_in_either_mode(num: int, capture: str) -> None:
    assert refusal(num, capture) is None


def test_the_suite_runs_on_the_version_it_names(env: Env, pg_install: PgInstall) -> None:
    """--pg is not silently ignored: the server answering is the version announced."""
    assert int(env.scalar("SHOW server_version_num")) // 10000 == pg_install.major
    assert str(env.scalar("SHOW server_version")).startswith(pg_install.version)


def run(config: Path, command: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([command, "--config", str(config)])
    out, err = capsys.readouterr()
    return code, out, err


def make_users(env: Env) -> Path:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    return env.config(USERS)


@pytest.mark.usefixtures("capture")
def test_check_accepts_this_server_and_names_its_version(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_users(env)
    assert run(config, "install", capsys)[0] == 0
    num = int(env.scalar("SHOW server_version_num"))
    code, out, err = run(config, "check", capsys)
    assert code == 0, err
    assert (
        f"ok: server: PostgreSQL {format_version(num)} (server_version_num {num}); "
        f"{env.capture} capture needs {oldest_for(env.capture)} or later"
    ) in out.splitlines()


@pytest.mark.usefixtures("capture")
def test_install_and_check_refuse_a_server_older_than_the_oldest_supported(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real server, with the bar raised above it: install refuses before it changes
    anything, check says why and checks nothing else."""
    monkeypatch.setattr(versions, "OLDEST", 99)
    monkeypatch.setattr(versions, "OLDEST_LOGICAL", 99)
    config = make_users(env)
    found = f"PostgreSQL {format_version(int(env.scalar('SHOW server_version_num')))}"
    code, _, err = run(config, "install", capsys)
    assert code == 1
    assert (
        f"cdc-invalidator: error: install refused, nothing was changed: the server is {found}, "
        "older than the oldest supported, PostgreSQL 99"
    ) in err
    assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
    assert env.scalar("SELECT count(*) FROM pg_publication") == 0
    assert (
        env.scalar("SELECT count(*) FROM pg_replication_slots WHERE database = current_database()")
        == 0
    )
    code, out, err = run(config, "check", capsys)
    assert code == 1
    assert f"error: database {env.dsn.rsplit('/', 1)[1]!r}: the server is {found}" in err
    assert "not installed" not in err + out


def test_programs_the_postgres_user_cannot_reach_are_named_and_others_still_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root the servers run as `postgres`: the wheel installed under a directory only
    root may enter (pytest's tmp_path, 0700) cannot serve --pg 18, which says so, and
    does not stop --pg 15 from finding the system's."""
    wheel = pgversion.wheel_bindir()
    assert wheel is not None  # the dev extra installs it
    hidden = tmp_path / "bin"
    hidden.mkdir()
    (hidden / "postgres").symlink_to(wheel / "postgres")
    monkeypatch.setattr(pgversion, "wheel_bindir", lambda: hidden)

    def none_named() -> Path:  # not the wheel's again, as --pg 18 named it for this run
        raise ServerError("none named")

    monkeypatch.setattr(pgversion, "find_pg_bindir", none_named)
    assert pgversion.select(15).major == 15
    if os.geteuid() != 0:  # we run the servers ourselves: nothing is hidden from us
        assert pgversion.select(18).bindir == hidden
        return
    with pytest.raises(ServerError, match=r"as user 'postgres' \(every directory above it"):
        pgversion.select(18)


@pytest.mark.usefixtures("capture")
def test_the_install_script_run_by_hand_refuses_too_old_a_server(
    env: Env, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cdc-invalidator sql | psql`: the script checks the server itself, right after the
    squatting guard, before it creates anything."""
    monkeypatch.setattr(versions, "OLDEST", 99)
    monkeypatch.setattr(versions, "OLDEST_LOGICAL", 99)
    config = make_users(env)
    code, script, err = run(config, "sql", capsys)
    assert code == 0, err
    result = psql(env, script)
    assert result.returncode != 0
    what = "logical capture" if env.logical else "cdc_invalidator"
    version = env.scalar("SHOW server_version")
    assert (
        f"cdc_invalidator: the server is PostgreSQL {version}: {what} needs PostgreSQL 99 or later"
    ) in result.stderr
    assert env.scalar("SELECT to_regnamespace('cdc_invalidator')") is None
