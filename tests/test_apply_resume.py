"""Resume: ``apply`` killed (SIGKILL) or interrupted (Ctrl-C) mid-run, then run again,
ends COMPLETED with no component upgraded twice.

The run is stopped while two upgrades of one phase hang (barriers, not sleeps):
``c`` after its work (its upgrade finished but was never recorded), ``d`` before it.
On resume ``c`` must validate and complete without a second upgrade, and ``d``
must fail validation and be upgraded once. The marker lines the upgrade commands
append count the upgrades.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ledger_process, run_ledger

from ledger.api import Ledger
from tests.applyplans import component, process_gone, tree, upgrades, wait_for, write_plan
from tests.conftest import child_env

PLAN = [
    ("one", 1, [component("a"), component("b")]),
    ("two", 2, [component("c"), component("d"), component("e")]),
    ("three", 1, [component("f")]),
]


def start_apply(home: Path, plan: Path, out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as fh:
        return ledger_process("--home", home, "apply", "--plain", plan, stdout=fh,
                              stderr=subprocess.STDOUT, text=False)


def apply_again(home: Path, plan: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ledger", "--home", str(home), "apply", "--plain", str(plan)],
        capture_output=True, text=True, env=child_env(), timeout=120, check=False)


def hang_mid_phase(tmp_path: Path, home: Path) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """Start a run and return once c (work done) and d (work not done) both hang."""
    work = tmp_path / "w"
    plan = write_plan(work, PLAN)
    (work / "block-after-c").touch()
    (work / "block-before-d").touch()
    proc = start_apply(home, plan, tmp_path / "first.out")
    try:
        wait_for(work / "c.blocked")
        wait_for(work / "d.blocked")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return work, plan, proc


def assert_each_upgraded_once(work: Path) -> None:
    for phase, _, comps in PLAN:
        for comp in comps:
            assert upgrades(work, phase, comp["name"]) == ["2.0"], (phase, comp["name"])


@pytest.mark.slow
def test_sigkill_mid_run_then_apply_again_completes_without_upgrading_twice(
        tmp_path: Path, home: Path) -> None:
    work, plan, proc = hang_mid_phase(tmp_path, home)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    leftovers = [int((work / f"{name}.pid").read_text()) for name in ("c", "d")]
    assert not any(process_gone(pid, 0.0) for pid in leftovers)  # they outlive the run
    groups = sorted(os.getpgid(pid) for pid in leftovers)  # each command's own group

    with Ledger(home) as led:
        doc = led.document()
    comps = doc["phases"]["two"]["components"]
    assert doc["current_state"] == "UPGRADING"
    assert (comps["c"]["state"], comps["d"]["state"], comps["e"]["state"]) == \
        ("UPGRADING", "UPGRADING", "PENDING")

    # A dry run now describes the resume and changes nothing.
    before = tree(home)
    dry = run_ledger("--home", home, "apply", "--dry-run", "--json", plan)
    dry.check_returncode()
    preview = json.loads(dry.stdout)
    assert preview["action"] == f"resume {doc['upgrade_id']} (UPGRADING)"
    actions = {r["component"]: r["action"] for r in preview["components"]}
    assert actions["a"] == "none (completed)" and actions["e"] == "upgrade"
    assert actions["c"].startswith("validate (interrupted)")
    assert tree(home) == before

    (work / "block-after-c").unlink()
    (work / "block-before-d").unlink()
    result = apply_again(home, plan)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming upgrade {doc['upgrade_id']} (UPGRADING)" in result.stdout
    assert_each_upgraded_once(work)
    assert all(process_gone(pid) for pid in leftovers)  # stopped, not left to finish
    with Ledger(home) as led:
        doc = led.document()
        stopped = led.events(kind="apply.leftover")
        resumes = led.events(kind="upgrade.resume")
    assert doc["current_state"] == "COMPLETED"
    comps = doc["phases"]["two"]["components"]
    assert comps["c"]["attempts"] == 1  # validated: completed without upgrading again
    assert comps["d"]["attempts"] == 2  # did not validate: upgraded once more
    # apply counts the attempts the ledger counts, across the two runs
    assert "UPGRADING two/d: 1.0 -> 2.0: upgraded and validated (attempt 2)\n" in \
        result.stdout, result.stdout
    d_log = (home / "logs" / doc["upgrade_id"] / "d.log").read_text()
    assert "two/d upgrade attempt 2 " in d_log and "two/d upgrade attempt 1 " in d_log
    assert comps["d"]["last_error"].startswith("interrupted; validation after resume")
    assert sorted(int(e["detail"]["pid"]) for e in stopped) == groups
    assert resumes[0]["detail"]["interrupted"] == ["c", "d"]
    log = (home / "logs" / doc["upgrade_id"] / "c.log").read_text()
    assert "stopped by a later apply" in log


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_mid_run_stops_cleanly_and_resumes(tmp_path: Path, home: Path, sig) -> None:
    work, plan, proc = hang_mid_phase(tmp_path, home)
    leftovers = [int((work / f"{name}.pid").read_text()) for name in ("c", "d")]
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 128 + sig
    out = (tmp_path / "first.out").read_text()
    name = signal.Signals(sig).name
    assert f"upgrade-ledger: interrupted by {name}; upgrade t-" in out
    assert "left UPGRADING and unlocked: run the same apply again to resume" in out
    assert all(process_gone(pid, 0.5) for pid in leftovers)  # its commands were ended

    with Ledger(home) as led:
        doc = led.document()
        assert not led.lock_status().held
        assert [e["detail"]["signal"] for e in led.events(kind="apply.interrupted")] == [name]
    assert doc["current_state"] == "UPGRADING"
    assert doc["phases"]["two"]["components"]["c"]["state"] == "UPGRADING"

    (work / "block-after-c").unlink()
    (work / "block-before-d").unlink()
    result = apply_again(home, plan)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_each_upgraded_once(work)
    with Ledger(home) as led:
        assert led.state() == "COMPLETED"
        assert led.events(kind="apply.leftover") == []  # nothing was left running


@pytest.mark.slow
def test_a_dropped_ssh_session_stops_the_run_cleanly(tmp_path: Path, home: Path) -> None:
    """What an ssh session that drops does to a run: its output goes nowhere and
    SIGHUP arrives. The run stops as on SIGTERM (commands stopped, the interruption
    recorded, the lock released, exit 129), and doctor says how to go on."""
    work = tmp_path / "w"
    plan = write_plan(work, PLAN)
    (work / "block-before-c").touch()
    proc = ledger_process("--home", home, "apply", plan)
    try:
        wait_for(work / "c.blocked")
    except BaseException:
        proc.kill()
        raise
    blocked = int((work / "c.pid").read_text())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the terminal is gone: nobody reads any more
    proc.stderr.close()
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=60) == 129
    assert process_gone(blocked, 0.5)

    with Ledger(home) as led:
        assert not led.lock_status().held
        [event] = led.events(kind="apply.interrupted")
        assert (event["detail"]["signal"], event["detail"]["state"]) == ("SIGHUP", "UPGRADING")
    doctor = run_ledger("--home", home, "doctor", "--json")
    [stuck] = [f for f in json.loads(doctor.stdout) if f["check"] == "stuck"]
    assert stuck["status"] == "fail"
    assert f"upgrade-ledger --home {home} apply {plan}" in stuck["hint"]
    assert "component complete" not in stuck["hint"]

    (work / "block-before-c").unlink()
    assert apply_again(home, plan).returncode == 0
    assert_each_upgraded_once(work)


@pytest.mark.slow
def test_doctor_says_to_run_the_same_apply_again(tmp_path: Path, home: Path) -> None:
    """An upgrade that apply started and that was killed mid-run: doctor names the
    plan file the ledger recorded, not the per-step commands."""
    work, plan, proc = hang_mid_phase(tmp_path, home)
    proc.kill()
    proc.wait(timeout=60)
    for name in ("c", "d"):
        os.kill(int((work / f"{name}.pid").read_text()), signal.SIGKILL)
    plan.rename(work / "renamed.toml")  # the hint comes from the ledger, not a guess
    doctor = run_ledger("--home", home, "doctor", "--json")
    [stuck] = [f for f in json.loads(doctor.stdout) if f["check"] == "stuck"]
    assert stuck["status"] == "fail" and "c (" in stuck["detail"]
    assert "run the same apply again" in stuck["hint"]
    assert stuck["hint"].endswith(f"upgrade-ledger --home {home} apply {plan}")

    with Ledger(home) as led:  # an upgrade driven step by step keeps the old advice
        led.init("by-hand", supersede=True)
        led.set_state("PLANNING")
        led.plan({"p": [("x", "1", "2")]})
        led.set_state("BACKING_UP")
        led.set_state("UPGRADING")
        led.phase_start("p")
        led.component_start("x")
    doctor = run_ledger("--home", home, "doctor", "--json")
    [stuck] = [f for f in json.loads(doctor.stdout) if f["check"] == "stuck"]
    assert "'component complete'" in stuck["hint"] and "apply" not in stuck["hint"]
