"""Operator commands: status, history, show, events, export, import, save-history.
Every output format, and the exact keys of every JSON shape (scripts parse them)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import walk_to_upgrading

from ledger.api import Ledger
from ledger.cli.reports import EVENT_COLUMNS, HISTORY_COLUMNS

STATUS_KEYS = ["host", "upgrade_id", "state", "outcome", "phase", "component", "progress_percent",
               "components", "rollback_points", "started_at", "updated_at", "lock", "stuck",
               "notify"]
LOCK_KEYS = ["path", "held", "stale", "suspect", "reason", "age_s", "holder"]
STUCK_KEYS = ["name", "phase", "age_s", "why"]
UPGRADE_KEYS = ["id", "host", "state", "outcome", "hostname", "user", "started_at", "updated_at",
                "finished_at", "duration_s", "superseded_by", "error"]
HISTORY_KEYS = [*UPGRADE_KEYS, "components", "completed", "failed"]
SHOW_KEYS = [*UPGRADE_KEYS, "current_phase", "current_component", "progress_percent",
             "phases", "components", "rollback_points", "events"]
PHASE_KEYS = ["name", "state", "started_at", "ended_at", "duration_s", "error"]
COMPONENT_KEYS = ["phase", "name", "state", "from_version", "to_version", "attempts",
                  "last_error", "note", "started_at", "completed_at", "failed_at",
                  "backup_path", "duration_s"]
POINT_KEYS = ["component", "backup_path", "size_bytes", "sha256", "created_at", "cleared_at"]
EVENT_KEYS = ["id", "host", "at", "upgrade_id", "kind", "subject", "from", "to", "user", "hostname",
              "pid", "detail"]
FORMATS = ["table", "plain", "csv"]


def legacy(uid: str, state: str, started: str, ended: str, host: str,
           components: dict[str, dict]) -> dict:
    """A legacy state document of a finished run (one phase, 'main')."""
    return {
        "upgrade_id": uid, "current_state": state, "started_at": started,
        "updated_at": ended, "current_phase": None, "current_component": None,
        "phases": {"main": {"state": "FAILED" if state == "FAILED" else "COMPLETED",
                            "started_at": started, "components": components}},
        "rollback_available": False, "can_resume": False,
        "metadata": {"hostname": host, "user": "ops", "pid": "4242"},
    }


@pytest.fixture(scope="module")
def fleet_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three finished upgrades on two hosts, then one running here (the current one).
    Built once; each test gets its own copy (``fleet``)."""
    home = tmp_path_factory.mktemp("fleet") / "home"
    with Ledger(home) as led:
        led.import_document(legacy(
            "u-2026-01", "COMPLETED", "2026-01-10T10:00:00Z", "2026-01-10T10:30:00Z", "alpha",
            {"node_exporter": {"state": "COMPLETED", "from_version": "1.7.0",
                               "to_version": "1.9.1", "started_at": "2026-01-10T10:05:00Z",
                               "completed_at": "2026-01-10T10:10:00Z", "attempts": 0}}),
            make_current=False)
        led.import_document(legacy(
            "u-2026-02", "FAILED", "2026-02-10T10:00:00Z", "2026-02-10T11:00:00Z", "beta",
            {"grafana": {"state": "FAILED", "from_version": "10.0", "to_version": "10.4",
                         "started_at": "2026-02-10T10:10:00Z",
                         "failed_at": "2026-02-10T10:20:00Z", "attempts": 2,
                         "last_error": "boom"}}), make_current=False)
        led.import_document(legacy(
            "u-2026-03", "ROLLED_BACK", "2026-03-01T08:00:00Z", "2026-03-01T09:00:00Z", "alpha",
            {}), make_current=False)
        walk_to_upgrading(led, "u-live")
        led.phase_start("exporters")
        led.component_start("prometheus", "2.45", "2.53")
        led.mark_rollback_point("prometheus", "/backups/prom.tgz", size_bytes=10)
    return home


@pytest.fixture
def fleet(home: Path, fleet_template: Path) -> Path:
    shutil.copytree(fleet_template, home, symlinks=True)
    return home


def out_of(cli, *args: str) -> str:
    result = cli(*args)
    assert (result.code, result.err) == (0, ""), (args, result)
    return result.out


def ids(cli, *args: str) -> list[str]:
    return [row["id"] for row in json.loads(out_of(cli, "history", "--json", *args))]


# -- status ----------------------------------------------------------------------------

def test_status_json_shape(cli, fleet) -> None:
    data = json.loads(out_of(cli, "status", "--json"))
    assert list(data) == STATUS_KEYS
    assert list(data["lock"]) == LOCK_KEYS
    assert [list(s) for s in data["stuck"]] == [STUCK_KEYS]
    assert (data["upgrade_id"], data["state"], data["phase"], data["component"]) == \
        ("u-live", "UPGRADING", "exporters", "prometheus")
    assert data["components"] == {"UPGRADING": 1}
    assert data["rollback_points"] == 1
    assert data["stuck"][0]["why"] == "upgrading while no live process holds the lock"


def test_status_before_any_upgrade(cli) -> None:
    data = json.loads(out_of(cli, "status", "--json"))
    assert (data["upgrade_id"], data["state"], data["stuck"]) == (None, "IDLE", [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_status_in_text_formats(cli, fleet, fmt) -> None:
    out = out_of(cli, "status", "-f", fmt)
    if fmt == "csv":
        rows = dict(csv.reader(io.StringIO(out)))
        assert rows["state"] == "UPGRADING"
        assert rows["lock"] == "free"
        assert rows["stuck"] == "prometheus (upgrading while no live process holds the lock)"
    elif fmt == "plain":
        assert "state: UPGRADING" in out.splitlines()
        assert "components: 1 upgrading" in out.splitlines()
    else:
        assert any(line.split() == ["state", "UPGRADING"] for line in out.splitlines())


# -- history ---------------------------------------------------------------------------

def test_history_newest_first_with_its_json_shape(cli, fleet) -> None:
    rows = json.loads(out_of(cli, "history", "--json"))
    assert [r["id"] for r in rows] == ["u-live", "u-2026-03", "u-2026-02", "u-2026-01"]
    assert all(list(r) == HISTORY_KEYS for r in rows)
    first = rows[-1]
    assert (first["hostname"], first["outcome"], first["duration_s"]) == \
        ("alpha", "COMPLETED", 1800.0)
    assert (first["components"], first["completed"], first["failed"]) == (1, 1, 0)


@pytest.mark.parametrize(("args", "expected"), [
    (("--state", "FAILED"), ["u-2026-02"]),
    (("--state", "COMPLETED"), ["u-2026-01"]),
    (("--component", "grafana"), ["u-2026-02"]),
    (("--host", "alpha"), []),  # imported runs are this host's, whoever ran them
    (("--since", "2026-02-01", "--until", "2026-03-01"), ["u-2026-02"]),
    (("--since", "2026-02-10T10:00:00Z", "--all-hosts"), ["u-live", "u-2026-03",
                                                            "u-2026-02"]),
    (("--since", "1d"), ["u-live"]),
    (("-n", "2"), ["u-live", "u-2026-03"]),
    (("-n", "1", "--all"), ["u-live", "u-2026-03", "u-2026-02", "u-2026-01"]),
])
def test_history_filters(cli, fleet, args, expected) -> None:
    assert ids(cli, *args) == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_history_in_text_formats(cli, fleet, fmt) -> None:
    out = out_of(cli, "history", "-f", fmt)
    lines = out.splitlines()
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(out)))
        assert rows[0] == HISTORY_COLUMNS
        assert [r[0] for r in rows[1:]] == ["u-live", "u-2026-03", "u-2026-02", "u-2026-01"]
        assert rows[3][:3] == ["u-2026-02", "FAILED", "FAILED"]
    elif fmt == "plain":
        assert len(lines) == 4
        assert lines[3].split("\t")[:4] == ["u-2026-01", "COMPLETED", "COMPLETED", "alpha"]
    else:
        assert lines[0].split() == HISTORY_COLUMNS
        assert lines[2].split()[0] == "u-live"


def test_history_of_an_empty_ledger_prints_the_header_and_json_is_a_list(cli) -> None:
    table = cli("history")
    assert (table.code, table.out.split("\n")[0].split(), table.err) == \
        (0, HISTORY_COLUMNS, "no upgrades match\n")
    assert out_of(cli, "history", "-f", "plain") == ""
    assert json.loads(out_of(cli, "history", "--json")) == []


# -- show --------------------------------------------------------------------------------

def test_show_json_shape(cli, fleet) -> None:
    data = json.loads(out_of(cli, "show", "u-2026-02", "--json"))
    assert list(data) == SHOW_KEYS
    assert [list(p) for p in data["phases"]] == [PHASE_KEYS]
    assert [list(c) for c in data["components"]] == [COMPONENT_KEYS]
    assert all(list(e) == EVENT_KEYS for e in data["events"])
    comp = data["components"][0]
    assert (comp["name"], comp["state"], comp["attempts"], comp["last_error"],
            comp["duration_s"]) == ("grafana", "FAILED", 2, "boom", 600.0)
    assert [e["kind"] for e in data["events"]] == ["upgrade.import"]
    live = json.loads(out_of(cli, "show", "--json"))
    assert live["id"] == "u-live"
    assert [list(p) for p in live["rollback_points"]] == [POINT_KEYS]
    assert live["rollback_points"][0]["size_bytes"] == 10


@pytest.mark.parametrize("fmt", FORMATS)
def test_show_in_text_formats(cli, fleet, fmt) -> None:
    out = out_of(cli, "show", "-f", fmt)
    if fmt == "table":
        for title in ("Phases:", "Components:", "Rollback points:", "Events:"):
            assert title in out.splitlines()
        assert any(line.split()[:3] == ["exporters", "prometheus", "UPGRADING"]
                   for line in out.splitlines())
    else:
        for title in ("# Phases", "# Components", "# Rollback points", "# Events"):
            assert title in out.splitlines()
        head = "id,u-live" if fmt == "csv" else "id: u-live"
        assert head in out.splitlines()
        comp = "exporters,prometheus,UPGRADING,2.45,2.53" if fmt == "csv" else \
            "exporters\tprometheus\tUPGRADING\t2.45\t2.53"
        assert any(line.startswith(comp) for line in out.splitlines())


# -- events --------------------------------------------------------------------------------

def test_events_json_shape_and_filters(cli, fleet) -> None:
    every = json.loads(out_of(cli, "events", "--json"))
    assert all(list(e) == EVENT_KEYS for e in every)
    assert [e["id"] for e in every] == sorted(e["id"] for e in every)  # oldest first
    live = json.loads(out_of(cli, "events", "--upgrade", "u-live", "--json"))
    assert [e["kind"] for e in live] == ["upgrade.init", "upgrade.state", "upgrade.state",
                                         "upgrade.state", "phase.in_progress",
                                         "component.upgrading", "rollback.mark"]
    comps = json.loads(out_of(cli, "events", "--kind", "component.", "--json"))
    assert [(e["kind"], e["subject"]) for e in comps] == [("component.upgrading",
                                                            "prometheus")]
    page = json.loads(out_of(cli, "events", "--after", str(every[1]["id"]), "-n", "2",
                             "--json"))
    assert [e["id"] for e in page] == [every[2]["id"], every[3]["id"]]
    by_comp = json.loads(out_of(cli, "events", "--component", "prometheus", "--json"))
    assert [e["kind"] for e in by_comp] == ["component.upgrading"]


def test_events_n_is_the_newest_n_printed_oldest_first(cli, fleet) -> None:
    every = [e["id"] for e in json.loads(out_of(cli, "events", "--json"))]
    newest = json.loads(out_of(cli, "events", "-n", "3", "--json"))
    assert [e["id"] for e in newest] == every[-3:]
    table = out_of(cli, "events", "-n", "3").splitlines()[2:]
    assert [int(line.split()[0]) for line in table] == every[-3:]
    live = json.loads(out_of(cli, "events", "--upgrade", "u-live", "-n", "2", "--json"))
    assert [e["kind"] for e in live] == ["component.upgrading", "rollback.mark"]
    # With --after, -n pages forward from that id.
    page = json.loads(out_of(cli, "events", "--after", str(every[0]), "-n", "2", "--json"))
    assert [e["id"] for e in page] == every[1:3]


def test_the_events_table_shows_each_events_detail_briefly(cli, fleet) -> None:
    lines = out_of(cli, "events", "--upgrade", "u-live").splitlines()
    assert lines[0].split()[-1] == "detail"
    mark = next(line for line in lines if "rollback.mark" in line)
    assert mark.rstrip().endswith(" size_bytes=10")  # nulls are left out
    start = next(line for line in lines if "component.upgrading" in line)
    assert start.rstrip().endswith(" from_version=2.45 phase=exporters to_version=2.53")
    with Ledger(fleet) as led:
        led.annotate("apply.plan", None, {"sha256": "ab" * 32, "path": "/srv/plans/x.toml"})
        led.annotate("apply.note", None, {"text": "x" * 300})
    plan, note = out_of(cli, "events", "-n", "2").splitlines()[2:]
    assert plan.rstrip().endswith(" path=/srv/plans/x.toml sha256=abababababab")  # cut to 12
    assert len(note.split()[-1]) == 60 and note.rstrip().endswith("…")  # a short column, cut


@pytest.mark.parametrize("fmt", FORMATS)
def test_events_in_text_formats(cli, fleet, fmt) -> None:
    out = out_of(cli, "events", "--upgrade", "u-live", "-f", fmt)
    lines = out.splitlines()
    if fmt == "csv":
        assert lines[0].split(",") == EVENT_COLUMNS
        assert len(lines) == 8
    elif fmt == "plain":
        assert len(lines) == 7
        assert lines[0].split("\t")[3] == "upgrade.init"
    else:
        assert lines[0].split() == [*EVENT_COLUMNS, "detail"]
        assert len(lines) == 9


# -- export, import, save-history ------------------------------------------------------------

def test_export_rewrites_the_views(cli, fleet) -> None:
    state = fleet / "state.json"
    expected = state.read_bytes()
    state.unlink()
    assert out_of(cli, "save-history", "u-2026-01") == f"{fleet / 'history' / 'u-2026-01.json'}\n"
    (fleet / "history" / "u-2026-01.json").unlink()
    result = cli("export")
    assert (result.code, result.out, result.err) == (0, "", "wrote 2 file(s)\n")
    assert state.read_bytes() == expected
    assert json.loads((fleet / "history" / "u-2026-01.json").read_text())["upgrade_id"] == \
        "u-2026-01"


def test_export_to_stdout_and_to_a_path(cli, fleet, tmp_path) -> None:
    assert out_of(cli, "export", "-o", "-") == (fleet / "state.json").read_text()
    target = tmp_path / "out" / "u-2026-02.json"
    target.parent.mkdir()
    assert out_of(cli, "export", "--upgrade", "u-2026-02", "-o", str(target)) == ""
    doc = json.loads(target.read_text())
    assert (doc["upgrade_id"], doc["current_state"]) == ("u-2026-02", "FAILED")
    assert target.stat().st_mode & 0o777 == 0o600
    assert json.loads(out_of(cli, "export", "--upgrade", "u-2026-03"))["upgrade_id"] == \
        "u-2026-03"


def test_import_from_stdin_and_the_round_trip(cli, fleet) -> None:
    doc = legacy("u-old", "COMPLETED", "2025-12-01T00:00:00Z", "2025-12-01T01:00:00Z",
                 "gamma", {})
    result = cli("import", "--no-current", "-", input=json.dumps(doc))
    assert (result.code, result.out) == (0, "u-old\n")
    assert json.loads(out_of(cli, "status", "--json"))["upgrade_id"] == "u-live"
    exported = out_of(cli, "export", "--upgrade", "u-old", "-o", "-")
    again = cli("import", "--no-current", "-", input=exported)
    assert again.code == 0
    assert out_of(cli, "export", "--upgrade", "u-old", "-o", "-").replace(
        '"serial": ', "").split("\n")[0] == exported.split("\n")[0]
    assert "u-old" in ids(cli, "--all")


def test_importing_a_bad_document_changes_nothing(cli, fleet) -> None:
    before = (fleet / "state.json").read_bytes()
    count = len(json.loads(out_of(cli, "events", "--json")))
    result = cli("import", "-", input='{"upgrade_id": "x", "upgrade_id": "y"}')
    assert result.code == 6
    assert result.err.startswith("upgrade-ledger: error: document ")
    assert result.err.endswith("has the key 'upgrade_id' twice\n")
    assert result.err.count("\n") == 1
    assert (fleet / "state.json").read_bytes() == before
    assert len(json.loads(out_of(cli, "events", "--json"))) == count
