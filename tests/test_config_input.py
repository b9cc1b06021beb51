"""Configuration input a user gets wrong, against real servers.

A CDC_INVALIDATOR_* variable that nearly names a setting is a configuration error
naming it (exit 2), not ignored: `CDC_INVALIDATOR_BATCHSIZE=5` or
`CDC_INVALIDATOR_REDIS_ULR=...` left the setting at the file's value, and `check` said
all was well (found by hand on PostgreSQL 15 and Redis 7.0). Variables that name
nothing near a setting, and Kubernetes' service links (CDC_INVALIDATOR_SERVICE_PORT,
..._REDIS_SENTINEL_PORT=tcp://..., near a setting or not), are left alone. A file with
a UTF-8 byte-order mark is read. A NUL in a table or column name is named.
"""

from __future__ import annotations

import pytest

from cdc_invalidator.cli import main
from tests.support.env import Env
from tests.support.listener import run_cli
from tests.support.servers import free_port

pytestmark = pytest.mark.servers

TABLES = {"public.users": ["user:{id}"]}
# What Kubernetes gives every pod in the namespace of a Service named cdc-invalidator.
SERVICE_VARIABLES = {
    "CDC_INVALIDATOR_SERVICE_HOST": "10.0.0.7",
    "CDC_INVALIDATOR_SERVICE_PORT": "9100",
    "CDC_INVALIDATOR_PORT": "tcp://10.0.0.7:9100",
    "CDC_INVALIDATOR_PORT_9100_TCP_PORT": "9100",
    # and of one named cdc-invalidator-redis-sentinel, near redis_sentinel_password
    "CDC_INVALIDATOR_REDIS_SENTINEL_SERVICE_HOST": "10.0.0.8",
    "CDC_INVALIDATOR_REDIS_SENTINEL_PORT": "tcp://10.0.0.8:26379",
    "CDC_INVALIDATOR_REDIS_SENTINEL_PORT_26379_TCP_ADDR": "10.0.0.8",
}


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("CDC_INVALIDATOR_REDIS_ULR", "CDC_INVALIDATOR_REDIS_URL"),
        ("CDC_INVALIDATOR_BATCHSIZE", "CDC_INVALIDATOR_BATCH_SIZE"),
        ("cdc_invalidator_scan_cont", "CDC_INVALIDATOR_SCAN_COUNT"),
        ("CDC_INVALIDATOR_METRIC_PORT", "CDC_INVALIDATOR_METRICS_PORT"),  # (not tcp://)
    ],
)
def test_a_misspelt_variable_is_named(env: Env, variable: str, meant: str) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    config = env.config(TABLES)
    assert main(["install", "--config", str(config)]) == 0
    value = f"redis://:pw-9c1e@127.0.0.1:{free_port()}/0" if "ULR" in variable else "50"
    result = run_cli("check", "--config", str(config), env={**SERVICE_VARIABLES, variable: value})
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert f"unknown setting from variable {variable}: did you mean {meant}" in text, text
    assert "pw-9c1e" not in text, text
    assert "Traceback" not in text, text


def test_variables_that_name_no_setting_are_left_alone(env: Env) -> None:
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    config = env.config(TABLES)
    assert main(["install", "--config", str(config)]) == 0
    result = run_cli("check", "--config", str(config), env=SERVICE_VARIABLES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_configuration_file_with_a_byte_order_mark_is_read(env: Env) -> None:
    """A file saved with a UTF-8 byte-order mark (Notepad does) was refused as "invalid
    TOML: Invalid statement (at line 1, column 1)", pointing at a character no editor
    shows (by hand: `check` exit 2)."""
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    config = env.config(TABLES)
    assert main(["install", "--config", str(config)]) == 0
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    result = run_cli("check", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ('[tables."public.us\\u0000ers"]\nkeys = ["user:{id}"]', "table 'public.us\\x00ers'"),
        ('[tables."public.users"]\nkeys = ["user:{i\\u0000d}"]', "column 'i\\x00d'"),
        (
            '[tables."public.users"]\nkeys = ["user:{id}"]\nignore_columns = ["a\\u0000b"]',
            "column 'a\\x00b'",
        ),
    ],
    ids=["table", "template", "ignore_columns"],
)
def test_a_nul_in_a_name_is_named(env: Env, table: str, named: str) -> None:
    """TOML lets a name hold "\\u0000", which no PostgreSQL name can: `sql`, `check` and
    `install` said only "PostgreSQL text fields cannot contain NUL (0x00) bytes" (exit 1),
    naming neither the table nor the column (by hand on PostgreSQL 15)."""
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    config = env.tmp_path / "nul.toml"
    config.write_text(f'database_url = "{env.dsn}"\nredis_url = "{env.redis_url}"\n{table}\n')
    for command in ("sql", "install"):
        result = run_cli(command, "--config", str(config))
        text = result.stdout + result.stderr
        assert result.returncode == 2, text
        assert f"{named}: holds a NUL character" in text, text
        assert "Traceback" not in text, text


def test_a_nul_in_the_metrics_address_is_named(env: Env) -> None:
    """`metrics_address = "127.0.0.1\\u0000"` passed `check`, and `run` ended in a
    traceback (TypeError: host name must not contain null character), by hand."""
    env.sql("CREATE TABLE users (id int PRIMARY KEY, email text)")
    assert main(["install", "--config", str(env.config(TABLES))]) == 0
    config = env.config(
        TABLES, name="bad.toml", metrics_address="127.0.0.1\x00", metrics_port=free_port()
    )
    result = run_cli("run", "--config", str(config))
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.returncode == 2, text
    assert "- metrics_address: '127.0.0.1\\x00' holds a NUL character" in text, text


def test_a_table_name_postgresql_truncates_is_refused_naming_the_name_it_keeps(
    env: Env,
) -> None:
    """A table created and configured with a name over 63 bytes: PostgreSQL keeps 63
    (with a NOTICE), install's lookup too, and the table was watched; its changes were
    queued under the catalog's name, which the configuration lacked, so every one went
    to the dead letters and its keys stayed (by hand on PostgreSQL 15: `l:1` left after
    an INSERT, "table public.xxx... is not in the configuration")."""
    long_name = "x" * 70
    env.sql(f"CREATE TABLE {long_name} (id int PRIMARY KEY)")
    config = env.config({f"public.{long_name}": ["l:{id}"]})
    result = run_cli("install", "--config", str(config))
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "is 70 bytes long, and PostgreSQL keeps only the first 63" in text, text
    assert repr("x" * 63) in text, text
    # Written as the catalog holds it, it is watched and its keys deleted.
    config = env.config({f"public.{'x' * 63}": ["l:{id}"]})
    assert main(["install", "--config", str(config)]) == 0


def test_a_column_name_postgresql_truncates_is_refused_naming_the_name_it_keeps(
    env: Env,
) -> None:
    """The column of a template, created with a 70-byte name (PostgreSQL kept 63):
    install said only that the table "has no column" of the name configured."""
    env.sql(f"CREATE TABLE users (id int PRIMARY KEY, {'c' * 70} text)")
    config = env.config({"public.users": ["user:{id}", f"user:c:{{{'c' * 70}}}"]})
    result = run_cli("install", "--config", str(config))
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "is 70 bytes long, and PostgreSQL keeps only the first 63" in text, text
    assert repr("c" * 63) in text, text
