"""The Python API beyond the state machine: concurrent writers, strict mode, where a
ledger lives, the read side (history, show, events, summary, status), components in
several phases, and the errors for things that do not exist."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import walk_to_upgrading

from ledger.api import Ledger
from ledger.errors import BadInput, Conflict, NotFound, NotLockOwner
from ledger.store.database import SCHEMA_REVISION
from ledger.views import document

# -- concurrent writers (real processes) -------------------------------------------------

def _worker(home: str, name: str, rounds: int, barrier: Any) -> None:
    with Ledger(home) as led:
        barrier.wait(timeout=120)
        led.plan({"p": [(name, "1", "2")]})
        for n in range(rounds):
            led.component_start(name)
            led.component_fail(name, f"round {n}")
        led.component_start(name)
        led.component_complete(name)


@pytest.mark.slow
def test_concurrent_writers_never_lose_an_update(home: Path) -> None:
    workers, rounds = 4, 12
    with Ledger(home) as led:
        walk_to_upgrading(led, "shared")
        led.phase_start("p")
        first_event = led.events(limit=None)[-1]["id"]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_worker, args=(str(home), f"c{n}", rounds, barrier))
             for n in range(workers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0
    with Ledger(home) as led:
        doc = led.document()
        comps = doc["phases"]["p"]["components"]
        assert sorted(comps) == [f"c{n}" for n in range(workers)]
        for comp in comps.values():
            # each round failed an attempt; the last one (attempt rounds + 1) worked
            assert (comp["state"], comp["attempts"]) == ("COMPLETED", rounds + 1)
            assert comp["last_error"] == f"round {rounds - 1}"
        events = led.events(after_id=first_event, limit=None)
        # per worker: a plan, then start+fail per round, then start+complete
        assert len(events) == workers * (1 + 2 * rounds + 2)
        assert len({e["id"] for e in events}) == len(events)
        positions = led.query("SELECT position FROM components WHERE upgrade_id = 'shared'")[1]
        assert len(set(positions)) == workers
        # The view written last is the ledger's latest: no writer's view overtook another.
        assert led.home.state_file.read_bytes() == document.dumps(doc)
        assert led.progress_percent() == 100


# -- strict mode and attribution ---------------------------------------------------------

def _open_new_ledgers(root: str, rounds: int, barrier: Any, out: Any) -> None:
    errors = []
    for n in range(rounds):
        barrier.wait(timeout=120)
        try:
            with Ledger(Path(root) / f"home{n}") as led:
                led.current_id()
        except Exception as exc:  # reported to the parent, which fails the test
            errors.append(f"round {n}: {type(exc).__name__}: {exc}")
    out.put(errors)


@pytest.mark.slow
def test_processes_opening_a_new_ledger_together_all_succeed(tmp_path: Path) -> None:
    # Switching a new database to WAL needs it to itself, and SQLite answers "locked"
    # at once rather than waiting: every opener must wait its turn instead of failing.
    ctx = multiprocessing.get_context("spawn")
    workers, rounds = 4, 20
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_open_new_ledgers, args=(str(tmp_path), rounds, barrier, out))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    errors = [e for _ in procs for e in out.get(timeout=300)]
    for proc in procs:
        proc.join(timeout=60)
    assert errors == []
    for n in range(rounds):
        with Ledger(tmp_path / f"home{n}") as led:
            assert led.db.revision() == SCHEMA_REVISION


def test_strict_mode_refuses_changes_without_the_lock(home: Path) -> None:
    with Ledger(home, pid=os.getpid(), strict=True) as led:
        with pytest.raises(NotLockOwner, match="must hold the lock"):
            led.init()
        assert led.current_id() is None and led.events(limit=None) == []
        led.acquire_lock()
        uid = led.init()
        led.set_state("PLANNING")
        led.release_lock()
        with pytest.raises(NotLockOwner):
            led.set_state("BACKING_UP")
        assert led.state() == "PLANNING" and led.current_id() == uid


def test_changes_are_attributed_to_the_given_pid(home: Path) -> None:
    with Ledger(home, pid=31337) as led:
        led.init("u1")
        assert led.document()["metadata"]["pid"] == "31337"
        assert {e["pid"] for e in led.events(limit=None)} == {31337}


# -- where the ledger lives ------------------------------------------------------------------

def test_the_home_comes_from_the_option_then_the_environment(tmp_path: Path) -> None:
    env = {"LEDGER_HOME": str(tmp_path / "ledger-home"),
           "UPGRADE_STATE_DIR": str(tmp_path / "legacy-home")}
    with Ledger(None, env=env) as led:
        assert led.home.root == tmp_path / "ledger-home"
    with Ledger(None, env={"UPGRADE_STATE_DIR": str(tmp_path / "legacy-home")}) as led:
        assert led.home.root == tmp_path / "legacy-home"
    with Ledger(tmp_path / "given", env=env) as led:
        assert led.home.root == tmp_path / "given"
        assert (tmp_path / "given" / "ledger.db").is_file()


def test_legacy_variables_move_the_state_file_and_history(tmp_path: Path) -> None:
    env = {"UPGRADE_STATE_DIR": str(tmp_path / "home"),
           "UPGRADE_STATE_FILE": str(tmp_path / "elsewhere" / "current.json"),
           "UPGRADE_HISTORY_DIR": str(tmp_path / "old-runs")}
    with Ledger(None, env=env) as led:
        led.init("u1")
        led.save_to_history()
    assert json.loads((tmp_path / "elsewhere" / "current.json").read_text())["upgrade_id"] == "u1"
    assert (tmp_path / "old-runs" / "u1.json").is_file()
    assert not (tmp_path / "home" / "state.json").exists()


# -- the read side ---------------------------------------------------------------------------

@pytest.fixture
def two_runs(ledger: Ledger) -> Ledger:
    """u1 completed (node 1.7 -> 1.8), then u2 mid-run (node failed once, then upgrading)."""
    walk_to_upgrading(ledger, "u1")
    ledger.plan({"exporters": [("node", "1.7", "1.8"), ("snmp", "0.1", "0.2")]})
    ledger.phase_start("exporters")
    ledger.component_start("node")
    ledger.component_complete("node")
    ledger.component_skip("snmp", "not installed")
    ledger.phase_complete("exporters")
    ledger.set_state("VALIDATING")
    ledger.set_state("COMPLETED")
    ledger.cleanup()
    walk_to_upgrading(ledger, "u2")
    ledger.plan({"exporters": [("node", "1.8", "1.9")], "server": [("prom", "2", "3")]})
    ledger.phase_start("exporters")
    ledger.mark_rollback_point("node", "/b/node-1.8.tgz")
    ledger.component_start("node")
    ledger.component_fail("node", "refused to start")
    ledger.component_start("node")
    return ledger


def test_history_filters(two_runs: Ledger) -> None:
    ids = lambda **kw: [h["id"] for h in two_runs.history(**kw)]  # noqa: E731
    assert ids() == ["u2", "u1"]
    assert ids(limit=None) == ["u2", "u1"]
    assert ids(state="COMPLETED") == ["u1"]
    assert ids(state="UPGRADING") == ["u2"]
    assert ids(component="snmp") == ["u1"]
    assert ids(component="prom") == ["u2"]
    assert ids(host=two_runs.hostname) == ["u2", "u1"]
    assert ids(host="another-host") == []
    assert ids(since="1d") == ["u2", "u1"]
    assert ids(until="2000-01-01") == []
    u1 = two_runs.history(state="COMPLETED")[0]
    assert (u1["components"], u1["completed"], u1["failed"]) == (2, 1, 0)
    assert u1["outcome"] == "COMPLETED" and u1["duration_s"] >= 0


def test_show_has_phases_components_points_and_events(two_runs: Ledger) -> None:
    shown = two_runs.show()
    assert shown["id"] == "u2" and shown["state"] == "UPGRADING"
    assert [p["name"] for p in shown["phases"]] == ["exporters", "server"]
    assert [(c["phase"], c["name"], c["state"], c["attempts"]) for c in shown["components"]] == \
        [("exporters", "node", "UPGRADING", 2), ("server", "prom", "PENDING", 0)]
    assert [p["backup_path"] for p in shown["rollback_points"]] == ["/b/node-1.8.tgz"]
    assert {e["upgrade_id"] for e in shown["events"]} == {"u2"}
    assert shown["events"][0]["kind"] == "upgrade.init"
    old = two_runs.show("u1")
    assert old["outcome"] == "COMPLETED" and old["progress_percent"] == 100


def test_events_filter_by_kind_component_upgrade_and_page(two_runs: Ledger) -> None:
    every = two_runs.events(limit=None)
    assert [e["id"] for e in every] == sorted(e["id"] for e in every)
    node = two_runs.events(component="node", limit=None)
    assert {e["subject"] for e in node} == {"node"}
    assert [e["kind"] for e in node if e["upgrade_id"] == "u2"] == [
        "component.upgrading", "component.failed", "component.upgrading"]
    kinds = {e["kind"] for e in two_runs.events(kind="component.", limit=None)}
    assert kinds == {"component.upgrading", "component.completed", "component.skipped",
                     "component.failed"}
    assert {e["kind"] for e in two_runs.events(kind="upgrade.init")} == {"upgrade.init"}
    page1 = two_runs.events(limit=5)
    page2 = two_runs.events(after_id=page1[-1]["id"], limit=5)
    assert [e["id"] for e in page1 + page2] == [e["id"] for e in every[:10]]
    failed = two_runs.events(kind="component.failed")[0]
    assert failed["detail"] == {"phase": "exporters", "text": "refused to start"}
    assert (failed["from"], failed["to"]) == ("UPGRADING", "FAILED")


def test_summary_reads_at_a_glance(two_runs: Ledger) -> None:
    lines = two_runs.summary().splitlines()
    assert lines[0] == "Upgrade:   u2"
    assert lines[1] == "State:     UPGRADING"
    assert "Phase:     exporters" in lines
    assert "Component: node" in lines
    assert "Progress:  0% (0/2 components, 1 pending, 1 upgrading)" in lines
    assert "Rollback:  available (1 points)" in lines
    assert "  phase server: PENDING" in lines


def test_status_and_stuck_components(two_runs: Ledger) -> None:
    status = two_runs.status()
    assert (status["upgrade_id"], status["state"], status["phase"], status["component"]) == \
        ("u2", "UPGRADING", "exporters", "node")
    assert status["components"] == {"PENDING": 1, "UPGRADING": 1}
    assert status["rollback_points"] == 1
    assert status["lock"]["held"] is False
    # Upgrading with nobody holding the lock: the run that did it is gone.
    assert [(s["name"], s["phase"]) for s in status["stuck"]] == [("node", "exporters")]
    two_runs.acquire_lock()
    try:
        assert two_runs.status()["stuck"] == []
        assert [s["name"] for s in two_runs.status(stuck_after_s=0)["stuck"]] == ["node"]
    finally:
        two_runs.release_lock()


def test_installed_version_and_component_status_across_upgrades(two_runs: Ledger) -> None:
    assert two_runs.installed_version("node") == "1.8"  # u2's attempt is not done
    assert two_runs.installed_version("snmp") is None  # skipped, never installed
    assert two_runs.component_status("snmp") == {}  # not in the current upgrade
    assert two_runs.component_status("node")["to_version"] == "1.9"
    two_runs.component_complete("node")
    assert two_runs.installed_version("node") == "1.9"


def test_queries_take_parameters_and_refuse_writes(two_runs: Ledger) -> None:
    columns, rows = two_runs.query(
        "SELECT upgrade_id, state FROM component_runs WHERE component = :c "
        "ORDER BY upgrade_id", {"c": "node"})
    assert columns == ["upgrade_id", "state"]
    assert rows == [("u1", "COMPLETED"), ("u2", "UPGRADING")]
    with pytest.raises(BadInput, match="read-only"):
        two_runs.query("UPDATE components SET state = 'COMPLETED'")
    with pytest.raises(BadInput, match="empty"):
        two_runs.query("  ")


# -- the same component in several phases ----------------------------------------------

def test_a_component_in_two_phases_is_tracked_per_phase(ledger: Ledger) -> None:
    walk_to_upgrading(ledger)
    ledger.plan({"stage1": [("db", "1", "2")], "stage2": [("db", "2", "3")]})
    ledger.phase_start("stage1")
    ledger.component_start("db")
    assert ledger.component_status("db")["phase"] == "stage1"
    ledger.phase_start("stage2")
    # The current phase's entry is the default; --phase names the other one.
    ledger.component_complete("db", phase="stage1")
    ledger.component_start("db")
    assert ledger.component_status("db")["phase"] == "stage2"
    ledger.component_fail("db", "disk")
    doc = ledger.document()
    assert doc["phases"]["stage1"]["components"]["db"]["state"] == "COMPLETED"
    assert doc["phases"]["stage2"]["components"]["db"]["state"] == "FAILED"
    assert ledger.installed_version("db") == "2"
    with pytest.raises(NotFound, match="no phase 'stage3'"):
        ledger.component_start("db", phase="stage3")


# -- what does not exist, and what cannot be done now ------------------------------------

def test_things_that_do_not_exist_are_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound, match="start one with 'upgrade-ledger init'"):
        ledger.set_state("PLANNING")
    with pytest.raises(NotFound):
        ledger.summary()
    assert ledger.component_status("a") == {}
    walk_to_upgrading(ledger, "u1")
    ledger.phase_start("p")
    with pytest.raises(NotFound, match="no upgrade 'u9'"):
        ledger.document("u9")
    with pytest.raises(NotFound, match="no upgrade 'u9'"):
        ledger.save_to_history("u9")
    with pytest.raises(NotFound, match="no upgrade 'u9'"):
        ledger.show("u9")
    with pytest.raises(NotFound, match="no phase 'q'"):
        ledger.phase_fail("q")
    with pytest.raises(NotFound, match="no component 'zz'"):
        ledger.component_complete("zz")


def test_resume_needs_a_run_that_stopped_mid_way(ledger: Ledger) -> None:
    ledger.init("u1")
    with pytest.raises(Conflict, match="only a run that stopped mid-way"):
        ledger.resume()
    ledger.set_state("PLANNING")
    assert ledger.resume() == []


def test_annotations_are_events_that_change_no_state(ledger: Ledger) -> None:
    ledger.init("u1")
    before = ledger.document()
    ledger.annotate("runner.plan", "exporters", {"file": "plan.toml"})
    event = ledger.events(limit=None)[-1]
    assert (event["kind"], event["subject"], event["detail"]) == \
        ("runner.plan", "exporters", {"file": "plan.toml"})
    after = ledger.document()
    assert {**after, "serial": 0} == {**before, "serial": 0}
    with pytest.raises(BadInput, match="not allowed"):
        ledger.annotate("upgrade.state")


def test_cleanup_releases_only_its_own_lock(ledger: Ledger) -> None:
    ledger.init("u1")
    ledger.acquire_lock(owner_pid=os.getpid())
    ledger.cleanup(owner_pid=os.getppid())  # alive, but not the owner: the lock stays
    assert ledger.lock_status().held
    ledger.cleanup()
    assert not ledger.lock_status().held


def test_export_views_rewrites_deleted_views(ledger: Ledger) -> None:
    ledger.init("u1")
    ledger.save_to_history()
    ledger.init("u2")
    ledger.home.state_file.unlink()
    ledger.home.history_file("u1").unlink()
    written = ledger.export_views()
    assert written == [ledger.home.state_file, ledger.home.history_file("u1")]
    assert json.loads(ledger.home.state_file.read_text())["upgrade_id"] == "u2"
    assert json.loads(ledger.home.history_file("u1").read_text())["upgrade_id"] == "u1"


def _doc_for(ledger: Ledger, upgrade_id: str) -> dict[str, Any]:
    doc = ledger.document()
    doc = json.loads(json.dumps(doc))
    doc["upgrade_id"] = upgrade_id
    return doc


def test_importing_over_a_running_upgrade_supersedes_it(ledger: Ledger) -> None:
    running = ledger.init("run-1")
    ledger.set_state("PLANNING")
    ledger.set_state("BACKING_UP")
    doc = _doc_for(ledger, "other")
    doc["current_state"] = "IDLE"
    ledger.import_document(doc)
    assert ledger.current_id() == "other"
    old = ledger.show(running)
    assert (old["state"], old["superseded_by"]) == ("FAILED", "other")
    kinds = [e["kind"] for e in ledger.events(upgrade_id=running)]
    assert kinds[-1] == "upgrade.superseded"


def test_an_imported_current_phase_must_be_one_of_its_phases(ledger: Ledger) -> None:
    ledger.init("run-1")
    ledger.set_state("PLANNING")
    ledger.phase_start("p1")
    doc = _doc_for(ledger, "run-2")
    doc["current_phase"] = "ghost"
    before = ledger.events(limit=None)
    with pytest.raises(document.InvalidDocument, match="current_phase 'ghost'"):
        ledger.import_document(doc)
    assert ledger.events(limit=None) == before
