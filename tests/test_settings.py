"""Configuration: loading, validation, environment overrides, error messages (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_invalidator.cli import main
from cdc_invalidator.events import TableName
from cdc_invalidator.settings import ConfigError, ConfigFile, load_settings

GOOD = """
database_url = "postgresql://app@db/app"
redis_url = "redis://cache:6379/0"
capture = "trigger"
[tables."public.users"]
keys = ["user:{id}", "user:email:{email}"]
[tables."orders"]
keys = ["order:{id}", "user:{user_id}:orders"]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_issue_example_loads(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, GOOD))
    mapper = settings.mapper()
    assert set(mapper.tables) == {TableName("public", "users"), TableName("public", "orders")}
    assert mapper.columns(TableName("public", "orders")) == ["id", "user_id"]
    assert settings.batch_size > 0


def test_environment_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_INVALIDATOR_REDIS_URL", "redis://other:1/2")
    monkeypatch.setenv("CDC_INVALIDATOR_BATCH_SIZE", "17")
    settings = load_settings(_write(tmp_path, GOOD))
    assert settings.redis_url == "redis://other:1/2"
    assert settings.batch_size == 17
    assert settings.database_url == "postgresql://app@db/app"


def test_a_bad_value_from_the_environment_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file does not hold it: the message says where it came from."""
    monkeypatch.setenv("CDC_INVALIDATOR_BATCH_SIZE", "abc")
    with pytest.raises(ConfigError, match=r"batch_size: .* \(from CDC_INVALIDATOR_BATCH_SIZE\)"):
        load_settings(_write(tmp_path, GOOD))


def test_a_bad_value_from_a_lower_case_variable_names_it_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Variables are read in any case: a lower-case one was not named, and the user
    looked for the bad value in the file (a review following the docs)."""
    monkeypatch.setenv("cdc_invalidator_capture", "bogus")
    with pytest.raises(ConfigError, match=r"capture: .* \(from cdc_invalidator_capture\)"):
        load_settings(_write(tmp_path, GOOD))


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_INVALIDATOR_CONFIG", str(_write(tmp_path, GOOD)))
    assert load_settings(None).redis_url == "redis://cache:6379/0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("database_url = \n", "invalid TOML"),
        (GOOD.replace("user:{id}", "user:{id"), "unbalanced '{'"),
        ("batch_sise = 5\n" + GOOD, "unknown setting 'batch_sise'"),
        ("batch_size = 0\n" + GOOD, "batch_size"),
        (GOOD.replace('capture = "trigger"', 'capture = "magic"'), "capture"),
        ('redis_url = "redis://x"\n', "tables"),
        (GOOD.replace('keys = ["order:{id}", "user:{user_id}:orders"]', "keys = []"), "keys"),
        (GOOD.replace('"user:{id}", ', '"{id}", '), "template '{id}' is too broad"),
        (
            GOOD.replace('"user:email:{email}"', '"user:email:{email|lowercase}"'),
            "template 'user:email:{email|lowercase}': unknown filter 'lowercase'",
        ),
        (GOOD.replace('[tables."orders"]', '[tables."a.b.c"]'), "invalid table name"),
        (GOOD.replace('[tables."orders"]', '[tables."public.USERS"]'), "name the same table"),
        (GOOD.replace("keys = [", "kees = [", 1), "unknown setting 'tables.public.users.kees'"),
        ('slot_name = "My-Slot"\n' + GOOD, "slot_name"),
        # libpq reads these only as it connects: an error each start, not a configuration's
        (
            GOOD.replace("@db/app", "@db/app?sslmode=bogus"),
            "sslmode='bogus': must be one of disable, allow,",
        ),
        (GOOD.replace("@db/app", "@db:abc/app"), "port='abc': must be a number"),
        ('publication_name = ""\n' + GOOD, "publication_name"),
        ("status_interval_ms = 0\n" + GOOD, "status_interval_ms"),
        ('replay_window = "soon"\n' + GOOD, "replay_window: 'soon' is not a duration"),
        ('replay_history = "-1h"\n' + GOOD, "replay_history: '-1h' is not a duration"),
        ("replay_history = true\n" + GOOD, "replay_history: expected a duration"),
        ("second_delete_ms = -1\n" + GOOD, "second_delete_ms"),
        ('notify_payload = "maybe"\n' + GOOD, "notify_payload"),
        (
            "bulk_sweep_rows = 999\n" + GOOD,
            r"bulk_sweep_rows: must be 0 \(off\) or at least 1000 rows \(got 999\)",
        ),
        ("bulk_sweep_rows = -1\n" + GOOD, "bulk_sweep_rows"),
        ("redis_check_interval_ms = 1\n" + GOOD, "redis_check_interval_ms"),
        ('metrics_address = ""\n' + GOOD, "metrics_address"),
        (
            GOOD.replace(
                'keys = ["order:{id}"', 'replica_identity = "nothing"\nkeys = ["order:{id}"'
            ),
            "replica_identity",
        ),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_settings(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("template", "prefix", "sweep"),
    [
        ("{email}:{id}", "", "'*:*'"),
        ("{id}", "", "'*'"),
        ("{a}-{b}", "", "'*-*'"),
        ("{id}:user", "", "'*:user'"),
        (":{id}", "", "':*'"),
        # The prefix is the beginning of every template: punctuation alone confines nothing.
        ("{id}", ":", "':*'"),
    ],
)
def test_a_template_whose_sweep_could_reach_other_keys_is_refused(
    tmp_path: Path, template: str, prefix: str, sweep: str
) -> None:
    table = f'[tables."public.sessions"]\nkey_prefix = "{prefix}"\nkeys = ["{template}"]\n'
    path = _write(tmp_path, GOOD + table)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert f"table 'public.sessions': template {template!r}" in message
    assert f"sweep {sweep}" in message
    # What to do about it.
    assert "must begin with literal text holding a letter or digit" in message
    assert f"such as 'sessions:{template}'" in message


@pytest.mark.parametrize(
    ("template", "prefix", "sweep"),
    [
        ("{id}", "app1:", "app1:*"),
        ("{a}:{b}", "s", "s*:*"),
        ("session:{id}", "", "session:*"),
        ("{{s}}:{id}", "", "{s}:*"),
    ],
)
def test_a_literal_prefix_from_key_prefix_or_the_template_is_enough(
    tmp_path: Path, template: str, prefix: str, sweep: str
) -> None:
    table = f'[tables."public.sessions"]\nkey_prefix = "{prefix}"\nkeys = ["{template}"]\n'
    settings = load_settings(_write(tmp_path, GOOD + table))
    [parsed] = settings.mapper().tables[TableName("public", "sessions")]
    assert parsed.glob() == sweep


def test_cli_refuses_a_too_broad_template_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, GOOD.replace('"user:email:{email}"', '"{email}:{id}"'))
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "table 'public.users': template '{email}:{id}' is too broad" in err
    assert "give it a literal prefix such as 'users:{email}:{id}'" in err


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_settings(tmp_path / "nope.toml")


def test_no_config_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDC_INVALIDATOR_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="--config"):
        load_settings(None)


@pytest.mark.parametrize("command", ["sql", "check", "install", "run", "status", "uninstall"])
def test_cli_bad_config_exits_2_without_traceback(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, GOOD.replace("user:{id}", "user:{id"))
    assert main([command, "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(path) in err
    assert "user:{id" in err


def test_sql_prints_reviewable_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", "--config", str(_write(tmp_path, GOOD))]) == 0
    out = capsys.readouterr().out
    assert "CREATE SCHEMA IF NOT EXISTS cdc_invalidator" in out
    assert "SELECT cdc_invalidator.watch('public.users', ARRAY['email', 'id']::text[]);" in out
    assert "SELECT cdc_invalidator.watch('public.orders', ARRAY['id', 'user_id']::text[]);" in out
    assert out.count("-- ") > 20  # the DBA reads comments saying what each part does


# Settings install compiles into the capture functions: (setting, its default, the
# environment's value, what each watch() call then says).
COMPILED = [
    ("notify_payload", False, "true", "notify_payload => true"),
    ("bulk_sweep_rows", 0, "100000", "bulk_sweep_rows => 100000"),
]


@pytest.mark.parametrize("compiled", COMPILED, ids=[row[0] for row in COMPILED])
def test_sql_compiles_a_setting_only_when_asked(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    compiled: tuple[str, object, str, str],
) -> None:
    """Off by default (the script's watch() calls are as before the setting existed);
    on, from the file or the environment, each watch() asks for it."""
    setting, default, value, call = compiled
    path = _write(tmp_path, GOOD)
    assert getattr(load_settings(path), setting) == default
    assert main(["sql", "--config", str(path)]) == 0
    assert f"{setting} =>" not in capsys.readouterr().out
    monkeypatch.setenv(f"CDC_INVALIDATOR_{setting.upper()}", value)
    assert main(["sql", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "SELECT cdc_invalidator.watch('public.users', ARRAY['email', 'id']::text[], "
        f"{call});" in out
    )
    assert out.count(f"{call});") == 2


@pytest.mark.parametrize(
    ("lines", "window", "history"),
    [
        ("", None, 7200.0),
        ('replay_window = "auto"\nreplay_history = "30m"', None, 1800.0),
        ('replay_window = "15m"', 900.0, 7200.0),
        # Kept at least as long as the window it must cover, and its margin.
        ('replay_window = "3h"\nreplay_history = "1h"', 10800.0, 10805.0),
        ('replay_window = "0s"\nreplay_history = 0', 0.0, 0.0),
        ('replay_window = "1h30m"', 5400.0, 7200.0),
    ],
)
def test_replay_durations(tmp_path: Path, lines: str, window: float | None, history: float) -> None:
    settings = load_settings(_write(tmp_path, lines + "\n" + GOOD))
    assert (settings.replay_window, settings.history_s) == (window, history)


def test_logical_settings_load(tmp_path: Path) -> None:
    text = GOOD.replace('capture = "trigger"', 'capture = "logical"\nslot_name = "app_cache"')
    text = text.replace('keys = ["order:{id}"', 'replica_identity = "keep"\nkeys = ["order:{id}"')
    settings = load_settings(_write(tmp_path, text))
    assert settings.capture == "logical"
    assert settings.slot_name == "app_cache"
    assert settings.publication_name == "cdc_invalidator"
    kept = {str(t): s.replica_identity for t, s in settings.table_settings().items()}
    assert kept == {"public.users": "full", "public.orders": "keep"}


def test_sql_in_logical_mode_says_why_and_adds_no_trigger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = GOOD.replace('capture = "trigger"', 'capture = "logical"')
    text = text.replace('keys = ["order:{id}"', 'replica_identity = "keep"\nkeys = ["order:{id}"')
    assert main(["sql", "--config", str(_write(tmp_path, text))]) == 0
    out = capsys.readouterr().out
    assert "SELECT cdc_invalidator.watch(" not in out  # no table gets triggers
    assert "SELECT cdc_invalidator.ensure_replica_identity('public.users'" in out
    assert "needs that column's old value" in out  # the comment saying why FULL
    assert "SELECT cdc_invalidator.require_replica_identity('public.orders');" in out
    assert "cdc_invalidator.publish('cdc_invalidator'" in out
    assert "pg_create_logical_replication_slot('cdc_invalidator', 'pgoutput')" in out


def test_config_file_sees_an_edit_made_after_the_settings_were_loaded(tmp_path: Path) -> None:
    """The listener's settings are loaded before its ConfigFile is made: an edit in
    between was taken for what they held (the stamp taken at construction), and never
    noticed. The first look reads the file."""
    users = '[tables."public.users"]\nkeys = ["user:{id}"]\n'
    path = _write(tmp_path, users)
    settings = load_settings(path)
    path.write_text(path.read_text() + '[tables."public.orders"]\nkeys = ["order:{id}"]\n')
    assert ConfigFile(path, settings).mapping_changed()
    same = ConfigFile(path, load_settings(path))
    assert not same.mapping_changed()
    path.write_text(path.read_text() + "\n")  # written again, the same tables
    assert not same.mapping_changed()
    path.write_text("not toml [")  # caught mid-write: not a change
    assert not same.mapping_changed()
    path.write_text(users)
    assert same.mapping_changed()


def test_config_file_sees_no_change_in_a_list_reordered(tmp_path: Path) -> None:
    """Templates and filter columns in another order mean the same: no restart."""
    table = '[tables."public.users"]\nkeys = [{}]\nignore_columns = [{}]\n'
    path = _write(tmp_path, table.format('"user:{id}", "e:{email}"', '"a", "b"'))
    same = ConfigFile(path, load_settings(path))
    path.write_text(table.format('"e:{email}", "user:{id}"', '"b", "a"'))
    assert not same.mapping_changed()
    path.write_text(table.format('"e:{email}", "user:{id}", "n:{name}"', '"b", "a"'))
    assert same.mapping_changed()


def test_the_mapping_fingerprint_is_what_the_tables_mean(tmp_path: Path) -> None:
    """install records it and a listener on another one stops: a table written without
    its schema, a list in another order, or a setting outside the tables changes
    nothing; a template added does."""
    base = 'database_url = "postgresql://h/db"\nredis_url = "redis://h"\n'
    quoted = '[tables."public.users"]\nkeys = ["user:{id}", "user:email:{email}"]\n'
    bare = '[tables.users]\nkeys = ["user:email:{email}", "user:{id}"]\n'
    more = '[tables.users]\nkeys = ["user:{id}", "user:email:{email}", "user:n:{name}"]\n'

    def fingerprint(text: str) -> str:
        return load_settings(_write(tmp_path, text)).mapping_fingerprint()

    first = fingerprint(base + quoted)
    assert fingerprint(base + "batch_size = 7\n" + bare) == first
    assert fingerprint(base + more) != first
