"""The per-step commands never import SQLAlchemy, Alembic or the PostgreSQL driver.

Shell scripts run ``upgrade-ledger`` once per step, so every import is paid per step;
SQLAlchemy alone costs several hundred milliseconds. Each command below runs in a
real process on an existing ledger, with and without a fleet database configured
(``--fleet``: a change then starts a pusher in the background, which may import what
it likes, but the step itself never waits on the network), and reports, at
interpreter exit, which of those packages it had imported. A new ledger (which must
be migrated) shows that the probe does see Alembic when it is imported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env, walk_to_upgrading
from fleethelpers import stop_pusher, wait_for
from sessionclient import SessionClient

from ledger.api import Ledger
from ledger.fleet import spawn

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("sqlalchemy", "alembic", "psycopg")
#: A fleet database nobody answers for (connection refused at once).
FLEET = "postgresql://ledger@127.0.0.1:1/fleet"
#: Runs the command as ``python -m ledger`` does, and on exit prints the heavy
#: top-level packages found in sys.modules (after everything, even sys.exit, ran).
PROBE = f"""
import atexit, runpy, sys
def report():
    heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
    sys.stderr.write('HEAVY:' + ','.join(heavy) + '\\n')
atexit.register(report)
sys.argv = ['upgrade-ledger', *sys.argv[1:]]
runpy.run_module('ledger', run_name='__main__', alter_sys=True)
"""


def probe(home: Path, *args: str) -> tuple[int, str, str, list[str]]:
    """Run one command in a new interpreter: (exit code, stdout, stderr, heavy imports)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEDGER_HOME", "UPGRADE_STATE_DIR", "LEDGER_DB_URL", "LEDGER_PID",
                        "LEDGER_FLEET_URL")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", PROBE, "--home", str(home), *args],
                          capture_output=True, text=True, check=False, timeout=120, env=env)
    *lines, last = done.stderr.splitlines() or [""]
    assert last.startswith("HEAVY:"), done.stderr
    heavy = [m for m in last.removeprefix("HEAVY:").split(",") if m]
    return done.returncode, done.stdout, "\n".join(lines), heavy


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An existing ledger mid-upgrade: phase p current, component a upgrading."""
    home = tmp_path_factory.mktemp("hot") / "home"
    with Ledger(home) as led:
        walk_to_upgrading(led, "u1")
        led.phase_start("p")
        led.component_start("a", "1.0", "2.0")
    return home


def state_doc(home: Path) -> dict:
    return json.loads((home / "state.json").read_text())


# (command, exit code, a check that the command did its work)
STEPS = [
    (["state", "get"], 0, lambda home, out: out == "UPGRADING\n"),
    (["state", "set", "VALIDATING"], 0,
     lambda home, out: state_doc(home)["current_state"] == "VALIDATING"),
    (["phase", "start", "p2"], 0, lambda home, out: state_doc(home)["current_phase"] == "p2"),
    (["component", "start", "b", "1", "2"], 0,
     lambda home, out: state_doc(home)["phases"]["p"]["components"]["b"]["state"] ==
     "UPGRADING"),
    (["component", "complete", "a"], 0,
     lambda home, out: state_doc(home)["phases"]["p"]["components"]["a"]["state"] ==
     "COMPLETED"),
    (["component", "status", "a"], 0, lambda home, out: json.loads(out)["state"] == "UPGRADING"),
    (["rollback", "mark", "a", "/backups/a.tgz"], 0,
     lambda home, out: state_doc(home)["rollback_available"] is True),
    (["lock", "acquire"], 0, lambda home, out: (home / "upgrade.lock.d" / "lock.info").exists()),
    (["lock", "status", "--json"], 0, lambda home, out: json.loads(out)["held"] is False),
    (["component", "is-upgraded", "a"], 1, lambda home, out: out == ""),
    (["in-progress", "-v"], 0, lambda home, out: out == "yes\n"),
    (["status"], 0, lambda home, out: "UPGRADING" in out),
    (["export", "-o", "-"], 0, lambda home, out: json.loads(out)["upgrade_id"] == "u1"),
]


#: The steps that change the ledger (and so start a pusher when a fleet is configured).
CHANGING = {"state set", "phase start", "component start", "component complete",
            "rollback mark"}


@pytest.mark.slow
@pytest.mark.parametrize("fleet", [None, FLEET], ids=["local", "fleet"])
@pytest.mark.parametrize(("args", "code", "did"), STEPS, ids=[" ".join(s[0]) for s in STEPS])
def test_per_step_commands_import_neither_sqlalchemy_nor_alembic_nor_psycopg(
        running: Path, home: Path, args: list[str], code: int, did, fleet: str | None) -> None:
    shutil.copytree(running, home, symlinks=True)
    try:
        got, out, err, heavy = probe(home, *(["--fleet", fleet] if fleet else []), *args)
        assert (got, err) == (code, ""), (got, err)
        assert did(home, out)  # the command really ran (not an early usage error)
        assert heavy == []
        if fleet is not None and " ".join(args[:2]) in CHANGING:
            # The change started a pusher in the background (which ships it later).
            wait_for((home / spawn.LOCK_NAME).exists, what="a pusher")
    finally:
        stop_pusher(home)


@pytest.mark.slow
def test_the_probe_sees_alembic_when_a_new_ledger_is_migrated(tmp_path: Path) -> None:
    home = tmp_path / "new"
    got, out, _err, heavy = probe(home, "state", "get")
    assert (got, out) == (0, "IDLE\n")
    assert "alembic" in heavy and "sqlalchemy" in heavy
    # ... and once migrated, the same command is back on the light path.
    assert probe(home, "state", "get")[3] == []


def test_the_drop_ins_save_is_a_per_step_command(running: Path, home: Path,
                                                  tmp_path: Path) -> None:
    shutil.copytree(running, home, symlinks=True)
    saved = tmp_path / "saved.json"
    saved.write_text('{"ticket": "OPS-1"}')
    got, out, err, heavy = probe(home, "legacy", "save", str(saved))
    assert (got, out, err) == (0, "u1\n", "")
    assert state_doc(home)["ticket"] == "OPS-1"
    assert heavy == []


def test_a_session_serves_the_per_step_commands_on_the_light_path(running: Path,
                                                                  tmp_path: Path) -> None:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    session = SessionClient(env=env, command=[sys.executable, "-c", PROBE])
    for i, (args, code, did) in enumerate(STEPS):
        home = tmp_path / f"home{i}"  # each step on its own copy, as above
        shutil.copytree(running, home, symlinks=True)
        got = session.call(["--home", str(home), *args])
        assert (got.code, got.err) == (code, b""), (args, got)
        assert did(home, got.out.decode()), args
    assert session.close() == 0
    assert session.errors.decode().splitlines()[-1] == "HEAVY:"  # neither, once for all


@pytest.mark.slow
def test_the_per_step_path_builds_no_dataclass_and_reads_no_csv(running: Path,
                                                               home: Path) -> None:
    """dataclasses (and the code each @dataclass compiles), csv and the document
    importer are start-up costs a per-step command does not need: its records are
    plain classes (core/values.py), csv is imported for CSV output only, the importer
    for imports and saves only."""
    shutil.copytree(running, home, symlinks=True)
    watched = ("dataclasses", "csv", "ledger.views.importer")
    probe = PROBE.replace(f"{{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})",
                          f"set(sys.modules) & set({watched!r})")
    assert probe != PROBE
    env = {k: v for k, v in os.environ.items() if k not in ("LEDGER_HOME", "LEDGER_PID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for args in (["component", "start", "b", "1", "2"], ["lock", "acquire"],
                 ["component", "status", "a"], ["state", "get"], ["export", "-o", "-"]):
        done = subprocess.run([sys.executable, "-c", probe, "--home", str(home), *args],
                              capture_output=True, text=True, check=False, timeout=120,
                              env=env)
        assert done.returncode == 0, done.stderr
        assert done.stderr.splitlines()[-1] == "HEAVY:", (args, done.stderr)
