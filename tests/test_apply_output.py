"""What ``apply`` prints and writes: a reader that goes away, the JSON-lines stream,
the dry run of a failing probe, command logs (capped, one footer) and the tail of a
failing step. Real processes throughout: the CLI as a child, real pipes, real readers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env, run_ledger

from ledger.api import Ledger
from ledger.apply import plan as plans
from ledger.apply.cmdlog import LOG_HEAD_BYTES, LOG_TAIL_BYTES
from ledger.errors import BadInput
from tests.applyplans import component, write_plan

EXAMPLE = REPO / "examples" / "observability-stack.toml"


def shell(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run *script* with bash (PIPESTATUS), the ledger importable as ``python -m ledger``."""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd,
                          env=child_env(PY=sys.executable), timeout=300, check=False)


# -- a reader that goes away ---------------------------------------------------------------


@pytest.mark.slow
def test_a_reader_that_goes_away_never_stops_the_run(tmp_path: Path) -> None:
    """``apply | head -3``: head exits after three lines; the run still completes, its
    exit code is the run's, and nothing is written to a closed file."""
    done = shell('"$PY" -m ledger --home demo apply "$1" | head -3; '
                 'echo "${PIPESTATUS[0]}" > rc'.replace("$1", str(EXAMPLE)), tmp_path)
    assert (tmp_path / "rc").read_text().strip() == "0", done.stderr
    assert len(done.stdout.splitlines()) == 3
    assert "error" not in done.stderr, done.stderr
    with Ledger(tmp_path / "demo") as led:
        assert led.state() == "COMPLETED"
        assert not led.lock_status().held
        uid = led.current_id()
    assert (tmp_path / "demo" / "history" / f"{uid}.json").exists()


@pytest.mark.slow
def test_a_reader_that_goes_away_during_a_rollback_keeps_the_exit_code(tmp_path: Path) -> None:
    done = shell('SIM_FAIL=loki "$PY" -m ledger --home demo apply "$1" 2>&1 | head -1; '
                 'echo "${PIPESTATUS[0]}" > rc'.replace("$1", str(EXAMPLE)), tmp_path)
    assert (tmp_path / "rc").read_text().strip() == "11", done.stdout
    with Ledger(tmp_path / "demo") as led:
        assert led.state() == "ROLLED_BACK"


def test_a_change_refused_mid_step_is_one_line_not_a_crash(tmp_path: Path, home: Path) -> None:
    """A command that moves its own component behind the run's back makes the run's
    next change an invalid transition: one line, exit 3, the lock released."""
    work = tmp_path / "w"
    sneaky = (f'{sys.executable} -m ledger --home "$LEDGER_HOME" component skip '
              '"$LEDGER_COMPONENT" --phase "$LEDGER_PHASE" && sh {W}/t.sh upgrade')
    plan = write_plan(work, [("one", 2, [component("a", upgrade=sneaky), component("b")])])
    result = run_ledger("--home", home, "apply", "--plain", plan)
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1 and "closed file" not in result.stderr
    assert "SKIPPED" in result.stderr
    with Ledger(home) as led:
        assert not led.lock_status().held


# -- --json: a stream of JSON lines -------------------------------------------------------------


def test_json_streams_one_object_per_change_then_the_outcome(tmp_path: Path, home: Path) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component("a"), component("b")])])
    (work / "fail-validate-b").touch()
    result = run_ledger("--home", home, "apply", "--json", plan)
    assert result.returncode == 11, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert {o["type"] for o in objects} <= {"event", "message", "failure", "outcome"}
    with Ledger(home) as led:
        recorded = led.events(limit=None)
    streamed = [o["event"] for o in objects if o["type"] == "event"]
    assert streamed == recorded  # every change of the run, once, in order
    [failure] = [o for o in objects if o["type"] == "failure"]
    assert "one/b" in failure["text"] and "b is unhealthy" in failure["tail"]
    outcome = objects[-1]
    assert outcome["type"] == "outcome"
    assert (outcome["state"], outcome["rolled_back"]) == ("ROLLED_BACK", ["one/b", "one/a"])
    assert outcome["upgrade_id"] == recorded[-1]["upgrade_id"]


# -- --dry-run with a failing probe -----------------------------------------------------------


def test_dry_run_shows_a_failing_probe_and_exits_13(tmp_path: Path, home: Path) -> None:
    work = tmp_path / "w"
    broken = component("b")
    broken["probe"] = "echo 'probe: cannot reach 127.0.0.1:9100' >&2; exit 3"
    plan = write_plan(work, [("one", 1, [component("a", probe=True), broken])])
    result = run_ledger("--home", home, "apply", "--dry-run", plan)
    assert result.returncode == 13, result
    assert "fail: probe exit 3" in result.stdout
    assert "probe: cannot reach 127.0.0.1:9100" in result.stderr
    assert not home.exists()

    data = run_ledger("--home", home, "apply", "--dry-run", "--json", plan)
    assert data.returncode == 13
    rows = {r["component"]: r for r in json.loads(data.stdout)["components"]}
    assert rows["b"]["stderr"] == ["probe: cannot reach 127.0.0.1:9100"]
    assert rows["a"]["stderr"] == [] and rows["a"]["action"] == "upgrade"

    quiet = component("a")
    quiet["probe"] = "true"
    silent = write_plan(tmp_path / "w2", [("one", 1, [quiet])])
    assert run_ledger("--home", home, "apply", "--dry-run", silent).returncode == 13


# -- plan files, logs, footers, tails -------------------------------------------------------------


def test_a_plan_that_is_not_a_regular_file_is_refused(tmp_path: Path, home: Path) -> None:
    fifo = tmp_path / "plan.toml"
    os.mkfifo(fifo)
    # A writer that never writes: reading the FIFO would block for ever.
    result = run_ledger("--home", home, "apply", fifo, timeout=30)
    assert result.returncode == 6, result
    assert result.stderr == (f"upgrade-ledger: error: {fifo}: cannot read the plan (not a "
                             "regular file)\n")
    assert not home.exists()
    try:
        plans.load("/dev/zero")
    except BadInput as exc:
        assert "not a regular file" in str(exc)
    else:
        raise AssertionError("/dev/zero was read as a plan")


def log_of(home: Path, name: str) -> str:
    with Ledger(home) as led:
        uid = led.current_id()
    return (home / "logs" / str(uid) / f"{name}.log").read_text(errors="replace")


@pytest.mark.slow
def test_the_log_footer_says_how_long_once(tmp_path: Path, home: Path) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component(
        "a", upgrade={"run": "exec sleep 30", "timeout": 0.5})])])
    assert run_ledger("--home", home, "apply", plan).returncode == 11
    [footer] = [line for line in log_of(home, "a").splitlines()
                if line.startswith("<== ") and "timed out" in line]
    assert re.fullmatch(r"<== timed out after \d+\.\d{3} s \(timeout 0\.5 s\)", footer), footer


@pytest.mark.slow
def test_a_log_keeps_its_head_and_its_tail_and_says_what_was_cut(
        tmp_path: Path, home: Path) -> None:
    work = tmp_path / "w"
    # About 23 MB of numbered lines, far past the cap.
    loud = "seq 1 3000000; sh {W}/t.sh upgrade"
    plan = write_plan(work, [("one", 1, [component("a", upgrade=loud)])])
    result = run_ledger("--home", home, "apply", plan)
    assert result.returncode == 0, result.stderr
    with Ledger(home) as led:
        path = home / "logs" / str(led.current_id()) / "a.log"
    size = path.stat().st_size
    assert size < 2 * 1024 * 1024 + 64 * 1024, size
    text = path.read_text()
    assert "\n1\n2\n3\n" in text
    assert "\n2999999\n3000000\nupgraded a to 2.0\n" in text
    [cut] = re.findall(r"\[\.\.\. (\d+) bytes cut: .*\]", text)
    produced = len("".join(f"{n}\n" for n in range(1, 3000001))) + len("upgraded a to 2.0\n")
    assert int(cut) == produced - LOG_HEAD_BYTES - LOG_TAIL_BYTES


def test_a_failing_step_shows_at_most_20_short_lines(tmp_path: Path, home: Path) -> None:
    work = tmp_path / "w"
    noisy = ("seq 1 100 >&2; head -c 100000 /dev/zero | tr '\\0' x >&2; "
             "echo >&2; echo 'the real reason' >&2; exit 1")
    plan = write_plan(work, [("one", 1, [component("a", upgrade=noisy)])])
    result = run_ledger("--home", home, "apply", "--plain", plan)
    assert result.returncode == 11
    shown = [line for line in result.stderr.splitlines() if line.startswith("    | ")]
    assert shown[-1] == "    | the real reason"
    assert len(shown) <= 20
    assert max(len(line) for line in shown) <= 320
    assert any("more characters" in line for line in shown)


@pytest.mark.slow
def test_two_loud_commands_at_once_each_fill_their_own_log(
        tmp_path: Path, home: Path) -> None:
    """Output is pumped by apply: two loud commands at once both finish, each log
    holding only its own lines."""
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 2, [
        component("a", upgrade="seq 1 500000 | sed 's/^/a/'; sh {W}/t.sh upgrade"),
        component("b", upgrade="seq 1 500000 | sed 's/^/b/'; sh {W}/t.sh upgrade")])])
    result = run_ledger("--home", home, "apply", plan)
    assert result.returncode == 0, result.stderr
    a, b = log_of(home, "a"), log_of(home, "b")
    assert "a500000" in a and "b1\n" not in a
    assert "b500000" in b and "a1\n" not in b
