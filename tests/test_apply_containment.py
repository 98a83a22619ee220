"""Everything a step starts is stopped with it, even what left its process group
(coreutils ``timeout``, ``setsid``): at its timeout, when its shell exits, when a
later run finds what a killed run left behind; and no rollback starts while any of
it still runs. Real processes, found in /proc by their command line and home.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ledger_process, run_ledger

from ledger.api import Ledger
from tests.applyplans import component, lines, wait_for, write_plan


def running(home: Path, *argv: str) -> list[int]:
    """Live processes with exactly this command line that an apply on *home* started."""
    want = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes() != want:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_bytes().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if f"LEDGER_HOME={home}".encode() in env and state not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


@pytest.fixture
def reaper(home: Path) -> Iterator[None]:
    """Whatever a failing test leaves running is killed afterwards."""
    yield
    for argv in (("sleep", "1012"), ("sleep", "1013"), ("sleep", "1014")):
        for pid in running(home, *argv):
            os.kill(pid, signal.SIGKILL)


#: A rollback command that first notes any sleep of this home still running.
WITNESS = ("for p in /proc/[0-9]*; do "
           "if tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q '^sleep 101[234] $' && "
           "tr '\\0' '\\n' < $p/environ 2>/dev/null | grep -qx \"LEDGER_HOME=$LEDGER_HOME\"; "
           "then echo \"$p still running\" >> {W}/at-rollback; fi; done; sh {W}/t.sh rollback")


@pytest.mark.slow
def test_a_timeout_stops_what_left_the_process_group(
        tmp_path: Path, home: Path, reaper: None) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component(
        "a", upgrade={"run": "cd . && timeout 600 sleep 1012", "timeout": 3},
        rollback=WITNESS)])])
    result = run_ledger("--home", home, "apply", plan)
    assert result.returncode == 11, result.stderr
    assert "one/a: upgrade timed out after" in result.stderr
    assert running(home, "sleep", "1012") == []
    assert lines(work, "at-rollback") == []  # gone before the rollback began
    assert lines(work, "rollbacks") == ["one.a"]


def test_what_a_command_leaves_running_in_another_session_is_stopped(
        tmp_path: Path, home: Path, reaper: None) -> None:
    work = tmp_path / "w"
    plan = write_plan(work, [("one", 1, [component(
        "a", upgrade="setsid sleep 1013 & sh {W}/t.sh upgrade")])])
    result = run_ledger("--home", home, "apply", plan)
    assert result.returncode == 0, result.stderr
    assert running(home, "sleep", "1013") == []


@pytest.mark.slow
def test_a_later_run_stops_what_a_killed_run_left_in_another_session(
        tmp_path: Path, home: Path, reaper: None) -> None:
    work = tmp_path / "w"
    hang = ("if [ -f {W}/hang ]; then setsid sleep 1014 & touch {W}/a.blocked; wait; fi; "
            "sh {W}/t.sh upgrade")
    plan = write_plan(work, [("one", 1, [component("a", upgrade=hang)])])
    (work / "hang").touch()
    with open(tmp_path / "first.out", "wb") as out:
        proc = ledger_process("--home", home, "apply", "--plain", plan, stdout=out,
                              stderr=out, text=False)
    try:
        wait_for(work / "a.blocked")
        deadline = time.monotonic() + 60
        while not (left := running(home, "sleep", "1014")) and time.monotonic() < deadline:
            time.sleep(0.02)  # the background setsid may not have started sleep yet
        assert len(left) == 1
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert running(home, "sleep", "1014") == left  # it outlived the run

    (work / "hang").unlink()
    result = run_ledger("--home", home, "apply", "--plain", plan)
    assert result.returncode == 0, result.stderr
    assert running(home, "sleep", "1014") == []
    with Ledger(home) as led:
        assert len(led.events(kind="apply.leftover")) == 1
