"""PostgreSQL as a first-class backend: the same output as SQLite, migrations that any
number of first calls can race, credentials never shown, a read-only ``sql`` that
accepts what SQLite's accepts. The tests run against the suite's own server
(tests/pgserver.py), through real processes where the command line is the subject."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env, ledger_process, run_ledger
from pgserver import Server
from test_schema import HISTORY

from ledger.api import Ledger
from ledger.errors import BadInput, QueryTimeout
from ledger.store import urls

SECRET = "s3cr3t-pw"


def with_password(url: str) -> str:
    """*url* with a password for its role (the suite's server trusts local users, so any
    password is accepted: what matters is that it is never printed)."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@")


@pytest.mark.slow
def test_numbers_print_and_serialise_as_on_sqlite(tmp_path: Path, pg_url: str) -> None:
    outputs = {}
    for name, url in (("sqlite", None), ("postgres", pg_url)):
        home = tmp_path / name
        with Ledger(home, db_url=url) as led:
            for doc in HISTORY:
                led.import_document(doc)
        query = ("SELECT upgrade_id, duration_s, attempts, components FROM upgrade_summary "
                 "ORDER BY upgrade_id")
        base = ["--home", home, *(["--db", url] if url else [])]
        outputs[name] = {fmt: run_ledger(*base, "sql", query, "-f", fmt) for fmt in
                         ("json", "csv", "plain", "table")}
        outputs[name]["mean"] = run_ledger(
            *base, "sql", "SELECT component, ROUND(AVG(duration_s), 1) AS mean_s FROM "
            "component_runs WHERE duration_s IS NOT NULL GROUP BY component ORDER BY 1",
            "-f", "csv")
    for fmt, done in outputs["postgres"].items():
        assert done.returncode == 0, done.stderr
        assert done.stdout == outputs["sqlite"][fmt].stdout, fmt
    rows = json.loads(outputs["postgres"]["json"].stdout)
    assert rows[0]["duration_s"] == 1800.0 and rows[2]["duration_s"] is None
    assert "1800.0" in outputs["postgres"]["csv"].stdout
    assert outputs["postgres"]["mean"].stdout.splitlines()[1:] == ["a,360.0", "b,630.0"]
    with Ledger(tmp_path / "postgres", db_url=pg_url) as led:
        (value,) = led.query("SELECT duration_s FROM upgrade_summary WHERE upgrade_id = 'u1'")[1]
        assert type(value[0]) is float


@pytest.mark.slow
def test_any_number_of_first_calls_on_an_empty_database_succeed(
        tmp_path: Path, pg_server: Server) -> None:
    for attempt in range(3):
        url = pg_server.new_database(f"race{attempt}")
        procs = [ledger_process("--home", tmp_path / f"{attempt}-{i}", "--db", url,
                                "--host-name", f"host-{i}", "init")
                 for i in range(8)]
        results = [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
        assert all(code == 0 for code, _ in results), results
        with Ledger(tmp_path / "check", db_url=url, host_name="host-0") as led:
            assert len(led.history(all_hosts=True)) == 8
        pg_server.drop_database(url)


PROBE = """
import runpy, sys
sys.argv = ["upgrade-ledger", *sys.argv[1:]]
try:
    runpy.run_module("ledger", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
print(sorted({m.split(".")[0] for m in sys.modules} & {"alembic", "sqlalchemy"}))
"""


@pytest.mark.slow
def test_a_step_does_not_pay_for_alembic_once_the_schema_is_current(
        tmp_path: Path, pg_url: str) -> None:
    def step(*args: str) -> str:
        done = subprocess.run([sys.executable, "-c", PROBE, "--home", str(tmp_path), "--db",
                               pg_url, *args], capture_output=True, text=True,
                              env=child_env(), timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert step("init") == "['alembic', 'sqlalchemy']"  # a new database: migrated
    assert step("state", "set", "PLANNING") == "[]"
    assert step("phase", "start", "p") == "[]"


@pytest.mark.slow
def test_the_password_is_never_printed(tmp_path: Path, pg_url: str) -> None:
    good = with_password(pg_url)
    wrong = good.replace("/ledger_", "/no_such_", 1)
    done = run_ledger("--home", tmp_path, "--db", wrong, "status")
    assert done.returncode == 8 and done.stderr.count("\n") == 1, done.stderr
    assert SECRET not in done.stderr and "***" in done.stderr
    assert "does not exist" in done.stderr
    for args in (["init"], ["status", "--json"], ["doctor"], ["doctor", "--json"],
                 ["history", "--all-hosts"], ["sql", "SELECT nope"]):
        done = run_ledger("--home", tmp_path, "--db", good, *args)
        assert SECRET not in done.stdout + done.stderr, args
    for path in Path(tmp_path).rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    assert urls.mask("postgresql://u:p%40ss@h:5432/db?sslmode=require") == \
        "postgresql://u:***@h:5432/db?sslmode=require"
    assert urls.mask("postgresql://h/db?user=u&password=x&sslmode=verify-full") == \
        "postgresql://h/db?user=u&password=***&sslmode=verify-full"


@pytest.fixture
def pg_ledger(tmp_path: Path, pg_url: str) -> Ledger:
    led = Ledger(tmp_path / "home", db_url=pg_url)
    led.init("u1")
    return led


@pytest.mark.parametrize("sql", ["PRAGMA table_info(upgrades)", "/* note */ SELECT 1",
                                 "-- a comment\nSELECT 1", "WITH x AS (SELECT 1 AS a) "
                                 "SELECT a FROM x", "EXPLAIN SELECT * FROM upgrades",
                                 "VALUES (1)", "SELECT * FROM upgrades WHERE id LIKE 'u%'"])
@pytest.mark.slow
def test_sql_accepts_what_sqlite_accepts(pg_ledger: Ledger, tmp_path: Path, sql: str) -> None:
    sqlite = Ledger(tmp_path / "sqlite")
    sqlite.init("u1")
    try:
        columns, rows = pg_ledger.query(sql)
        sqlite_columns, sqlite_rows = sqlite.query(sql)
        assert rows and sqlite_rows
        if sql.startswith("PRAGMA"):
            assert columns == sqlite_columns
            # The same columns, with the same not-null flags and primary key.
            assert {r[1]: (r[3], r[5] > 0) for r in rows} == \
                {r[1]: (r[3], r[5] > 0) for r in sqlite_rows}
    finally:
        sqlite.close()
        pg_ledger.close()


@pytest.mark.parametrize("sql", [
    "DELETE FROM events", "UPDATE upgrades SET state = 'IDLE'", "DROP VIEW failures",
    "/* hidden */ DELETE FROM events", "SELECT 1; DELETE FROM events",
    "EXPLAIN ANALYZE DELETE FROM events", "SELECT * FROM upgrades FOR UPDATE",
    "WITH gone AS (DELETE FROM events RETURNING id) SELECT COUNT(*) FROM gone",
    "SELECT set_config('transaction_read_only', 'off', true)",
    "SELECT nextval('events_id_seq')", "PRAGMA journal_mode=DELETE"])
def test_sql_refuses_every_write(pg_ledger: Ledger, sql: str) -> None:
    before = pg_ledger.events(limit=None)
    try:
        with pytest.raises(BadInput):
            pg_ledger.query(sql)
        assert pg_ledger.events(limit=None) == before
        assert pg_ledger.state() == "IDLE"
    finally:
        pg_ledger.close()


def test_sql_has_a_statement_timeout(pg_ledger: Ledger) -> None:
    try:
        with pytest.raises(QueryTimeout, match="longer than 1 s"):
            pg_ledger.query("SELECT pg_sleep(30)", timeout_s=1)
        assert pg_ledger.query("SELECT 1")[1] == [(1,)]  # the connection is still good
    finally:
        pg_ledger.close()


def test_a_postgres_url_without_psycopg_says_what_to_install(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['psycopg'] = None\n"
              "from ledger.cli import main\n"
              "sys.argv = ['upgrade-ledger', '--home', sys.argv[1], '--db', "
              "'postgresql://u:pw@localhost/db', 'status']\nmain()")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, env=child_env(), timeout=60, check=False)
    assert done.returncode == 6, done.stderr
    assert "upgrade-ledger[postgres]" in done.stderr and done.stderr.count("\n") == 1
    assert ":pw@" not in done.stderr


def test_other_postgres_drivers_are_refused_in_one_line(tmp_path: Path) -> None:
    done = run_ledger("--home", tmp_path, "--db", "postgresql+psycopg2://u:pw@h/db", "status")
    assert done.returncode == 6 and "psycopg 3" in done.stderr and ":pw@" not in done.stderr


def test_the_connection_settings_pass_through_the_url(tmp_path: Path, pg_url: str) -> None:
    # libpq options in the query string reach the server (TLS options travel the same way).
    url = pg_url + "&application_name=fleet-report&options=-c%20work_mem%3D12345kB"
    with Ledger(tmp_path, db_url=url) as led:
        ((name, timeout),) = led.query("SELECT current_setting('application_name'), "
                                       "current_setting('work_mem')")[1]
    assert name == "fleet-report" and timeout == "12345kB"
