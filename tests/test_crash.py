"""SIGKILL anywhere: a 50-component upgrade survives being killed at any moment.

A child process (tests/faultchild.py) drives the upgrade through the ``Ledger`` API
and prints a line after every call that returned. The parent kills it with SIGKILL,
at random moments (seeded) or right after each step in turn, and after every kill
checks what an operator relies on:

- ``PRAGMA integrity_check`` is ok;
- every step the child reported is in the ledger (rows, and the event when the call
  changed something; the serial of the view it saw is an event of the ledger);
- state.json parses and is the current view or the one before it, whole, with a
  serial never ahead of the ledger;
- once the ledger is opened again, no temp file is left anywhere in the home.

Then a new child resumes (skipping COMPLETED components, redoing UPGRADING ones),
until one finishes: the run ends COMPLETED with every component completed exactly
once. Default: >= 50 kills; ``pytest --exhaustive`` (or ``LEDGER_EXHAUSTIVE_TESTS=1``):
>= 500. Both sweeps are marked ``slow``: ``-m "not slow"`` leaves them out.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faultchild as fc
import pytest
from conftest import child_env

from ledger.api import Ledger

CHILD = Path(fc.__file__).resolve()
COMPONENTS = 50
STEPS = len(fc.canonical_steps(COMPONENTS))


@dataclass
class Run:
    """One upgrade, driven to the end by a chain of children, each maybe killed."""

    home: Path
    kills: int = 0
    children: int = 0
    lines: list[dict[str, Any]] = field(default_factory=list)
    known_views: dict[int, set[str]] = field(default_factory=dict)
    checked: int = 0
    done: bool = False

    def child(self, kill_when: Callable[[dict[str, Any] | None, float], float | None]) -> None:
        """Run one child. ``kill_when(line, elapsed)`` is asked at start (line None) and
        after each line: a number means "SIGKILL after that many seconds"."""
        self.children += 1
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(self.home), "--components", str(COMPONENTS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), bufsize=0)
        assert proc.stdout is not None and proc.stderr is not None
        started = time.monotonic()
        buffer = b""
        deadline: float | None = None
        delay = kill_when(None, 0.0)
        if delay is not None:
            deadline = started + delay
        killed = False
        while True:
            timeout = 120.0 if deadline is None else max(0.0, deadline - time.monotonic())
            ready = select.select([proc.stdout], [], [], timeout)[0]
            if not ready:
                if deadline is None:
                    proc.kill()
                    pytest.fail(f"child {proc.pid} said nothing for 120 s")
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                line = json.loads(raw)
                if line.get("done"):
                    self.done = True
                    continue
                self.lines.append(line)
                if deadline is None:
                    delay = kill_when(line, time.monotonic() - started)
                    if delay is not None:
                        deadline = time.monotonic() + delay
        # Whatever the child wrote before it died was reported: read it all.
        rest = proc.stdout.read()
        for raw in (buffer + rest).splitlines():
            line = json.loads(raw)
            if line.get("done"):
                self.done = True
            else:
                self.lines.append(line)
        code = proc.wait(timeout=60)
        err = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
        if killed and code == -signal.SIGKILL:
            self.kills += 1
        else:
            assert code == 0, f"child exited {code}: {err}"
        self.check()

    def check(self) -> None:
        """Everything the crash must not have broken (see the module docstring)."""
        db = self.home / "ledger.db"
        if not db.exists():
            assert not self.lines
            return
        assert fc.integrity(db) == "ok"
        with Ledger(self.home) as led:  # opening cleans the dead writers' temp files
            assert fc.leftover_temp_files(led) == []
            fc.check_snapshots(led)
            if led.current_id() is None:
                assert not self.lines, "steps were reported but no upgrade is in the ledger"
                return
            self.checked += fc.check_reported(led, self.lines)
            for line in self.lines:  # views a child saw whole after a call returned
                if line["serial"] is not None:
                    self.known_views.setdefault(line["serial"], set()).add(line["sha"])
            fc.check_view(led, self.known_views)

    def finish(self) -> None:
        """Resume until a child completes the run; then check it ended well."""
        for _ in range(5):
            if self.done:
                break
            self.child(lambda line, elapsed: None)
        assert self.done
        with Ledger(self.home) as led:
            fc.check_finished(led, COMPONENTS)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated ledger.db to copy, so that most runs skip Alembic."""
    home = tmp_path_factory.mktemp("template")
    Ledger(home).close()
    return home / "ledger.db"


def fresh_home(base: Path, name: str, template: Path | None) -> Path:
    home = base / name
    home.mkdir(mode=0o700)
    if template is not None:
        shutil.copyfile(template, home / "ledger.db")
        os.chmod(home / "ledger.db", 0o600)
    return home


def report(name: str, runs: list[Run]) -> None:
    """Print the figures (shown with ``pytest -s``)."""
    kills = sum(r.kills for r in runs)
    steps = sum(len(r.lines) for r in runs)
    checks = sum(r.checked for r in runs)
    children = sum(r.children for r in runs)
    print(f"\n[{name}] runs={len(runs)} children={children} kills={kills} "
          f"survived={kills} steps-reported={steps} step-checks={checks}")


@pytest.mark.slow
def test_sweep_kill_right_after_every_step(tmp_path: Path, template: Path,
                                           exhaustive: bool) -> None:
    """Kill right after step k, for every k of the run, resuming in between; when
    exhaustive the sweep is repeated with each kill delayed a little further into step
    k+1."""
    delays = [0.0, 0.0005, 0.002, 0.005] if exhaustive else [0.0]
    runs = []
    for n, delay in enumerate(delays):
        run = Run(fresh_home(tmp_path, f"sweep{n}", template))
        runs.append(run)
        target = 1
        while target <= STEPS and not run.done:
            def kill_after(line: dict[str, Any] | None, _elapsed: float,
                           target: int = target, delay: float = delay) -> float | None:
                if line is not None and (line["step"] or 0) >= target:
                    return delay
                return None
            run.child(kill_after)
            target = max([target] + [ln["step"] or 0 for ln in run.lines]) + 1
        run.finish()
        # Without delay a kill landed right after nearly every step (a few are committed
        # by the dying child itself, unreported, and the next child starts past them);
        # with a delay each child gets further before it dies.
        assert run.kills >= (STEPS // 2 if delay == 0 else STEPS // 8)
    report("sweep", runs)


@pytest.mark.slow
def test_random_kills(tmp_path: Path, template: Path, exhaustive: bool) -> None:
    """SIGKILL at random moments (seeded): during start-up and migration of a new
    ledger, inside API calls, between the commit and the view, in save to history."""
    wanted = 500 if exhaustive else 40
    rng = random.Random(20261127)
    runs: list[Run] = []
    while sum(r.kills for r in runs) < wanted:
        first = not runs  # the first run starts without a ledger: kills hit migration
        run = Run(fresh_home(tmp_path, f"random{len(runs)}", None if first else template))
        runs.append(run)
        for _ in range(60):
            if run.done:
                break
            if run.children == 0 and first:
                # a random moment of the first start: imports, migration, first steps
                at = rng.uniform(0.0, 1.5)
                run.child(lambda line, _e, at=at: at if line is None else None)
                continue
            after = rng.randint(1, 12)
            delay = rng.uniform(0.0, 0.02)

            def kill_random(line: dict[str, Any] | None, _elapsed: float,
                            state: list[int] = [after], delay: float = delay,  # noqa: B006
                            ) -> float | None:
                if line is None:
                    return None
                state[0] -= 1
                return delay if state[0] <= 0 else None
            run.child(kill_random)
        run.finish()
    report("random", runs)
    assert sum(r.kills for r in runs) >= wanted


OTHER_HANDLE_CHILD = """
import os, sys
from ledger.api import Ledger
home, second = sys.argv[1], sys.argv[2] == "second"
led = Ledger(home)                  # a new ledger: this process runs the migration
led.init("lock-run")
if second:
    Ledger(home).close()            # another handle in the same process, closed again
print("ready", flush=True)
sys.stdin.readline()                # meanwhile another process opens and closes it
led.set_state("PLANNING")
print("committed", flush=True)
sys.stdin.readline()                # killed here
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["migrated", "second"])
def test_a_returned_change_survives_other_processes_closing_the_ledger(
        tmp_path: Path, case: str) -> None:
    """Closing any descriptor of ledger.db drops the process's POSIX locks, SQLite's
    among them; if the migration or a second handle did so, another process closing
    its connection took the WAL for unused and deleted it, and the next commit went
    into an unlinked file: acknowledged, invisible to others, lost at the kill."""
    home = tmp_path / "home"
    proc = subprocess.Popen([sys.executable, "-c", OTHER_HANDLE_CHILD, str(home), case],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=child_env())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        other = subprocess.run(
            [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
             "c.execute('SELECT COUNT(*) FROM events').fetchone(); c.close()",
             str(home / "ledger.db")], check=True, timeout=60)
        assert other.returncode == 0
        assert (home / "ledger.db-wal").exists(), "the WAL was deleted under a live writer"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "committed"
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdin.close()
        proc.stdout.close()
    assert fc.integrity(home / "ledger.db") == "ok"
    with Ledger(home) as led:
        assert led.state() == "PLANNING"
