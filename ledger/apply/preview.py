"""``apply --dry-run``: what a run of a plan would do, changing nothing.

It reads the ledger (when the home has one) to tell a new upgrade from a resumed
one and finished components from pending ones, and runs the plan's ``probe``
commands, which must only read, to show what would be skipped. Nothing is written:
no lock, no event, no log, no backup folder; probe output goes to an anonymous
temporary file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ledger.api import Ledger
from ledger.apply.jobs import command_env
from ledger.apply.plan import Component, Plan
from ledger.apply.runner import plan_digest
from ledger.apply.shell import Running
from ledger.core import states
from ledger.lock import DEFAULT_TIMEOUT_S
from ledger.store.home import Home


def preview_home(home: str | os.PathLike[str] | None, plan: Plan, *,
                 db_url: str | None = None, env: Mapping[str, str] | None = None,
                 lock_timeout_s: float = DEFAULT_TIMEOUT_S, supersede: bool = False,
                 again: bool = False, host_name: str | None = None) -> dict[str, Any]:
    """``preview`` of *plan* for the home at *home* (resolved as everywhere), opening
    its ledger only if it has one: a home without a ledger stays untouched."""
    where = Home.at(home, env)
    ledger = None
    if db_url is not None or where.db_path.exists():
        ledger = Ledger(home, db_url=db_url, env=env, lock_timeout_s=lock_timeout_s,
                        host_name=host_name)
    try:
        return preview(where, ledger, plan, supersede=supersede, again=again)
    finally:
        if ledger is not None:
            ledger.close()


def preview(home: Home, ledger: Ledger | None, plan: Plan, *, supersede: bool = False,
            again: bool = False) -> dict[str, Any]:
    """``{plan, sha256, upgrade_id, action, components: [{phase, component, from,
    to, installed, action, stderr}]}`` for a run of *plan* in *home*, whose *ledger*
    is None when the home has none yet. An action starting with ``fail`` is a
    component the run would fail on; ``stderr`` holds the last lines its probe
    printed there (``[]`` when it ran no probe)."""
    uid, action, known = _upgrade_action(ledger, plan, supersede=supersede, again=again)
    rows = []
    earlier: set[str] = set()  # components with a stage before this one
    for c in plan.components():
        state = known.get(c.key)
        installed = None
        stderr: list[str] = []
        if action.startswith(("nothing", "refused")):
            what = "none"
        elif state in (states.COMPLETED, states.SKIPPED):
            what = f"none ({state.lower()})"
        elif state == states.UPGRADING:
            what = "validate (interrupted); upgrade again if that fails"
        elif c.probe is not None:
            installed, what, stderr = _probe(home, plan, uid, c, later_stage=c.name in earlier)
        else:
            what = "upgrade" if state != states.FAILED else "upgrade (retry)"
        earlier.add(c.name)
        rows.append({"phase": c.phase, "component": c.name, "from": c.from_version,
                     "to": c.to_version, "installed": installed, "action": what,
                     "stderr": stderr})
    return {"plan": str(plan.path), "sha256": plan.sha256, "upgrade_id": uid,
            "action": action, "components": rows}


def _upgrade_action(ledger: Ledger | None, plan: Plan, *, supersede: bool, again: bool,
                    ) -> tuple[str | None, str, dict[tuple[str, str], str]]:
    """(upgrade id, what the run would do with it, component states if resumed)."""
    current = ledger.current_id() if ledger is not None else None
    if ledger is None or current is None:
        return None, "start a new upgrade", {}
    doc = ledger.document()
    state, outcome = doc["current_state"], doc["outcome"]
    same = plan_digest(ledger, current) == plan.sha256
    known = {(p, n): c["state"] for p, phase in doc["phases"].items()
             for n, c in phase["components"].items()}
    if same and (states.is_in_progress(state) or (state == states.IDLE and outcome is None)):
        return current, f"resume {current} ({state})", known
    if same and outcome == states.COMPLETED and not again:
        return current, f"nothing: {current} already applied this plan", known
    if states.is_in_progress(state) and not supersede:
        return current, (f"refused: {current} is in progress ({state}) for another plan "
                         "(--supersede ends it)"), {}
    return None, "start a new upgrade" + (f" (superseding {current})"
                                          if states.is_in_progress(state) else ""), {}


def _probe(home: Home, plan: Plan, uid: str | None, c: Component, *,
           later_stage: bool) -> tuple[str | None, str, list[str]]:
    """Run the probe of *c*; (installed version, what a run would do, the last lines
    it printed on stderr)."""
    assert c.probe is not None
    env = command_env(home, plan, uid or "", c, step="probe", from_version=c.from_version)
    running = Running(c.probe.run, env=env, cwd=plan.base_dir, timeout_s=c.probe.timeout_s,
                      log=None, label=f"{c.phase}/{c.name} probe (dry run)", capture=True)
    try:
        result = running.wait()
    finally:
        running.stop()
    version = result.output.strip().splitlines()[0].strip() if result.output.strip() else ""
    if not result.ok or not version:
        return None, (f"fail: probe {result.describe()}" if not result.ok else
                      "fail: probe printed nothing"), result.tail
    if version in plan.targets_from(c):
        return version, f"skip (probe reports {version})", result.tail
    if c.from_version is not None and version != c.from_version and not later_stage:
        return (version, f"fail: installed {version}, the plan upgrades from "
                f"{c.from_version}", result.tail)
    return version, "upgrade", result.tail
