"""examples/upgrade-with-state.sh runs to the end, as documented, in a demo folder, and
leaves the story it tells in the ledger: backups as rollback points, a failure and a
retry, an interrupted run resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env

from ledger.api import Ledger

#: Every test runs with the session and without it (conftest.py, dropin_mode).
pytestmark = pytest.mark.usefixtures("dropin_mode")

EXAMPLE = REPO / "examples" / "upgrade-with-state.sh"
EXPORTERS = {"node_exporter": "1.9.1", "blackbox_exporter": "0.27.0",
             "postgres_exporter": "0.17.1", "redis_exporter": "1.74.0",
             "nginx_exporter": "1.5.1"}


@pytest.mark.slow
def test_the_example_runs_to_the_end_inside_its_demo_folder(tmp_path: Path) -> None:
    env = child_env(UPGRADE_STATE_DIR="./demo-bash")
    for name in ("UPGRADE_HISTORY_DIR", "UPGRADE_BACKUPS_DIR", "UPGRADE_STATE_FILE",
                 "UPGRADE_LOCK_FILE", "UPGRADE_TEMP_DIR", "UPGRADE_LEDGER_BIN"):
        env.pop(name, None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    done = subprocess.run(["bash", str(EXAMPLE)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["demo-bash"]  # nothing else touched
    home = tmp_path / "demo-bash"
    # stderr holds only the resume note about the exporter left half-way
    assert done.stderr.splitlines() == [
        "component redis_exporter (phase exporters) was left mid-upgrade to 1.74.0: "
        "validate it"]
    assert "first run died (exit 137)" in done.stdout
    assert "postgres_exporter: attempt 1 failed (sha256 mismatch" in done.stdout
    assert done.stdout.splitlines()[-1].split(" | ")[1] == "COMPLETED"

    with Ledger(home) as led:
        (upgrade,) = led.history()
        shown = led.show(upgrade["id"])
        breaks = led.events(kind="lock.break")
    kinds = [e["kind"] for e in shown["events"]]
    assert upgrade["outcome"] == "COMPLETED" and upgrade["completed"] == 5
    assert "upgrade.resume" in kinds and len(breaks) == 1  # the dead run's lock, taken over
    components = {c["name"]: c for c in shown["components"]}
    assert {n: c["to_version"] for n, c in components.items()} == EXPORTERS
    assert {c["state"] for c in components.values()} == {"COMPLETED"}
    postgres = components["postgres_exporter"]
    assert postgres["attempts"] == 2 and "sha256 mismatch" in postgres["last_error"]
    points = shown["rollback_points"]
    assert sorted(p["component"] for p in points) == sorted(EXPORTERS)
    assert all(Path(p["backup_path"]).is_file() for p in points)
    assert all(Path(p["backup_path"]).parent == home / "backups" for p in points)

    saved = json.loads((home / "history" / f"{upgrade['id']}.json").read_text())
    assert saved["current_state"] == "COMPLETED"
    assert json.loads((home / "state.json").read_text())["current_state"] == "IDLE"
    assert not (home / "upgrade.lock.d").exists()
    for name, version in EXPORTERS.items():
        assert (home / "host" / name / "VERSION").read_text() == version + "\n"
