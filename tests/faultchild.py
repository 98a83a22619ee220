"""Child process for the fault-injection tests: drive a 50-component upgrade through
the ``Ledger`` API and report every step that returned.

Run as ``python tests/faultchild.py HOME`` with the repository on PYTHONPATH. The
driver converges: it reads the ledger and does whatever is left, so the same code
starts a new run and resumes a run that a SIGKILL interrupted (it skips COMPLETED
components and redoes UPGRADING ones). After each API call has returned it prints
one JSON line on stdout and flushes it::

    {"step": 7, "kind": "component.upgrading", "subject": "c01", "changed": true,
     "serial": 12, "sha": "…"}

``step`` is the position of the call in the canonical run (``canonical_steps()``;
null for the resume bookkeeping call), ``serial`` and ``sha`` describe the
state.json the call left behind. The parent kills this process at will; a line it
has read is a promise that the step is in the ledger.

Options: ``--components N`` (default 50, split over two phases),
``--pause-each S`` (sleep S seconds after each report, to widen kill windows),
``--stop-after K`` (exit at once, without cleaning up, after step K).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ledger.api import Ledger
from ledger.core import states
from ledger.ops import snapshots
from ledger.views import document

RUN_ID = "crash-run"
PHASES = ("p1", "p2")
FROM, TO = "1.0.0", "2.0.0"


def component_names(count: int) -> list[str]:
    """c01, c02, ... split in order over the two phases."""
    return [f"c{i:02d}" for i in range(1, count + 1)]


def plan_of(count: int) -> dict[str, list[tuple[str, str, str]]]:
    """The run's plan: the first half of the components in p1, the rest in p2."""
    names = component_names(count)
    half = (count + 1) // 2
    return {"p1": [(n, FROM, TO) for n in names[:half]],
            "p2": [(n, FROM, TO) for n in names[half:]]}


def canonical_steps(count: int = 50) -> list[tuple[str, str | None, str | None]]:
    """Every call of an uninterrupted run, in order: (event kind, subject, to value).

    Step numbers are 1-based positions in this list.
    """
    steps: list[tuple[str, str | None, str | None]] = [
        ("upgrade.init", None, "IDLE"),
        ("upgrade.state", None, states.PLANNING),
        ("upgrade.plan", None, None),
        ("upgrade.state", None, states.BACKING_UP),
        ("upgrade.state", None, states.UPGRADING),
    ]
    for phase, comps in plan_of(count).items():
        steps.append(("phase.in_progress", phase, states.IN_PROGRESS))
        for name, _, _ in comps:
            steps.append(("component.upgrading", name, states.UPGRADING))
            steps.append(("component.completed", name, states.COMPLETED))
        steps.append(("phase.completed", phase, states.COMPLETED))
    steps += [
        ("upgrade.state", None, states.VALIDATING),
        ("upgrade.state", None, states.COMPLETED),
        ("upgrade.history", None, None),
    ]
    return steps


class Reporter:
    """Prints one flushed line per returned call."""

    def __init__(self, led: Ledger, count: int, pause_s: float,
                 stop_after: int | None = None) -> None:
        self.led = led
        self.index = {step: n for n, step in enumerate(canonical_steps(count), start=1)}
        self.pause_s = pause_s
        self.stop_after = stop_after

    def __call__(self, kind: str, subject: str | None, to: str | None,
                 changed: bool | None = True) -> None:
        try:
            data = self.led.home.state_file.read_bytes()
            serial = json.loads(data).get("serial")
            sha = hashlib.sha256(data).hexdigest()
        except FileNotFoundError:
            serial, sha = None, None
        line = {"step": self.index.get((kind, subject, to)), "kind": kind,
                "subject": subject, "to": to, "changed": changed, "serial": serial,
                "sha": sha}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        if self.pause_s:
            time.sleep(self.pause_s)
        if self.stop_after is not None and (line["step"] or 0) >= self.stop_after:
            os._exit(0)  # stop dead, as a crash would, but at a chosen step


def drive(home: Path, count: int, pause_s: float = 0.0, stop_after: int | None = None) -> None:
    """Bring the run to COMPLETED and saved to history, from wherever it stands
    (or stop dead after step *stop_after*)."""
    with Ledger(home) as led:
        report = Reporter(led, count, pause_s, stop_after)
        led.acquire_lock(wait_s=120)
        if led.current_id() != RUN_ID:
            led.init(RUN_ID)
            report("upgrade.init", None, "IDLE")
        state = led.state()
        if states.is_resumable(state):
            led.resume()  # records the resume; UPGRADING components are redone below
            report("upgrade.resume", None, None, True)
        if state == states.IDLE:
            state = _move(led, report, states.PLANNING)
        if state == states.PLANNING:
            led.plan(plan_of(count))
            report("upgrade.plan", None, None)
            state = _move(led, report, states.BACKING_UP)
        if state == states.BACKING_UP:
            state = _move(led, report, states.UPGRADING)
        if state == states.UPGRADING:
            _upgrade_all(led, report, count)
            state = _move(led, report, states.VALIDATING)
        if state == states.VALIDATING:
            state = _move(led, report, states.COMPLETED)
        if state != states.COMPLETED:
            raise SystemExit(f"faultchild: unexpected state {state}")
        # Saved or not, save again, as a script's cleanup does at every exit: a kill
        # may have fallen after the save was recorded but before its file and snapshot.
        led.save_to_history()
        report("upgrade.history", None, None)
        led.release_lock()
    sys.stdout.write(json.dumps({"done": True}) + "\n")
    sys.stdout.flush()


def _move(led: Ledger, report: Reporter, target: str) -> str:
    changed = led.set_state(target)
    report("upgrade.state", None, target, changed)
    return target


def _upgrade_all(led: Ledger, report: Reporter, count: int) -> None:
    doc: dict[str, Any] = led.document()
    for phase, comps in plan_of(count).items():
        if doc["phases"].get(phase, {}).get("state") == states.COMPLETED:
            continue
        report_changed = led.phase_start(phase)
        report("phase.in_progress", phase, states.IN_PROGRESS, report_changed)
        for name, frm, to in comps:
            known = doc["phases"].get(phase, {}).get("components", {}).get(name, {})
            if known.get("state") == states.COMPLETED:
                continue  # done before the interruption: never upgrade it twice
            # PENDING, or UPGRADING when the last run died mid-way: (re)do the work.
            report("component.upgrading", name, states.UPGRADING,
                   led.component_start(name, frm, to))
            report("component.completed", name, states.COMPLETED,
                   led.component_complete(name))
        report("phase.completed", phase, states.COMPLETED, led.phase_complete(phase))


# -- what the parent uses: the CLI as a real process, and the checks after a fault ----

REPO = Path(__file__).resolve().parent.parent


def cli(home: Path | None, *args: str, fsize: int | None = None,
        env: dict[str, str] | None = None, umask: int | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """``upgrade-ledger [--home HOME] ARGS`` in a real process (this checkout's code),
    optionally with its file size limited to *fsize* bytes (writes past it fail with
    EFBIG; SIGXFSZ is ignored) or a given *umask*."""

    def limits() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if umask is not None:
            os.umask(umask)

    full_env = {k: v for k, v in os.environ.items()
                if k not in ("LEDGER_HOME", "UPGRADE_STATE_DIR", "LEDGER_SNAPSHOT_KEEP")}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env.update(env or {})
    home_args = ["--home", str(home)] if home is not None else []
    return subprocess.run([sys.executable, "-m", "ledger", *home_args, *args],
                          capture_output=True, text=True, env=full_env, timeout=120,
                          preexec_fn=limits, check=False)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a refused command that exited *code*."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("upgrade-ledger: error: "), proc.stderr
    return lines[0]


# -- what the parent checks after each kill ------------------------------------------

UPGRADE_ORDER = (states.IDLE, states.PLANNING, states.BACKING_UP, states.UPGRADING,
                 states.VALIDATING, states.COMPLETED)
LATER = {  # a state a reported step left behind, and the states that may follow it
    states.UPGRADING: (states.UPGRADING, states.COMPLETED),
    states.IN_PROGRESS: (states.IN_PROGRESS, states.COMPLETED),
    states.COMPLETED: (states.COMPLETED,),
}


def integrity(db_path: Path) -> str:
    """``PRAGMA integrity_check`` of a SQLite file, opened the way a next process would."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def check_reported(led: Ledger, lines: list[dict[str, Any]]) -> int:
    """Every step a child reported is in the ledger (rows and, if it changed
    something, its event); return how many lines were checked."""
    with led.db.read() as tx:
        upgrade = tx.one("SELECT state, saved_at FROM upgrades WHERE id = :u", {"u": RUN_ID})
        for line in lines:
            kind, subject, to = line["kind"], line["subject"], line["to"]
            assert upgrade is not None, f"reported {kind} but the upgrade is not in the ledger"
            if line["serial"] is not None:
                assert tx.scalar("SELECT 1 FROM events WHERE id = :i AND upgrade_id = :u",
                                 {"i": line["serial"], "u": RUN_ID}), line
            if line["changed"]:
                assert tx.scalar(
                    "SELECT 1 FROM events WHERE upgrade_id = :u AND kind = :k "
                    "AND subject IS :s AND (:t IS NULL OR to_value = :t)",
                    {"u": RUN_ID, "k": kind, "s": subject, "t": to}), f"no event for {line}"
            if kind == "upgrade.state" or kind == "upgrade.init":
                assert UPGRADE_ORDER.index(upgrade["state"]) >= UPGRADE_ORDER.index(to), line
            elif kind.startswith("component."):
                row = tx.scalar("SELECT state FROM components WHERE upgrade_id = :u AND "
                                "name = :n", {"u": RUN_ID, "n": subject})
                assert row in LATER[to], f"{line} but the row is {row}"
            elif kind.startswith("phase."):
                row = tx.scalar("SELECT state FROM phases WHERE upgrade_id = :u AND "
                                "name = :n", {"u": RUN_ID, "n": subject})
                assert row in LATER[to], f"{line} but the row is {row}"
            elif kind == "upgrade.history":
                assert upgrade["saved_at"], line
                json.loads(led.home.history_file(RUN_ID).read_bytes())
    return len(lines)


def check_view(led: Ledger, known: dict[int, set[str]]) -> None:
    """state.json parses and is the ledger's current view or the one before it,
    whole (a view some process completed); remember it as known-good."""
    path = led.home.state_file
    with led.db.read() as tx:
        serials = [r[0] for r in tx.all("SELECT id FROM events WHERE upgrade_id = :u "
                                        "ORDER BY id DESC LIMIT 2", {"u": RUN_ID})]
        current = document.dumps(document.build(tx, RUN_ID)) if serials else None
    if not path.exists():
        assert not known, "state.json vanished after a view had been written"
        assert len(serials) <= 1, "two changes committed and still no view"
        return
    data = path.read_bytes()
    doc = document.parse(data)  # never partial: a whole, valid document
    assert doc["lineage"] is not None
    serial = doc["serial"]
    assert serials and serial <= serials[0], f"view serial {serial} ahead of the ledger"
    sha = hashlib.sha256(data).hexdigest()
    if serial == serials[0]:
        assert data == current, "state.json claims the latest serial but differs from it"
    else:
        assert len(serials) == 2 and serial == serials[1], \
            f"view serial {serial} is neither the latest {serials} nor the one before"
        assert sha in known.get(serial, set()), "previous view is not one a writer completed"
    known.setdefault(serial, set()).add(sha)


def check_snapshots(led: Ledger) -> None:
    """Every snapshot present is whole: a kill never leaves half of one under its name."""
    for snap in snapshots.listing(led.home):
        assert snapshots.check_file(snap.path) is None, snap


def leftover_temp_files(led: Ledger) -> list[str]:
    """Temp files of atomic writes anywhere in the home (after the ledger was opened)."""
    found = []
    for folder in {led.home.tmp_dir, led.home.root, led.home.history_dir,
                   led.home.state_file.parent, led.home.root / "snapshots"}:
        if folder.is_dir():
            found += [str(p) for p in folder.iterdir()
                      if p.name.endswith(".tmp") or p.name.startswith(".")]
    return sorted(found)


def check_finished(led: Ledger, count: int) -> None:
    """The run reached COMPLETED, saved, with each component completed exactly once."""
    with led.db.read() as tx:
        assert tx.scalar("SELECT state FROM upgrades WHERE id = :u",
                         {"u": RUN_ID}) == states.COMPLETED
        rows = {r["name"]: r["state"] for r in tx.all(
            "SELECT name, state FROM components WHERE upgrade_id = :u", {"u": RUN_ID})}
        done = {r["subject"]: r["n"] for r in tx.all(
            "SELECT subject, COUNT(*) AS n FROM events WHERE upgrade_id = :u AND "
            "kind = 'component.completed' GROUP BY subject", {"u": RUN_ID})}
    snaps = snapshots.listing(led.home)
    assert snaps and snaps[0].upgrade_id == RUN_ID, "no snapshot taken at the save"
    assert rows == dict.fromkeys(component_names(count), states.COMPLETED)
    assert done == dict.fromkeys(component_names(count), 1), \
        {n: c for n, c in done.items() if c != 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("home", type=Path)
    parser.add_argument("--components", type=int, default=50)
    parser.add_argument("--pause-each", type=float, default=0.0)
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args(argv)
    drive(args.home, args.components, args.pause_each, args.stop_after)


if __name__ == "__main__":
    main()
