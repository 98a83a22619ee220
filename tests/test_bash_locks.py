"""The bash drop-in under concurrency and signals: background workers racing for the
lock (one winner) and changing components (nothing lost), a worker killed with KILL
(its stale lock is taken over), and the release on EXIT, TERM and INT.

Real bash processes throughout; barriers are files and FIFOs, never sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env, walk_to_upgrading

from ledger.api import Ledger

#: Every test runs with the session and without it (conftest.py, dropin_mode).
pytestmark = pytest.mark.usefixtures("dropin_mode")

LIB = REPO / "scripts" / "upgrade-state.sh"
BIN_DIR = Path(sys.executable).parent


def bash_env(home: Path, **extra: str) -> dict[str, str]:
    env = child_env(LIB=str(LIB), UPGRADE_STATE_DIR=str(home))
    for name in ("UPGRADE_HISTORY_DIR", "UPGRADE_BACKUPS_DIR", "UPGRADE_STATE_FILE",
                 "UPGRADE_LOCK_FILE", "UPGRADE_TEMP_DIR", "UPGRADE_LEDGER_BIN"):
        env.pop(name, None)
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


def run_bash(script: str, home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f"set -euo pipefail\nsource \"$LIB\"\n{script}"],
                          env=bash_env(home, **extra), capture_output=True, text=True,
                          timeout=300, check=False)


def lock_pid(home: Path) -> int:
    return int((home / "upgrade.lock.d" / "lock.info").read_text().split("|")[0])


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A ledger created up front, so that concurrent first calls do not all create it."""
    path = tmp_path / "home"
    Ledger(path).close()
    return path


# Poll for a file with a builtin wait (read -t on a private FIFO opened read-write never
# gets data, so it simply times out): no sleep processes left behind by a KILL.
WAIT_FOR = """
wait_for() {
    local fifo=$1.wait.$BASHPID n
    mkfifo "$fifo"
    for ((n = 0; n < 6000; n++)); do
        if [[ -e $1 ]]; then rm -f "$fifo"; return 0; fi
        read -r -t 0.05 _ <>"$fifo" || :
    done
    rm -f "$fifo"
    echo "timed out waiting for $1" >&2
    return 1
}
"""


@pytest.mark.slow
def test_one_of_many_background_workers_takes_the_lock(home: Path, tmp_path: Path) -> None:
    d = tmp_path / "sync"
    d.mkdir()
    done = run_bash(WAIT_FOR + f"""
D={d}
for i in 1 2 3 4; do
    (
        wait_for "$D/start"
        if upgrade_lock_acquire 2>"$D/err.$i"; then
            echo "won $BASHPID" >"$D/result.$i"
            wait_for "$D/release"
            upgrade_lock_release
        else
            # A loser's release must not free the winner's lock.
            rc=0
            upgrade_lock_release 2>"$D/release-err.$i" || rc=$?
            echo "lost $BASHPID $rc" >"$D/result.$i"
        fi
    ) &
done
touch "$D/start"
for i in 1 2 3 4; do wait_for "$D/result.$i"; done
cut -d'|' -f1 "$UPGRADE_LOCK_FILE.d/lock.info" >"$D/holder"
touch "$D/release"
wait
[[ -e $UPGRADE_LOCK_FILE.d ]] && echo "still locked" || echo "released"
""", home)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "released\n"
    results = {i: (d / f"result.{i}").read_text().split() for i in range(1, 5)}
    winners = [r for r in results.values() if r[0] == "won"]
    assert len(winners) == 1, results
    winner_pid = winners[0][1]
    assert (d / "holder").read_text().strip() == winner_pid  # the subshell's own BASHPID
    for i, result in results.items():
        if result[0] == "won":
            continue
        err = (d / f"err.{i}").read_text()
        assert err.count("\n") == 1 and err.startswith("ERROR: "), err
        assert f"held by PID {winner_pid}" in err
        assert result[2] == "0"  # a non-owner's release exits 0 ...
        assert (d / f"release-err.{i}").read_text().startswith("WARNING: ")  # ... and says so


@pytest.mark.slow
def test_background_workers_changing_components_lose_nothing(home: Path) -> None:
    with Ledger(home) as led:
        walk_to_upgrading(led, "parallel")
        led.phase_start("exporters")
    workers, per_worker = 3, 4
    done = run_bash(f"""
for w in $(seq {workers}); do
    (
        for c in $(seq {per_worker}); do
            upgrade_component_start "w$w-c$c" 1.0 2.0
            upgrade_component_complete "w$w-c$c"
        done
    ) &
    pids+=($!)
done
for p in "${{pids[@]}}"; do wait "$p"; done
upgrade_get_progress_percent
""", home)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "100\n"
    names = {f"w{w}-c{c}" for w in range(1, workers + 1) for c in range(1, per_worker + 1)}
    with Ledger(home) as led:
        doc = led.document()
        starts = led.events(upgrade_id="parallel", kind="component.upgrading")
    components = doc["phases"]["exporters"]["components"]
    assert set(components) == names
    assert {c["state"] for c in components.values()} == {"COMPLETED"}
    assert len(starts) == len(names)  # every change has its event
    view = json.loads((home / "state.json").read_text())
    assert set(view["phases"]["exporters"]["components"]) == names  # the view is whole too


@pytest.mark.slow
def test_a_worker_killed_with_kill_leaves_a_stale_lock_that_is_taken_over(
        home: Path, tmp_path: Path) -> None:
    d = tmp_path / "sync"
    d.mkdir()
    done = run_bash(WAIT_FOR + f"""
D={d}
take_and_hang() {{
    upgrade_lock_acquire
    echo "$BASHPID" >"$D/$1.pid"
    wait_for "$D/never"
}}
take_and_hang first &
first=$!
wait_for "$D/first.pid"
kill -KILL "$first"
wait "$first" || echo "first died: $?"
upgrade_lock_is_held || echo "held: no"
upgrade_lock_acquire
echo "mine $BASHPID"
upgrade_lock_release
take_and_hang second &
second=$!
wait_for "$D/second.pid"
kill -KILL "$second"
wait "$second" || :
upgrade_lock_check_stale
[[ -e $UPGRADE_LOCK_FILE.d ]] && echo "still locked" || echo "stale lock removed"
""", home)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["first died: 137", "held: no"]
    assert lines[2].startswith("mine ") and lines[3] == "stale lock removed"
    first = int((d / "first.pid").read_text())
    second = int((d / "second.pid").read_text())
    with Ledger(home) as led:
        breaks = led.events(kind="lock.break")
    assert [int(b["from"]) for b in breaks] == [first, second]  # both on the record
    assert breaks[0]["to"] == lines[2].split()[1]  # taken over by the next acquirer


@pytest.mark.slow
def test_the_lock_is_released_when_the_shell_exits(home: Path) -> None:
    done = run_bash("""
trap 'echo "own trap saw $?"' EXIT
( upgrade_lock_acquire; echo "sub holds: $(cut -d'|' -f1 "$UPGRADE_LOCK_FILE.d/lock.info")" )
[[ -e $UPGRADE_LOCK_FILE.d ]] && echo "still locked" || echo "released by the subshell"
trap -p EXIT
upgrade_lock_acquire
echo "main holds: $(cut -d'|' -f1 "$UPGRADE_LOCK_FILE.d/lock.info") (me $BASHPID)"
exit 3
""", home)
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("sub holds: ")
    assert lines[1] == "released by the subshell"
    assert lines[2] == """trap -- 'echo "own trap saw $?"' EXIT"""  # left as it was
    holder, me = lines[3].split()[2], lines[3].split()[4].rstrip(")")
    assert holder == me
    assert lines[4] == "own trap saw 3"  # chained: the script's trap runs, with its $?
    assert not (home / "upgrade.lock.d").exists()


@pytest.mark.slow
def test_a_trap_set_after_acquiring_is_chained_on_the_next_call(home: Path) -> None:
    done = run_bash("""
upgrade_lock_acquire
trap 'echo "replacement trap ran"' EXIT
upgrade_lock_is_held
false
""", home)
    assert done.returncode == 1, done.stderr  # set -e: `false` ends the script
    assert done.stdout == "replacement trap ran\n"
    assert not (home / "upgrade.lock.d").exists()


def default_signals() -> None:
    """In the child, before bash starts: SIGINT back to its default action.

    A shell started in the background without job control (``nohup pytest &``) runs
    its children with SIGINT ignored, and bash can neither trap nor reset a signal that
    was ignored when it started; the script under test must see a normal SIGINT.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sigint_in_runner", ["default", "ignored"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_the_lock_is_released_on_term_and_int(home: Path, tmp_path: Path, sig: signal.Signals,
                                              sigint_in_runner: str) -> None:
    fifo = tmp_path / "hang"
    os.mkfifo(fifo)
    script = f"""set -euo pipefail
source "$LIB"
upgrade_lock_acquire
echo "ready $BASHPID"
read -r -t 120 _ <>{fifo}
echo "not interrupted"
"""
    # "ignored": the test runner itself runs with SIGINT ignored, as it does in the
    # background; the child must not inherit that.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) \
        if sigint_in_runner == "ignored" else None
    try:
        proc = subprocess.Popen(["bash", "-c", script], env=bash_env(home), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=default_signals)  # noqa: PLW1509 (no threads here)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    with proc:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "ready", proc.stderr.read() if proc.stderr else ""
        assert lock_pid(home) == int(ready[1]) == proc.pid
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == -sig, err
    assert out == "" and err == ""
    assert not (home / "upgrade.lock.d").exists()


# -- a script that removes the library's trap ------------------------------------------
#
# The old library installed `trap 'upgrade_lock_release' EXIT TERM INT` when sourced; a
# script (or a test simulating a crash) that removes it keeps its lock at exit, exactly
# as a crashed holder would, and the next shell finds that holder dead.


def check_stale_from_another_shell(home: Path) -> subprocess.CompletedProcess[str]:
    return run_bash("""
upgrade_lock_is_held || echo "held: no"
upgrade_lock_check_stale
[[ -e $UPGRADE_LOCK_FILE.d ]] && echo "still locked" || echo "stale lock removed"
""", home)


def test_a_script_that_removes_the_trap_keeps_its_lock_at_exit(home: Path) -> None:
    crashed = run_bash("""
trap - EXIT TERM INT
upgrade_lock_acquire
echo "$BASHPID"
exit 0
""", home)
    assert (crashed.returncode, crashed.stderr) == (0, "")
    holder = int(crashed.stdout)
    assert lock_pid(home) == holder  # upgrade.lock.d/lock.info left behind
    checked = check_stale_from_another_shell(home)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == "held: no\nstale lock removed\n"
    assert "stale" in checked.stderr
    with Ledger(home) as led:
        (broken,) = led.events(kind="lock.break")
    assert int(broken["from"]) == holder


def test_a_subshell_that_removes_the_trap_keeps_its_lock(home: Path, tmp_path: Path) -> None:
    done = run_bash(f"""
( trap - EXIT TERM INT; upgrade_lock_acquire; echo "$BASHPID" >{tmp_path}/holder; exit 0 )
[[ -e $UPGRADE_LOCK_FILE.d ]] && echo "kept" || echo "released"
""", home)
    assert (done.returncode, done.stdout) == (0, "kept\n"), done.stderr
    assert lock_pid(home) == int((tmp_path / "holder").read_text())
    checked = check_stale_from_another_shell(home)
    assert checked.stdout == "held: no\nstale lock removed\n", checked.stderr


def test_the_removal_holds_for_an_exit_trap_the_script_sets_afterwards(home: Path) -> None:
    # Once the script has removed the library's trap, the drop-in does not put it back,
    # not even chained onto a trap of the script's own: the choice was made.
    done = run_bash("""
trap - EXIT
upgrade_lock_acquire
trap 'echo "own trap ran"' EXIT
upgrade_lock_is_held
exit 0
""", home)
    assert (done.returncode, done.stdout) == (0, "own trap ran\n"), done.stderr
    assert (home / "upgrade.lock.d" / "lock.info").is_file()


def test_sourcing_again_installs_the_release_again(home: Path) -> None:
    done = run_bash("""
trap - EXIT
source "$LIB"
upgrade_lock_acquire
exit 0
""", home)
    assert done.returncode == 0, done.stderr
    assert not (home / "upgrade.lock.d").exists()


def test_a_subshell_reads_the_choice_from_the_traps_it_was_shown(home: Path) -> None:
    done = run_bash("""
( trap 'echo term' TERM; trap : EXIT; upgrade_lock_acquire; exit 0 )
[[ -e $UPGRADE_LOCK_FILE.d ]] && echo "own EXIT trap: kept" || echo "own EXIT trap: released"
trap - EXIT
( upgrade_lock_acquire; exit 0 )
[[ -e $UPGRADE_LOCK_FILE.d ]] && echo "removed in the parent: kept" || echo "removed: released"
""", home)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "own EXIT trap: released\nremoved in the parent: kept\n"
