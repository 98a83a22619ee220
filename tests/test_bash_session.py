"""The drop-in's session (scripts/upgrade-state.sh, docs/bash.md "The session"), through
real bash: one session per shell serves every call, command substitutions and
background jobs included, in turns; ownership stays the calling shell's; no session
outlives its shell; and a session SIGKILLed at random points of a 200-call script
loses no call, answers each once and never makes a change twice.

An ``upgrade-ledger`` wrapper that logs each start of a process shows which calls
were served by the session and which ran as their own process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO, child_env, walk_to_upgrading

from ledger.api import Ledger

#: Real bash scripts and sessions: every test here takes a second or more.
pytestmark = pytest.mark.slow

LIB = REPO / "scripts" / "upgrade-state.sh"
BIN_DIR = Path(sys.executable).parent


def logged_bin(tmp_path: Path) -> tuple[Path, Path]:
    """An upgrade-ledger that appends its arguments to a log, then runs the real one."""
    log = tmp_path / "starts"
    wrapper = tmp_path / "bin" / "upgrade-ledger"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/bash\nargs="$*"\nprintf "%s\\n" "${{args//$\'\\n\'/ }}" >>"{log}"\n'
                       f'exec "{BIN_DIR}/upgrade-ledger" "$@"\n')
    wrapper.chmod(0o755)
    log.touch()
    return wrapper, log


def bash_env(home: Path, wrapper: Path, **extra: str) -> dict[str, str]:
    env = child_env(LIB=str(LIB), UPGRADE_STATE_DIR=str(home), UPGRADE_LEDGER_BIN=str(wrapper))
    for name in ("UPGRADE_HISTORY_DIR", "UPGRADE_BACKUPS_DIR", "UPGRADE_STATE_FILE",
                 "UPGRADE_LOCK_FILE", "UPGRADE_TEMP_DIR", "UPGRADE_LEDGER_SESSION"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f'set -euo pipefail\nsource "$LIB"\n{script}'],
                          env=env, capture_output=True, text=True, timeout=600, check=False)


def starts(log: Path) -> list[str]:
    """Each process start: "session" for a session, else the command's own words."""
    return [line.split("--pid ", 1)[-1].split(" ", 1)[-1] if "--pid" in line else line
            for line in log.read_text().splitlines()]


def is_session(pid: int) -> bool:
    """Whether *pid* is still a live ``upgrade-ledger session`` process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return cmdline[-2:] == [b"session", b""] and \
        stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_gone(pid: int, what: str) -> None:
    deadline = time.monotonic() + 60
    while is_session(pid):
        assert time.monotonic() < deadline, f"the session outlived its shell ({what})"
        time.sleep(0.05)


SCRIPT = """
upgrade_state_init_dirs
id=$(upgrade_state_init; echo "$BASHPID" >"$D/init-pid")
upgrade_state_set PLANNING
state=$(upgrade_state_get_current)
pct=$(upgrade_get_progress_percent)
upgrade_list_history 5 >/dev/null
upgrade_lock_acquire
echo "$id $state $pct $(cut -d'|' -f1 "$UPGRADE_LOCK_FILE.d/lock.info") $BASHPID"
upgrade_lock_release
"""


@pytest.mark.parametrize("setting", ["", "0"])
def test_one_session_serves_the_shell_and_its_command_substitutions(
        tmp_path: Path, setting: str) -> None:
    wrapper, log = logged_bin(tmp_path)
    env = bash_env(tmp_path / "home", wrapper, D=str(tmp_path))
    if setting:
        env["UPGRADE_LEDGER_SESSION"] = setting
    done = run_bash(SCRIPT, env)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    uid, state, pct, holder, me = done.stdout.split()
    assert (state, pct, holder) == ("PLANNING", "0", me)  # the lock is the shell's
    with Ledger(tmp_path / "home") as led:
        assert str(led.document(uid)["metadata"]["pid"]) == (tmp_path / "init-pid").read_text(
        ).strip()  # the command substitution's shell, as always
        assert {e["pid"] for e in led.events(kind="upgrade.state")} == {int(me)}
    if setting == "0":  # off: one process per call
        assert starts(log) == ["state get", "legacy init --", "state set -- PLANNING", "state get",
                               "progress", starts(log)[5], "lock acquire --owner " + me,
                               "lock release --owner " + me]
    else:
        assert starts(log) == ["session"]


def test_background_jobs_and_pipelines_take_turns_on_the_session(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with Ledger(home) as led:
        led.init("parallel")
        for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
            led.set_state(state)
        led.phase_start("p")
    wrapper, log = logged_bin(tmp_path)
    done = run_bash("""
upgrade_get_progress_percent >/dev/null
for w in 1 2 3 4; do
    (
        echo "$BASHPID" >"$D/pid.$w"
        for c in 1 2 3 4 5 6 7 8; do
            upgrade_component_start "w$w-c$c" 1.0 2.0
            upgrade_component_get_status "w$w-c$c" >"$D/status.$w.$c"
            upgrade_component_complete "w$w-c$c"
        done
    ) &
done
upgrade_list_history | while read -r line; do upgrade_is_in_progress && echo "in progress"; done
wait
upgrade_get_progress_percent
""", bash_env(home, wrapper, D=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "in progress\n100\n"
    assert starts(log) == ["session"]  # every call of every shell went through it
    with Ledger(home) as led:
        for w in range(1, 5):
            pid = int((tmp_path / f"pid.{w}").read_text())
            for c in range(1, 9):
                status = json.loads((tmp_path / f"status.{w}.{c}").read_text())
                assert (status["name"], status["state"]) == (f"w{w}-c{c}", "UPGRADING")
                (start,) = led.events(component=f"w{w}-c{c}", kind="component.upgrading")
                assert start["pid"] == pid  # the worker's own shell


def test_a_script_s_wait_does_not_wait_for_the_session(tmp_path: Path) -> None:
    wrapper, _log = logged_bin(tmp_path)
    done = run_bash("""
upgrade_state_get_current
sleep 0.1 &
wait
echo waited
""", bash_env(tmp_path / "home", wrapper))
    assert (done.returncode, done.stdout) == (0, "IDLE\nwaited\n"), done.stderr


@pytest.mark.parametrize("how", ["exit", "kill", "exit leaving a job that holds its pipes"])
def test_no_session_outlives_its_shell(tmp_path: Path, how: str) -> None:
    wrapper, _log = logged_bin(tmp_path)
    end = {"exit": "exit 0", "kill": "kill -KILL $$",
           "exit leaving a job that holds its pipes": "sleep 30 >/dev/null 2>&1 & exit 0"}[how]
    done = run_bash(f"""
upgrade_state_get_current >/dev/null
echo "${{_UPGRADE_STATE_SESSION[1]}}"
{end}
""", bash_env(tmp_path / "home", wrapper))
    assert done.returncode == (-9 if how == "kill" else 0), done.stderr
    wait_gone(int(done.stdout.split()[0]), how)


def test_a_session_gone_between_calls_is_replaced(tmp_path: Path) -> None:
    wrapper, log = logged_bin(tmp_path)
    done = run_bash("""
upgrade_state_init >/dev/null
first=${_UPGRADE_STATE_SESSION[1]}
kill -KILL "$first"
while kill -0 "$first" 2>/dev/null; do :; done
upgrade_state_set PLANNING
upgrade_state_get_current
[[ ${_UPGRADE_STATE_SESSION[1]} != "$first" ]] && echo "a new session"
""", bash_env(tmp_path / "home", wrapper))
    assert (done.returncode, done.stdout) == (0, "PLANNING\na new session\n"), done.stderr
    assert starts(log) == ["session", "session"]


def test_arguments_and_output_keep_every_byte(tmp_path: Path) -> None:
    wrapper, log = logged_bin(tmp_path)
    query = "SELECT char(0) || 'a\u00e9' || char(0)"
    done = run_bash(r"""
upgrade_state_init >/dev/null
upgrade_state_set PLANNING
upgrade_phase_start $'caf\xc3\xa9'
upgrade_component_start $'bad\xffname' 1 2 2>"$D/bad.err" || echo "refused $?"
_upgrade_state_call 0 "$BASHPID" sql --format plain "$QUERY" >"$D/nul.out"
upgrade_phase_get_next
upgrade_state_load >"$D/state.json"
""", bash_env(tmp_path / "home", wrapper, D=str(tmp_path), QUERY=query))
    assert (done.returncode, done.stdout) == (0, "refused 1\n"), done.stderr
    assert starts(log) == ["session"]
    # Plain output escapes control characters and keeps the rest as UTF-8: the
    # session hands over the very bytes a one-shot process writes.
    alone = subprocess.run([BIN_DIR / "upgrade-ledger", "--home", tmp_path / "home",
                            "sql", "--format", "plain", query],
                           capture_output=True, check=True, env=child_env())
    assert (tmp_path / "nul.out").read_bytes() == alone.stdout == "\\x00a\u00e9\\x00\n".encode()
    assert json.loads((tmp_path / "state.json").read_text())["current_phase"] == "caf\u00e9"
    # The refusal names the bytes as a one-shot process names them.
    alone = subprocess.run([BIN_DIR / "upgrade-ledger", "--home", tmp_path / "home",
                            "component", "start", b"bad\xffname", "1", "2"],
                           capture_output=True, check=False, env=child_env())
    line = alone.stderr.removeprefix(b"upgrade-ledger: ")
    assert (tmp_path / "bad.err").read_bytes() == b"ERROR: " + line.removeprefix(b"error: ")


@pytest.mark.parametrize("session", ["1", "0"])
def test_a_reader_that_goes_away_a_folder_that_is_gone_and_a_trap_are_as_without_it(
        tmp_path: Path, session: str) -> None:
    """What a process per call did, the session does: `FUNC | head` and `| grep -q`
    under pipefail (the document is bigger than a pipe holds), a call from a folder the
    script deleted, and a trap's `$(...)` while the shell is in a call."""
    home = tmp_path / "home"
    with Ledger(home) as led:
        walk_to_upgrading(led)
        led.phase_start("p")
        for i in range(300):
            led.component_start(f"component-{i:03d}", "1.0.0", "2.0.0")
    wrapper, log = logged_bin(tmp_path)
    done = run_bash(r"""
upgrade_state_get_current >/dev/null
for i in 1 2 3; do upgrade_state_load | head -c 12; echo; done
if upgrade_state_load | grep -q '"current_state": "UPGRADING"'; then echo found; fi
work=$(mktemp -d "$D/work.XXXX"); cd "$work"; rmdir "$work"
upgrade_phase_complete p
cd "$D"
trap 't0=$EPOCHREALTIME; st=$(upgrade_state_get_current)
      echo "trap $st $t0 $EPOCHREALTIME" >"$D/trap.out"' USR1
( sleep 0.3; kill -USR1 $$ ) &
until [[ -s $D/trap.out ]]; do upgrade_get_progress_percent >/dev/null; done
read -r word state t0 t1 <"$D/trap.out"
echo "$word $state"
echo "${t0/,/.} ${t1/,/.}" >"$D/trap.times"
""", bash_env(home, wrapper, D=str(tmp_path), UPGRADE_LEDGER_SESSION=session))
    assert (done.returncode, done.stdout) == (
        0, '{\n  "upgrade\n' * 3 + "found\ntrap UPGRADING\n"), done.stderr
    # A trap's call made while its shell is in a call never waits for the turn its own
    # shell holds (it would get it only at the 5 s token timeout).
    t0, t1 = map(float, (tmp_path / "trap.times").read_text().split())
    assert t1 - t0 < 4.5
    # (The logging wrapper is a bash script: in the deleted folder bash itself says so.)
    assert [line for line in done.stderr.splitlines()
            if not line.startswith("shell-init:")] == [], done.stderr
    if session == "1":
        # One session served it all; the call from a folder that is gone ran as a
        # process.
        kinds = starts(log)
        assert kinds.count("session") == 1, kinds
        assert "phase complete -- p" in kinds, kinds


def test_a_request_too_big_for_the_pipe_runs_as_a_process(tmp_path: Path) -> None:
    wrapper, log = logged_bin(tmp_path)
    done = run_bash("""
upgrade_state_init >/dev/null
big=$(printf '%*s' 600000 '' | tr ' ' x)
upgrade_state_save "{\\"note\\": \\"$big\\"}" || echo "refused $?"
upgrade_state_save '{"note": "small"}'
""", bash_env(tmp_path / "home", wrapper))
    assert (done.returncode, done.stdout) == (0, "refused 1\n"), done.stderr
    assert "kept" in done.stderr  # 64 KiB of kept keys at most: refused, as ever
    assert starts(log) == ["session", "legacy save -"]


# -- the session killed at random points ------------------------------------------------

def crash_calls() -> list[str]:
    """200 calls of an upgrade: every kind of change, predicates and reads."""
    calls = ["upgrade_state_init upgrade-crash", "upgrade_state_set PLANNING",
             "upgrade_state_set BACKING_UP", "upgrade_state_set UPGRADING",
             "upgrade_phase_start p1", """upgrade_state_save '{"ticket": "OPS-1"}'"""]
    i = 0
    while len(calls) < 196:
        i += 1
        calls += [f"upgrade_component_start c{i} 1.0 2.0",
                  f"upgrade_mark_rollback_point c{i} /backups/c{i}.tgz"]
        if i % 4 == 0:
            calls += [f'upgrade_component_fail c{i} "attempt {i} failed"',
                      f"upgrade_component_start c{i} 1.0 2.0"]
        calls += [f"upgrade_component_complete c{i}", f"upgrade_component_is_upgraded c{i}",
                  "upgrade_get_progress_percent"]
    return [*calls[:196], "upgrade_resume", "upgrade_save_to_history",
            "upgrade_get_rollback_info", "upgrade_cleanup"]


def crash_script() -> str:
    lines = ['set -uo pipefail', 'source "$LIB"', 'n=0',
             'check() { local rc=0; n=$((n + 1)); "$@" >"$D/$n.out" 2>"$D/$n.err" || rc=$?; '
             'echo "$n $rc" >>"$D/log"; }']
    return "\n".join([*lines, *(f"check {call}" for call in crash_calls()), ""])


class Killer(threading.Thread):
    """SIGKILLs each session of one shell at a random moment of its life."""

    def __init__(self, shell: int, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.shell, self.rng = shell, rng
        self.done = threading.Event()
        self.kills = 0

    def sessions(self) -> list[int]:
        try:
            children = Path(f"/proc/{self.shell}/task/{self.shell}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in children.split() if is_session(int(p))]

    def run(self) -> None:
        while not self.done.is_set():
            found = self.sessions()
            if not found:
                time.sleep(0.005)
                continue
            # Anywhere in its life: starting, between two calls, in the middle of one.
            self.done.wait(self.rng.uniform(0, 1.5))
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass
            while any(p in self.sessions() for p in found) and not self.done.is_set():
                time.sleep(0.005)


def run_round(tmp_path: Path, name: str, wrapper: Path, rng: random.Random | None,
              ) -> tuple[dict[str, object], int, int]:
    """One run of the script (killing its sessions when *rng* is given): its answers,
    ledger and shell PID, and how many sessions were killed."""
    d = tmp_path / name
    d.mkdir()
    home = d / "home"
    env = bash_env(home, wrapper, D=str(d))
    proc = subprocess.Popen(["bash", "-c", crash_script()], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killer = None
    if rng is not None:
        killer = Killer(proc.pid, rng)
        killer.start()
    out, err = proc.communicate(timeout=600)
    if killer is not None:
        killer.done.set()
        killer.join()
    assert (proc.returncode, out, err) == (0, "", ""), err
    n = len(crash_calls())
    answers = {"log": (d / "log").read_text().splitlines(),
               "calls": [((d / f"{i}.out").read_bytes(), (d / f"{i}.err").read_bytes())
                         for i in range(1, n + 1)]}
    with Ledger(home) as led:
        answers["trail"] = [(e["kind"], e["subject"], e["from"], e["to"],
                             "shell" if e["pid"] == proc.pid else e["pid"])
                            for e in led.events(limit=None)]
        answers["document"] = timeless(led.document("upgrade-crash"))
    return answers, proc.pid, killer.kills if killer else 0


def timeless(data: object) -> object:
    if isinstance(data, dict):
        return {k: timeless(v) for k, v in data.items()
                if not k.endswith("_at") and k not in ("duration_s", "lineage", "pid")}
    if isinstance(data, list):
        return [timeless(v) for v in data]
    return data


@pytest.fixture
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory (tmpfs) when the host has one: what is tested here is the
    session's death, not the disk's, and 51 runs of 200 fsynced calls would take
    minutes on a busy disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="ledger-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_session_killed_at_random_points_loses_nothing_and_doubles_nothing(
        memory_dir: Path, exhaustive: bool) -> None:
    assert len(crash_calls()) == 200
    tmp_path = memory_dir
    wrapper, log = logged_bin(tmp_path)
    expected, _, _ = run_round(tmp_path, "reference", wrapper, None)
    assert starts(log) == ["session"]
    assert [line.split()[0] for line in expected["log"]] == [str(i) for i in range(1, 201)]
    assert "shell" in {e[4] for e in expected["trail"]}
    seed = random.Random(int(os.environ.get("LEDGER_TEST_SEED", "18")))
    rounds = 500 if exhaustive else 50
    seeds = [seed.random() for _ in range(rounds)]
    # Two rounds at a time: a round mostly waits (on its session, on start-ups).
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda r: run_round(tmp_path, f"round-{r}", wrapper,
                                                    random.Random(seeds[r])), range(rounds)))
    kills = 0
    for r, (got, _shell, killed) in enumerate(results):
        kills += killed
        assert got["log"] == expected["log"], f"round {r}"  # each call answered, once
        for i, (mine, theirs) in enumerate(zip(got["calls"], expected["calls"], strict=True)):
            assert mine == theirs, f"round {r}, call {i + 1}: {crash_calls()[i]}"
        assert got["trail"] == expected["trail"], f"round {r}"  # nothing lost or doubled
        assert got["document"] == expected["document"], f"round {r}"
    assert kills >= 50
    retried = [s for s in starts(log) if s.startswith("session retry")]
    assert retried, "no session died in the middle of a change"
