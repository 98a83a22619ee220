"""``upgrade-ledger sql`` and docs/sql-reporting.md: every ready query in the document
runs against a small real ledger and gives the rows an operator expects."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from conftest import walk_to_upgrading

from ledger.api import Ledger

DOC = Path(__file__).resolve().parent.parent / "docs" / "sql-reporting.md"


def doc_queries() -> dict[str, str]:
    """{heading: sql} for every ```sql block under a '### ' heading of the document."""
    text = DOC.read_text()
    found = re.findall(r"^### ([^\n]+)\n(?:(?!^### ).)*?```sql\n(.*?)```", text,
                       re.MULTILINE | re.DOTALL)
    return {title.strip(): sql for title, sql in found}


def run(uid: str, host: str, state: str, start: str, end: str,
        phases: dict[str, tuple[str, str, str | None, dict[str, dict]]]) -> dict:
    """A legacy document of a finished upgrade. *phases*: name -> (state, started,
    ended, components); times are HH:MM on the day of *start*."""
    day = start[:11]

    def at(hhmm: str | None) -> str | None:
        return None if hhmm is None else f"{day}{hhmm}:00Z"

    doc_phases = {}
    for name, (pstate, pstart, pend, comps) in phases.items():
        phase: dict = {"state": pstate, "started_at": at(pstart), "components": {}}
        phase["failed_at" if pstate == "FAILED" else "completed_at"] = at(pend)
        if pstate == "FAILED":
            phase["error"] = f"{name} failed"
        for cname, (cstate, frm, to, cstart, cend, attempts, error) in comps.items():
            comp = {"state": cstate, "from_version": frm, "to_version": to,
                    "started_at": at(cstart), "attempts": attempts}
            comp["failed_at" if cstate == "FAILED" else "completed_at"] = at(cend)
            if error:
                comp["last_error"] = error
            phase["components"][cname] = comp
        doc_phases[name] = phase
    return {"upgrade_id": uid, "current_state": state, "started_at": start,
            "updated_at": end, "current_phase": None, "current_component": None,
            "phases": doc_phases, "rollback_available": False, "can_resume": False,
            "metadata": {"hostname": host, "user": "ops", "pid": "100"}}


RUNS = [
    run("a-2026-01", "alpha", "COMPLETED", "2026-01-05T10:00:00Z", "2026-01-05T10:30:00Z", {
        "exporters": ("COMPLETED", "10:00", "10:10", {
            "node_exporter": ("COMPLETED", "1.7.0", "1.9.1", "10:01", "10:03", 1, None)}),
        "servers": ("COMPLETED", "10:10", "10:30", {
            "prometheus": ("COMPLETED", "2.45", "2.53", "10:10", "10:25", 1, None)}),
    }),
    run("b-2026-01", "beta", "COMPLETED", "2026-01-20T12:00:00Z", "2026-01-20T12:20:00Z", {
        "exporters": ("COMPLETED", "12:00", "12:20", {
            "node_exporter": ("COMPLETED", "1.7.0", "1.9.1", "12:01", "12:05", 1, None)}),
    }),
    run("a-2026-02", "alpha", "FAILED", "2026-02-03T09:00:00Z", "2026-02-03T09:40:00Z", {
        "exporters": ("COMPLETED", "09:00", "09:05", {
            "node_exporter": ("COMPLETED", "1.9.1", "1.10.0", "09:01", "09:02", 1, None)}),
        "servers": ("FAILED", "09:05", "09:40", {
            "prometheus": ("FAILED", "2.53", "3.0.0", "09:05", "09:35", 3,
                           "tsdb migration failed")}),
    }),
    run("b-2026-02", "beta", "ROLLED_BACK", "2026-02-15T08:00:00Z", "2026-02-15T08:30:00Z", {
        "servers": ("FAILED", "08:00", "08:30", {
            "prometheus": ("FAILED", "2.53", "3.0.0", "08:05", "08:20", 2, "WAL replay")}),
    }),
]
HERE = socket.gethostname()


@pytest.fixture(scope="module")
def reports_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four finished upgrades on hosts alpha and beta, and one running on this host."""
    home = tmp_path_factory.mktemp("sql") / "home"
    fill(home)
    return home


def fill(home: Path, url: str | None = None) -> None:
    """The reports ledger: each run imported as its own host's, the live one here's."""
    for doc in RUNS:
        with Ledger(home, db_url=url, host_name=doc["metadata"]["hostname"]) as led:
            led.import_document(doc, make_current=False)
    with Ledger(home, db_url=url) as led:
        walk_to_upgrading(led, "live")
        led.phase_start("exporters")
        led.component_start("node_exporter", "1.10.0", "1.11.0")


@pytest.fixture
def reports(home: Path, reports_template: Path) -> Path:
    shutil.copytree(reports_template, home, symlinks=True)
    return home


def month_now() -> str:
    return time.strftime("%Y-%m", time.gmtime())


EXPECTED = {
    "Mean upgrade duration per component": lambda: [
        ("prometheus", 1, 900.0, 900.0),
        ("node_exporter", 3, 140.0, 240.0),
    ],
    "Failure rate by target version": lambda: [
        ("prometheus", "3.0.0", 2, 2, 100.0),
        ("node_exporter", "1.9.1", 2, 0, 0.0),
        ("node_exporter", "1.10.0", 1, 0, 0.0),
        ("prometheus", "2.53", 1, 0, 0.0),
    ],
    "Last successful upgrade per component": lambda: [
        ("alpha", "node_exporter", "1.10.0", "2026-02-03T09:02:00.000Z", "a-2026-02"),
        ("alpha", "prometheus", "2.53", "2026-01-05T10:25:00.000Z", "a-2026-01"),
        ("beta", "node_exporter", "1.9.1", "2026-01-20T12:05:00.000Z", "b-2026-01"),
    ],
    "What is running now": lambda: [
        ("live", HERE, "UPGRADING", "exporters", "node_exporter", "1.10.0", "1.11.0"),
    ],
    "Slowest phases": lambda: [
        ("servers", 3, 1700.0, 2100.0),
        ("exporters", 3, 700.0, 1200.0),
    ],
    "Upgrades per host per month": lambda: [
        ("alpha", "2026-01", 1, 1, 0, 0),
        ("beta", "2026-01", 1, 1, 0, 0),
        ("alpha", "2026-02", 1, 0, 1, 0),
        ("beta", "2026-02", 1, 0, 0, 1),
        (HERE, month_now(), 1, 0, 0, 0),
    ],
    "Recent failures": lambda: [
        ("2026-02-15T08:30:00.000Z", "phase", "beta", "b-2026-02", "servers", None, None,
         "servers failed"),
        ("2026-02-15T08:30:00.000Z", "upgrade", "beta", "b-2026-02", None, None, None, None),
        ("2026-02-15T08:20:00.000Z", "component", "beta", "b-2026-02", "servers",
         "prometheus", "3.0.0", "WAL replay"),
    ],
    "Components that needed retries": lambda: [
        ("a-2026-02", "alpha", "prometheus", "3.0.0", "FAILED", 3, "tsdb migration failed"),
        ("b-2026-02", "beta", "prometheus", "3.0.0", "FAILED", 2, "WAL replay"),
    ],
    "The audit trail of one upgrade": lambda: [
        ("upgrade.init", None, None, "IDLE"),
        ("upgrade.state", None, "IDLE", "PLANNING"),
        ("upgrade.state", None, "PLANNING", "BACKING_UP"),
        ("upgrade.state", None, "BACKING_UP", "UPGRADING"),
        ("phase.in_progress", "exporters", "PENDING", "IN_PROGRESS"),
        ("component.upgrading", "node_exporter", None, "UPGRADING"),
    ],
    "Failures per component version across hosts": lambda: [
        ("prometheus", "3.0.0", 2, 2, 2, 3),
        ("node_exporter", "1.10.0", 1, 0, 0, 0),
        ("node_exporter", "1.9.1", 2, 0, 0, 0),
        ("prometheus", "2.53", 1, 0, 0, 0),
    ],
    "Hosts still on an old version": lambda: [
        ("beta", "node_exporter", "1.9.1", "2026-01-20T12:05:00.000Z", "b-2026-01"),
    ],
    "Mean duration per component per host": lambda: [
        ("alpha", "node_exporter", 2, 90.0),
        ("alpha", "prometheus", 1, 900.0),
        ("beta", "node_exporter", 1, 240.0),
    ],
}
PARAMS = {"Recent failures": {"since": "2026-02-10"},
          "The audit trail of one upgrade": {"id": "live"},
          "Hosts still on an old version": {"component": "node_exporter",
                                            "version": "1.10.0"}}
#: Columns to compare, for queries whose rows carry times of the live upgrade.
PICK = {"What is running now": (0, 1, 2, 4, 5, 6, 7),
        "The audit trail of one upgrade": (2, 3, 4, 5)}


def test_the_document_has_the_six_asked_for_queries_and_each_is_tested() -> None:
    queries = doc_queries()
    assert set(queries) == set(EXPECTED)
    assert len(queries) >= 6


@pytest.mark.parametrize("title", list(EXPECTED))
def test_each_documented_query_gives_the_expected_rows(reports: Path, title: str) -> None:
    sql = doc_queries()[title]
    with Ledger(reports) as led:
        columns, rows = led.query(sql, PARAMS.get(title))
    assert len(set(columns)) == len(columns)
    pick = PICK.get(title)
    got = [tuple(row[i] for i in pick) if pick else tuple(row) for row in rows]
    assert got == EXPECTED[title]()


def test_each_documented_query_gives_the_same_rows_on_postgres(tmp_path: Path,
                                                               pg_url: str) -> None:
    fill(tmp_path / "home", pg_url)
    with Ledger(tmp_path / "home", db_url=pg_url) as led:
        for title, sql in doc_queries().items():
            columns, rows = led.query(sql, PARAMS.get(title))
            pick = PICK.get(title)
            got = [tuple(row[i] for i in pick) if pick else tuple(row) for row in rows]
            assert got == EXPECTED[title](), title
            assert len(set(columns)) == len(columns)


def test_a_documented_query_through_the_cli_as_csv(cli, reports: Path) -> None:
    sql = doc_queries()["Failure rate by target version"]
    result = cli("sql", sql, "-f", "csv")
    assert result.code == 0, result.err
    rows = list(csv.reader(io.StringIO(result.out)))
    assert rows[0] == ["component", "to_version", "runs", "failed", "failure_pct"]
    assert rows[1] == ["prometheus", "3.0.0", "2", "2", "100.0"]


@pytest.mark.parametrize("fmt", ["table", "plain", "csv", "json"])
def test_sql_in_every_format_with_a_parameter(cli, reports: Path, fmt: str) -> None:
    result = cli("sql", "SELECT upgrade_id, outcome FROM upgrade_summary WHERE hostname = :h "
                 "ORDER BY started_at", "-p", "h=beta", "-f", fmt)
    assert (result.code, result.err) == (0, "")
    if fmt == "json":
        assert json.loads(result.out) == [{"upgrade_id": "b-2026-01", "outcome": "COMPLETED"},
                                          {"upgrade_id": "b-2026-02",
                                           "outcome": "ROLLED_BACK"}]
    elif fmt == "csv":
        assert result.out == ("upgrade_id,outcome\nb-2026-01,COMPLETED\n"
                              "b-2026-02,ROLLED_BACK\n")
    elif fmt == "plain":
        assert result.out == "b-2026-01\tCOMPLETED\nb-2026-02\tROLLED_BACK\n"
    else:
        lines = result.out.splitlines()
        assert lines[0].split() == ["upgrade_id", "outcome"]
        assert [line.split() for line in lines[2:]] == [["b-2026-01", "COMPLETED"],
                                                        ["b-2026-02", "ROLLED_BACK"]]


def test_sql_reads_pragmas_that_only_read(cli, reports: Path) -> None:
    result = cli("sql", "PRAGMA table_info(upgrade_summary)", "-f", "json")
    assert result.code == 0
    names = [c["name"] for c in json.loads(result.out)]
    assert names[:3] == ["host", "upgrade_id", "state"]


def test_an_empty_result_has_no_rows_but_csv_keeps_its_header(cli, reports: Path) -> None:
    query = "SELECT upgrade_id FROM upgrade_summary WHERE hostname = 'nowhere'"
    assert cli("sql", query, "--json").out == "[]\n"
    assert cli("sql", query, "-f", "csv").out == "upgrade_id\n"
