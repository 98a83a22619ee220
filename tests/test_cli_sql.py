"""``upgrade-ledger sql`` and docs/sql-reporting.md: every ready query in the document
runs against a small real ledger and gives the rows an operator expects."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import child_env, walk_to_upgrading

from ledger.api import Ledger
from ledger.errors import QueryTimeout

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


# -- limits: time, memory, Ctrl-C, settings ---------------------------------------------

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"


def test_a_query_that_never_ends_is_stopped_by_the_timeout(cli, reports: Path) -> None:
    result = cli("sql", ENDLESS, "--timeout", "0.5")
    assert result.code == 6, result
    assert result.err.splitlines() == [
        "upgrade-ledger: error: sql: the query ran longer than 0.5 s and was stopped "
        "(--timeout)"]
    with Ledger(reports) as led, pytest.raises(QueryTimeout):
        led.query(ENDLESS, timeout_s=0.2)


def test_the_timeout_defaults_to_30_seconds_and_0_means_none(cli, reports: Path) -> None:
    from ledger.cli.reports import sql  # noqa: PLC0415

    timeout = next(p for p in sql.params if p.name == "timeout_s")
    assert timeout.default == 30.0
    assert cli("sql", "SELECT 1", "--timeout", "0").code == 0
    assert cli("sql", "SELECT 1", "--timeout", "-1").code == 2


SETTING_PRAGMAS = ["PRAGMA page_size = 1024", "PRAGMA main.page_size=8192",
                   "PRAGMA cache_size = 10", "PRAGMA query_only = 0",
                   "PRAGMA foreign_keys = OFF", "PRAGMA journal_size_limit = 1",
                   "PRAGMA wal_checkpoint(TRUNCATE)", "PRAGMA optimize",
                   "PRAGMA user_version = 3", "PRAGMA schema_version = 99",
                   "PRAGMA writable_schema = ON", "PRAGMA mmap_size = 1048576"]


@pytest.mark.parametrize("statement", SETTING_PRAGMAS)
def test_every_pragma_that_sets_something_is_refused(cli, reports: Path,
                                                     statement: str) -> None:
    before = (reports / "ledger.db").read_bytes()
    result = cli("sql", statement)
    assert result.code == 6, result
    assert "only read-only queries are allowed" in result.err
    assert (reports / "ledger.db").read_bytes() == before


@pytest.mark.parametrize(("statement", "column"), [
    ("PRAGMA journal_mode", "journal_mode"), ("PRAGMA page_size", "page_size"),
    ("PRAGMA table_info(upgrades)", "name"), ("PRAGMA index_list(events)", "name"),
    ("PRAGMA user_version", "user_version"), ("PRAGMA quick_check", "quick_check"),
    ("PRAGMA foreign_key_list(components)", "table")])
def test_pragmas_that_only_read_are_allowed(cli, reports: Path, statement: str,
                                            column: str) -> None:
    result = cli("sql", statement, "--json")
    assert result.code == 0, result
    assert column in json.loads(result.out)[0]


def _peak_rss_kib(*args: str) -> tuple[int, int]:
    """(exit status, peak RSS in KiB) of ``upgrade-ledger ARGS`` as a real process whose
    output goes nowhere; measured by a wrapper whose only child it is."""
    wrapper = ("import resource, subprocess, sys; "
               "done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
               "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "ledger",
                           *args], capture_output=True, text=True, check=True,
                          env=child_env(), timeout=600)
    code, peak = done.stdout.split()
    return int(code), int(peak)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "plain", "json"])
def test_rows_are_streamed_not_collected(reports: Path, fmt: str) -> None:
    """80 MB of rows go through in a few tens of MB: memory does not grow with the
    result (it reached gigabytes when every row was collected before printing)."""
    rows = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 40000) "
            "SELECT x, printf('%2000d', x) AS pad FROM c")
    code, peak = _peak_rss_kib("--home", str(reports), "sql", rows, "-f", fmt)
    assert code == 0
    assert peak < 64 * 1024, f"peak RSS {peak} KiB for 80 MB of {fmt}"


def test_a_table_is_bounded_and_says_which_formats_stream(cli, reports: Path) -> None:
    many = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 10001) "
            "SELECT x FROM c")
    result = cli("sql", many)
    assert result.code == 6 and result.out == "", result
    assert result.err.splitlines() == [
        "upgrade-ledger: error: more than 10000 rows do not fit a table; use -f csv, "
        "plain or json, which stream any number of rows"]
    assert len(cli("sql", many.replace("10001", "10000")).out.splitlines()) == 10002


def test_ctrl_c_stops_a_running_query(reports: Path) -> None:
    """SIGINT while SQLite computes: the query stops at once, exit 130, one line."""
    proc = subprocess.Popen([sys.executable, "-m", "ledger", "--home", str(reports), "sql",
                             ENDLESS, "--timeout", "0"], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_querying(proc.pid, reports / "ledger.db")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert err.splitlines() == ["upgrade-ledger: interrupted"]


def _wait_until_querying(pid: int, db: Path) -> None:
    """Until the process has its reporting connection open (its second handle of the
    ledger, beside the ledger's own), then a moment more: it is inside the query."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            handles = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            handles = []
        if handles.count(str(db)) >= 2:
            time.sleep(0.3)
            return
        time.sleep(0.01)
    raise AssertionError("the query never started")


def test_blobs_print_as_hex_in_every_format(cli, reports: Path) -> None:
    for fmt in ("table", "plain", "csv"):
        result = cli("sql", "SELECT x'00ff10' AS b", "-f", fmt)
        assert result.code == 0, result
        assert "X'00FF10'" in result.out
    assert json.loads(cli("sql", "SELECT x'00ff10' AS b", "--json").out) == [{"b": "X'00FF10'"}]
