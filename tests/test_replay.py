"""A call run again on a ``Replay`` completes it without doing anything twice.

For every change of the API: made once by a process, then asked again of a Replay
that starts from the event before it, it returns what it returned and the ledger is
unchanged (no second event, the same document); asked of a Replay when it was not
made, it is made. A change by another process is never taken for the caller's. The
``session retry`` command does the same for a whole command line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_ledger, walk_to_upgrading

from ledger.api import Ledger
from ledger.ops.replay import Replay

PID = os.getpid()  # the process the calls are made for (the shell of a script)
OTHER = os.getppid()  # another live process

CALLS: dict[str, Callable[[Ledger], Any]] = {
    "init": lambda led: led.init(supersede=True),
    "init with an id": lambda led: led.init("second", supersede=True),
    "import": lambda led: led.import_document({**led.document(), "upgrade_id": "imported"}),
    "save": lambda led: led.save_document('{"ticket": "OPS-1"}'),
    "set_state": lambda led: led.set_state("VALIDATING"),
    "plan": lambda led: led.plan({"p2": [("x", "1", "2")]}),
    "phase_start": lambda led: led.phase_start("p2"),
    "phase_complete": lambda led: led.phase_complete("p"),
    "phase_fail": lambda led: led.phase_fail("p", "broke"),
    "phase_skip": lambda led: led.phase_skip("p", "not needed"),
    "component_start": lambda led: led.component_start("b", "1", "2"),
    "component_complete": lambda led: led.component_complete("a"),
    "component_fail": lambda led: led.component_fail("a", "boom"),
    "component_skip": lambda led: led.component_skip("a", "done already"),
    "resume": lambda led: led.resume(),
    "annotate": lambda led: led.annotate("plan.file", "a", {"path": "x.toml"}),
    "mark_rollback_point": lambda led: led.mark_rollback_point("a", "/backups/a.tgz"),
    "clear_rollback_points": lambda led: led.clear_rollback_points(),
    "save_to_history": lambda led: led.save_to_history(),
    "cleanup": lambda led: led.cleanup(),
}


@pytest.fixture
def running(home: Path) -> Path:
    """Mid-upgrade: phase p current, component a upgrading with a rollback point."""
    with Ledger(home) as led:
        walk_to_upgrading(led, "u1")
        led.phase_start("p")
        led.component_start("a", "1.0", "2.0")
        led.mark_rollback_point("a", "/backups/a-old.tgz")
    return home


def snapshot(home: Path) -> tuple[list[tuple], str]:
    with Ledger(home) as led:
        trail = [(e["kind"], e["subject"], e["to"], e["pid"]) for e in led.events(limit=None)]
    return trail, (home / "state.json").read_text()


def newest(home: Path) -> int:
    with Ledger(home) as led:
        return led.last_event_id()


@pytest.mark.parametrize("name", CALLS)
def test_a_change_that_was_made_is_not_made_again(running: Path, name: str) -> None:
    call = CALLS[name]
    before = newest(running)
    with Ledger(running, pid=PID) as first:
        result = call(first)
    made = snapshot(running)
    assert len(made[0]) > 0
    with Replay(running, pid=PID, after=before) as again:
        assert call(again) == result
        assert again.replayed
        again.finish()
    assert snapshot(running) == made


@pytest.mark.parametrize("name", CALLS)
def test_a_change_that_was_not_made_is_made(running: Path, name: str, tmp_path: Path) -> None:
    call = CALLS[name]
    twin = tmp_path / "twin"
    shutil.copytree(running, twin, symlinks=True)
    with Ledger(twin, pid=PID) as plain:
        expected = call(plain)
    before = newest(running)
    with Replay(running, pid=PID, after=before) as replay:
        result = call(replay)
        assert not replay.replayed
        replay.finish()
    if name not in ("init", "save_to_history"):  # a new id from the clock; a path
        assert result == expected
    assert [e[:3] for e in snapshot(running)[0]] == [e[:3] for e in snapshot(twin)[0]]


def test_another_process_s_change_is_not_the_caller_s(running: Path) -> None:
    before = newest(running)
    with Ledger(running, pid=OTHER) as other:
        other.mark_rollback_point("a", "/backups/a.tgz")
    with Replay(running, pid=PID, after=before) as replay:
        replay.mark_rollback_point("a", "/backups/a.tgz")
        assert not replay.replayed
    with Ledger(running) as led:
        assert [e["pid"] for e in led.events(after_id=before)] == [OTHER, PID]


def test_a_call_cut_off_half_way_is_completed(running: Path) -> None:
    # cleanup: saved to history, then the session died before the reset to IDLE.
    with Ledger(running) as led:
        led.set_state("VALIDATING")
        led.set_state("COMPLETED")
    before = newest(running)
    with Ledger(running, pid=PID) as first:
        first.save_to_history()
    (running / "history" / "u1.json").unlink()  # died before the file was written
    with Replay(running, pid=PID, after=before) as replay:
        replay.cleanup()
        replay.finish()
    with Ledger(running) as led:
        kinds = [e["kind"] for e in led.events(after_id=before)]
        assert kinds == ["upgrade.history", "upgrade.state"]  # each once
        assert led.state() == "IDLE"
    assert json.loads((running / "history" / "u1.json").read_text())["upgrade_id"] == "u1"


def test_the_view_is_rewritten_when_the_first_run_died_before_it(running: Path) -> None:
    before = newest(running)
    stale = (running / "state.json").read_bytes()
    with Ledger(running, pid=PID) as first:
        first.component_complete("a")
    (running / "state.json").write_bytes(stale)  # the view of before the change
    with Replay(running, pid=PID, after=before) as replay:
        replay.component_complete("a")
        replay.finish()
    doc = json.loads((running / "state.json").read_text())
    assert doc["phases"]["p"]["components"]["a"]["state"] == "COMPLETED"


def test_lock_breaks_are_looked_up_and_lock_moves_made_again(running: Path) -> None:
    holder = subprocess.Popen(["sleep", "60"])
    with Ledger(running, pid=OTHER) as other:
        other.acquire_lock(holder.pid)
    holder.kill()
    holder.wait()  # the lock is stale now
    before = newest(running)
    with Ledger(running, pid=PID) as first:
        assert first.check_stale_lock()
    with Replay(running, pid=PID, after=before) as replay:
        assert replay.check_stale_lock()  # the note "removed a stale lock" again
        replay.acquire_lock(PID)
        replay.acquire_lock(PID)  # re-entrant
        assert replay.release_lock(PID)
        assert not replay.release_lock(PID)
    with Ledger(running) as led:
        assert len(led.events(kind="lock.break")) == 1


def test_session_retry_runs_a_command_line_on_a_replay(running: Path) -> None:
    before = newest(running)
    base = ["--home", running, "--pid", str(PID)]
    first = run_ledger(*base, "legacy", "init")
    assert first.returncode == 0, first.stderr
    new_id = first.stdout.strip()
    assert "superseded" in first.stderr  # u1 was UPGRADING
    again = run_ledger(*base, "session", "retry", "--after", str(before), "--",
                       *base, "legacy", "init")
    assert (again.returncode, again.stdout, again.stderr) == (0, first.stdout, first.stderr)
    with Ledger(running) as led:
        assert [u["id"] for u in led.history()] == [new_id, "u1"]  # no third upgrade
    # Nothing made after that point: the command runs, once.
    before = newest(running)
    fail = run_ledger(*base, "session", "retry", "--after", str(before), "--",
                      *base, "state", "set", "NOPE")
    assert fail.returncode == 6 and fail.stderr.startswith("upgrade-ledger: error: unknown")
    made = run_ledger(*base, "session", "retry", "--after", str(before), "--",
                      *base, "state", "set", "PLANNING")
    assert (made.returncode, made.stdout, made.stderr) == (0, "", "")
    with Ledger(running) as led:
        assert led.state() == "PLANNING"
