"""The bash drop-in (scripts/upgrade-state.sh), driven through real bash: every
function's output and exit status, the environment it reads, how it behaves inside
strict scripts, and the seed's usage examples.

Each CLI call costs a Python start-up, so each test runs one bash script that makes
many calls and records them (tests/bash/harness.sh), then checks the records.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import REPO, child_env

from ledger.api import Ledger

#: Every test runs with the session and without it (conftest.py, dropin_mode).
pytestmark = pytest.mark.usefixtures("dropin_mode")

LIB = REPO / "scripts" / "upgrade-state.sh"
SCRIPTS = REPO / "tests" / "bash"
BIN_DIR = Path(sys.executable).parent  # where this venv's upgrade-ledger lives

STAMP = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"
DEFAULTS = {
    "UPGRADE_STATE_DIR": "{d}",
    "UPGRADE_HISTORY_DIR": "{d}/history",
    "UPGRADE_BACKUPS_DIR": "{d}/backups",
    "UPGRADE_STATE_FILE": "{d}/state.json",
    "UPGRADE_LOCK_FILE": "{d}/upgrade.lock",
    "UPGRADE_TEMP_DIR": "{d}/tmp",
}


def bash_env(home: Path | None, **extra: str) -> dict[str, str]:
    """A child environment: this venv's upgrade-ledger first on PATH, no UPGRADE_*."""
    env = child_env(LIB=str(LIB))
    for name in [*DEFAULTS, "UPGRADE_LEDGER_BIN", "LEDGER_FORMAT", "LEDGER_PID"]:
        env.pop(name, None)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    if home is not None:
        env["UPGRADE_STATE_DIR"] = str(home)
    env.update(extra)
    return env


def run_bash(script: str, env: dict[str, str], cwd: Path | None = None,
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", script], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


@dataclass
class Call:
    rc: int
    out: str
    err: str
    state: dict | None  # state.json right after the call


class Harness:
    """Runs a script under tests/bash/harness.sh and reads back its `check` records."""

    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.records = tmp_path / "records"
        self.records.mkdir()

    def run(self, body: str, **env: str) -> dict[str, Call]:
        script = f"set -euo pipefail\nsource {SCRIPTS / 'harness.sh'}\n{body}"
        done = run_bash(script, bash_env(self.home, HARNESS_OUT=str(self.records), **env))
        assert done.returncode == 0, done.stderr
        calls = {}
        for rc_file in self.records.glob("*.rc"):
            name = rc_file.stem
            state = self.records / f"{name}.state"
            calls[name] = Call(int(rc_file.read_text()),
                               (self.records / f"{name}.out").read_text(),
                               (self.records / f"{name}.err").read_text(),
                               json.loads(state.read_text()) if state.exists() else None)
        return calls


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def setup_upgrade(home: Path, upgrade_id: str | None = None, *states: str) -> str:
    """Start an upgrade through the Python API (fast) and move it through *states*."""
    with Ledger(home) as led:
        uid = led.init(upgrade_id)
        for state in states:
            led.set_state(state)
    return uid


def ok(call: Call, out: str = "") -> None:
    """Exit 0, exactly *out* on stdout, nothing on stderr."""
    assert (call.rc, call.out, call.err) == (0, out, ""), call


def refused(call: Call, *fragments: str) -> None:
    """Exit 1, nothing on stdout, one ERROR: line on stderr containing *fragments*."""
    assert call.rc == 1, call
    assert call.out == "", call
    lines = call.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), call
    for fragment in fragments:
        assert fragment in lines[0], call


# -- every function --------------------------------------------------------------------

@pytest.mark.slow
def test_every_function_on_a_whole_upgrade(harness: Harness) -> None:
    calls = harness.run("""
check dirs upgrade_state_init_dirs
check ts upgrade_get_timestamp
check genid upgrade_generate_id
check init upgrade_state_init
check current0 upgrade_state_get_current
check lock upgrade_lock_acquire
check held upgrade_lock_is_held
check stale upgrade_lock_check_stale
check planning upgrade_state_set PLANNING
check planning_again upgrade_state_set PLANNING
check jump upgrade_state_set COMPLETED
check valid upgrade_state_validate_transition PLANNING BACKING_UP
check invalid upgrade_state_validate_transition PLANNING COMPLETED
check backing upgrade_state_set BACKING_UP
check upgrading upgrade_state_set UPGRADING
check nophase upgrade_component_start node_exporter 1.7.0 1.9.1
check phase upgrade_phase_start exporters
check start upgrade_component_start node_exporter 1.7.0 1.9.1
check mark upgrade_mark_rollback_point node_exporter /backups/node_exporter-1.7.0.tar.gz
check notyet upgrade_component_is_upgraded node_exporter
check complete upgrade_component_complete node_exporter
check upgraded upgrade_component_is_upgraded node_exporter
check status upgrade_component_get_status node_exporter
check unknown upgrade_component_get_status nobody
check fresh upgrade_component_start fresh_exporter "" 0.5.0
check fail upgrade_component_fail fresh_exporter "download failed"
check failed_status upgrade_component_get_status fresh_exporter
check progress upgrade_get_progress_percent
check rbinfo upgrade_get_rollback_info
check point upgrade_get_resume_point
check canresume upgrade_can_resume
check inprogress upgrade_is_in_progress
check resume upgrade_resume
check summary upgrade_get_summary
check next_none upgrade_phase_get_next
check phase_fail upgrade_phase_fail exporters "fresh_exporter failed"
check phase_retry upgrade_phase_start exporters
check phase_done upgrade_phase_complete exporters
check rbclear upgrade_clear_rollback_point
check rbinfo_after upgrade_get_rollback_info
check load upgrade_state_load
check validating upgrade_state_set VALIDATING
check completed upgrade_state_set COMPLETED
check notinprogress upgrade_is_in_progress
check cantresume upgrade_can_resume
check history_saved upgrade_save_to_history
check list upgrade_list_history
check release upgrade_lock_release
check notheld upgrade_lock_is_held
check cleanup upgrade_cleanup
check current_after upgrade_state_get_current
""")
    assert len(calls) == 51
    ok(calls["dirs"])
    assert re.fullmatch(STAMP + "\n", calls["ts"].out) and calls["ts"].rc == 0
    assert re.fullmatch(r"upgrade-\d{8}-\d{6}\n", calls["genid"].out)
    init = calls["init"]
    assert init.rc == 0 and init.err == ""
    uid = init.out.strip()
    assert re.fullmatch(r"upgrade-\d{8}-\d{6}(-\d+)?", uid)
    assert init.state["upgrade_id"] == uid and init.state["current_state"] == "IDLE"
    ok(calls["current0"], "IDLE\n")

    ok(calls["lock"])
    ok(calls["held"])
    ok(calls["stale"])  # a live lock is not stale: left alone, silently
    ok(calls["planning"])
    ok(calls["planning_again"])  # the same state again is success
    refused(calls["jump"], "PLANNING -> COMPLETED", "BACKING_UP")
    assert calls["jump"].state["current_state"] == "PLANNING"  # nothing changed
    ok(calls["valid"])
    assert (calls["invalid"].rc, calls["invalid"].out, calls["invalid"].err) == (1, "", "")
    refused(calls["nophase"], "no phase is current")
    assert calls["nophase"].state["phases"] == {}

    ok(calls["start"])
    comp = calls["start"].state["phases"]["exporters"]["components"]["node_exporter"]
    assert comp["state"] == "UPGRADING"
    assert (comp["from_version"], comp["to_version"]) == ("1.7.0", "1.9.1")
    assert calls["start"].state["current_component"] == "node_exporter"
    ok(calls["mark"])
    assert calls["mark"].state["rollback_available"] is True
    assert (calls["notyet"].rc, calls["notyet"].out, calls["notyet"].err) == (1, "", "")
    ok(calls["complete"])
    assert calls["complete"].state["phases"]["exporters"]["components"]["node_exporter"][
        "state"] == "COMPLETED"
    ok(calls["upgraded"])

    status = json.loads(calls["status"].out)
    assert calls["status"].rc == 0 and calls["status"].err == ""
    assert status["state"] == "COMPLETED" and status["to_version"] == "1.9.1"
    assert status["backup_path"] == "/backups/node_exporter-1.7.0.tar.gz"
    assert re.fullmatch(STAMP, status["completed_at"])
    ok(calls["unknown"], "{}\n")

    ok(calls["fresh"])  # "" as a version means unknown, as the old library allowed
    ok(calls["fail"])
    failed = json.loads(calls["failed_status"].out)
    assert (failed["state"], failed["attempts"], failed["last_error"]) == (
        "FAILED", 2, "download failed")  # attempt 1 failed: 2 is next
    assert failed["from_version"] is None and failed["to_version"] == "0.5.0"
    ok(calls["progress"], "50\n")

    info = json.loads(calls["rbinfo"].out)
    assert info["rollback_available"] is True
    assert [{k: c[k] for k in ("name", "backup_path", "from_version", "to_version")}
            for c in info["components"]] == [
        {"name": "node_exporter", "backup_path": "/backups/node_exporter-1.7.0.tar.gz",
         "from_version": "1.7.0", "to_version": "1.9.1"}]
    assert json.loads(calls["point"].out) == {
        "state": "UPGRADING", "phase": "exporters", "component": None, "can_resume": True}
    ok(calls["canresume"])
    ok(calls["inprogress"])
    ok(calls["resume"])  # nothing was left mid-upgrade: no note
    summary = calls["summary"]
    assert summary.rc == 0 and uid in summary.out and "UPGRADING" in summary.out
    assert "50%" in summary.out
    ok(calls["next_none"])  # no PENDING phase

    ok(calls["phase_fail"])
    phase = calls["phase_fail"].state["phases"]["exporters"]
    assert (phase["state"], phase["error"]) == ("FAILED", "fresh_exporter failed")
    ok(calls["phase_retry"])
    ok(calls["phase_done"])
    assert calls["phase_done"].state["phases"]["exporters"]["state"] == "COMPLETED"
    ok(calls["rbclear"])
    assert calls["rbclear"].state["rollback_available"] is False
    assert json.loads(calls["rbinfo_after"].out) == {"rollback_available": False,
                                                     "components": []}

    load = calls["load"]
    assert load.rc == 0 and load.err == ""
    assert json.loads(load.out) == calls["rbclear"].state  # the document, as in state.json

    ok(calls["validating"])
    ok(calls["completed"])
    assert calls["completed"].state["current_state"] == "COMPLETED"
    assert (calls["notinprogress"].rc, calls["notinprogress"].out) == (1, "")
    assert (calls["cantresume"].rc, calls["cantresume"].out) == (1, "")
    ok(calls["history_saved"])
    saved = json.loads((harness.home / "history" / f"{uid}.json").read_text())
    assert saved["current_state"] == "COMPLETED"
    lines = calls["list"].out.splitlines()
    assert calls["list"].rc == 0 and len(lines) == 1
    assert re.fullmatch(rf"{uid} \| COMPLETED \| {STAMP} → {STAMP}", lines[0])

    ok(calls["release"])
    assert not (harness.home / "upgrade.lock.d").exists()
    assert (calls["notheld"].rc, calls["notheld"].out) == (1, "")
    ok(calls["cleanup"])
    ok(calls["current_after"], "IDLE\n")  # a finished upgrade goes back to IDLE


@pytest.mark.slow
def test_functions_before_any_upgrade(harness: Harness) -> None:
    calls = harness.run("""
check current upgrade_state_get_current
check load upgrade_state_load
check next upgrade_phase_get_next
check progress upgrade_get_progress_percent
check status upgrade_component_get_status node_exporter
check upgraded upgrade_component_is_upgraded node_exporter
check canresume upgrade_can_resume
check inprogress upgrade_is_in_progress
check point upgrade_get_resume_point
check summary upgrade_get_summary
check list upgrade_list_history
check held upgrade_lock_is_held
check release upgrade_lock_release
check phase upgrade_phase_start exporters
""")
    ok(calls["current"], "IDLE\n")
    refused(calls["load"], "no upgrade")
    ok(calls["next"])
    ok(calls["progress"], "0\n")
    ok(calls["status"], "{}\n")
    for name in ("upgraded", "canresume", "inprogress", "held"):
        assert (calls[name].rc, calls[name].out, calls[name].err) == (1, "", ""), name
    refused(calls["point"], "no upgrade")
    refused(calls["summary"], "no upgrade")
    ok(calls["list"])
    ok(calls["release"])  # nothing held: nothing to do
    refused(calls["phase"], "no upgrade")
    assert not (harness.home / "state.json").exists()


def test_questions_on_a_home_with_no_ledger_answer_no_in_silence(harness: Harness) -> None:
    calls = harness.run("""
check upgraded upgrade_component_is_upgraded node_exporter
check canresume upgrade_can_resume
check inprogress upgrade_is_in_progress
check held upgrade_lock_is_held
""")
    for name in ("upgraded", "canresume", "inprogress", "held"):
        assert (calls[name].rc, calls[name].out, calls[name].err) == (1, "", ""), name
    assert not (harness.home / "ledger.db").exists()  # a question makes no ledger


@pytest.mark.slow
def test_save_and_write_atomic_replace_the_document_and_refuse_bad_json(
        harness: Harness) -> None:
    setup_upgrade(harness.home, None, "PLANNING")
    calls = harness.run("""
with_state() {  # the current document with its state swapped: FROM TO
    local doc
    doc=$(upgrade_state_load)
    printf '%s' "${doc/\\"current_state\\": \\"$1\\"/\\"current_state\\": \\"$2\\"}"
}
check save upgrade_state_save "$(with_state PLANNING BACKING_UP)"
check atomic upgrade_state_write_atomic "$(with_state BACKING_UP UPGRADING)"
check garbage upgrade_state_save '{"upgrade_id": '
check unknown_state upgrade_state_write_atomic "$(with_state UPGRADING EXPLODED)"
check missing upgrade_state_save
check current upgrade_state_get_current
""")
    ok(calls["save"])
    assert calls["save"].state["current_state"] == "BACKING_UP"
    ok(calls["atomic"])
    assert calls["atomic"].state["current_state"] == "UPGRADING"
    refused(calls["garbage"], "not valid JSON")
    refused(calls["unknown_state"], "EXPLODED")
    refused(calls["missing"], "usage: upgrade_state_save JSON")
    ok(calls["current"], "UPGRADING\n")  # the bad documents changed nothing
    assert calls["garbage"].state == calls["atomic"].state


@pytest.mark.slow
def test_refusals_are_one_error_line_and_change_nothing(harness: Harness) -> None:
    setup_upgrade(harness.home)
    calls = harness.run("""
check unknown upgrade_state_set EXPLODED
check check_unknown upgrade_state_validate_transition IDLE EXPLODED
check badname upgrade_phase_start "../etc"
check noargs upgrade_component_start
check noargs2 upgrade_mark_rollback_point node_exporter
check nobody upgrade_component_complete nobody
check badlimit upgrade_list_history ten
check zero upgrade_list_history 0
check current upgrade_state_get_current
""")
    refused(calls["unknown"], "EXPLODED")
    refused(calls["check_unknown"], "EXPLODED")
    refused(calls["badname"], "../etc")
    refused(calls["noargs"], "usage: upgrade_component_start COMPONENT FROM TO")
    refused(calls["noargs2"], "usage: upgrade_mark_rollback_point COMPONENT BACKUP_PATH")
    refused(calls["nobody"], "nobody")
    refused(calls["badlimit"], "ten")
    refused(calls["zero"], "0")
    ok(calls["current"], "IDLE\n")
    first = calls["unknown"].state
    for name in ("check_unknown", "badname", "noargs", "nobody"):
        assert calls[name].state == first, name


@pytest.mark.slow
def test_init_while_an_upgrade_runs_supersedes_it_with_one_warning(
        harness: Harness) -> None:
    setup_upgrade(harness.home, "first-run", "PLANNING")
    calls = harness.run("""
check second upgrade_state_init
check third upgrade_state_init
check same_id upgrade_state_init first-run
check list upgrade_list_history 2
""")
    second = calls["second"]
    new_id = second.out.strip()
    assert second.rc == 0 and re.fullmatch(r"upgrade-\d{8}-\d{6}(-\d+)?", new_id)
    warning = second.err.splitlines()
    assert len(warning) == 1 and warning[0].startswith("WARNING: ")
    assert "first-run" in warning[0] and "PLANNING" in warning[0] and new_id in warning[0]
    assert second.state["upgrade_id"] == new_id
    ok(calls["third"], calls["third"].out)  # the second one was IDLE: nothing to supersede
    refused(calls["same_id"], "first-run")  # ids are never reused
    with Ledger(harness.home) as led:
        old = led.show("first-run")
    assert old["state"] == "FAILED" and old["superseded_by"] == new_id  # kept, not lost
    assert calls["list"].out.splitlines()[0].startswith(calls["third"].out.strip() + " | IDLE | ")


def test_history_lists_every_upgrade_newest_first_with_its_outcome(
        harness: Harness) -> None:
    for n in (1, 2, 3):
        setup_upgrade(harness.home, f"run-{n}", "PLANNING", "FAILED", "IDLE")
    calls = harness.run("""
check all upgrade_list_history
check two upgrade_list_history 2
""")
    lines = calls["all"].out.splitlines()
    assert [line.split(" | ")[:2] for line in lines] == [
        ["run-3", "FAILED"], ["run-2", "FAILED"], ["run-1", "FAILED"]]
    ok(calls["two"], "".join(line + "\n" for line in lines[:2]))


@pytest.mark.slow
def test_a_component_left_mid_upgrade_is_named_on_resume(harness: Harness) -> None:
    setup_upgrade(harness.home, None, "PLANNING", "BACKING_UP", "UPGRADING")
    with Ledger(harness.home) as led:
        led.plan({"exporters": [("node_exporter", "1.7.0", "1.9.1")],
                  "core": [("prometheus", "2.48.1", "2.55.1")], "logging": []})
        led.phase_start("exporters")
        led.component_start("node_exporter", "1.7.0", "1.9.1")
    calls = harness.run("""
check next upgrade_phase_get_next
check point upgrade_get_resume_point
check resume upgrade_resume
""")
    ok(calls["next"], "core\n")  # the first PENDING phase, in planned order
    assert json.loads(calls["point"].out)["component"] == "node_exporter"
    resume = calls["resume"]
    assert resume.rc == 0 and resume.out == ""
    assert "node_exporter" in resume.err and "ERROR" not in resume.err


# -- environment -------------------------------------------------------------------------

def test_environment_defaults_follow_the_state_dir(tmp_path: Path) -> None:
    show = "; ".join(f'echo "{name}=${name}"' for name in DEFAULTS)
    done = run_bash(f"source {LIB}; {show}", bash_env(tmp_path / "s"))
    assert done.returncode == 0, done.stderr
    expected = "".join(f"{k}={v.format(d=tmp_path / 's')}\n" for k, v in DEFAULTS.items())
    assert done.stdout == expected
    done = run_bash(f"unset UPGRADE_STATE_DIR; source {LIB}; {show}", bash_env(None))
    assert done.stdout.splitlines()[0] == "UPGRADE_STATE_DIR=/var/lib/observability-upgrades"


def test_timestamps_and_ids_are_utc_whatever_the_local_zone(tmp_path: Path) -> None:
    done = run_bash(f"source {LIB}; upgrade_get_timestamp; upgrade_generate_id; echo $TZ",
                    bash_env(tmp_path / "s", TZ="America/New_York"))
    stamp, new_id, tz = done.stdout.split()
    assert done.returncode == 0 and tz == "America/New_York"  # the caller's TZ is kept
    now = datetime.now(UTC)
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((now - moment).total_seconds()) < 600  # UTC, not New York (hours away)
    made = datetime.strptime(new_id, "upgrade-%Y%m%d-%H%M%S").replace(tzinfo=UTC)
    assert abs((now - made).total_seconds()) < 600


@pytest.mark.slow
def test_every_path_variable_is_honoured(tmp_path: Path) -> None:
    paths = {"UPGRADE_STATE_FILE": tmp_path / "views" / "current.json",
             "UPGRADE_HISTORY_DIR": tmp_path / "old-runs",
             "UPGRADE_LOCK_FILE": tmp_path / "locks" / "my.lock",
             "UPGRADE_TEMP_DIR": tmp_path / "scratch",
             "UPGRADE_BACKUPS_DIR": tmp_path / "saved"}
    script = f"""set -euo pipefail; source {LIB}
upgrade_state_init run-1 >/dev/null
upgrade_lock_acquire
cut -d'|' -f1 "$UPGRADE_LOCK_FILE.d/lock.info"
echo "$BASHPID"
upgrade_save_to_history
"""
    done = run_bash(script, bash_env(tmp_path / "state", **{k: str(v) for k, v in
                                                            paths.items()}))
    assert done.returncode == 0, done.stderr
    holder, me = done.stdout.split()
    assert holder == me  # the lock is the calling shell's, in ${UPGRADE_LOCK_FILE}.d
    assert json.loads(paths["UPGRADE_STATE_FILE"].read_text())["upgrade_id"] == "run-1"
    assert (paths["UPGRADE_HISTORY_DIR"] / "run-1.json").is_file()
    assert paths["UPGRADE_TEMP_DIR"].is_dir() and paths["UPGRADE_BACKUPS_DIR"].is_dir()
    assert not (paths["UPGRADE_LOCK_FILE"].parent / "my.lock.d").exists()  # released at exit
    assert (tmp_path / "state" / "ledger.db").is_file()  # the ledger lives in the state dir
    assert not (tmp_path / "state" / "state.json").exists()
    for folder in (tmp_path / "state", paths["UPGRADE_HISTORY_DIR"]):
        assert folder.stat().st_mode & 0o777 == 0o700
    for file in (paths["UPGRADE_STATE_FILE"], tmp_path / "state" / "ledger.db"):
        assert file.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_strict_mode_no_user_no_hostname_sourced_twice_and_nothing_leaks(
        tmp_path: Path, dropin_mode: str) -> None:
    # Snapshot the shell's variables, options and traps before sourcing, after sourcing
    # twice, and after calls; only the documented names may appear, nothing may change.
    snap = ("{ declare -p | grep -v -E '^declare -[-a-zA-Z]* (BASH_[A-Z_]+|_|PIPESTATUS|"
            "FUNCNAME|SECONDS|EPOCH[A-Z]+|SRANDOM|RANDOM|LINENO|BASH_COMMAND|snap_[a-z]+)='"
            " | sed 's/=.*//'; set -o; shopt -p; trap -p; } > \"$1\"")
    script = f"""set -euo pipefail
unset USER HOSTNAME
umask 022
take() {{ {snap}; }}
take {tmp_path}/before
source {LIB}
source {LIB}
take {tmp_path}/sourced
id=$(upgrade_state_init)
upgrade_state_set PLANNING
upgrade_state_get_current
upgrade_is_in_progress
upgrade_component_is_upgraded nobody || echo "no: $?"
upgrade_list_history 1 >/dev/null
upgrade_get_timestamp >/dev/null
upgrade_generate_id >/dev/null
take {tmp_path}/called
echo "id=$id"
declare -F | sed 's/^declare -f //' > {tmp_path}/functions
"""
    done = run_bash(script, bash_env(tmp_path / "home"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == ["PLANNING", "no: 1"]
    before = (tmp_path / "before").read_text().splitlines()
    sourced = (tmp_path / "sourced").read_text().splitlines()
    called = (tmp_path / "called").read_text().splitlines()
    added = sorted(set(sourced) - set(before))
    # UPGRADE_STATE_DIR came from the environment; the others get their defaults. As
    # with the old library, sourcing installs the release of the lock on EXIT.
    assert added == sorted([*(f"declare -- {name}" for name in DEFAULTS
                              if name != "UPGRADE_STATE_DIR"),
                            "declare -- _UPGRADE_STATE_TRAPS_PID",
                            "trap -- '_upgrade_state_on_exit' EXIT"]), added
    assert set(before) - set(sourced) == set()
    # The script's own variable, and the session's record (docs/bash.md, The session).
    session = ["declare -a _UPGRADE_STATE_SESSION"] if dropin_mode == "session" else []
    assert sorted(set(called) - set(sourced)) == sorted(["declare -- id", *session])
    functions = set((tmp_path / "functions").read_text().split()) - {"take"}
    public = {f for f in functions if not f.startswith("_upgrade_state")}
    assert len(public) == 35 and all(f.startswith("upgrade_") for f in public), public
    with Ledger(tmp_path / "home") as led:
        meta = led.document()["metadata"]
    assert meta["user"] and meta["hostname"]  # found without USER/HOSTNAME


@pytest.mark.slow
def test_the_command_is_found_on_path_or_through_upgrade_ledger_bin(
        tmp_path: Path) -> None:
    bare = "/usr/bin:/bin"
    script = f"set -euo pipefail; source {LIB}; upgrade_state_get_current"
    missing = run_bash(script, bash_env(tmp_path / "a", PATH=bare))
    assert missing.returncode != 0 and missing.stdout == ""
    assert missing.stderr.startswith("ERROR: ") and missing.stderr.count("\n") == 1
    assert "UPGRADE_LEDGER_BIN" in missing.stderr

    via_var = run_bash(script, bash_env(tmp_path / "b", PATH=bare,
                                        UPGRADE_LEDGER_BIN=str(BIN_DIR / "upgrade-ledger")))
    assert (via_var.returncode, via_var.stdout, via_var.stderr) == (0, "IDLE\n", "")

    wrong = run_bash(script, bash_env(tmp_path / "c", UPGRADE_LEDGER_BIN=str(tmp_path)))
    assert wrong.returncode != 0 and wrong.stderr.startswith("ERROR: UPGRADE_LEDGER_BIN=")
    assert wrong.stderr.count("\n") == 1


# -- the seed's usage examples ---------------------------------------------------------

@pytest.mark.slow
def test_seed_example_basic_upgrade(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = subprocess.run(["bash", str(SCRIPTS / "basic.sh")], env=bash_env(home),
                          capture_output=True, text=True, timeout=300, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    uid = done.stdout.strip()
    saved = json.loads((home / "history" / f"{uid}.json").read_text())
    assert saved["current_state"] == "COMPLETED"
    component = saved["phases"]["exporters"]["components"]["node_exporter"]
    assert (component["state"], component["to_version"]) == ("COMPLETED", "1.9.1")
    assert json.loads((home / "state.json").read_text())["current_state"] == "IDLE"
    assert not (home / "upgrade.lock.d").exists()  # the EXIT trap's cleanup released it


@pytest.mark.slow
def test_seed_example_idempotency(tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = subprocess.run(["bash", str(SCRIPTS / "idempotency.sh")], env=bash_env(home),
                          capture_output=True, text=True, timeout=300, check=False)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout == "Already upgraded, skipping\n"
    assert (home / "performed").read_text() == "node_exporter\n"


@pytest.mark.slow
def test_seed_example_resume_after_a_crash(tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = ["bash", str(SCRIPTS / "resume.sh")]
    crashed = subprocess.run(script, env=bash_env(home, CRASH="1"), capture_output=True,
                             text=True, timeout=300, check=False)
    assert crashed.returncode == -9, crashed.stderr
    assert crashed.stdout == "node_exporter: upgraded\n"
    resumed = subprocess.run(script, env=bash_env(home), capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.splitlines() == [
        'resuming at {"state":"UPGRADING","phase":"exporters","component":'
        '"blackbox_exporter","can_resume":true}',
        "node_exporter: already upgraded", "blackbox_exporter: upgraded"]
    assert "blackbox_exporter" in resumed.stderr  # the note about the interrupted one
    with Ledger(home) as led:
        (upgrade,) = led.history()
        events = [e["kind"] for e in led.events(upgrade_id=upgrade["id"])]
        breaks = led.events(kind="lock.break")
    assert upgrade["outcome"] == "COMPLETED" and upgrade["completed"] == 2
    assert "upgrade.resume" in events
    assert len(breaks) == 1  # the crashed run's stale lock was taken over, on the record


# -- switching a host over ---------------------------------------------------------------

def legacy_document(upgrade_id: str, state: str, components: dict[str, str]) -> dict:
    """A state document as the old bash library wrote it (no serial, no lineage)."""
    return {
        "upgrade_id": upgrade_id, "current_state": state,
        "started_at": "2025-12-27T10:30:00Z", "updated_at": "2025-12-27T10:42:00Z",
        "current_phase": "exporters", "current_component": None,
        "phases": {"exporters": {"state": "IN_PROGRESS", "started_at": "2025-12-27T10:31:00Z",
                                 "components": {
                                     name: {"state": cstate, "from_version": "1.0.0",
                                            "to_version": "2.0.0", "attempts": 0,
                                            "last_error": None}
                                     for name, cstate in components.items()}}},
        "rollback_available": False, "can_resume": state == "UPGRADING",
        "metadata": {"hostname": "old-host", "user": "ops", "pid": "4242"},
    }


@pytest.mark.slow
def test_the_old_library_files_are_loaded_on_the_first_call(harness: Harness) -> None:
    home = harness.home
    (home / "history").mkdir(parents=True)
    (home / "history" / "upgrade-20251201-090000.json").write_text(json.dumps(
        legacy_document("upgrade-20251201-090000", "COMPLETED", {"node_exporter": "COMPLETED"})))
    (home / "state.json").write_text(json.dumps(legacy_document(
        "upgrade-20251227-103000", "UPGRADING",
        {"node_exporter": "COMPLETED", "blackbox_exporter": "UPGRADING"}), indent=2))
    calls = harness.run("""
check current upgrade_state_get_current
check done upgrade_component_is_upgraded node_exporter
check list upgrade_list_history
""")
    current = calls["current"]
    assert (current.rc, current.out) == (0, "UPGRADING\n")
    assert current.err.startswith("NOTE: loaded 2 upgrade(s)") and current.err.count("\n") == 1
    ok(calls["done"])
    assert [line.split(" | ")[:2] for line in calls["list"].out.splitlines()] == [
        ["upgrade-20251227-103000", "UPGRADING"], ["upgrade-20251201-090000", "COMPLETED"]]
    assert current.state["lineage"]  # state.json is now the ledger's view of the same run
    assert current.state["phases"]["exporters"]["components"]["blackbox_exporter"][
        "state"] == "UPGRADING"


@pytest.mark.slow
def test_an_unreadable_old_state_file_is_kept_aside(harness: Harness) -> None:
    home = harness.home
    home.mkdir()
    (home / "state.json").write_text('{"upgrade_id": "upgrade-1", "current_st')
    calls = harness.run("check current upgrade_state_get_current\n")
    current = calls["current"]
    assert (current.rc, current.out) == (0, "IDLE\n")
    assert current.err.startswith("WARNING: ") and "state.json.legacy" in current.err
    assert (home / "state.json.legacy").read_text().startswith('{"upgrade_id": "upgrade-1"')


@pytest.mark.slow
def test_text_that_looks_like_an_option_is_recorded_as_text(tmp_path: Path) -> None:
    # Error texts and names are passed after '--': "--config: unknown flag" is a
    # failure message to record, not an option of the command.
    home = tmp_path / "home"
    script = """
        set -euo pipefail
        source "$LIB"
        upgrade_state_init run-1 >/dev/null
        upgrade_state_set PLANNING
        upgrade_state_set BACKING_UP
        upgrade_state_set UPGRADING
        upgrade_phase_start p1
        upgrade_component_start c1 1.0 2.0
        upgrade_component_fail c1 "--config: unknown flag"
        upgrade_mark_rollback_point c1 -backup.tar
        upgrade_phase_fail p1 "-1 exit"
    """
    done = run_bash(script, bash_env(home))
    assert done.returncode == 0, done.stderr
    with Ledger(home) as led:
        comp = led.component_status("c1")
        assert (comp["state"], comp["last_error"]) == ("FAILED", "--config: unknown flag")
        assert led.rollback_info()["components"][0]["backup_path"] == "-backup.tar"
        assert led.show()["phases"][0]["error"] == "-1 exit"


@pytest.mark.slow
def test_a_failure_whose_text_is_not_utf8_is_still_recorded(tmp_path: Path) -> None:
    # The old library recorded these; the ledger once lost them with an internal error,
    # leaving the component UPGRADING. Bytes that are not UTF-8 and control characters
    # are recorded as \xNN escapes; a text over 64 KiB is cut with a marker.
    home = tmp_path / "home"
    script = r"""
        set -euo pipefail
        source "$LIB"
        upgrade_state_init run-1 >/dev/null
        upgrade_state_set PLANNING
        upgrade_state_set BACKING_UP
        upgrade_state_set UPGRADING
        upgrade_phase_start p1
        upgrade_component_start nginx 1.0 2.0
        upgrade_component_fail nginx "$(printf 'caf\xe9')"
        upgrade_component_start colour 1 2
        upgrade_component_fail colour "$(printf 'exit 3: \033[31mERROR\033[0m\r')"
        upgrade_component_start chatty 1 2
        upgrade_component_fail chatty "$(head -c 70000 /dev/zero | tr '\0' x)END"
        upgrade_phase_fail p1 "$(printf 'bad \xff\xfe bytes\tand a tab')"
    """
    done = run_bash(script, bash_env(home))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    with Ledger(home) as led:
        errors = {c: led.component_status(c) for c in ("nginx", "colour", "chatty")}
        phase_error = led.show()["phases"][0]["error"]
    assert {c: e["state"] for c, e in errors.items()} == dict.fromkeys(errors, "FAILED")
    assert errors["nginx"]["last_error"] == "caf\\xe9"
    assert errors["colour"]["last_error"] == "exit 3: \\x1b[31mERROR\\x1b[0m\\x0d"
    chatty = errors["chatty"]["last_error"]
    assert len(chatty) <= 64 * 1024 and chatty.startswith("xxx") and chatty.endswith("xxxEND")
    assert "characters cut" in chatty
    assert phase_error == "bad \\xff\\xfe bytes\tand a tab"


# -- attempts ----------------------------------------------------------------------------

@pytest.mark.slow
def test_attempts_count_the_attempt_in_progress_or_the_next_one(tmp_path: Path) -> None:
    # As the old library counted: 1 at the first start, + 1 at each failure. Unlike it,
    # the start of a retry does not set the count back to 1.
    home = tmp_path / "home"
    setup_upgrade(home, "run-1", "PLANNING", "BACKING_UP", "UPGRADING")
    script = """
        set -euo pipefail
        source "$LIB"
        attempts() { jq -r ".phases.exporters.components.$1.attempts" "$UPGRADE_STATE_FILE"; }
        upgrade_phase_start exporters
        upgrade_component_start node_exporter 1.7.0 1.9.1
        echo "started: $(attempts node_exporter)"
        upgrade_component_fail node_exporter "download failed"
        echo "failed once: $(attempts node_exporter)"
        upgrade_component_start node_exporter 1.7.0 1.9.1
        echo "retry started: $(attempts node_exporter)"
        upgrade_component_fail node_exporter "checksum mismatch"
        upgrade_component_start node_exporter 1.7.0 1.9.1
        upgrade_component_complete node_exporter
        echo "completed on the third: $(attempts node_exporter)"
        echo "status: $(upgrade_component_get_status node_exporter | jq .attempts)"
        upgrade_component_start blackbox_exporter 0.24.0 0.25.0
        upgrade_component_complete blackbox_exporter
        echo "first time right: $(attempts blackbox_exporter)"
    """
    done = run_bash(script, bash_env(home))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "started: 1", "failed once: 2", "retry started: 2", "completed on the third: 3",
        "status: 3", "first time right: 1"]


# -- keys a script keeps in state.json ---------------------------------------------------

@pytest.mark.slow
def test_save_keeps_the_keys_a_script_wrote_in_every_later_view(tmp_path: Path) -> None:
    # The old library wrote any JSON it was given: scripts stash their own keys in
    # state.json with jq and read them back later, also from the history file.
    home = tmp_path / "home"
    setup_upgrade(home, "run-1", "PLANNING", "BACKING_UP", "UPGRADING")
    script = """
        set -euo pipefail
        source "$LIB"
        kept() {
            jq -c '[.maintenance_window, .phases.exporters.components.node_exporter.ticket,
                    .phases.exporters.components.node_exporter.state, .current_state]' "$1"
        }
        upgrade_phase_start exporters
        upgrade_component_start node_exporter 1.7.0 1.9.1
        upgrade_state_save "$(upgrade_state_load | jq '.maintenance_window = "sun"
            | .phases.exporters.components.node_exporter.ticket = {"id": "OPS-1", "n": [1, 2]}')"
        echo "saved: $(kept "$UPGRADE_STATE_FILE")"
        upgrade_component_complete node_exporter
        echo "completed: $(kept "$UPGRADE_STATE_FILE")"
        upgrade_component_start blackbox_exporter "" 0.25.0
        upgrade_state_set VALIDATING
        echo "validating: $(kept "$UPGRADE_STATE_FILE")"
        upgrade_save_to_history
        echo "history: $(kept "$UPGRADE_HISTORY_DIR/run-1.json")"
        upgrade_state_write_atomic "$(upgrade_state_load | jq 'del(.maintenance_window)')"
        echo "deleted: $(kept "$UPGRADE_STATE_FILE")"
        echo "status: $(upgrade_component_get_status node_exporter | jq -c .ticket)"
    """
    done = run_bash(script, bash_env(home))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    ticket = '{"id":"OPS-1","n":[1,2]}'
    assert done.stdout.splitlines() == [
        f'saved: ["sun",{ticket},"UPGRADING","UPGRADING"]',
        f'completed: ["sun",{ticket},"COMPLETED","UPGRADING"]',
        f'validating: ["sun",{ticket},"COMPLETED","VALIDATING"]',
        f'history: ["sun",{ticket},"COMPLETED","VALIDATING"]',
        f'deleted: [null,{ticket},"COMPLETED","VALIDATING"]',
        f"status: {ticket}"]
    with Ledger(home) as led:  # what a rebuilt view says, too
        doc = led.document()
    assert doc["phases"]["exporters"]["components"]["node_exporter"]["ticket"] == {
        "id": "OPS-1", "n": [1, 2]}
    assert json.loads((home / "state.json").read_text()) == doc


@pytest.mark.slow
def test_a_document_with_no_known_field_is_kept_as_it_is(harness: Harness) -> None:
    uid = setup_upgrade(harness.home, "run-1", "PLANNING")
    calls = harness.run("""
check before upgrade_state_load
check save upgrade_state_save '{"test": "data", "number": 123}'
check atomic upgrade_state_write_atomic '{"test": "data", "number": 124, "nested": {"a": [null]}}'
check step upgrade_state_set BACKING_UP
check load upgrade_state_load
check test_key jq -r .test "$UPGRADE_STATE_FILE"
""")
    ok(calls["save"])
    ok(calls["atomic"])
    ok(calls["step"])
    ok(calls["test_key"], "data\n")
    before, after = json.loads(calls["before"].out), json.loads(calls["load"].out)
    assert (after["test"], after["number"], after["nested"]) == ("data", 124, {"a": [None]})
    assert after["upgrade_id"] == uid and after["current_state"] == "BACKING_UP"
    assert after["phases"] == before["phases"] and after["metadata"] == before["metadata"]
    assert list(after)[-3:] == ["test", "number", "nested"]  # after the ledger's own fields


@pytest.mark.slow
def test_save_refuses_bad_json_and_too_much_kept_data_changing_nothing(
        harness: Harness) -> None:
    setup_upgrade(harness.home, "run-1", "PLANNING")
    calls = harness.run("""
check kept upgrade_state_save '{"ticket": "OPS-1"}'
check garbage upgrade_state_save '{"test": "data", '
check not_object upgrade_state_write_atomic '[1, 2]'
big=$(printf '%*s' 70000 '' | tr ' ' x)
check too_big upgrade_state_save "{\\"blob\\": \\"$big\\"}"
check state_typo upgrade_state_save '{"current_state": "PLANING", "ticket": "OPS-2"}'
check load upgrade_state_load
""")
    ok(calls["kept"])
    refused(calls["garbage"], "not valid JSON")
    refused(calls["not_object"], "object")
    refused(calls["too_big"], "65536")
    refused(calls["state_typo"], "PLANING")
    for name in ("garbage", "not_object", "too_big", "state_typo"):
        assert calls[name].state == calls["kept"].state, name
    assert json.loads(calls["load"].out)["ticket"] == "OPS-1"
