"""The per-step commands: init, state, phase, component, rollback, resume, predicates,
progress and summary. In-process (click's runner) for the behaviour, real processes
for the path shell scripts take."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import child_env, run_ledger

from ledger.core.states import UPGRADE_STATES as STATES

COMPONENT_KEYS = ["phase", "name", "state", "from_version", "to_version", "attempts",
                  "last_error", "note", "started_at", "completed_at", "failed_at",
                  "backup_path", "duration_s"]
ROLLBACK_KEYS = ["rollback_available", "components"]
ROLLBACK_ITEM_KEYS = ["name", "backup_path", "from_version", "to_version", "size_bytes",
                      "sha256"]
RESUME_POINT_KEYS = ["state", "phase", "component", "can_resume"]
SHA = "ab" * 32


def ok(cli, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a command that must succeed silently on stderr; return its stdout."""
    result = cli(*args, env=env)
    assert (result.code, result.err) == (0, ""), (args, result)
    return result.out


def upgrading(cli) -> None:
    """An upgrade in UPGRADING, phase 'exporters' current."""
    ok(cli, "init", "u1")
    for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
        ok(cli, "state", "set", state)
    ok(cli, "phase", "start", "exporters")


def state_doc(home: Path) -> dict:
    return json.loads((home / "state.json").read_text())


# -- init and state ----------------------------------------------------------------------

def test_init_prints_the_id_and_starts_idle(cli, home) -> None:
    assert ok(cli, "init", "u1") == "u1\n"
    assert ok(cli, "state", "get") == "IDLE\n"
    assert state_doc(home)["upgrade_id"] == "u1"


def test_init_makes_an_id_when_none_is_given(cli) -> None:
    assert re.fullmatch(r"upgrade-\d{8}-\d{6}\n", ok(cli, "init"))


def test_state_get_before_any_upgrade_is_idle(cli) -> None:
    assert ok(cli, "state", "get") == "IDLE\n"


def test_init_refuses_while_an_upgrade_runs_unless_superseded(cli) -> None:
    ok(cli, "init", "u1")
    ok(cli, "state", "set", "PLANNING")
    result = cli("init", "u2")
    assert result.code == 9
    assert result.err == ("upgrade-ledger: error: upgrade u1 is still in progress (PLANNING); "
                          "finish it, or supersede it explicitly (--supersede)\n")
    assert ok(cli, "init", "u2", "--supersede") == "u2\n"
    shown = json.loads(ok(cli, "show", "u1", "--json"))
    assert (shown["state"], shown["superseded_by"]) == ("FAILED", "u2")


def test_state_walk_and_the_same_state_again(cli, home) -> None:
    ok(cli, "init", "u1")
    for state in ("PLANNING", "PLANNING", "BACKING_UP"):
        assert ok(cli, "state", "set", state) == ""
    assert state_doc(home)["current_state"] == "BACKING_UP"


def test_an_invalid_transition_exits_3_names_the_allowed_targets_changes_nothing(
        cli, home) -> None:
    ok(cli, "init", "u1")
    before = (home / "state.json").read_bytes()
    result = cli("state", "set", "COMPLETED")
    assert result.code == 3
    assert result.err == ("upgrade-ledger: error: invalid upgrade transition IDLE -> "
                          "COMPLETED; allowed from IDLE: PLANNING\n")
    assert (home / "state.json").read_bytes() == before


def test_state_names_are_taken_in_any_case(cli, home) -> None:
    ok(cli, "init", "u1")
    ok(cli, "state", "set", "planning")
    ok(cli, "state", "set", "Backing_Up")
    assert state_doc(home)["current_state"] == "BACKING_UP"  # stored as the machine names it
    assert cli("state", "check", "upgrading", "rolling_back").code == 0
    assert cli("state", "check", "idle", "completed").code == 1
    ok(cli, "state", "set", "failed")
    assert [r["id"] for r in json.loads(ok(cli, "history", "--state", "failed", "--json"))] \
        == ["u1"]
    assert json.loads(ok(cli, "history", "--state", "rolled_back", "--json")) == []
    refused = cli("state", "set", "finished")
    assert refused.code == 6
    assert refused.err.startswith("upgrade-ledger: error: unknown upgrade state 'finished'; "
                                  "expected one of: IDLE, PLANNING")


@pytest.mark.parametrize(("words", "expected"), [
    (["state", "set", ""], list(STATES)),
    (["state", "set", "ro"], ["ROLLING_BACK", "ROLLED_BACK"]),
    (["state", "check", "IDLE", "P"], ["PLANNING"]),
    (["history", "--state", "f"], ["FAILED"]),
])
def test_state_names_complete_in_the_shell(home, words, expected) -> None:
    env = child_env(_UPGRADE_LEDGER_COMPLETE="bash_complete",
                    COMP_WORDS=" ".join(["upgrade-ledger", *words]),
                    COMP_CWORD=str(len(words)))
    done = run_ledger(env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"plain,{name}" for name in expected]
    assert not home.exists()  # completing opens no ledger


def test_state_set_keeps_the_error_text(cli) -> None:
    upgrading(cli)
    ok(cli, "state", "set", "FAILED", "--error", "disk full")
    assert json.loads(ok(cli, "show", "--json"))["error"] == "disk full"


# -- predicates: exit code only, words with -v ---------------------------------------------

@pytest.mark.parametrize(("args", "yes"), [
    (("state", "check", "IDLE", "PLANNING"), True),
    (("state", "check", "IDLE", "COMPLETED"), False),
    (("in-progress",), True),
    (("can-resume",), True),
    (("component", "is-upgraded", "node_exporter"), True),
    (("component", "is-upgraded", "blackbox"), False),
    (("lock", "held"), False),
])
def test_predicates_answer_by_exit_code_and_print_only_with_v(cli, args, yes) -> None:
    upgrading(cli)
    ok(cli, "component", "start", "node_exporter", "1.7.0", "1.9.1")
    ok(cli, "component", "complete", "node_exporter")
    quiet = cli(*args)
    assert (quiet.code, quiet.out, quiet.err) == (0 if yes else 1, "", "")
    loud = cli(*args, "-v")
    assert (loud.code, loud.out) == (0 if yes else 1, "yes\n" if yes else "no\n")


def test_predicates_say_no_when_nothing_runs(cli) -> None:
    ok(cli, "init", "u1")
    for args in (("in-progress",), ("can-resume",)):
        assert cli(*args).code == 1
    ok(cli, "state", "set", "PLANNING")
    ok(cli, "state", "set", "FAILED")
    assert cli("in-progress").code == 1


# -- phases --------------------------------------------------------------------------------

def test_phases_start_complete_fail_skip_and_next(cli, home) -> None:
    ok(cli, "init", "u1")
    ok(cli, "state", "set", "PLANNING")
    for phase in ("a", "b", "c", "d"):
        ok(cli, "component", "plan", f"x-{phase}", "--phase", phase)
    assert ok(cli, "phase", "next") == "a\n"
    ok(cli, "phase", "start", "a")
    ok(cli, "phase", "complete", "a")
    ok(cli, "phase", "start", "b")
    ok(cli, "phase", "fail", "b", "boom")
    ok(cli, "phase", "skip", "c", "not needed")
    assert ok(cli, "phase", "next") == "d\n"
    ok(cli, "phase", "skip", "d")
    assert ok(cli, "phase", "next") == ""
    phases = {p: v["state"] for p, v in state_doc(home)["phases"].items()}
    assert phases == {"a": "COMPLETED", "b": "FAILED", "c": "SKIPPED", "d": "SKIPPED"}
    assert state_doc(home)["phases"]["b"]["error"] == "boom"


def test_completing_an_unknown_phase_exits_5(cli) -> None:
    ok(cli, "init", "u1")
    result = cli("phase", "complete", "nope")
    assert result.code == 5
    assert result.err.startswith("upgrade-ledger: error: no phase 'nope' in upgrade u1")


# -- components ----------------------------------------------------------------------------

def test_component_lifecycle_and_status_json_shape(cli) -> None:
    upgrading(cli)
    assert json.loads(ok(cli, "component", "status", "node_exporter")) == {}
    ok(cli, "component", "start", "node_exporter", "1.7.0", "1.9.1")
    ok(cli, "component", "fail", "node_exporter", "checksum mismatch")
    ok(cli, "component", "start", "node_exporter")
    ok(cli, "component", "complete", "node_exporter")
    status = json.loads(ok(cli, "component", "status", "node_exporter"))
    assert list(status) == COMPONENT_KEYS
    assert (status["state"], status["attempts"], status["last_error"]) == \
        ("COMPLETED", 2, "checksum mismatch")  # the second attempt worked
    assert (status["from_version"], status["to_version"]) == ("1.7.0", "1.9.1")
    assert ok(cli, "component", "version", "node_exporter") == "1.9.1\n"


@pytest.mark.parametrize("fmt", ["table", "plain", "csv", "json"])
def test_component_status_in_every_format(cli, fmt) -> None:
    upgrading(cli)
    ok(cli, "component", "start", "node_exporter", "1.7.0", "1.9.1")
    out = ok(cli, "component", "status", "node_exporter", "-f", fmt)
    if fmt == "json":
        assert json.loads(out)["state"] == "UPGRADING"
    elif fmt == "csv":
        assert out.splitlines()[0] == "key,value"
        assert "state,UPGRADING" in out.splitlines()
    elif fmt == "plain":
        assert "state: UPGRADING" in out.splitlines()
    else:
        assert re.search(r"^state\s+UPGRADING$", out, re.MULTILINE)


def test_component_skip_keeps_the_reason_and_version_of_unknown_exits_1(cli) -> None:
    upgrading(cli)
    ok(cli, "component", "plan", "grafana", "10.0", "10.4", "--phase", "exporters")
    ok(cli, "component", "skip", "grafana", "already at 10.4")
    status = json.loads(ok(cli, "component", "status", "grafana"))
    assert (status["state"], status["note"]) == ("SKIPPED", "already at 10.4")
    result = cli("component", "version", "grafana")
    assert (result.code, result.out) == (1, "")


def test_the_same_component_in_two_phases_is_addressed_with_phase(cli) -> None:
    upgrading(cli)
    ok(cli, "component", "start", "agent", "1", "2")
    ok(cli, "phase", "start", "dashboards")
    ok(cli, "component", "start", "agent", "2", "3")
    ok(cli, "component", "complete", "agent", "--phase", "exporters")
    comps = {(c["phase"], c["name"]): c["state"]
             for c in json.loads(ok(cli, "show", "--json"))["components"]}
    assert comps == {("exporters", "agent"): "COMPLETED", ("dashboards", "agent"): "UPGRADING"}


def test_component_start_without_a_phase_is_refused(cli) -> None:
    ok(cli, "init", "u1")
    result = cli("component", "start", "x")
    assert result.code == 9
    assert "no phase is current; start one first" in result.err


# -- rollback points -------------------------------------------------------------------------

def test_rollback_mark_info_clear_with_the_json_shape(cli) -> None:
    upgrading(cli)
    ok(cli, "component", "start", "prometheus", "2.45", "2.53")
    ok(cli, "rollback", "mark", "prometheus", "/backups/prom.tgz", "--size", "1024",
       "--sha256", SHA)
    info = json.loads(ok(cli, "rollback", "info"))
    assert list(info) == ROLLBACK_KEYS
    assert info["rollback_available"] is True
    assert [list(c) for c in info["components"]] == [ROLLBACK_ITEM_KEYS]
    assert info["components"][0] == {"name": "prometheus", "backup_path": "/backups/prom.tgz",
                                     "from_version": "2.45", "to_version": "2.53",
                                     "size_bytes": 1024, "sha256": SHA}
    ok(cli, "rollback", "clear")
    assert json.loads(ok(cli, "rollback", "info")) == {"rollback_available": False,
                                                        "components": []}


@pytest.mark.parametrize("fmt", ["table", "plain", "csv"])
def test_rollback_info_as_rows(cli, fmt) -> None:
    upgrading(cli)
    ok(cli, "rollback", "mark", "prometheus", "/backups/prom.tgz")
    out = ok(cli, "rollback", "info", "-f", fmt)
    first = out.splitlines()[0]
    if fmt == "csv":
        assert first == ",".join(ROLLBACK_ITEM_KEYS)
        assert out.splitlines()[1].startswith("prometheus,/backups/prom.tgz,")
    elif fmt == "table":
        assert first.split() == ROLLBACK_ITEM_KEYS
    else:
        assert first.startswith("prometheus\t/backups/prom.tgz")


def test_a_bad_checksum_is_refused(cli) -> None:
    upgrading(cli)
    result = cli("rollback", "mark", "prometheus", "/b", "--sha256", "xyz")
    assert (result.code, result.err) == (6, "upgrade-ledger: error: sha256 must be 64 "
                                            "lower-case hex digits\n")


# -- resume, progress, summary ------------------------------------------------------------

def test_resume_lists_interrupted_components_and_the_resume_point(cli) -> None:
    upgrading(cli)
    ok(cli, "component", "start", "node_exporter", "1.7.0", "1.9.1")
    point = json.loads(ok(cli, "resume", "point"))
    assert list(point) == RESUME_POINT_KEYS
    assert point == {"state": "UPGRADING", "phase": "exporters",
                     "component": "node_exporter", "can_resume": True}
    result = cli("resume")
    assert result.code == 0
    assert result.err == ("component node_exporter (phase exporters) was left mid-upgrade to "
                          "1.9.1: validate it\n")
    assert cli("resume", "-q").err == ""
    kinds = [e["kind"] for e in json.loads(ok(cli, "events", "--json"))]
    assert kinds.count("upgrade.resume") == 2


def test_resume_of_a_finished_upgrade_is_refused(cli) -> None:
    ok(cli, "init", "u1")
    result = cli("resume")
    assert result.code == 9
    assert "only a run that stopped mid-way" in result.err


def test_progress_and_summary(cli) -> None:
    upgrading(cli)
    ok(cli, "component", "plan", "a", "--phase", "exporters")
    ok(cli, "component", "plan", "b", "--phase", "exporters")
    ok(cli, "component", "start", "a")
    ok(cli, "component", "complete", "a")
    assert ok(cli, "progress") == "50\n"
    summary = ok(cli, "summary")
    assert "State:     UPGRADING" in summary
    assert "Progress:  50% (1/2 components, 1 pending)" in summary


# -- real processes: what a shell script does -----------------------------------------------

@pytest.mark.slow
def test_a_script_drives_an_upgrade_step_by_step_in_real_processes(run_cli, home) -> None:
    steps = [("init", "u1"), ("state", "set", "PLANNING"), ("state", "set", "BACKING_UP"),
             ("state", "set", "UPGRADING"), ("phase", "start", "exporters"),
             ("component", "start", "node_exporter", "1.7.0", "1.9.1"),
             ("component", "complete", "node_exporter")]
    for step in steps:
        done = run_cli(*step)
        assert (done.returncode, done.stderr) == (0, ""), (step, done)
    doc = state_doc(home)
    assert doc["phases"]["exporters"]["components"]["node_exporter"]["state"] == "COMPLETED"
    assert (home / "state.json").stat().st_mode & 0o777 == 0o600
    predicate = run_cli("component", "is-upgraded", "node_exporter")
    assert (predicate.returncode, predicate.stdout, predicate.stderr) == (0, "", "")
    refused = run_cli("state", "set", "IDLE")
    assert refused.returncode == 3
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    pids = {e["pid"] for e in json.loads(run_cli("events", "--json").stdout)}
    assert len(pids) == 1  # every step is attributed to the calling process (this test)


@pytest.mark.parametrize(("fmt", "expected"), [
    ("plain", "state: UPGRADING\nphase: exporters\ncomponent: \ncan_resume: yes\n"),
    ("csv", "key,value\nstate,UPGRADING\nphase,exporters\ncomponent,\ncan_resume,yes\n"),
    ("table", None),
])
def test_resume_point_in_text_formats(cli, fmt, expected) -> None:
    upgrading(cli)
    out = ok(cli, "resume", "point", "-f", fmt)
    if expected is None:
        assert [line.split() for line in out.splitlines()] == [
            ["state", "UPGRADING"], ["phase", "exporters"], ["component"],
            ["can_resume", "yes"]]
    else:
        assert out == expected


def test_the_root_format_applies_to_every_command(cli) -> None:
    upgrading(cli)
    assert ok(cli, "--format", "plain", "resume", "point").startswith("state: UPGRADING\n")
    assert ok(cli, "--format", "csv", "resume", "point", "-f", "json").startswith("{")
    assert ok(cli, "resume", "point", env={"LEDGER_FORMAT": "csv"}).startswith("key,value\n")
