"""The state document: what the ledger writes conforms to the shipped schema, round
trips through export and import, reads legacy documents, and refuses bad ones."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.api import Ledger
from ledger.errors import InvalidDocument
from ledger.views import document

REPO = Path(__file__).resolve().parent.parent
SCHEMA = json.loads(resources.files("ledger").joinpath("state.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(
    SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def test_the_shipped_schema_is_a_valid_schema_for_the_legacy_fields() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert set(SCHEMA["required"]) == {
        "upgrade_id", "current_state", "started_at", "updated_at", "current_phase",
        "current_component", "phases", "rollback_available", "can_resume", "metadata"}


def views(led: Ledger) -> list[Path]:
    return [led.home.state_file, *sorted(led.home.history_dir.glob("*.json"))]


STEPS: list[tuple[str, Callable[[Ledger], Any]]] = [
    ("init", lambda led: led.init("u-1")),
    ("planning", lambda led: led.set_state("PLANNING")),
    ("plan", lambda led: led.plan({"backup": [], "exporters": [
        ("node_exporter", "1.7.0", "1.9.1"), ("blackbox", None, "0.25.0"),
        ("snmp \u00e9t\u00e9", "0.1", "0.2")]})),
    ("backing_up", lambda led: led.set_state("BACKING_UP")),
    ("phase backup", lambda led: led.phase_start("backup")),
    ("rollback point", lambda led: led.mark_rollback_point(
        "node_exporter", "/var/backups/node_exporter-1.7.0.tgz", size_bytes=2048,
        sha256="ab" * 32)),
    ("backup done", lambda led: led.phase_complete("backup")),
    ("upgrading", lambda led: led.set_state("UPGRADING")),
    ("phase exporters", lambda led: led.phase_start("exporters")),
    ("start node", lambda led: led.component_start("node_exporter")),
    ("node done", lambda led: led.component_complete("node_exporter")),
    ("start blackbox", lambda led: led.component_start("blackbox")),
    ("blackbox fails", lambda led: led.component_fail("blackbox", "port 9115 in use\nretry")),
    ("unplanned", lambda led: led.component_start("extra", None, "1.0")),
    ("skip snmp", lambda led: led.component_skip("snmp \u00e9t\u00e9", "not installed")),
    ("resume", lambda led: led.resume()),
    ("failed", lambda led: led.set_state("FAILED", error="blackbox could not start")),
    ("save", lambda led: led.save_to_history()),
    ("cleanup", lambda led: led.cleanup()),
    ("next", lambda led: led.init("u-2")),
    ("planning 2", lambda led: led.set_state("PLANNING")),
    ("supersede", lambda led: led.init("u-3", supersede=True)),
    ("save old", lambda led: led.save_to_history("u-2")),
]


def test_every_view_the_ledger_writes_conforms_and_matches_the_ledger(ledger: Ledger) -> None:
    seen = 0
    for name, step in STEPS:
        step(ledger)
        for path in views(ledger):
            data = path.read_bytes()
            doc = json.loads(data)
            errors = [e.message for e in VALIDATOR.iter_errors(doc)]
            assert errors == [], (name, path.name, errors)
            assert document.parse(data) == doc  # our own validator agrees
            seen += 1
        # state.json is byte for byte what the ledger builds now: never stale, never
        # patched wrong. A history file is the upgrade as it was when saved.
        current = ledger.home.state_file.read_bytes()
        assert current == document.dumps(ledger.document()), name
        if name.startswith("save"):
            uid = ledger.events(limit=None)[-1]["upgrade_id"]
            assert ledger.home.history_file(uid).read_bytes() == \
                document.dumps(ledger.document(uid)), name
    assert seen >= len(STEPS) + 3
    # The serial is the upgrade's newest event; the lineage is the ledger's.
    doc = json.loads(ledger.home.state_file.read_text())
    assert doc["serial"] == max(e["id"] for e in ledger.events(upgrade_id="u-3", limit=None))
    assert doc["lineage"] == ledger.query(
        "SELECT value FROM ledger_meta WHERE key = 'lineage'")[1][0][0]


def test_the_file_is_indented_utf8_and_newline_terminated(ledger: Ledger) -> None:
    for _, step in STEPS[:3]:
        step(ledger)
    data = ledger.home.state_file.read_bytes()
    assert data.endswith(b"}\n") and data.startswith(b'{\n  "upgrade_id": "u-1",\n')
    assert "snmp \u00e9t\u00e9".encode() in data  # not \\u escapes: jq and grep read it
    assert data == (json.dumps(json.loads(data), indent=2, ensure_ascii=False) + "\n").encode()


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_legacy_jq_reads_work(ledger: Ledger) -> None:
    for _, step in STEPS[:13]:
        step(ledger)

    def jq(expr: str, path: Path) -> str:
        return subprocess.run(["jq", "-r", expr, str(path)], capture_output=True, text=True,
                              check=True, timeout=60).stdout.strip()

    path = ledger.home.state_file
    assert jq(".current_state", path) == "UPGRADING"
    assert jq(".phases.exporters.components.node_exporter.state", path) == "COMPLETED"
    assert jq(".phases.exporters.components.blackbox.attempts", path) == "2"  # failed once
    assert jq('[.phases[].components[] | select(.state == "FAILED")] | length', path) == "1"
    assert jq(".rollback_points[0].backup_path", path) == "/var/backups/node_exporter-1.7.0.tgz"


# -- export and import ---------------------------------------------------------------

@pytest.fixture
def rich(ledger: Ledger) -> Ledger:
    """A ledger whose documents use every field, additions included."""
    for _, step in STEPS:
        step(ledger)
    return ledger


@pytest.mark.parametrize("uid", ["u-1", "u-2", "u-3"])
def test_export_then_import_gives_back_the_same_document(rich: Ledger, uid: str) -> None:
    exported = rich.export_document(uid)
    rich.import_document(exported, make_current=False)
    again = rich.document(uid)
    assert again["serial"] > json.loads(exported)["serial"]
    assert {**again, "serial": 0} == {**json.loads(exported), "serial": 0}
    assert rich.current_id() == "u-3"


def test_a_document_moves_to_another_ledger_whole(rich: Ledger, tmp_path: Path) -> None:
    with Ledger(tmp_path / "other") as other:
        for uid in ("u-1", "u-2"):
            original = rich.document(uid)
            other.import_document(rich.export_document(uid))
            moved = other.document(uid)
            ignore = {"serial": 0, "lineage": None}
            assert {**moved, **ignore} == {**original, **ignore}
            assert moved["lineage"] != original["lineage"]  # it is the other ledger's now
        assert other.installed_version("node_exporter") == "1.9.1"
        assert other.rollback_info()["rollback_available"] is False  # u-2's: none


def test_importing_the_state_json_file_itself_changes_nothing_but_the_serial(
        rich: Ledger) -> None:
    before = rich.document()
    rich.import_document(rich.home.state_file.read_bytes())
    assert {**rich.document(), "serial": 0} == {**before, "serial": 0}


LEGACY = {
    "upgrade_id": "upgrade-20251227-103000",
    "current_state": "UPGRADING",
    "started_at": "2025-12-27T10:30:00Z",
    "updated_at": "2025-12-27T10:42:10Z",
    "current_phase": "exporters",
    "current_component": "blackbox_exporter",
    "phases": {
        "backup": {"state": "COMPLETED", "started_at": "2025-12-27T10:30:05Z",
                   "completed_at": "2025-12-27T10:31:00Z", "components": {}},
        "exporters": {
            "state": "IN_PROGRESS", "started_at": "2025-12-27T10:31:00Z",
            "components": {
                "node_exporter": {
                    "state": "COMPLETED", "from_version": "1.7.0", "to_version": "1.9.1",
                    "started_at": "2025-12-27T10:31:00Z",
                    "completed_at": "2025-12-27T10:35:00Z", "attempts": 0,
                    "backup_path": "/var/lib/observability-upgrades/backups/"
                                   "node_exporter-1.7.0-20251227.tar.gz"},
                "blackbox_exporter": {
                    "state": "IN_PROGRESS", "from_version": "0.24.0", "to_version": "0.25.0",
                    "started_at": "2025-12-27T10:42:10Z", "attempts": 1,
                    "last_error": "timeout"},
            },
        },
        "validate": {"state": "PENDING"},
    },
    "rollback_available": True,
    "can_resume": True,
    "metadata": {"hostname": "web1", "user": "root", "pid": "12345"},
}


def test_a_legacy_document_imports_and_resumes(ledger: Ledger) -> None:
    jsonschema.validate(LEGACY, SCHEMA)
    uid = ledger.import_document(json.dumps(LEGACY))
    assert uid == "upgrade-20251227-103000" and ledger.current_id() == uid
    doc = ledger.document()
    exporters = doc["phases"]["exporters"]["components"]
    assert exporters["blackbox_exporter"]["state"] == "UPGRADING"  # the legacy alias
    assert exporters["blackbox_exporter"]["attempts"] == 1
    assert list(doc["phases"]) == ["backup", "exporters", "validate"]
    assert doc["phases"]["validate"] == {"state": "PENDING", "components": {}}
    assert (doc["started_at"], doc["updated_at"]) == (LEGACY["started_at"],
                                                       LEGACY["updated_at"])
    assert doc["metadata"] == LEGACY["metadata"]
    # What the legacy fields meant carries over: resume point, rollback points, next phase.
    assert ledger.resume_point() == {"state": "UPGRADING", "phase": "exporters",
                                     "component": "blackbox_exporter", "can_resume": True}
    assert [c["name"] for c in ledger.rollback_info()["components"]] == ["node_exporter"]
    assert ledger.next_phase() == "validate"
    assert [c["name"] for c in ledger.resume()] == ["blackbox_exporter"]
    VALIDATOR.validate(json.loads(ledger.home.state_file.read_text()))


# -- parsing refuses what is not a document -------------------------------------------

GOOD = json.dumps(LEGACY)


def spoilt(change: Callable[[dict[str, Any]], Any]) -> str:
    doc = json.loads(GOOD)
    change(doc)
    return json.dumps(doc)


REFUSED = [
    ("nan", GOOD.replace('"attempts": 1', '"attempts": NaN'), "contains NaN"),
    ("infinity", GOOD.replace('"attempts": 1', '"attempts": Infinity'), "contains Infinity"),
    ("minus-infinity", GOOD.replace('"attempts": 1', '"attempts": -Infinity'),
     "contains -Infinity"),
    ("duplicate-top", GOOD.replace('{"upgrade_id"', '{"can_resume": false, "upgrade_id"', 1),
     "has the key 'can_resume' twice"),
    ("duplicate-nested", GOOD.replace('"hostname": "web1"', '"user": "x", "hostname": "web1"'),
     "has the key 'user' twice"),
    ("truncated", GOOD[:-10], "is not valid JSON"),
    ("trailing-garbage", GOOD + "x", "is not valid JSON"),
    ("two-documents", GOOD + GOOD, "is not valid JSON"),
    ("bad-utf8", GOOD.encode().replace(b"web1", b"web\xff"), "is not valid JSON"),
    ("string", '"state"', "must be a JSON object"),
    ("null", "null", "must be a JSON object"),
    ("deep-arrays", "[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ("deep-objects", '{"a":' * 50_000 + "1" + "}" * 50_000, "nested too deeply"),
    ("deep-inside", spoilt(lambda d: d.__setitem__("x", json.loads("[" * 20 + "]" * 20))),
     "nested deeper than 16 levels"),
    ("huge", '{"pad": "' + "x" * document.MAX_DOCUMENT + '"}', "at most 33554432 allowed"),
    ("state-unknown", spoilt(lambda d: d.__setitem__("current_state", "RUNNING")),
     "unknown upgrade state 'RUNNING'"),
    ("state-null", spoilt(lambda d: d.__setitem__("current_state", None)),
     "unknown upgrade state 'None'"),
    ("phase-state-unknown", spoilt(lambda d: d["phases"]["validate"].__setitem__("state", "TODO")),
     "unknown phase state 'TODO'"),
    ("component-state-number", spoilt(lambda d: d["phases"]["exporters"]["components"][
        "node_exporter"].__setitem__("state", 3)), "unknown component state '3'"),
    ("id-number", spoilt(lambda d: d.__setitem__("upgrade_id", 42)),
     "upgrade id must be a non-empty string"),
    ("id-path", spoilt(lambda d: d.__setitem__("upgrade_id", "x/../../y")), "is not allowed"),
    ("can-resume-string", spoilt(lambda d: d.__setitem__("can_resume", "true")),
     "can_resume must be true or false"),
    ("can-resume-int", spoilt(lambda d: d.__setitem__("can_resume", 1)),
     "can_resume must be true or false"),
    ("phases-null", spoilt(lambda d: d.__setitem__("phases", None)), "phases must be an object"),
    ("phase-not-object", spoilt(lambda d: d["phases"].__setitem__("validate", "PENDING")),
     "phases.validate must be an object"),
    ("phase-without-state", spoilt(lambda d: d["phases"]["validate"].pop("state")),
     "phases.validate lacks state"),
    ("components-list", spoilt(lambda d: d["phases"]["backup"].__setitem__("components", [])),
     "phases.backup.components must be an object"),
    ("metadata-string", spoilt(lambda d: d.__setitem__("metadata", "web1")),
     "metadata must be an object"),
    ("pid-negative", spoilt(lambda d: d["metadata"].__setitem__("pid", "-1")),
     "metadata.pid must be a decimal process id"),
    ("stamp-offset", spoilt(lambda d: d.__setitem__("started_at", "2025-12-27T10:30:00+01:00")),
     "started_at must be a UTC timestamp"),
    ("stamp-fraction", spoilt(lambda d: d.__setitem__("updated_at", "2025-12-27T10:30:00.5Z")),
     "updated_at must be a UTC timestamp"),
    ("missing", spoilt(lambda d: d.pop("can_resume")), "document lacks can_resume"),
    ("current-phase-number", spoilt(lambda d: d.__setitem__("current_phase", 1)),
     "phase name must be a non-empty string"),
    ("last-error-list", spoilt(lambda d: d["phases"]["exporters"]["components"][
        "blackbox_exporter"].__setitem__("last_error", ["x"])), "last_error must be a string"),
]


@pytest.mark.parametrize(("text", "message"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_parse_refuses_what_is_not_a_valid_document(text: str | bytes, message: str) -> None:
    with pytest.raises(InvalidDocument) as caught:
        document.parse(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_refused_documents_are_each_one_change_from_a_good_one() -> None:
    assert document.parse(GOOD) == LEGACY


# -- any numbers, any text: imported whole, or refused as a document --------------------

#: Whole numbers of every size: past 53 bits (JSON readers), 63 bits (SQLite) and beyond.
ANY_INT = st.one_of(st.integers(), st.sampled_from(
    [2**53 - 1, 2**53, 2**63 - 2, 2**63 - 1, 2**63, 2**64,
     10**30]))
#: Every code point, lone surrogates ("\ud800" in JSON) and invisible characters included.
ANY_TEXT = st.text(max_size=10)
#: Digits of every script: "²" and "٣" are digits to str.isdigit(), not all to int().
DIGITS = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=12)


@st.composite
def wild_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A document of one failed component where one field (drawn first) takes a number
    or a text from anywhere; the others are plain, so the wild one decides."""
    wild = draw(st.sampled_from(["name", "phase_error", "from_version", "attempts",
                                 "last_error", "hostname", "pid", "size_bytes", "serial"]))

    def pick(field: str, plain: Any, anything: st.SearchStrategy[Any]) -> Any:
        return draw(anything) if field == wild else plain

    name = pick("name", "node_exporter", ANY_TEXT)
    return {
        "upgrade_id": "wild", "current_state": "FAILED",
        "started_at": "2026-01-01T10:00:00Z", "updated_at": "2026-01-01T11:00:00Z",
        "current_phase": None, "current_component": None,
        "phases": {"main": {"state": "FAILED",
                            "error": pick("phase_error", None, st.one_of(st.none(), ANY_TEXT)),
                            "components": {name: {
                                "state": "FAILED",
                                "from_version": pick("from_version", "1.0", ANY_TEXT),
                                "to_version": "2.0", "attempts": pick("attempts", 1, ANY_INT),
                                "last_error": pick("last_error", "boom", ANY_TEXT)}}}},
        "rollback_available": True, "can_resume": False,
        "metadata": {"hostname": pick("hostname", "h1", ANY_TEXT), "user": "ops",
                     "pid": pick("pid", "42", st.one_of(st.none(), DIGITS,
                                                       ANY_INT.map(str)))},
        "rollback_points": [{"component": name, "backup_path": "/b/x.tgz",
                             "size_bytes": pick("size_bytes", 10,
                                                st.one_of(st.none(), ANY_INT))}],
        "serial": pick("serial", 7, ANY_INT),
    }


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=wild_documents())
def test_any_numbers_and_text_import_whole_or_are_refused(ledger: Ledger,
                                                         doc: dict[str, Any]) -> None:
    """Never an internal error: a document is imported and reads back as it was, or it
    is refused as an ``InvalidDocument`` with the ledger unchanged."""
    before = ledger.events(limit=None)
    try:
        uid = ledger.import_document(json.dumps(doc), make_current=False)
    except InvalidDocument as exc:
        assert "\n" not in str(exc)
        assert ledger.events(limit=None) == before
        return
    back = document.parse(ledger.export_document(uid))
    (name, comp), = back["phases"]["main"]["components"].items()
    sent = doc["phases"]["main"]["components"][name]
    assert (comp["attempts"], comp["last_error"], comp["from_version"]) == \
        (sent["attempts"], sent["last_error"], sent["from_version"])
    assert back["rollback_points"][0]["size_bytes"] == doc["rollback_points"][0]["size_bytes"]
    assert back["metadata"]["hostname"] == doc["metadata"]["hostname"]
    sent_pid = doc["metadata"]["pid"]
    assert back["metadata"]["pid"] == (None if sent_pid is None else str(int(sent_pid)))


# -- the documentation's example is a real document -----------------------------------

def test_the_documented_example_is_a_valid_document() -> None:
    text = (REPO / "docs" / "state-json.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.DOTALL)
    assert blocks, "docs/state-json.md has no json example"
    example = document.parse(blocks[0])
    VALIDATOR.validate(example)
    for field in ("serial", "lineage", "outcome", "rollback_points"):
        assert field in example


# -- saving a document into an upgrade (the legacy upgrade_state_save) -------------------

def with_kept_keys(doc: dict[str, Any]) -> dict[str, Any]:
    """*doc* with keys of a script's own at every level the legacy format has."""
    doc = json.loads(json.dumps(doc))
    doc["maintenance_window"] = {"day": "sun", "hours": [2, 4]}
    doc["metadata"]["ticket"] = "OPS-1"
    for phase in doc["phases"].values():
        phase["owner"] = "team-a"
        for comp in phase["components"].values():
            comp["checked_by"] = ["probe", None, 1.5, True]
    return doc


def test_kept_keys_survive_export_and_import(rich: Ledger, tmp_path: Path) -> None:
    rich.save_document(with_kept_keys(rich.document("u-1")))
    saved = rich.document("u-1")
    assert saved["maintenance_window"] == {"day": "sun", "hours": [2, 4]}
    assert saved["metadata"]["ticket"] == "OPS-1"
    assert saved["phases"]["exporters"]["owner"] == "team-a"
    assert saved["phases"]["exporters"]["components"]["blackbox"]["checked_by"] == [
        "probe", None, 1.5, True]
    VALIDATOR.validate(saved)  # the schema allows them (additionalProperties)
    assert rich.home.state_file.read_bytes() == document.dumps(saved)
    rich.save_to_history("u-1")
    assert json.loads(rich.home.history_file("u-1").read_text()) == \
        {**rich.document("u-1"), "serial": saved["serial"] + 1}
    with Ledger(tmp_path / "other") as other:
        other.import_document(rich.export_document("u-1"))
        moved = other.document("u-1")
    ignore = {"serial": 0, "lineage": None}
    assert {**moved, **ignore} == {**rich.document("u-1"), **ignore}


def test_a_saved_document_is_merged_into_the_upgrade(rich: Ledger) -> None:
    before = rich.document()  # u-3, current, IDLE
    rich.save_document(with_kept_keys(before))
    rich.save_document({"current_state": "PLANNING", "ticket": "OPS-2"})
    after = rich.document()
    # the known field is applied, the others are left; the top-level keys the ledger
    # does not know are the document's (maintenance_window is gone), metadata's and
    # the phases' stay since the document does not carry those objects
    assert after["current_state"] == "PLANNING" and after["ticket"] == "OPS-2"
    assert "maintenance_window" not in after
    assert after["metadata"] == {**before["metadata"], "ticket": "OPS-1"}
    assert after["started_at"] == before["started_at"]
    assert after["updated_at"] >= before["updated_at"]
    assert after["rollback_points"] == before["rollback_points"]
    assert rich.events(upgrade_id="u-3")[-1]["kind"] == "upgrade.save"


def test_a_partial_save_keeps_phases_components_and_rollback_points(rich: Ledger) -> None:
    rich.save_document(with_kept_keys(rich.document("u-1")))
    before = rich.document("u-1")
    rich.save_document({"upgrade_id": "u-1", "note": "reviewed"})
    after = rich.document("u-1")
    assert rich.current_id() == "u-1"  # the upgrade it names becomes current
    assert after["phases"] == before["phases"]
    assert after["rollback_points"] == before["rollback_points"]
    assert after["rollback_available"] == before["rollback_available"]
    assert after["note"] == "reviewed" and "maintenance_window" not in after


def test_a_whole_document_saved_for_a_new_id_creates_the_upgrade(rich: Ledger) -> None:
    doc = {**with_kept_keys(rich.document("u-1")), "upgrade_id": "u-9"}
    assert rich.save_document(doc) == "u-9"
    created = rich.document("u-9")
    assert created["maintenance_window"] == doc["maintenance_window"]
    assert rich.current_id() == "u-9"
