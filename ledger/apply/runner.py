"""The execution engine of ``upgrade-ledger apply``: a plan driven through the state
machine, resumable at every step.

The run holds the upgrade lock from start to end and moves the current upgrade
IDLE → PLANNING → BACKING_UP → UPGRADING → VALIDATING → COMPLETED, or through
ROLLING_BACK to ROLLED_BACK (or FAILED). Each step reads where the ledger stands and
continues from there, so running ``apply`` again after a crash, a reboot or a
Ctrl-C picks up exactly where the last run stopped. The ledger is driven only
through the ``Ledger`` API; docs/apply.md describes every rule.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ledger import queries
from ledger.api import Ledger, RunContext
from ledger.apply import backups, contain
from ledger.apply.jobs import Jobs, Quiet, Reporter, backup_dir
from ledger.apply.plan import Component, Plan
from ledger.apply.scheduler import Interrupted, Stop
from ledger.apply.shell import stop_leftovers
from ledger.core import clock, states
from ledger.core.rollout import Rollout
from ledger.errors import Conflict, LedgerError, StorageError, UpgradeInProgress
from ledger.lock import DEFAULT_TIMEOUT_S

__all__ = ["Interrupted", "Options", "Outcome", "Reporter", "Run", "apply", "plan_digest"]

#: The annotation that ties an upgrade to the plan file driving it.
PLAN_EVENT = queries.PLAN_EVENT
ROLLBACK_EVENT = "apply.rollback"
#: Components a rollback must undo: their upgrade has begun.
CHANGED = (states.COMPLETED, states.UPGRADING, states.FAILED)
#: What stops a run at its next safe point: Ctrl-C, ``kill``, a dropped ssh session.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class Options:
    """How to run: roll back automatically; end another plan's upgrade in progress;
    start anew even when the current upgrade already completed this plan; how to meet
    the plan's rolling-upgrade limits (``rollout``: its ``max_hosts``, when set,
    overrides the plan's; the rest says how to wait and what to ignore)."""

    rollback: bool = True
    supersede: bool = False
    again: bool = False
    rollout: Rollout = field(default_factory=Rollout)

#: What a run does with the current upgrade: continue it, start a new one, or nothing.
RESUME, NEW, DONE = "resume", "new", "done"


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``state`` is COMPLETED, ROLLED_BACK or FAILED."""

    upgrade_id: str
    state: str
    resumed: bool = False
    already_applied: bool = False
    error: str | None = None
    #: ``phase/component`` of each component rolled back, in the order it was.
    rolled_back: tuple[str, ...] = ()


def open_ledger(home: str | os.PathLike[str] | None = None, *, db_url: str | None = None,
                env: Mapping[str, str] | None = None, strict: bool = False,
                lock_timeout_s: float = DEFAULT_TIMEOUT_S,
                host_name: str | None = None, fleet_url: str | None = None) -> Ledger:
    """The ledger a run works on: the run itself (this process) owns the lock and its
    changes, not the shell that started it, as the per-step commands' owner is."""
    return Ledger(home, db_url=db_url, env=env, pid=os.getpid(), strict=strict,
                  lock_timeout_s=lock_timeout_s, host_name=host_name, fleet_url=fleet_url)


def apply(ledger: Ledger, plan: Plan, options: Options = Options(),
          reporter: Reporter | None = None) -> Outcome:
    """Run *plan* on *ledger* (or resume it); see ``Run``."""
    return Run(ledger, plan, options, reporter or Quiet()).execute()


def plan_digest(ledger: Ledger, upgrade_id: str) -> str | None:
    """The sha256 of the plan file recorded for an upgrade, or None."""
    with ledger.db.read() as tx:
        record = queries.plan_record(tx, upgrade_id)
    return None if record is None else record.get("sha256")


class Run(Jobs):
    """One run of a plan. ``execute`` holds the lock and moves the state machine."""

    def __init__(self, ledger: Ledger, plan: Plan, options: Options, reporter: Reporter) -> None:
        super().__init__(ledger, plan, reporter)
        self.options = options
        self.resumed = False

    # -- the run -------------------------------------------------------------------

    def execute(self) -> Outcome:
        """Take the lock, run (or resume) the plan, release the lock."""
        feed = _EventFeed(self.ledger, self.out)
        self.ledger.after_change.append(feed)
        try:
            self.ledger.acquire_lock()
            try:
                decision = self._decide()
                # What the ledger's listeners do during a run (by default, subscribers
                # hear of every change as it is made, never failing a step; with a
                # fleet, the run takes its slot first and ships every change).
                with _catching_signals(self.stop), contain.subreaper(), \
                        contextlib.ExitStack() as effects:
                    run = self._context(decision)
                    for effect in self.ledger.during_run:
                        effects.enter_context(effect(self.ledger, run))
                    try:
                        return self._execute(decision)
                    except Interrupted as exc:
                        self._note_interrupt(exc)
                        raise
            finally:
                self.ledger.release_lock()
        finally:
            self.ledger.after_change.remove(feed)
            feed()

    def _context(self, decision: str) -> RunContext:
        plan = self.plan
        rollout = self.options.rollout
        rollout = replace(rollout, max_hosts=rollout.max_hosts or plan.max_hosts,
                          halt_after_failures=plan.halt_after_failures)
        return RunContext(plan_name=plan.name, plan_sha256=plan.sha256,
                          plan_path=str(plan.path), rollout=rollout,
                          resuming=decision == RESUME, idle=decision == DONE,
                          stopping=self.stop.requested, say=self.out.line)

    def _execute(self, decision: str) -> Outcome:
        self.stop.check()  # asked to stop while the listeners started (waiting for a slot)
        leftovers = stop_leftovers(self.ledger.home, self.records)
        already = self._choose_upgrade(decision)
        if already is not None:
            return already
        for item in leftovers:
            self.ledger.annotate("apply.leftover", None, item)
            self.out.line(f"stopped a command left running by a killed run: {item['command']}")
        steps: dict[str, Callable[[], None]] = {
            states.IDLE: self._start_planning,
            states.PLANNING: self._planning,
            states.BACKING_UP: self._backing_up,
            states.UPGRADING: self._upgrading,
            states.VALIDATING: self._validating,
            states.ROLLING_BACK: self._rolling_back,
        }
        doc = self.ledger.document()
        self.done = sum(1 for p in doc["phases"].values() for c in p["components"].values()
                        if c["state"] in (states.COMPLETED, states.SKIPPED))
        # On resume, the versions the stopped run found installed (its probes).
        self.versions = {(p, n): c["from_version"] for p, phase in doc["phases"].items()
                         for n, c in phase["components"].items() if c["from_version"]}
        while (state := self.ledger.state()) not in states.TERMINAL_STATES:
            self.stop.check()
            self.label = state
            self._progress()
            steps[state]()
        self.ledger.save_to_history()
        doc = self.ledger.document()
        return Outcome(self.uid, state, resumed=self.resumed, error=doc.get("error"),
                       rolled_back=tuple(self._rolled_back()))

    def _decide(self) -> str:
        """What this run does (``RESUME``, ``NEW`` or ``DONE``), decided before it
        changes anything: resume the current upgrade if it runs this plan, do nothing
        when it applied the plan already, else start a new one."""
        current = self.ledger.current_id()
        if current is None:
            return NEW
        doc = self.ledger.document()
        state, outcome = doc["current_state"], doc["outcome"]
        same = plan_digest(self.ledger, current) == self.plan.sha256
        if same and (states.is_in_progress(state) or (state == states.IDLE and
                                                       outcome is None)):
            return RESUME
        if same and outcome == states.COMPLETED and not self.options.again:
            return DONE
        if states.is_in_progress(state) and not self.options.supersede:
            raise Conflict(
                f"upgrade {current} is in progress ({state}) for "
                + ("another plan" if plan_digest(self.ledger, current) else
                   "no plan file") + "; resume it with its own plan, or start this "
                "one with --supersede (ends it as FAILED)")
        return NEW

    def _choose_upgrade(self, decision: str) -> Outcome | None:
        """Act on the decision: resume the current upgrade, say there is nothing to
        do, or start a new upgrade."""
        current = self.ledger.current_id()
        if decision == RESUME and current is not None:
            state = self.ledger.state()
            self.uid, self.resumed = current, True
            if states.is_in_progress(state):
                self.ledger.resume()  # records the resume in the trail
            self.out.line(f"resuming upgrade {current} ({state}) of {self.plan.path}")
            return None
        if decision == DONE and current is not None:
            self.out.line(f"upgrade {current} already applied this plan (COMPLETED); "
                          "nothing to do (--again starts it anew)")
            return Outcome(current, states.COMPLETED, already_applied=True)
        self.uid = self._new_upgrade()
        self.ledger.annotate(PLAN_EVENT, None, {"sha256": self.plan.sha256,
                                                "path": str(self.plan.path),
                                                "name": self.plan.name})
        self.out.line(f"upgrade {self.uid}: {self.plan.name} ({self.total} components in "
                      f"{len(self.plan.phases)} phases) from {self.plan.path}")
        return None

    def _new_upgrade(self) -> str:
        at = clock.now()
        base = f"{self.plan.id_prefix}-{at[:10].replace('-', '')}-{at[11:19].replace(':', '')}"
        for n in range(1, 1000):
            try:
                return self.ledger.init(base if n == 1 else f"{base}-{n}",
                                        supersede=self.options.supersede)
            except UpgradeInProgress:
                raise
            except Conflict:
                continue
        raise Conflict(f"no free upgrade id for {base}")

    def _note_interrupt(self, exc: Interrupted) -> None:
        if not self.uid:
            return
        exc.upgrade_id = self.uid
        with contextlib.suppress(LedgerError):
            exc.state = self.ledger.state()
            self.ledger.annotate("apply.interrupted", None,
                                 {"signal": signal.Signals(exc.signum).name,
                                  "state": exc.state})

    # -- the states ------------------------------------------------------------------

    def _start_planning(self) -> None:
        self.ledger.set_state(states.PLANNING)

    def _planning(self) -> None:
        self.ledger.plan(self.plan.ledger_plan())
        self.ledger.set_state(states.BACKING_UP)

    def _backing_up(self) -> None:
        """Back up every component not yet backed up (nothing has changed yet, so a
        failure here ends the upgrade FAILED with nothing to roll back)."""
        recorded = {p["backup_path"] for p in self.ledger.rollback_info()["components"]}
        comps = self._component_states()
        for phase in self.plan.phases:
            todo = [c for c in phase.components if comps[c.key] == states.PENDING
                    and str(backup_dir(self.ledger.home, self.uid, c)) not in recorded]
            if not self._drive([self._backup_job(c) for c in todo], phase.max_parallel):
                self.ledger.set_state(states.FAILED, error=self.error)
                return
        self.ledger.set_state(states.UPGRADING)

    def _upgrading(self) -> None:
        """Phases in order; in each, up to max_parallel components at once."""
        doc = self.ledger.document()
        for phase in self.plan.phases:
            if doc["phases"][phase.name]["state"] in (states.COMPLETED, states.SKIPPED):
                continue
            comps = self._component_states()
            todo = [c for c in phase.components
                    if comps[c.key] not in (states.COMPLETED, states.SKIPPED)]
            self.ledger.phase_start(phase.name)
            if not self._drive([self._upgrade_job(c, comps[c.key]) for c in todo],
                               phase.max_parallel):
                self.ledger.phase_fail(phase.name, self.error)
                self._fail_over()
                return
            comps = self._component_states()
            if all(comps[c.key] == states.SKIPPED for c in phase.components):
                self.ledger.phase_skip(phase.name, "every component was already at its target")
            else:
                self.ledger.phase_complete(phase.name)
        self.ledger.set_state(states.VALIDATING)

    def _validating(self) -> None:
        """Validate every upgraded component again, now that all are upgraded; a
        component upgraded in stages is checked at its last stage only."""
        last = {c.name: c for c in self.plan.components()}
        comps = self._component_states()
        for phase in self.plan.phases:
            todo = [c for c in phase.components
                    if last[c.name] is c and comps[c.key] == states.COMPLETED]
            if not self._drive([self._validate_job(c) for c in todo], phase.max_parallel):
                self._fail_over()
                return
        self.ledger.set_state(states.COMPLETED)
        self.out.line(f"COMPLETED: upgrade {self.uid}")

    def _fail_over(self) -> None:
        if self.survivors:
            # Rolling back beside a step that still runs could undo half of it.
            self.ledger.set_state(states.FAILED, error=f"{self.error}; rollback refused: "
                                  "processes a step started are still running "
                                  f"({', '.join(map(str, self.survivors))})")
            return
        if self.options.rollback:
            self.out.line(f"rolling back: {self.error}")
            self.ledger.set_state(states.ROLLING_BACK, error=self.error)
        else:
            self.ledger.set_state(states.FAILED,
                                  error=f"{self.error} (automatic rollback disabled)")

    def _rolling_back(self) -> None:
        """Undo the changed components in reverse plan order, each backup verified
        first. The first refusal or failure stops the rollback: FAILED."""
        comps = self._component_states()
        undone = {(e["detail"]["phase"], e["subject"]) for e in self.ledger.events(
            upgrade_id=self.uid, kind=ROLLBACK_EVENT, limit=None) if e["detail"].get("ok")}
        points = {p["backup_path"]: p for p in self.ledger.rollback_info()["components"]}
        reason = self.ledger.document().get("error")
        for c in reversed(list(self.plan.components())):
            if comps[c.key] not in CHANGED:
                continue
            if c.key in undone:  # restored by a run stopped before it said so
                self._mark_rolled_back(c, points)
                continue
            self.stop.check()
            self.label = f"ROLLING_BACK {c.phase}/{c.name}"
            self._progress()
            problem = self._verify_backup(c, points)
            self.error = None
            if problem is None and not self._drive([self._rollback_job(c)], 1):
                problem = self.error
            if problem is not None:
                self.ledger.annotate(ROLLBACK_EVENT, c.name,
                                     {"phase": c.phase, "ok": False, "error": problem})
                self.ledger.set_state(states.FAILED, error=f"{reason}; rollback stopped: "
                                      f"{problem}" if reason else problem)
                return
            self.ledger.annotate(ROLLBACK_EVENT, c.name, {
                "phase": c.phase, "ok": True, "sha256": points[self._backup_key(c)]["sha256"],
                "size_bytes": points[self._backup_key(c)]["size_bytes"]})
            self._mark_rolled_back(c, points)
            self.out.line(f"ROLLING_BACK {c.phase}/{c.name}: rolled back (backup verified)")
        self.ledger.set_state(states.ROLLED_BACK)
        undone_now = self._rolled_back()
        self.out.line(f"ROLLED_BACK: upgrade {self.uid} ({reason}); rolled back "
                      f"{len(undone_now)}: {', '.join(undone_now) or 'nothing'}")

    def _mark_rolled_back(self, c: Component, points: Mapping[str, Any]) -> None:
        point = points.get(self._backup_key(c)) or {}
        self.ledger.component_rolled_back(
            c.name, f"rolled back from its backup (sha256 {str(point.get('sha256'))[:12]}, "
                    "verified)", phase=c.phase)

    def _rolled_back(self) -> list[str]:
        """``phase/component`` of each component this upgrade rolled back, in order."""
        return [f"{e['detail']['phase']}/{e['subject']}" for e in self.ledger.events(
            upgrade_id=self.uid, kind=ROLLBACK_EVENT, limit=None) if e["detail"].get("ok")]

    def _backup_key(self, c: Component) -> str:
        return str(backup_dir(self.ledger.home, self.uid, c))

    def _verify_backup(self, c: Component, points: Mapping[str, Any]) -> str | None:
        """Why the backup of *c* cannot be trusted, or None when it checks out."""
        point = points.get(self._backup_key(c))
        if point is None or not point["sha256"]:
            return f"{c.name} ({c.phase}): no verified backup recorded; rollback refused"
        try:
            # Looked at right before it is read: not through a link planted since.
            self.ledger.home.private_dir(Path(point["backup_path"]), create=False)
            size, sha256, _ = backups.digest(Path(point["backup_path"]))
        except StorageError as exc:
            return f"{c.name} ({c.phase}): {exc}; rollback refused"
        if sha256 != point["sha256"] or size != point["size_bytes"]:
            return (f"{c.name} ({c.phase}): backup {point['backup_path']} changed since it "
                    f"was taken (sha256 {sha256[:12]}…, {size} B; recorded "
                    f"{point['sha256'][:12]}…, {point['size_bytes']} B); rollback refused")
        return None


class _EventFeed:
    """After each change, hands the reporter the events recorded since the last call
    (a reporter that streams every change, such as ``apply --json``)."""

    def __init__(self, ledger: Ledger, reporter: Reporter) -> None:
        self.ledger = ledger
        self.reporter = reporter
        with ledger.db.read() as tx:
            self.after = int(tx.scalar(
                "SELECT COALESCE(MAX(id), 0) FROM events WHERE host = :host"))

    def __call__(self) -> None:
        for event in self.ledger.events(after_id=self.after, limit=None):
            self.after = event["id"]
            self.reporter.event(event)


@contextlib.contextmanager
def _catching_signals(stop: Stop) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP only set a flag; the run stops at its next safe
    point. (A dropped ssh session sends SIGHUP: it ends the run as ``kill`` does,
    releasing the lock, instead of killing the process where it stands.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in previous:
        signal.signal(sig, stop.request)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
