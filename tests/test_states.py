"""The seed's 13 unit scenarios, on a real ledger, plus what the ledger adds: supersede,
unique ids, planning, version tracking and the audit trail.

The seed's lock scenario lives in test_lock.py; here is everything around it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from conftest import child_env

from ledger.api import Ledger
from ledger.core import states
from ledger.errors import Conflict, InvalidTransition, NotFound, UpgradeInProgress

ID = re.compile(r"upgrade-\d{8}-\d{6}(-\d+)?")

#: DESIGN.md's table, written out again so a change to ledger/states.py must be deliberate.
EXPECTED_TRANSITIONS = {
    ("IDLE", "PLANNING"), ("PLANNING", "BACKING_UP"), ("BACKING_UP", "UPGRADING"),
    ("UPGRADING", "VALIDATING"), ("VALIDATING", "COMPLETED"), ("UPGRADING", "ROLLING_BACK"),
    ("ROLLING_BACK", "ROLLED_BACK"), ("UPGRADING", "FAILED"), ("FAILED", "IDLE"),
    ("COMPLETED", "IDLE"), ("ROLLED_BACK", "IDLE"),
    # the extensions
    ("VALIDATING", "ROLLING_BACK"), ("VALIDATING", "FAILED"), ("ROLLING_BACK", "FAILED"),
    ("PLANNING", "FAILED"), ("BACKING_UP", "FAILED"),
}


def path_to(target: str) -> list[str]:
    """The shortest list of states that takes a new upgrade (IDLE) to *target*."""
    queue: deque[list[str]] = deque([[]])
    while queue:
        path = queue.popleft()
        here = path[-1] if path else states.IDLE
        if here == target:
            return path
        queue.extend([*path, nxt] for nxt in states.UPGRADE_TRANSITIONS[here]
                     if nxt not in path)
    raise AssertionError(f"{target} is unreachable")


def drive_to(ledger: Ledger, target: str) -> None:
    for state in path_to(target):
        ledger.set_state(state)


def state_json(ledger: Ledger) -> dict[str, Any]:
    return json.loads(ledger.home.state_file.read_text())


def event_count(ledger: Ledger) -> int:
    return len(ledger.events(limit=None))


# -- 1. initialisation -----------------------------------------------------------------

def test_a_new_ledger_is_idle_and_empty(ledger: Ledger) -> None:
    assert ledger.state() == "IDLE"
    assert ledger.current_id() is None
    assert not ledger.home.state_file.exists()
    assert ledger.progress_percent() == 0
    assert not ledger.in_progress()


def test_init_creates_an_idle_upgrade_and_its_state_json(ledger: Ledger) -> None:
    uid = ledger.init()
    assert ID.fullmatch(uid)
    assert ledger.current_id() == uid
    assert ledger.state() == "IDLE"
    doc = state_json(ledger)
    assert doc["upgrade_id"] == uid
    assert doc["current_state"] == "IDLE"
    assert (doc["phases"], doc["current_phase"], doc["current_component"]) == ({}, None, None)
    assert (doc["rollback_available"], doc["can_resume"]) == (False, False)
    assert doc["metadata"]["pid"] == str(os.getpid())
    assert doc["metadata"]["hostname"] and doc["metadata"]["user"]
    assert doc["started_at"] == doc["updated_at"]


def test_init_takes_a_given_id(ledger: Ledger) -> None:
    assert ledger.init("nightly-2026.11_a") == "nightly-2026.11_a"
    assert state_json(ledger)["upgrade_id"] == "nightly-2026.11_a"
    with pytest.raises(Conflict, match="exists already"):
        ledger.init("nightly-2026.11_a")


# -- 2. valid transitions --------------------------------------------------------------

def test_the_transition_table_is_the_designed_one() -> None:
    table = {(a, b) for a, targets in states.UPGRADE_TRANSITIONS.items() for b in targets}
    assert table == EXPECTED_TRANSITIONS
    assert set(states.UPGRADE_STATES) == {s for pair in table for s in pair}


@pytest.mark.parametrize(("current", "target"), sorted(EXPECTED_TRANSITIONS))
def test_every_allowed_transition_is_recorded(ledger: Ledger, current: str,
                                              target: str) -> None:
    ledger.init()
    drive_to(ledger, current)
    before = event_count(ledger)
    assert Ledger.validate_transition(current, target)
    assert ledger.set_state(target) is True
    assert ledger.state() == target
    assert state_json(ledger)["current_state"] == target
    event = ledger.events(limit=None)[-1]
    assert (event["kind"], event["from"], event["to"]) == ("upgrade.state", current, target)
    assert event_count(ledger) == before + 1


@pytest.mark.parametrize("state", states.UPGRADE_STATES)
def test_setting_the_current_state_again_is_a_silent_no_op(ledger: Ledger, state: str) -> None:
    ledger.init()
    drive_to(ledger, state)
    before, view = event_count(ledger), ledger.home.state_file.read_bytes()
    assert ledger.set_state(state) is False
    assert event_count(ledger) == before
    assert ledger.home.state_file.read_bytes() == view


# -- 3. invalid transitions blocked (each pair, with the unchanged ledger, is in
#       test_bad_input.py; here the error's content) -------------------------------------

def test_an_invalid_transition_names_both_states_and_the_allowed_ones(ledger: Ledger) -> None:
    ledger.init()
    ledger.set_state("PLANNING")
    with pytest.raises(InvalidTransition) as caught:
        ledger.set_state("COMPLETED")
    err = caught.value
    assert (err.current, err.target, err.allowed) == ("PLANNING", "COMPLETED",
                                                      ("BACKING_UP", "FAILED"))
    assert str(err) == ("invalid upgrade transition PLANNING -> COMPLETED; "
                        "allowed from PLANNING: BACKING_UP, FAILED")
    assert ledger.state() == "PLANNING"
    assert not Ledger.validate_transition("PLANNING", "COMPLETED")


# -- 4. phase management ---------------------------------------------------------------

def test_phases_start_complete_fail_and_come_next_in_planned_order(ledger: Ledger) -> None:
    ledger.init()
    ledger.set_state("PLANNING")
    ledger.plan({"backup": [], "exporters": [], "validate": []})
    assert ledger.next_phase() == "backup"
    assert ledger.phase_start("backup") is True
    assert ledger.resume_point()["phase"] == "backup"
    assert ledger.next_phase() == "exporters"
    ledger.phase_complete("backup")
    ledger.phase_start("exporters")
    ledger.phase_fail("exporters", "disk full")
    doc = state_json(ledger)
    assert list(doc["phases"]) == ["backup", "exporters", "validate"]
    assert doc["phases"]["backup"]["state"] == "COMPLETED"
    assert doc["phases"]["backup"]["completed_at"] >= doc["phases"]["backup"]["started_at"]
    assert doc["phases"]["exporters"]["state"] == "FAILED"
    assert doc["phases"]["exporters"]["error"] == "disk full"
    assert "failed_at" in doc["phases"]["exporters"]
    assert doc["current_phase"] == "exporters"
    assert ledger.next_phase() == "validate"
    # A failed phase may be retried; the retry clears the old failure.
    ledger.phase_start("exporters")
    retried = state_json(ledger)["phases"]["exporters"]
    assert retried["state"] == "IN_PROGRESS"
    assert "error" not in retried and "failed_at" not in retried
    ledger.phase_complete("exporters")
    ledger.phase_skip("validate", "nothing to validate")
    assert ledger.next_phase() is None


def test_an_unplanned_phase_is_created_when_started(ledger: Ledger) -> None:
    ledger.init()
    ledger.phase_start("adhoc")
    assert state_json(ledger)["phases"]["adhoc"]["state"] == "IN_PROGRESS"


def test_a_phase_must_be_started_before_it_completes(ledger: Ledger) -> None:
    ledger.init()
    ledger.plan({"p": []})
    with pytest.raises(InvalidTransition, match="PENDING -> COMPLETED"):
        ledger.phase_complete("p")
    with pytest.raises(NotFound, match="no phase 'q'"):
        ledger.phase_complete("q")


# -- 5. component tracking -------------------------------------------------------------

def test_components_record_versions_states_and_times(ledger: Ledger) -> None:
    ledger.init()
    drive_to(ledger, "UPGRADING")
    ledger.phase_start("exporters")
    assert ledger.component_status("node_exporter") == {}
    ledger.component_start("node_exporter", "1.7.0", "1.9.1")
    status = ledger.component_status("node_exporter")
    assert (status["state"], status["from_version"], status["to_version"]) == \
        ("UPGRADING", "1.7.0", "1.9.1")
    assert status["phase"] == "exporters" and status["started_at"]
    assert state_json(ledger)["current_component"] == "node_exporter"
    assert not ledger.is_upgraded("node_exporter")
    ledger.component_complete("node_exporter")
    status = ledger.component_status("node_exporter")
    assert status["state"] == "COMPLETED" and status["completed_at"]
    assert status["attempts"] == 1  # the first attempt worked
    doc = state_json(ledger)
    assert doc["current_component"] is None
    comp = doc["phases"]["exporters"]["components"]["node_exporter"]
    assert comp["state"] == "COMPLETED" and comp["to_version"] == "1.9.1"


# -- 6. idempotency --------------------------------------------------------------------

def test_repeating_a_finished_step_changes_nothing(ledger: Ledger) -> None:
    ledger.init()
    drive_to(ledger, "UPGRADING")
    ledger.plan({"p": [("a", "1", "2")]})
    ledger.phase_start("p")
    ledger.component_start("a")
    ledger.component_complete("a")
    ledger.phase_complete("p")
    assert ledger.is_upgraded("a")
    before, view = event_count(ledger), ledger.home.state_file.read_bytes()
    assert ledger.component_complete("a") is False
    assert ledger.phase_complete("p") is False
    assert ledger.set_state("UPGRADING") is False
    assert event_count(ledger) == before
    assert ledger.home.state_file.read_bytes() == view
    # Planning again (a resumed script does) adds nothing.
    ledger.plan({"p": [("a", "1", "2")]})
    doc = state_json(ledger)
    assert list(doc["phases"]) == ["p"]
    assert doc["phases"]["p"]["components"]["a"]["state"] == "COMPLETED"


# -- 7. crash recovery -----------------------------------------------------------------

CRASHING_RUN = textwrap.dedent("""
    import sys, time
    from ledger.api import Ledger
    led = Ledger(sys.argv[1])
    led.init()
    for s in ("PLANNING", "BACKING_UP", "UPGRADING"):
        led.set_state(s)
    led.plan({"exporters": [("a", "1", "2"), ("b", "1", "2"), ("c", "1", "2")]})
    led.phase_start("exporters")
    led.component_start("a")
    led.component_complete("a")
    led.component_start("b")
    print("upgrading b", flush=True)
    time.sleep(600)
""")


def kill_after_line(script: str, home: Path, line: str) -> None:
    """Run *script* on *home* in a child, SIGKILL it once it printed *line*."""
    child = subprocess.Popen([sys.executable, "-c", script, str(home)],
                             stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == line + "\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        if child.stdout:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_run_killed_mid_upgrade_resumes_at_the_interrupted_component(home: Path) -> None:
    kill_after_line(CRASHING_RUN, home, "upgrading b")
    with Ledger(home) as led:
        assert led.can_resume() and led.in_progress()
        assert led.resume_point() == {"state": "UPGRADING", "phase": "exporters",
                                      "component": "b", "can_resume": True}
        doc = state_json(led)
        assert doc["can_resume"] is True
        assert doc["phases"]["exporters"]["components"]["b"]["state"] == "UPGRADING"
        interrupted = led.resume()
        assert [c["name"] for c in interrupted] == ["b"]
        assert interrupted[0]["state"] == "UPGRADING"
        assert led.events(limit=None)[-1]["kind"] == "upgrade.resume"
        # The resumed run skips what is done and redoes what was interrupted.
        assert led.is_upgraded("a") and not led.is_upgraded("b")
        led.component_start("b")
        led.component_complete("b")
        assert led.progress_percent() == 66


HAMMERING_RUN = textwrap.dedent("""
    import itertools, sys
    from ledger.api import Ledger
    led = Ledger(sys.argv[1])
    led.init()
    for s in ("PLANNING", "BACKING_UP", "UPGRADING"):
        led.set_state(s)
    names = [f"c{n:03d}" for n in range(200)]
    led.plan({"all": [(n, "1", "2") for n in names]})
    led.phase_start("all")
    # Upgrade (and re-run) components until killed: the kill lands mid-run for sure.
    for step, name in enumerate(itertools.cycle(names)):
        led.component_start(name)
        led.component_complete(name)
        if step == 20:
            print("busy", flush=True)
""")


@pytest.mark.slow
def test_a_run_killed_while_writing_leaves_a_consistent_ledger(home: Path) -> None:
    kill_after_line(HAMMERING_RUN, home, "busy")
    with sqlite3.connect(home / "ledger.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    view = state_json_of(home)  # written atomically: always whole
    with Ledger(home) as led:
        comps = led.document()["phases"]["all"]["components"]
        sequence = "".join(comp["state"][0] for comp in comps.values())
        # In order: done ones, at most one interrupted, then the rest (pending in the
        # first round, done from an earlier round after that).
        assert re.fullmatch(r"C*U?(C*|P*)", sequence), sequence
        assert sequence.count("C") >= 21
        upgrading = [name for name, comp in comps.items() if comp["state"] == "UPGRADING"]
        # Each start and completion has its event; nothing is half-written.
        kinds = [e["kind"] for e in led.events(kind="component.", limit=None)]
        assert kinds.count("component.upgrading") == \
            kinds.count("component.completed") + len(upgrading)
        assert [c["name"] for c in led.resume()] == upgrading
        assert view["serial"] <= led.document()["serial"]


def state_json_of(home: Path) -> dict[str, Any]:
    return json.loads((home / "state.json").read_text())


# -- 9. rollback, the parts that need no lock --------------------------------------------

def test_rollback_points_are_marked_listed_and_cleared(ledger: Ledger, tmp_path: Path) -> None:
    ledger.init()
    drive_to(ledger, "BACKING_UP")
    ledger.plan({"exporters": [("a", "1.0", "2.0"), ("b", "3", "4")]})
    assert ledger.rollback_info() == {"rollback_available": False, "components": []}
    ledger.mark_rollback_point("a", tmp_path / "a.tgz", size_bytes=12, sha256="ab" * 32)
    ledger.mark_rollback_point("b", str(tmp_path / "b.tgz"))
    info = ledger.rollback_info()
    assert info["rollback_available"] is True
    assert info["components"] == [
        {"name": "a", "backup_path": str(tmp_path / "a.tgz"), "from_version": "1.0",
         "to_version": "2.0", "size_bytes": 12, "sha256": "ab" * 32},
        {"name": "b", "backup_path": str(tmp_path / "b.tgz"), "from_version": "3",
         "to_version": "4", "size_bytes": None, "sha256": None},
    ]
    doc = state_json(ledger)
    assert doc["rollback_available"] is True
    assert doc["phases"]["exporters"]["components"]["a"]["backup_path"] == str(tmp_path / "a.tgz")
    assert [p["component"] for p in doc["rollback_points"]] == ["a", "b"]
    ledger.set_state("UPGRADING")
    ledger.set_state("ROLLING_BACK")
    ledger.set_state("ROLLED_BACK")
    assert ledger.clear_rollback_points() == 2
    assert ledger.rollback_info() == {"rollback_available": False, "components": []}
    assert state_json(ledger)["rollback_available"] is False
    # Cleared points stay in the ledger, for the record.
    shown = ledger.show()["rollback_points"]
    assert len(shown) == 2 and all(p["cleared_at"] for p in shown)
    assert ledger.show()["outcome"] == "ROLLED_BACK"


# -- 10. progress ----------------------------------------------------------------------

def test_progress_counts_done_components_among_those_planned(ledger: Ledger) -> None:
    ledger.init()
    assert ledger.progress_percent() == 0
    drive_to(ledger, "UPGRADING")
    ledger.plan({"p": [("a", None, "1"), ("b", None, "1"), ("c", None, "1")],
                 "q": [("d", None, "1")]})
    assert ledger.progress_percent() == 0
    ledger.phase_start("p")
    ledger.component_start("a")
    assert ledger.progress_percent() == 0
    ledger.component_complete("a")
    assert ledger.progress_percent() == 25
    ledger.component_start("b")
    ledger.component_fail("b", "boom")
    assert ledger.progress_percent() == 25  # a failure is not progress
    ledger.component_skip("c", "already at 1")
    assert ledger.progress_percent() == 50  # a skip is
    ledger.phase_start("q")
    ledger.component_start("d")
    ledger.component_complete("d")
    assert ledger.progress_percent() == 75


def test_a_completed_upgrade_without_components_is_all_done(ledger: Ledger) -> None:
    ledger.init()
    drive_to(ledger, "COMPLETED")
    assert ledger.progress_percent() == 100


# -- 11. history -----------------------------------------------------------------------

def test_history_lists_saved_upgrades_newest_first(ledger: Ledger) -> None:
    first = ledger.init()
    drive_to(ledger, "FAILED")
    ledger.cleanup()
    assert ledger.state() == "IDLE"
    second = ledger.init()
    drive_to(ledger, "COMPLETED")
    saved = ledger.save_to_history()
    assert saved == ledger.home.history_dir / f"{second}.json"
    assert json.loads(saved.read_text()) == ledger.document()
    assert json.loads((ledger.home.history_dir / f"{first}.json").read_text())[
        "current_state"] == "FAILED"
    assert [h["id"] for h in ledger.history()] == [second, first]
    assert [h["id"] for h in ledger.history(limit=1)] == [second]
    assert [h["id"] for h in ledger.history(state="FAILED")] == [first]
    # A finished run reset to IDLE is still found by how it ended.
    assert [h["id"] for h in ledger.history(state="IDLE")] == [first]
    assert ledger.history(since="2000-01-01") and not ledger.history(since="2999-01-01")
    row = ledger.history()[1]
    assert (row["state"], row["outcome"]) == ("IDLE", "FAILED")


def test_cleanup_leaves_a_run_in_progress_resumable(ledger: Ledger) -> None:
    uid = ledger.init()
    drive_to(ledger, "UPGRADING")
    ledger.cleanup()
    assert ledger.state() == "UPGRADING" and ledger.can_resume()
    assert (ledger.home.history_dir / f"{uid}.json").exists()


# -- 12. component failure -------------------------------------------------------------

def test_component_failures_count_attempts_and_keep_the_last_error(ledger: Ledger) -> None:
    ledger.init()
    drive_to(ledger, "UPGRADING")
    ledger.phase_start("p")
    ledger.component_start("a", "1", "2")
    ledger.component_fail("a", "timeout")
    status = ledger.component_status("a")
    assert (status["state"], status["attempts"], status["last_error"]) == \
        ("FAILED", 2, "timeout")  # attempt 1 failed: the next is 2
    assert status["failed_at"]
    ledger.component_start("a")  # a retry: attempt 2, not back to 1
    assert (ledger.component_status("a")["state"], ledger.component_status("a")["attempts"]) \
        == ("UPGRADING", 2)
    ledger.component_fail("a", "checksum mismatch")
    status = ledger.component_status("a")
    assert (status["attempts"], status["last_error"]) == (3, "checksum mismatch")
    comp = state_json(ledger)["phases"]["p"]["components"]["a"]
    assert (comp["attempts"], comp["last_error"]) == (3, "checksum mismatch")
    with pytest.raises(InvalidTransition, match="FAILED -> COMPLETED"):
        ledger.component_complete("a")
    failures = ledger.query("SELECT component, error, attempts FROM failures")[1]
    assert failures == [("a", "checksum mismatch", 3)]


# -- 13. in-progress detection ---------------------------------------------------------

@pytest.mark.parametrize("state", states.UPGRADE_STATES)
def test_in_progress_means_a_run_between_planning_and_its_end(ledger: Ledger,
                                                               state: str) -> None:
    ledger.init()
    drive_to(ledger, state)
    expected = state in {"PLANNING", "BACKING_UP", "UPGRADING", "VALIDATING", "ROLLING_BACK"}
    assert ledger.in_progress() is expected
    assert ledger.can_resume() is expected
    assert state_json(ledger)["can_resume"] is expected


# -- beyond the seed: supersede ----------------------------------------------------------

def test_init_while_in_progress_is_refused_and_nothing_changes(ledger: Ledger) -> None:
    uid = ledger.init()
    drive_to(ledger, "UPGRADING")
    before, view = event_count(ledger), ledger.home.state_file.read_bytes()
    with pytest.raises(UpgradeInProgress) as caught:
        ledger.init()
    assert (caught.value.upgrade_id, caught.value.state) == (uid, "UPGRADING")
    assert "supersede" in str(caught.value)
    assert ledger.current_id() == uid
    assert event_count(ledger) == before
    assert ledger.home.state_file.read_bytes() == view


def test_supersede_ends_the_old_run_and_keeps_it_in_history(ledger: Ledger) -> None:
    old = ledger.init()
    drive_to(ledger, "UPGRADING")
    new = ledger.init(supersede=True)
    assert new != old and ledger.current_id() == new and ledger.state() == "IDLE"
    old_doc = ledger.document(old)
    assert old_doc["current_state"] == "FAILED"
    assert old_doc["outcome"] == "FAILED"
    assert old_doc["superseded_by"] == new
    assert new in old_doc["error"]
    by_id = {h["id"]: h for h in ledger.history()}
    assert by_id[old]["superseded_by"] == new
    kinds = [(e["kind"], e["upgrade_id"]) for e in ledger.events(limit=None)[-2:]]
    assert kinds == [("upgrade.superseded", old), ("upgrade.init", new)]


def test_init_after_a_finished_run_needs_no_supersede(ledger: Ledger) -> None:
    old = ledger.init()
    drive_to(ledger, "COMPLETED")
    new = ledger.init()
    assert ledger.document(old).get("superseded_by") is None
    assert ledger.current_id() == new


# -- beyond the seed: ids ----------------------------------------------------------------

def test_ids_stay_unique_for_many_inits_in_the_same_second(ledger: Ledger) -> None:
    ids = [ledger.init() for _ in range(25)]
    assert len(set(ids)) == 25
    assert all(ID.fullmatch(i) for i in ids)
    seconds = [i[:len("upgrade-YYYYMMDD-HHMMSS")] for i in ids]
    assert len(set(seconds)) < len(seconds)  # some shared a second, and still differ


def _init_many(home: str, barrier: Any, count: int, out: Any) -> None:
    led = Ledger(home)
    barrier.wait(timeout=120)
    out.put([led.init() for _ in range(count)])
    led.close()


@pytest.mark.slow
def test_two_processes_starting_at_once_get_different_ids(home: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_init_many, args=(str(home), barrier, 10, out))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    ids = out.get(timeout=120) + out.get(timeout=120)
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert len(set(ids)) == 20
    with Ledger(home) as led:
        assert {h["id"] for h in led.history(limit=None)} == set(ids)
        assert len([e for e in led.events(limit=None) if e["kind"] == "upgrade.init"]) == 20


# -- beyond the seed: planning and versions -------------------------------------------

def test_planned_components_are_pending_until_they_start(ledger: Ledger) -> None:
    ledger.init()
    ledger.set_state("PLANNING")
    ledger.plan({"exporters": [("node_exporter", "1.7.0", "1.9.1"), ("blackbox", None, "0.25")],
                 "server": [("prometheus", "2.50", "3.1")]})
    doc = state_json(ledger)
    assert list(doc["phases"]) == ["exporters", "server"]
    assert all(p["state"] == "PENDING" for p in doc["phases"].values())
    comps = doc["phases"]["exporters"]["components"]
    assert list(comps) == ["node_exporter", "blackbox"]
    assert comps["node_exporter"] == {"state": "PENDING", "from_version": "1.7.0",
                                      "to_version": "1.9.1", "attempts": 0}
    assert ledger.component_status("prometheus")["state"] == "PENDING"
    assert ledger.events(limit=None)[-1]["kind"] == "upgrade.plan"


def test_installed_version_follows_completed_upgrades_only(ledger: Ledger) -> None:
    assert ledger.installed_version("node_exporter") is None
    ledger.init()
    drive_to(ledger, "UPGRADING")
    ledger.phase_start("p")
    ledger.component_start("node_exporter", "1.7.0", "1.8.0")
    ledger.component_complete("node_exporter")
    drive_to_end(ledger)
    assert ledger.installed_version("node_exporter") == "1.8.0"
    ledger.init()
    drive_to(ledger, "UPGRADING")
    ledger.phase_start("p")
    ledger.component_start("node_exporter", "1.8.0", "1.9.1")
    ledger.component_fail("node_exporter", "refused to start")
    assert ledger.installed_version("node_exporter") == "1.8.0"  # a failure installs nothing
    ledger.component_start("node_exporter")
    ledger.component_complete("node_exporter")
    assert ledger.installed_version("node_exporter") == "1.9.1"


def test_installed_version_after_a_rollback_is_the_version_restored(ledger: Ledger) -> None:
    ledger.init()
    drive_to(ledger, "UPGRADING")
    ledger.phase_start("p")
    ledger.component_start("node_exporter", "1.7.0", "1.9.1")
    ledger.component_complete("node_exporter")
    assert ledger.installed_version("node_exporter") == "1.9.1"
    ledger.set_state("ROLLING_BACK")
    assert ledger.installed_version("node_exporter") == "1.9.1"  # not restored yet
    ledger.set_state("ROLLED_BACK")
    assert ledger.installed_version("node_exporter") == "1.7.0"
    ledger.set_state("IDLE")  # the outcome survives the reset
    assert ledger.installed_version("node_exporter") == "1.7.0"


def drive_to_end(ledger: Ledger) -> None:
    ledger.set_state("VALIDATING")
    ledger.set_state("COMPLETED")
    ledger.set_state("IDLE")


# -- beyond the seed: the audit trail ---------------------------------------------------

CHANGES = [
    ("init", lambda led: led.init()),
    ("set_state", lambda led: led.set_state("PLANNING")),
    ("plan", lambda led: led.plan({"p": [("a", "1", "2")], "q": [("b", None, None)]})),
    ("phase_start", lambda led: led.phase_start("p")),
    ("component_start", lambda led: led.component_start("a")),
    ("component_fail", lambda led: led.component_fail("a", "boom")),
    ("component_start_again", lambda led: led.component_start("a")),
    ("component_complete", lambda led: led.component_complete("a")),
    ("mark_rollback_point", lambda led: led.mark_rollback_point("a", "/b/a.tgz")),
    ("phase_complete", lambda led: led.phase_complete("p")),
    ("phase_start_q", lambda led: led.phase_start("q")),
    ("component_skip", lambda led: led.component_skip("b", "not installed")),
    ("phase_fail", lambda led: led.phase_fail("q", "gave up")),
    ("phase_skip", lambda led: led.phase_skip("q", "not needed")),
    ("resume", lambda led: led.resume()),
    ("clear_rollback_points", lambda led: led.clear_rollback_points()),
    ("set_state_failed", lambda led: led.set_state("FAILED", error="operator abort")),
    ("save_to_history", lambda led: led.save_to_history()),
    ("import", lambda led: led.import_document(led.export_document())),
    ("set_state_idle", lambda led: led.set_state("IDLE")),
]


def test_every_change_appends_exactly_one_event_saying_who(home: Path) -> None:
    with Ledger(home, pid=4242) as led:
        for name, change in CHANGES:
            before = led.events(limit=None)
            change(led)
            after = led.events(limit=None)
            assert len(after) == len(before) + 1, name
            event = after[-1]
            assert event["pid"] == 4242, name
            assert event["user"] == led.user and event["hostname"] == led.hostname, name
            assert event["upgrade_id"] == led.current_id(), name
            if before:
                assert event["at"] >= before[-1]["at"], name
            # The view follows the ledger: its serial is the newest event.
            assert state_json(led)["serial"] == event["id"], name


def test_a_change_and_its_event_commit_together(ledger: Ledger) -> None:
    ledger.init()
    before, view = event_count(ledger), ledger.home.state_file.read_bytes()
    # Make every event insert fail: the change it belongs to must not land either.
    with sqlite3.connect(ledger.home.db_path) as conn:
        conn.execute("CREATE TRIGGER no_events BEFORE INSERT ON events "
                     "BEGIN SELECT RAISE(ABORT, 'events refused'); END")
    with pytest.raises(Exception, match="events refused"):
        ledger.set_state("PLANNING")
    with pytest.raises(Exception, match="events refused"):
        ledger.phase_start("p")
    with sqlite3.connect(ledger.home.db_path) as conn:
        conn.execute("DROP TRIGGER no_events")
    assert ledger.state() == "IDLE"
    assert ledger.document()["phases"] == {}
    assert event_count(ledger) == before
    assert ledger.home.state_file.read_bytes() == view


def test_a_refused_change_appends_no_event(ledger: Ledger) -> None:
    ledger.init()
    before = event_count(ledger)
    with pytest.raises(InvalidTransition):
        ledger.set_state("COMPLETED")
    ledger.plan({"p": []})
    with pytest.raises(InvalidTransition):
        ledger.phase_complete("p")
    assert event_count(ledger) == before + 1  # only the plan
