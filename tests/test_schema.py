"""The schema: code, metadata and migrations agree; migrations go down and up again;
the reporting views give the right numbers for a known history."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from conftest import walk_to_upgrading
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Engine

from ledger.api import Ledger
from ledger.store import migrate
from ledger.store.database import SCHEMA_REVISION
from ledger.store.schema import metadata

TABLES = {"ledger_meta", "hosts", "upgrades", "phases", "components", "rollback_points", "events",
          "notify_cursors", "fleet_push", "fleet_cursors", "fleet_slots"}
VIEWS = {"upgrade_summary", "component_runs", "phase_runs", "failures", "plan_runs",
         "host_status"}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """An engine on the ledger.db of a ledger created the normal way."""
    Ledger(tmp_path / "home").close()
    eng = create_engine(f"sqlite:///{tmp_path / 'home' / 'ledger.db'}")
    yield eng
    eng.dispose()


def drift(eng: Engine) -> list[Any]:
    with eng.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def test_the_code_expects_the_newest_migration() -> None:
    assert migrate.head_revision() == SCHEMA_REVISION
    assert SCHEMA_REVISION in migrate.known_revisions()


def test_the_migrated_database_is_exactly_the_declared_metadata(engine: Engine) -> None:
    assert drift(engine) == []
    names = set(inspect(engine).get_table_names())
    assert names == TABLES | {"alembic_version"}
    assert set(metadata.tables) == TABLES
    assert set(inspect(engine).get_view_names()) == VIEWS


def test_upgrade_downgrade_upgrade_round_trips(engine: Engine, tmp_path: Path) -> None:
    url = str(engine.url)
    home = tmp_path / "home"
    with Ledger(home) as led:  # some data, so the downgrade has rows to drop
        led.init("before")
    migrate.downgrade(url, "base")
    engine.dispose()
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    assert inspect(engine).get_view_names() == []
    migrate.upgrade(url)
    engine.dispose()
    assert drift(engine) == []
    assert set(inspect(engine).get_view_names()) == VIEWS
    with Ledger(home) as led:
        assert led.current_id() is None  # the data went with the downgrade
        led.init("after")
        assert led.document()["lineage"]  # a new lineage came with the first revision


def test_each_revision_goes_down_one_step_and_back(engine: Engine) -> None:
    url = str(engine.url)
    revisions = sorted(migrate.known_revisions())
    for below in reversed(["base", *revisions[:-1]]):
        migrate.downgrade(url, below)
        engine.dispose()
        with engine.connect() as conn:
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        assert version == ([] if below == "base" else [(below,)])
    migrate.upgrade(url)
    engine.dispose()
    assert drift(engine) == []


def test_opening_a_ledger_behind_the_code_migrates_it(engine: Engine, tmp_path: Path) -> None:
    migrate.downgrade(str(engine.url), "0001")
    engine.dispose()
    with Ledger(tmp_path / "home") as led:
        led.init()
    with sqlite3.connect(tmp_path / "home" / "ledger.db") as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == \
            (SCHEMA_REVISION,)
    conn.close()


# -- the reporting views, on a history whose numbers are known ---------------------------

def doc(uid: str, state: str, started: str, updated: str, phases: dict[str, Any],
        **extra: Any) -> dict[str, Any]:
    return {"upgrade_id": uid, "current_state": state, "started_at": started,
            "updated_at": updated, "current_phase": None, "current_component": None,
            "phases": phases, "rollback_available": False, "can_resume": False,
            "metadata": {"hostname": "web1", "user": "ops", "pid": "100"}, **extra}


HISTORY = [
    # Completed in 30 minutes: two phases, three components (one retried, one skipped).
    doc("u1", "COMPLETED", "2026-01-01T10:00:00Z", "2026-01-01T10:30:00Z", {
        "backup": {"state": "COMPLETED", "started_at": "2026-01-01T10:00:00Z",
                   "completed_at": "2026-01-01T10:05:00Z", "components": {}},
        "exporters": {"state": "COMPLETED", "started_at": "2026-01-01T10:05:00Z",
                      "completed_at": "2026-01-01T10:25:00Z", "components": {
                          "a": {"state": "COMPLETED", "from_version": "1", "to_version": "2",
                                "started_at": "2026-01-01T10:05:00Z",
                                "completed_at": "2026-01-01T10:10:00Z", "attempts": 1},
                          "b": {"state": "COMPLETED", "from_version": "1", "to_version": "2",
                                "started_at": "2026-01-01T10:10:00Z",
                                "completed_at": "2026-01-01T10:20:30Z", "attempts": 2},
                          "c": {"state": "SKIPPED", "from_version": "2", "to_version": "2",
                                "attempts": 0}}}}),
    # Failed after 10 minutes: its one component failed twice.
    doc("u2", "FAILED", "2026-01-02T08:00:00Z", "2026-01-02T08:10:00Z", {
        "exporters": {"state": "FAILED", "started_at": "2026-01-02T08:01:00Z",
                      "failed_at": "2026-01-02T08:09:00Z", "error": "gave up",
                      "components": {
                          "a": {"state": "FAILED", "from_version": "2", "to_version": "3",
                                "started_at": "2026-01-02T08:01:00Z",
                                "failed_at": "2026-01-02T08:08:00Z", "attempts": 3,
                                "last_error": "timeout"}}}}, error="exporters failed"),
    # Still running: no duration yet.
    doc("u3", "UPGRADING", "2026-01-03T09:00:00Z", "2026-01-03T09:01:00Z", {
        "exporters": {"state": "IN_PROGRESS", "started_at": "2026-01-03T09:00:30Z",
                      "components": {
                          "a": {"state": "UPGRADING", "from_version": "2", "to_version": "3",
                                "started_at": "2026-01-03T09:00:30Z", "attempts": 1}}}}),
]


@pytest.fixture
def history(ledger: Ledger) -> Ledger:
    for document in HISTORY:
        ledger.import_document(document)
    return ledger


def rows(led: Ledger, sql: str) -> list[dict[str, Any]]:
    columns, values = led.query(sql)
    return [dict(zip(columns, row, strict=True)) for row in values]


def test_upgrade_summary_has_durations_and_counts(history: Ledger) -> None:
    got = rows(history, "SELECT upgrade_id, state, outcome, hostname, duration_s, phases, "
                        "components, components_completed, components_failed, "
                        "components_skipped, attempts, error FROM upgrade_summary "
                        "ORDER BY upgrade_id")
    assert got == [
        {"upgrade_id": "u1", "state": "COMPLETED", "outcome": "COMPLETED", "hostname": "web1",
         "duration_s": 1800.0, "phases": 2, "components": 3, "components_completed": 2,
         "components_failed": 0, "components_skipped": 1, "attempts": 3, "error": None},
        {"upgrade_id": "u2", "state": "FAILED", "outcome": "FAILED", "hostname": "web1",
         "duration_s": 600.0, "phases": 1, "components": 1, "components_completed": 0,
         "components_failed": 1, "components_skipped": 0, "attempts": 3,
         "error": "exporters failed"},
        {"upgrade_id": "u3", "state": "UPGRADING", "outcome": None, "hostname": "web1",
         "duration_s": None, "phases": 1, "components": 1, "components_completed": 0,
         "components_failed": 0, "components_skipped": 0, "attempts": 1, "error": None},
    ]


def test_component_runs_have_a_row_and_a_duration_per_run(history: Ledger) -> None:
    got = rows(history, "SELECT upgrade_id, component, state, from_version, to_version, "
                        "attempts, duration_s, upgrade_outcome FROM component_runs "
                        "ORDER BY upgrade_id, component")
    assert [tuple(r.values()) for r in got] == [
        ("u1", "a", "COMPLETED", "1", "2", 1, 300.0, "COMPLETED"),
        ("u1", "b", "COMPLETED", "1", "2", 2, 630.0, "COMPLETED"),
        ("u1", "c", "SKIPPED", "2", "2", 0, None, "COMPLETED"),
        ("u2", "a", "FAILED", "2", "3", 3, 420.0, "FAILED"),
        ("u3", "a", "UPGRADING", "2", "3", 1, None, None),
    ]
    # The question the views are for: how long does component a take when it works?
    assert history.query("SELECT AVG(duration_s) FROM component_runs "
                         "WHERE component = 'a' AND state = 'COMPLETED'")[1] == [(300.0,)]


def test_phase_runs_keep_the_planned_order_and_durations(history: Ledger) -> None:
    got = rows(history, "SELECT upgrade_id, position, phase, state, duration_s, error "
                        "FROM phase_runs ORDER BY upgrade_id, position")
    assert [tuple(r.values()) for r in got] == [
        ("u1", 1, "backup", "COMPLETED", 300.0, None),
        ("u1", 2, "exporters", "COMPLETED", 1200.0, None),
        ("u2", 1, "exporters", "FAILED", 480.0, "gave up"),
        ("u3", 1, "exporters", "IN_PROGRESS", None, None),
    ]


def test_failures_list_every_level_that_went_wrong(history: Ledger) -> None:
    got = rows(history, "SELECT level, upgrade_id, phase, component, at, error, attempts "
                        "FROM failures ORDER BY at, level")
    assert [tuple(r.values()) for r in got] == [
        ("component", "u2", "exporters", "a", "2026-01-02T08:08:00.000Z", "timeout", 3),
        ("phase", "u2", "exporters", None, "2026-01-02T08:09:00.000Z", "gave up", None),
        ("upgrade", "u2", None, None, "2026-01-02T08:10:00.000Z", "exporters failed", None),
    ]


def test_views_see_a_run_made_through_the_api(ledger: Ledger) -> None:
    uid = walk_to_upgrading(ledger)
    ledger.plan({"p": [("a", "1", "2"), ("b", "1", "2")]})
    ledger.phase_start("p")
    ledger.component_start("a")
    ledger.component_complete("a")
    ledger.component_start("b")
    ledger.component_fail("b", "no")
    ledger.set_state("FAILED")
    (summary,) = rows(ledger, "SELECT * FROM upgrade_summary")
    assert summary["upgrade_id"] == uid and summary["outcome"] == "FAILED"
    assert summary["duration_s"] >= 0
    assert (summary["components"], summary["components_completed"],
            summary["components_failed"]) == (2, 1, 1)
    assert [r["component"] for r in rows(ledger, "SELECT * FROM failures "
                                                 "WHERE level = 'component'")] == ["b"]


# -- data migrations -----------------------------------------------------------------------

def ledger_at(revision: str, home: Path) -> str:
    """A new ledger file in *home* migrated to *revision* only; its SQLAlchemy URL."""
    home.mkdir(mode=0o700)
    url = f"sqlite:///{home / 'ledger.db'}"
    migrate.upgrade(url, revision)
    return url


#: Components as a 0002 ledger recorded them, where ``attempts`` counted failures:
#: (name, state, attempts, started_at, failed_at) -> attempts from revision 0003 on.
BEFORE_0003 = {
    ("planned", "PENDING", 0, None, None): 0,
    ("skipped", "SKIPPED", 0, None, None): 0,
    ("first_try", "UPGRADING", 0, "2026-01-01T10:00:00.000Z", None): 1,
    ("done_at_once", "COMPLETED", 0, "2026-01-01T10:00:00.000Z", None): 1,
    ("failed_once", "FAILED", 1, "2026-01-01T10:00:00.000Z", "2026-01-01T10:01:00.000Z"): 2,
    ("done_on_the_third", "COMPLETED", 2, "2026-01-01T10:05:00.000Z", None): 3,
    ("skipped_after_a_start", "SKIPPED", 0, "2026-01-01T10:00:00.000Z", None): 1,
    ("completed_no_stamps", "COMPLETED", 0, None, None): 1,  # loaded from a legacy file
}


def test_revision_0003_counts_attempts_and_adds_the_kept_keys(tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = ledger_at("0002", home)
    with sqlite3.connect(home / "ledger.db") as conn:
        conn.execute("INSERT INTO upgrades (id, state, started_at, updated_at) VALUES "
                     "('u1', 'UPGRADING', '2026-01-01T09:00:00.000Z', "
                     "'2026-01-01T10:05:00.000Z')")
        conn.execute("INSERT INTO phases (upgrade_id, name, position, state) "
                     "VALUES ('u1', 'p', 1, 'IN_PROGRESS')")
        for n, (name, state, attempts, started, failed) in enumerate(BEFORE_0003, start=1):
            conn.execute("INSERT INTO components (upgrade_id, phase, name, position, state, "
                         "attempts, started_at, failed_at) VALUES ('u1', 'p', ?, ?, ?, ?, ?, ?)",
                         (name, n, state, attempts, started, failed))
        conn.execute("INSERT INTO ledger_meta (key, value) VALUES ('current_upgrade', 'u1')")
    conn.close()

    with Ledger(home) as led:  # opening a ledger behind the code migrates it
        doc = led.document("u1")
        shown = {c["name"]: c["attempts"] for c in led.show("u1")["components"]}
        assert "ticket" not in doc  # no kept keys before any save
        led.save_document({"ticket": "OPS-1"})  # the new columns keep them
        assert led.document("u1")["ticket"] == "OPS-1"
    got = {name: c["attempts"] for name, c in doc["phases"]["p"]["components"].items()}
    expected = {key[0]: after for key, after in BEFORE_0003.items()}
    assert got == expected
    assert shown == expected

    migrate.downgrade(url, "0002")  # and back: the failure counts they were
    with sqlite3.connect(home / "ledger.db") as conn:
        back = dict(conn.execute("SELECT name, attempts FROM components").fetchall())
        columns = {row[1] for table in ("upgrades", "phases", "components")
                   for row in conn.execute(f"PRAGMA table_info({table})")}
    conn.close()
    assert back == {key[0]: key[2] for key in BEFORE_0003}
    assert not columns & {"extra", "metadata_extra"}


def test_postgres_gets_the_declared_schema_and_round_trips(tmp_path: Path, pg_url: str) -> None:
    with Ledger(tmp_path / "home", db_url=pg_url) as led:
        led.init("before")
    eng = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        assert drift(eng) == []
        assert set(inspect(eng).get_view_names()) == VIEWS
        migrate.downgrade(pg_url, "base")
        eng.dispose()
        assert set(inspect(eng).get_table_names()) == {"alembic_version"}
        migrate.upgrade(pg_url)
        eng.dispose()
        assert drift(eng) == []
        # Event ids still come from a sequence after the tables were re-keyed.
        with Ledger(tmp_path / "home", db_url=pg_url) as led:
            led.init("after")
            led.set_state("PLANNING")
            assert [e["id"] for e in led.events(limit=None)] == [1, 2]
    finally:
        eng.dispose()
