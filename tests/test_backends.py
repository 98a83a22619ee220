"""Every database path: stdlib sqlite3 for a home's ledger.db, SQLAlchemy for a URL,
psycopg 3 for a PostgreSQL server (the suite's own, see tests/pgserver.py).

The same scenario runs through each and gives the same results; the stdlib path
never imports SQLAlchemy (or Alembic) once the ledger exists, and the PostgreSQL
path neither once its schema is current.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env

from ledger.api import Ledger
from ledger.errors import BadInput, InvalidTransition, UpgradeInProgress

BACKENDS = ["stdlib", "sqlalchemy", "postgres"]
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")


def open_ledger(backend: str, root: Path, pg_url: str | None = None) -> Ledger:
    if backend == "stdlib":
        return Ledger(root / "home")
    if backend == "postgres":
        assert pg_url is not None
        return Ledger(root / "home", db_url=pg_url)
    return Ledger(root / "home", db_url=f"sqlite+pysqlite:///{root / 'shared.db'}")


@pytest.fixture(params=BACKENDS)
def backend_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else None
    with open_ledger(request.param, tmp_path, url) as led:
        yield led


def masked(value: Any) -> Any:
    """*value* with timestamps, durations and the ledger's identity blanked out."""
    if isinstance(value, dict):
        return {k: "<x>" if k in ("duration_s", "lineage", "age_s", "pid") else masked(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v) for v in value]
    if isinstance(value, str):
        return STAMP.sub("<t>", value)
    return value


def scenario(led: Ledger) -> dict[str, Any]:
    """A whole upgrade with a failure, a retry, a skip, a rollback point, a refused step,
    a supersede and a round trip; everything the API reports along the way."""
    out: dict[str, Any] = {}
    first = led.init("first")
    led.set_state("PLANNING")
    led.plan({"backup": [], "exporters": [("node", "1.7", "1.9"), ("blackbox", "0.24", "0.25"),
                                          ("snmp", None, "0.26")]})
    led.set_state("BACKING_UP")
    led.phase_start("backup")
    led.mark_rollback_point("node", "/b/node.tgz", size_bytes=10, sha256="0" * 64)
    led.phase_complete("backup")
    led.set_state("UPGRADING")
    led.phase_start("exporters")
    led.component_start("node")
    led.component_complete("node")
    led.component_start("blackbox")
    led.component_fail("blackbox", "port in use")
    out["after_failure"] = led.component_status("blackbox")
    led.component_start("blackbox")
    led.component_complete("blackbox")
    led.component_skip("snmp", "not installed")
    with pytest.raises(InvalidTransition):
        led.set_state("COMPLETED")
    out["progress"] = led.progress_percent()
    out["resume_point"] = led.resume_point()
    out["rollback"] = led.rollback_info()
    out["summary"] = led.summary()
    led.import_document(led.export_document())
    led.set_state("VALIDATING")
    led.set_state("COMPLETED")
    led.save_to_history()
    out["installed"] = led.installed_version("node")
    led.cleanup()
    led.init("second")
    led.set_state("PLANNING")
    with pytest.raises(UpgradeInProgress):
        led.init("third")
    led.init("third", supersede=True)
    out["documents"] = [led.document(uid) for uid in (first, "second", "third")]
    out["history"] = led.history()
    out["events"] = [{k: e[k] for k in ("id", "kind", "subject", "from", "to", "upgrade_id",
                                        "detail")} for e in led.events(limit=None)]
    out["views"] = {}
    for name in ("upgrade_summary", "component_runs", "phase_runs", "failures"):
        columns, rows = led.query(f"SELECT * FROM {name}")
        out["views"][name] = sorted((dict(zip(columns, row, strict=True)) for row in rows),
                                    key=repr)
    out["state.json"] = json.loads(led.home.state_file.read_text())
    return masked(out)


def test_postgres_gives_the_same_results_as_sqlite(tmp_path: Path, pg_url: str) -> None:
    results = {}
    for backend in ("stdlib", "postgres"):
        with open_ledger(backend, tmp_path / backend, pg_url) as led:
            results[backend] = scenario(led)
            if backend == "postgres":
                assert led.db.dialect == "postgresql"
                assert type(led.db).__name__ == "PgDatabase"
    stdlib, postgres = results["stdlib"], results["postgres"]
    for key in stdlib:
        assert postgres[key] == stdlib[key], key
    assert stdlib["progress"] == 100 and stdlib["installed"] == "1.9"
    # Numbers are numbers (never Decimal), with SQLite's values.
    durations = [r["duration_s"] for r in _raw_views(tmp_path, pg_url)]
    assert durations and all(isinstance(d, float) for d in durations if d is not None)


def _raw_views(tmp_path: Path, pg_url: str) -> list[dict[str, Any]]:
    with open_ledger("postgres", tmp_path / "postgres", pg_url) as led:
        columns, rows = led.query("SELECT duration_s FROM component_runs UNION ALL "
                                  "SELECT duration_s FROM upgrade_summary")
    return [dict(zip(columns, row, strict=True)) for row in rows]


def test_both_paths_give_the_same_results(tmp_path: Path) -> None:
    results = {}
    for backend in ("stdlib", "sqlalchemy"):
        with open_ledger(backend, tmp_path / backend) as led:
            results[backend] = scenario(led)
            assert led.db.dialect == "sqlite"
    assert type(open_ledger("sqlalchemy", tmp_path / "sqlalchemy").db).__name__ == \
        "AlchemyDatabase"
    stdlib, alchemy = results["stdlib"], results["sqlalchemy"]
    for key in stdlib:
        assert alchemy[key] == stdlib[key], key
    # and the scenario said something: the results are not empty shells
    assert stdlib["progress"] == 100
    assert stdlib["installed"] == "1.9"
    assert stdlib["documents"][0]["outcome"] == "COMPLETED"
    assert stdlib["documents"][1]["superseded_by"] == "third"
    assert len(stdlib["events"]) > 20


def test_the_sqlalchemy_ledger_lives_at_its_url_and_views_in_the_home(tmp_path: Path) -> None:
    with open_ledger("sqlalchemy", tmp_path) as led:
        led.init("u1")
    assert (tmp_path / "shared.db").exists()
    assert not (tmp_path / "home" / "ledger.db").exists()
    assert json.loads((tmp_path / "home" / "state.json").read_text())["upgrade_id"] == "u1"
    # A second process, or a second open, sees the same ledger.
    with open_ledger("sqlalchemy", tmp_path) as led:
        assert led.current_id() == "u1"


def test_reporting_queries_are_read_only_on_both_paths(backend_ledger: Ledger) -> None:
    backend_ledger.init("u1")
    for sql in ("DELETE FROM events", "UPDATE upgrades SET state = 'IDLE'",
                "DROP VIEW failures", "INSERT INTO ledger_meta VALUES ('k', 'v')"):
        with pytest.raises(BadInput, match="read-only"):
            backend_ledger.query(sql)
    assert backend_ledger.query("SELECT COUNT(*) FROM events")[1] == [(1,)]


def test_a_refused_change_rolls_back_on_both_paths(backend_ledger: Ledger) -> None:
    backend_ledger.init("u1")
    backend_ledger.set_state("PLANNING")
    before = backend_ledger.events(limit=None)
    view = backend_ledger.home.state_file.read_bytes()
    with pytest.raises(InvalidTransition):
        backend_ledger.set_state("COMPLETED")
    with pytest.raises(UpgradeInProgress):
        backend_ledger.init("u2")
    assert backend_ledger.events(limit=None) == before
    assert backend_ledger.home.state_file.read_bytes() == view
    assert backend_ledger.history(limit=None)[0]["id"] == "u1"
    assert len(backend_ledger.history(limit=None)) == 1


HEAVY_PROBE = textwrap.dedent("""
    import json, sys
    from ledger.api import Ledger
    url = sys.argv[2] if len(sys.argv) > 2 else None
    with Ledger(sys.argv[1], db_url=url) as led:
        led.set_state("UPGRADING")
        led.phase_start("p")
        led.component_start("a", "1", "2")
        led.component_complete("a")
        led.mark_rollback_point("a", "/b/a.tgz")
        led.is_upgraded("a"); led.progress_percent(); led.resume_point(); led.summary()
        led.history(); led.export_views(); led.query("SELECT * FROM upgrade_summary")
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules}
                            & {"sqlalchemy", "alembic"})))
""")


def probe(*args: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", HEAVY_PROBE, *args], capture_output=True,
                          text=True, check=True, env=child_env(), timeout=120)
    return json.loads(done.stdout)


@pytest.mark.slow
def test_the_stdlib_path_never_imports_sqlalchemy_on_an_existing_ledger(tmp_path: Path) -> None:
    for root, url in ((tmp_path / "a", None),
                      (tmp_path / "b", f"sqlite+pysqlite:///{tmp_path / 'b.db'}")):
        with Ledger(root, db_url=url) as led:
            led.init()
            led.set_state("PLANNING")
            led.set_state("BACKING_UP")
    assert probe(str(tmp_path / "a")) == []
    # The probe does see SQLAlchemy when it is used: the check above is not blind.
    assert probe(str(tmp_path / "b"), f"sqlite+pysqlite:///{tmp_path / 'b.db'}") == \
        ["sqlalchemy"]


def test_the_postgres_path_never_imports_sqlalchemy_once_the_schema_is_current(
        tmp_path: Path, pg_url: str) -> None:
    with Ledger(tmp_path / "home", db_url=pg_url) as led:  # creates the schema (Alembic)
        led.init()
        led.set_state("PLANNING")
        led.set_state("BACKING_UP")
    assert probe(str(tmp_path / "home"), pg_url) == []
