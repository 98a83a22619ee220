"""``upgrade-ledger apply``: a plan run through the state machine with real commands.

Commands are real ``/bin/sh`` processes (tests/applyplans.py); the evidence they
leave (one line per finished upgrade, start/end stamps, rollback order) is what the
tests count. Resume after SIGKILL and Ctrl-C: tests/test_apply_resume.py.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from conftest import child_env, run_ledger

from ledger.api import Ledger
from ledger.ops import doctor
from tests.applyplans import (
    component,
    lines,
    max_overlap,
    process_gone,
    tree,
    upgrades,
    write_plan,
)
from tests.conftest import REPO

EXAMPLE = REPO / "examples" / "observability-stack.toml"


def ledger_of(home: Path) -> Ledger:
    return Ledger(home)


def rollback_events(led: Ledger) -> list[dict]:
    return led.events(kind="apply.rollback", limit=None)


# -- the example plan, through the real command -----------------------------------------


@pytest.mark.slow
def test_the_example_plan_completes_and_a_second_apply_does_nothing(tmp_path: Path) -> None:
    # As in the README: a relative home, from another folder than the plan's.
    def apply() -> subprocess.CompletedProcess[str]:
        return run_ledger("--home", "demo", "apply", EXAMPLE, cwd=tmp_path)

    home = tmp_path / "demo"
    result = apply()
    assert result.returncode == 0, result.stderr
    assert "COMPLETED: upgrade obs-" in result.stdout
    sim = home / "sim"
    versions = {d.name: (d / "VERSION").read_text().strip() for d in sim.iterdir() if d.is_dir()}
    assert versions == {
        "node_exporter": "1.9.1", "nginx_exporter": "1.5.1", "mysqld_exporter": "0.17.2",
        "phpfpm_exporter": "2.2.0", "fail2ban_exporter": "0.10.3", "prometheus": "3.8.1",
        "loki": "3.6.3", "promtail": "3.6.3"}
    # Prometheus went through 2.55.1 first: two stages, one component name.
    changes = (sim / "changes.log").read_text()
    assert "prometheus 2.48.1 -> 2.55.1" in changes and "prometheus 2.55.1 -> 3.8.1" in changes

    with ledger_of(home) as led:
        doc = led.document()
        uid = doc["upgrade_id"]
        assert doc["current_state"] == "COMPLETED"
        comps = [(p, n, c["state"], c["from_version"], c["to_version"])
                 for p, phase in doc["phases"].items() for n, c in phase["components"].items()]
        assert ("prometheus-2.55", "prometheus", "COMPLETED", "2.48.1", "2.55.1") in comps
        assert ("prometheus-3", "prometheus", "COMPLETED", "2.55.1", "3.8.1") in comps
        assert all(state == "COMPLETED" for _, _, state, _, _ in comps) and len(comps) == 9
        points = led.rollback_info()["components"]
        assert len(points) == 9
        assert all(len(p["sha256"]) == 64 and p["size_bytes"] > 0 for p in points)
        assert {Path(p["backup_path"]).parent.name for p in points} == {
            "exporters", "prometheus-2.55", "prometheus-3", "logging"}
        assert led.events(kind="apply.plan")[0]["detail"]["path"] == str(EXAMPLE)
    assert (home / "history" / f"{uid}.json").exists()
    logs = home / "logs" / uid
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700
    assert {p.name for p in logs.iterdir()} == {f"{n}.log" for n in versions}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in logs.iterdir())

    again = apply()
    assert again.returncode == 0
    assert f"upgrade {uid} already applied this plan" in again.stdout
    assert (sim / "changes.log").read_text() == changes  # nothing ran again

    # The README's tour runs doctor on this very home: it must find it healthy
    # (the simulated service keeps its files private like the rest of the home).
    findings = doctor.run_checks(home)
    assert [f.check for f in findings if f.status == "fail"] == []


def test_commands_get_the_documented_environment(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    dump = 'env | grep -E "^LEDGER_" | sort > {W}/env.$LEDGER_STEP; sh {W}/t.sh upgrade'
    plan = write_plan(work, [("core", 1, [component("prom", "2.48.1", "2.55.1",
                                                     upgrade=dump)])])
    assert cli("apply", str(plan)).code == 0
    env = dict(line.split("=", 1) for line in (work / "env.upgrade").read_text().splitlines())
    with ledger_of(home) as led:
        uid = led.current_id()
    assert env["LEDGER_COMPONENT"] == "prom"
    assert env["LEDGER_PHASE"] == "core"
    assert (env["LEDGER_FROM_VERSION"], env["LEDGER_TO_VERSION"]) == ("2.48.1", "2.55.1")
    assert env["LEDGER_UPGRADE_ID"] == uid and uid.startswith("t-")
    assert env["LEDGER_HOME"] == str(home)
    assert env["LEDGER_BACKUP_DIR"] == str(home / "backups" / uid / "core" / "prom")
    assert env["LEDGER_STEP"] == "upgrade" and env["LEDGER_ATTEMPT"] == "1"
    assert env["LEDGER_PLAN_DIR"] == str(work)
    assert env["LEDGER_LOG"] == str(home / "logs" / uid / "prom.log")


# -- automatic rollback ------------------------------------------------------------------


def three_phases(work: Path, **defaults: object) -> Path:
    return write_plan(work, [
        ("one", 1, [component("a"), component("b")]),
        ("two", 1, [component("c")]),
        ("three", 1, [component("d")]),
    ], defaults=defaults)


@pytest.mark.slow
def test_a_failed_validation_rolls_back_in_reverse_order_with_verified_backups(
        tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = three_phases(work)
    (work / "fail-validate-c").touch()

    result = cli("apply", str(plan))

    assert result.code == 11, result
    assert result.err.endswith("ROLLED_BACK: two/c: validate exit 1 (attempt 1 of 1)\n")
    assert "c is unhealthy" in result.err  # the log's tail is shown
    assert lines(work, "rollbacks") == ["two.c", "one.b", "one.a"]  # d never started
    assert upgrades(work, "three", "d") == []
    with ledger_of(home) as led:
        doc = led.document()
        assert doc["current_state"] == "ROLLED_BACK"
        assert doc["phases"]["two"]["state"] == "FAILED"
        assert doc["phases"]["three"]["components"]["d"]["state"] == "PENDING"
        assert doc["phases"]["two"]["components"]["c"]["last_error"] == \
            "validate exit 1 (attempt 1 of 1)"
        recorded = {(p["backup_path"]): p["sha256"] for p in led.rollback_info()["components"]}
        verified = rollback_events(led)
        assert [(e["subject"], e["detail"]["ok"]) for e in verified] == \
            [("c", True), ("b", True), ("a", True)]
        for event in verified:
            path = str(home / "backups" / doc["upgrade_id"] / event["detail"]["phase"] /
                       event["subject"])
            assert event["detail"]["sha256"] == recorded[path]
    # A rolled-back plan is not "applied": running it again starts a new upgrade.
    (work / "fail-validate-c").unlink()
    assert cli("apply", str(plan)).code == 0


@pytest.mark.slow
def test_a_final_validation_failure_rolls_back_too(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = three_phases(work)
    (work / "validate-passes-a").write_text("1")  # healthy after its upgrade, not at the end
    result = cli("apply", str(plan))
    assert result.code == 11, result
    assert "one/a: final validation: validate exit 1" in result.err
    assert lines(work, "rollbacks") == ["three.d", "two.c", "one.b", "one.a"]
    with ledger_of(home) as led:
        states = [e["to"] for e in led.events(kind="upgrade.state")]
    assert states[-3:] == ["VALIDATING", "ROLLING_BACK", "ROLLED_BACK"]


def test_no_rollback_leaves_it_failed_for_a_human(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = three_phases(work)
    (work / "fail-validate-c").touch()
    result = cli("apply", "--no-rollback", str(plan))
    assert result.code == 12, result
    assert "(automatic rollback disabled)" in result.err
    assert lines(work, "rollbacks") == []
    with ledger_of(home) as led:
        assert led.state() == "FAILED"


def test_a_failed_rollback_ends_failed_and_stops_there(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = three_phases(work)
    (work / "fail-validate-c").touch()
    (work / "fail-rollback-b").touch()
    result = cli("apply", str(plan))
    assert result.code == 12, result
    assert "rollback stopped: one/b: rollback exit 3" in result.err
    assert "cannot restore b" in result.err
    assert lines(work, "rollbacks") == ["two.c"]  # a is left for a human, in order
    with ledger_of(home) as led:
        assert led.state() == "FAILED"
        assert [(e["subject"], e["detail"]["ok"]) for e in rollback_events(led)] == \
            [("c", True), ("b", False)]


def test_a_backup_that_changed_refuses_its_rollback(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = three_phases(work)
    (work / "fail-validate-c").touch()
    (work / "tamper-c").touch()  # the upgrade of c alters c's backup
    result = cli("apply", str(plan))
    assert result.code == 12, result
    assert "c (two): backup " in result.err
    assert "changed since it was taken" in result.err and "rollback refused" in result.err
    assert lines(work, "rollbacks") == []  # no rollback command ran at all
    with ledger_of(home) as led:
        assert led.state() == "FAILED"
        [event] = rollback_events(led)
        assert (event["subject"], event["detail"]["ok"]) == ("c", False)


def test_a_backup_that_saved_nothing_fails_before_any_change(
        tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 2, [component("a"), component("b", backup="true")])])
    result = cli("apply", str(plan))
    assert result.code == 12, result
    assert "one/b: backup" in result.err and "is empty" in result.err
    assert lines(work, "stamps") == []  # nothing was upgraded
    with ledger_of(home) as led:
        assert [e["to"] for e in led.events(kind="upgrade.state")][-1] == "FAILED"
        assert [e["from"] for e in led.events(kind="upgrade.state")][-1] == "BACKING_UP"


# -- retries, timeouts, parallelism, probes ------------------------------------------------


def test_retries_with_backoff_then_success(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component("a", retries=2, backoff=0.01)])])
    (work / "fail-upgrade-a").write_text("2")
    result = cli("apply", str(plan))
    assert result.code == 0, result
    assert upgrades(work, "one", "a") == ["2.0"]  # upgraded once, after two failures
    assert result.out.count("retrying in") == 2
    assert "retrying in 0.01 s" in result.out and "retrying in 0.02 s" in result.out
    with ledger_of(home) as led:
        comp = led.component_status("a")
        log = (home / "logs" / led.current_id() / "a.log").read_text()
    assert comp["state"] == "COMPLETED" and comp["attempts"] == 3  # the third one worked
    assert "one/a: 1.0 -> 2.0: upgraded and validated (attempt 3)" in result.out
    assert log.count("upgrade attempt") == 3
    assert log.count("upgrade of a fails on purpose") == 2


def test_retries_run_out(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component("a", retries=1)])])
    (work / "fail-upgrade-a").write_text("2")
    result = cli("apply", str(plan))
    assert result.code == 11
    assert "one/a: upgrade exit 1 (attempt 2 of 2)" in result.err
    with ledger_of(home) as led:
        assert led.component_status("a")["attempts"] == 3  # two failed: the next is 3


def test_a_command_over_its_timeout_is_killed_with_its_process_group(
        tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    slow = {"run": "sleep 30 & echo $! > {W}/sleeper; wait", "timeout": 0.5}
    plan = write_plan(work, [("one", 1, [component("a", upgrade=slow)])])
    result = cli("apply", str(plan))
    assert result.code == 11, result
    assert "one/a: upgrade timed out after" in result.err
    sleeper = int((work / "sleeper").read_text())
    assert process_gone(sleeper)  # the whole group went, not just the shell
    with ledger_of(home) as led:
        log = (home / "logs" / led.current_id() / "a.log").read_text()
    assert "<== timed out after" in log


@pytest.mark.slow
def test_max_parallel_is_respected_and_used(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [
        ("wide", 2, [component(f"w{i}") for i in range(5)]),
        ("narrow", 1, [component(f"n{i}") for i in range(3)]),
    ])
    # The first two upgrades of "wide" wait for each other: they must overlap, which
    # only happens if both run at once (a barrier, no timing).
    (work / "barrier-wide").write_text("2")
    result = cli("apply", str(plan))
    assert result.code == 0, result
    assert max_overlap(work, "wide") == 2
    assert max_overlap(work, "narrow") == 1
    assert all(upgrades(work, "wide", f"w{i}") == ["2.0"] for i in range(5))


@pytest.mark.slow
def test_a_probe_at_the_target_skips_with_its_evidence(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [
        ("stage1", 1, [component("p", "1.0", "2.0", probe=True), component("q", probe=True)]),
        ("stage2", 1, [component("p", "2.0", "3.0", probe=True)]),
    ])
    (work / "q.installed").write_text("2.0\n")  # q is already at its target
    result = cli("apply", str(plan))
    assert result.code == 0, result
    assert upgrades(work, "stage1", "q") == []
    assert lines(work, "backups") == ["stage1.p", "stage2.p"]  # no backup for q
    assert upgrades(work, "stage1", "p") == ["2.0"] and upgrades(work, "stage2", "p") == ["3.0"]
    with ledger_of(home) as led:
        doc = led.document()
    q = doc["phases"]["stage1"]["components"]["q"]
    assert (q["state"], q["note"]) == ("SKIPPED", "probe reported 2.0 (the target)")
    p2 = doc["phases"]["stage2"]["components"]["p"]
    assert (p2["state"], p2["from_version"]) == ("COMPLETED", "2.0")

    # A host already past a stage: both stages skipped, with the later target named.
    work2 = tmp_path / "w2"
    plan2 = write_plan(work2, [("stage1", 1, [component("p", "1.0", "2.0", probe=True)]),
                               ("stage2", 1, [component("p", "2.0", "3.0", probe=True)])])
    (work2 / "p.installed").write_text("3.0\n")
    assert cli("apply", "--supersede", str(plan2)).code == 0
    with ledger_of(home) as led:
        doc = led.document()
    assert doc["phases"]["stage1"]["components"]["p"]["note"] == \
        "probe reported 3.0 (the target of a later stage)"
    assert doc["phases"]["stage1"]["state"] == "SKIPPED"
    assert lines(work2, "stamps") == []


def test_a_probe_reporting_an_unexpected_version_fails_the_component(
        tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    # b is found at 1.5 when its turn comes (after the backups were taken).
    upgrade_a = "sh {W}/t.sh upgrade && echo 1.5 > {W}/b.installed"
    plan = write_plan(work, [("one", 1, [component("a", upgrade=upgrade_a),
                                         component("b", probe=True)])])
    result = cli("apply", str(plan))
    assert result.code == 11, result
    assert "one/b: installed version is 1.5, but the plan upgrades from 1.0" in result.err
    assert upgrades(work, "one", "b") == []


# -- dry run, lock, another plan ------------------------------------------------------------


def test_dry_run_changes_nothing(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component("a", probe=True), component("b", probe=True)])])
    (work / "b.installed").write_text("2.0\n")
    result = cli("apply", "--dry-run", str(plan))
    assert result.code == 0, result
    assert not home.exists()  # a new home is not even created
    assert "start a new upgrade" in result.out
    assert lines(work, "backups") == [] and lines(work, "stamps") == []
    rows = {r["component"]: r for r in json.loads(
        cli("apply", "--dry-run", "--json", str(plan)).out)["components"]}
    assert rows["a"]["action"] == "upgrade" and rows["a"]["installed"] == "1.0"
    assert rows["b"]["action"] == "skip (probe reports 2.0)"

    assert cli("apply", str(plan)).code == 0
    before = tree(home)
    again = cli("apply", "--dry-run", "--json", str(plan))
    assert json.loads(again.out)["action"].startswith("nothing: t-")
    assert tree(home) == before


def test_a_held_lock_refuses_the_run(tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component("a")])])
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE)
    try:
        with ledger_of(home) as led:
            led.acquire_lock(holder.pid)
        result = cli("apply", str(plan))
    finally:
        holder.communicate("")
    assert result.code == 4, result
    assert result.err.count("\n") == 1 and str(holder.pid) in result.err
    assert lines(work, "backups") == []


def test_another_plan_in_progress_is_refused_unless_superseded(
        tmp_path: Path, home: Path, cli) -> None:
    with ledger_of(home) as led:
        led.init("manual")
        led.set_state("PLANNING")
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component("a")])])
    result = cli("apply", str(plan))
    assert result.code == 9, result
    assert "upgrade manual is in progress (PLANNING) for no plan file" in result.err
    assert lines(work, "backups") == []
    assert cli("apply", "--supersede", str(plan)).code == 0
    with ledger_of(home) as led:
        assert led.show("manual")["state"] == "FAILED"
        assert led.state() == "COMPLETED"


def test_a_probe_that_prints_no_version_stops_before_any_change(
        tmp_path: Path, home: Path, cli) -> None:
    work = tmp_path / "w"
    comp = component("a")
    comp["probe"] = "echo 'not a version'"
    plan = write_plan(work, [("one", 1, [comp])])
    result = cli("apply", str(plan))
    assert result.code == 12, result
    assert "one/a: probe printed 'not a version', not a version" in result.err
    assert lines(work, "backups") == [] and lines(work, "stamps") == []
    with ledger_of(home) as led:
        assert led.state() == "FAILED"
        assert led.component_status("a")["state"] == "PENDING"


@pytest.mark.slow
def test_rolled_back_components_read_rolled_back_everywhere(tmp_path: Path) -> None:
    """The README's rollback demo: every component undone reads ROLLED_BACK, counted
    apart (status, summary, show, the views, metrics, state.json); the one that never
    started stays PENDING."""
    env = dict(child_env(), SIM_FAIL="loki")
    result = run_ledger("--home", "demo", "apply", EXAMPLE, cwd=tmp_path, env=env)
    assert result.returncode == 11, result.stderr
    home = tmp_path / "demo"

    status = json.loads(run_ledger("--home", home, "status", "--json").stdout)
    assert status["components"] == {"PENDING": 1, "ROLLED_BACK": 8}
    assert status["progress_percent"] == 0
    assert "8 rolled_back" not in run_ledger("--home", home, "status").stdout
    assert "1 pending, 8 rolled back" in run_ledger("--home", home, "status").stdout

    summary = run_ledger("--home", home, "summary").stdout
    assert "0% (0/9 components, 1 pending, 8 rolled back)" in summary
    assert ("Rolled back: loki (logging), prometheus (prometheus-3), prometheus "
            "(prometheus-2.55), fail2ban_exporter (exporters)") in summary

    show = json.loads(run_ledger("--home", home, "show", "--json").stdout)
    states = {(c["phase"], c["name"]): c["state"] for c in show["components"]}
    assert states.pop(("logging", "promtail")) == "PENDING"
    assert set(states.values()) == {"ROLLED_BACK"}
    loki = next(c for c in show["components"] if c["name"] == "loki")
    assert loki["last_error"].startswith("validate exit 1")  # why it failed is kept
    assert [e["kind"] for e in show["events"]].count("component.rolled_back") == 8

    sql = run_ledger("--home", home, "sql", "--json",
                     "SELECT components_completed, components_failed, components_skipped, "
                     "components_rolled_back FROM upgrade_summary")
    assert json.loads(sql.stdout) == [{"components_completed": 0, "components_failed": 0,
                                       "components_skipped": 0, "components_rolled_back": 8}]
    runs = json.loads(run_ledger("--home", home, "sql", "--json",
                                 "SELECT state, COUNT(*) AS n FROM component_runs "
                                 "GROUP BY state ORDER BY state").stdout)
    assert runs == [{"state": "PENDING", "n": 1}, {"state": "ROLLED_BACK", "n": 8}]

    metrics = run_ledger("--home", home, "metrics").stdout
    assert re.search(r'upgrade_ledger_components\{state="ROLLED_BACK",upgrade_id="[^"]+"\} 8',
                     metrics) or re.search(
        r'upgrade_ledger_components\{upgrade_id="[^"]+",state="ROLLED_BACK"\} 8(\.0)?', metrics)

    doc = json.loads((home / "state.json").read_text())
    assert doc["phases"]["logging"]["components"]["loki"]["state"] == "ROLLED_BACK"
    schema = json.loads((REPO / "ledger" / "state.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(doc)
    assert run_ledger("--home", home, "component", "is-upgraded", "loki").returncode == 1
