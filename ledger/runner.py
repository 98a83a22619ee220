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
import shutil
import signal
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from ledger import backups, clock, states
from ledger.api import Ledger
from ledger.commands import Result, Running, stop_leftovers
from ledger.errors import Conflict, LedgerError, StorageError, UpgradeInProgress
from ledger.home import Home, make_private_dir
from ledger.plan import Component, Plan
from ledger.scheduler import Exec, Interrupted, Job, Pause, Stop, drive

__all__ = ["Interrupted", "Options", "Outcome", "Reporter", "Run", "apply", "plan_digest"]

#: The annotation that ties an upgrade to the plan file driving it.
PLAN_EVENT = "apply.plan"
ROLLBACK_EVENT = "apply.rollback"
#: Components a rollback must undo: their upgrade has begun.
CHANGED = (states.COMPLETED, states.UPGRADING, states.FAILED)

#: A piece of a job: yields requests, receives results, returns a value.
Steps = Generator[Exec | Pause, Result | None, Any]


class Reporter(Protocol):
    """Where a run tells the operator what happens (the CLI draws lines and a bar)."""

    def line(self, text: str) -> None: ...

    def progress(self, done: int, total: int, label: str) -> None: ...

    def failure(self, text: str, tail: Sequence[str]) -> None: ...


class Quiet:
    """A reporter that says nothing (the Python API's default)."""

    def line(self, text: str) -> None:
        pass

    def progress(self, done: int, total: int, label: str) -> None:
        pass

    def failure(self, text: str, tail: Sequence[str]) -> None:
        pass


@dataclass(frozen=True)
class Options:
    """How to run: roll back automatically; end another plan's upgrade in progress;
    start anew even when the current upgrade already completed this plan."""

    rollback: bool = True
    supersede: bool = False
    again: bool = False


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``state`` is COMPLETED, ROLLED_BACK or FAILED."""

    upgrade_id: str
    state: str
    resumed: bool = False
    already_applied: bool = False
    error: str | None = None


def apply(ledger: Ledger, plan: Plan, options: Options = Options(),
          reporter: Reporter | None = None) -> Outcome:
    """Run *plan* on *ledger* (or resume it); see ``Run``."""
    return Run(ledger, plan, options, reporter or Quiet()).execute()


def plan_digest(ledger: Ledger, upgrade_id: str) -> str | None:
    """The sha256 of the plan file recorded for an upgrade, or None."""
    found = ledger.events(upgrade_id=upgrade_id, kind=PLAN_EVENT, limit=None)
    return found[-1]["detail"].get("sha256") if found else None


def backup_dir(home: Home, upgrade_id: str, component: Component) -> Path:
    """``<home>/backups/<upgrade id>/<phase>/<component>``, absolute."""
    root = home.backups_dir.absolute()
    return root / upgrade_id / component.phase / component.name


class Run:
    """One run of a plan. ``execute`` holds the lock and moves the state machine."""

    def __init__(self, ledger: Ledger, plan: Plan, options: Options, reporter: Reporter) -> None:
        self.ledger = ledger
        self.plan = plan
        self.options = options
        self.out = reporter
        self.stop = Stop()
        self.uid = ""
        self.resumed = False
        self.versions: dict[tuple[str, str], str] = {}  # installed version seen per stage
        self.error: str | None = None
        self.error_tail: Sequence[str] = ()
        self.done = 0
        self.total = sum(len(p.components) for p in plan.phases)
        self.active: dict[tuple[str, str], str] = {}
        self.label = ""
        self.records = ledger.home.logs_dir.absolute() / ".running"

    # -- the run -------------------------------------------------------------------

    def execute(self) -> Outcome:
        """Take the lock, run (or resume) the plan, release the lock."""
        self.ledger.acquire_lock()
        try:
            with _catching_signals(self.stop):
                try:
                    return self._execute()
                except Interrupted as exc:
                    self._note_interrupt(exc)
                    raise
        finally:
            self.ledger.release_lock()

    def _execute(self) -> Outcome:
        leftovers = stop_leftovers(self.records)
        already = self._choose_upgrade()
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
        while (state := self.ledger.state()) not in states.TERMINAL_STATES:
            self.stop.check()
            self.label = state
            self._progress()
            steps[state]()
        self.ledger.save_to_history()
        doc = self.ledger.document()
        return Outcome(self.uid, state, resumed=self.resumed, error=doc.get("error"))

    def _choose_upgrade(self) -> Outcome | None:
        """Resume the current upgrade if it runs this plan; else start a new one."""
        current = self.ledger.current_id()
        if current is not None:
            doc = self.ledger.document()
            state, outcome = doc["current_state"], doc["outcome"]
            same = plan_digest(self.ledger, current) == self.plan.sha256
            if same and (states.is_in_progress(state) or (state == states.IDLE and
                                                           outcome is None)):
                self.uid, self.resumed = current, True
                if states.is_in_progress(state):
                    self.ledger.resume()  # records the resume in the trail
                self.out.line(f"resuming upgrade {current} ({state}) of {self.plan.path}")
                return None
            if same and outcome == states.COMPLETED and not self.options.again:
                self.out.line(f"upgrade {current} already applied this plan (COMPLETED); "
                              "nothing to do (--again starts it anew)")
                return Outcome(current, states.COMPLETED, already_applied=True)
            if states.is_in_progress(state) and not self.options.supersede:
                raise Conflict(
                    f"upgrade {current} is in progress ({state}) for "
                    + ("another plan" if plan_digest(self.ledger, current) else
                       "no plan file") + "; resume it with its own plan, or start this "
                    "one with --supersede (ends it as FAILED)")
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
            if comps[c.key] not in CHANGED or c.key in undone:
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
            self.out.line(f"ROLLING_BACK {c.phase}/{c.name}: rolled back (backup verified)")
        self.ledger.set_state(states.ROLLED_BACK)
        self.out.line(f"ROLLED_BACK: upgrade {self.uid} ({reason})")

    def _backup_key(self, c: Component) -> str:
        return str(backup_dir(self.ledger.home, self.uid, c))

    def _verify_backup(self, c: Component, points: Mapping[str, Any]) -> str | None:
        """Why the backup of *c* cannot be trusted, or None when it checks out."""
        point = points.get(self._backup_key(c))
        if point is None or not point["sha256"]:
            return f"{c.name} ({c.phase}): no verified backup recorded; rollback refused"
        try:
            size, sha256, _ = backups.digest(Path(point["backup_path"]))
        except StorageError as exc:
            return f"{c.name} ({c.phase}): {exc}; rollback refused"
        if sha256 != point["sha256"] or size != point["size_bytes"]:
            return (f"{c.name} ({c.phase}): backup {point['backup_path']} changed since it "
                    f"was taken (sha256 {sha256[:12]}…, {size} B; recorded "
                    f"{point['sha256'][:12]}…, {point['size_bytes']} B); rollback refused")
        return None

    # -- jobs (generators driven by the scheduler) -----------------------------------

    def _backup_job(self, c: Component) -> Callable[[], Job]:
        def job() -> Job:
            if c.probe is not None:
                version = yield from self._probe(c)
                if version is None:
                    return False
                if self._skip_if_done(c, version):
                    return True
            folder = backup_dir(self.ledger.home, self.uid, c)
            result = yield from self._attempts(c, "backup", before=lambda: _empty(folder))
            if not result.ok:
                return self._failed(c, f"backup {result.describe()}", result)
            try:
                size, sha256, files = backups.digest(folder)
            except StorageError as exc:
                return self._failed(c, str(exc), result)
            self.ledger.mark_rollback_point(c.name, folder, size_bytes=size, sha256=sha256,
                                            phase=c.phase)
            self._say(c, "BACKING_UP", f"backed up {files} files, {size} B, "
                      f"sha256 {sha256[:12]} ({result.duration_s:.2f} s)")
            return True

        return job

    def _upgrade_job(self, c: Component, state: str) -> Callable[[], Job]:
        def job() -> Job:
            led = self.ledger
            if state == states.UPGRADING:  # a run stopped mid-upgrade: check it first
                result = cast(Result, (yield Exec(c, "validate")))
                if result.ok:
                    led.component_complete(c.name, phase=c.phase)
                    self._finished(c, "was interrupted; validates: completed without "
                                      "upgrading again")
                    return True
                led.component_fail(c.name, "interrupted; validation after resume: "
                                   f"{result.describe()}", phase=c.phase)
                self._say(c, "UPGRADING", "was interrupted and does not validate: "
                          "upgrading again")
            elif c.probe is not None:
                version = yield from self._probe(c)
                error = None
                if version is None:
                    error = self.error or "probe failed"
                elif self._skip_if_done(c, version):
                    return True
                elif c.from_version is not None and version != c.from_version:
                    error = (f"installed version is {version}, but the plan upgrades from "
                             f"{c.from_version}")
                    self._failed(c, error, None)
                if error is not None:  # recorded on the component: it never started
                    led.component_start(c.name, version, c.to_version, phase=c.phase)
                    led.component_fail(c.name, error, phase=c.phase)
                    return False
            frm = self.versions.get(c.key) or c.from_version
            for attempt in range(1, c.retries + 2):
                led.component_start(c.name, frm, c.to_version, phase=c.phase)
                result = cast(Result, (yield Exec(c, "upgrade", attempt)))
                step = "upgrade"
                if result.ok:
                    result = cast(Result, (yield Exec(c, "validate", attempt)))
                    step = "validate"
                if result.ok:
                    led.component_complete(c.name, phase=c.phase)
                    self._finished(c, f"{frm or '?'} -> {c.to_version}: upgraded and "
                                      f"validated (attempt {attempt})")
                    return True
                error = f"{step} {result.describe()} (attempt {attempt} of {c.retries + 1})"
                led.component_fail(c.name, error, phase=c.phase)
                if attempt > c.retries:
                    return self._failed(c, error, result)
                delay = c.backoff_s * 2 ** (attempt - 1)
                self._say(c, "UPGRADING", f"{error}; retrying in {delay:g} s")
                yield Pause(delay)
            return False  # not reached: the last attempt returns above

        return job

    def _validate_job(self, c: Component) -> Callable[[], Job]:
        def job() -> Job:
            result = yield from self._attempts(c, "validate")
            if not result.ok:
                return self._failed(c, f"final validation: validate {result.describe()}",
                                    result)
            self._say(c, "VALIDATING", "valid")
            return True

        return job

    def _rollback_job(self, c: Component) -> Callable[[], Job]:
        def job() -> Job:
            result = yield from self._attempts(c, "rollback")
            if not result.ok:
                return self._failed(c, f"rollback {result.describe()}", result)
            return True

        return job

    def _attempts(self, c: Component, step: str, *, before: Callable[[], None] | None = None,
                  ) -> Steps:
        """Run *step* with the component's retries and backoff; return the last Result."""
        for attempt in range(1, c.retries + 2):
            if before is not None:
                before()
            result = cast(Result, (yield Exec(c, step, attempt)))
            if result.ok or attempt > c.retries:
                return result
            delay = c.backoff_s * 2 ** (attempt - 1)
            self._say(c, step.upper(), f"{step} {result.describe()} (attempt {attempt} of "
                      f"{c.retries + 1}); retrying in {delay:g} s")
            yield Pause(delay)
        raise AssertionError("unreachable")

    def _probe(self, c: Component) -> Steps:
        """Run the probe; return the installed version it printed, or None (failed)."""
        result: Result = yield from self._attempts(c, "probe")
        version = result.output.strip().splitlines()[0].strip() if result.output.strip() else ""
        if not result.ok or not version or " " in version or len(version) > 128:
            error = (f"probe {result.describe()}" if not result.ok else
                     f"probe printed {version[:40]!r}, not a version")
            self._failed(c, error, result)
            return None
        self.versions[c.key] = version
        return version

    def _skip_if_done(self, c: Component, version: str) -> bool:
        targets = self.plan.targets_from(c)
        if version not in targets:
            return False
        why = "the target" if version == c.to_version else "the target of a later stage"
        self.ledger.component_skip(c.name, f"probe reported {version} ({why})", phase=c.phase)
        self._finished(c, f"skipped: probe reported {version} ({why})")
        return True

    # -- running commands -------------------------------------------------------------

    def _drive(self, jobs: Sequence[Callable[[], Job]], limit: int) -> bool:
        results = drive(jobs, limit, self._start, self.stop)
        return all(r is not False for r in results)

    def _start(self, request: Exec) -> Running:
        c = request.component
        log_dir = self.ledger.home.logs_dir.absolute() / self.uid
        make_private_dir(log_dir)
        log = log_dir / f"{c.name}.log"
        env = command_env(self.ledger.home, self.plan, self.uid, c, step=request.step,
                          from_version=self.versions.get(c.key) or c.from_version)
        env["LEDGER_ATTEMPT"] = str(request.attempt)
        env["LEDGER_LOG"] = str(log)
        command = c.command(request.step)
        running = Running(command.run, env=env, cwd=self.plan.base_dir,
                          timeout_s=command.timeout_s, log=log,
                          label=f"{c.phase}/{c.name} {request.step} attempt {request.attempt}",
                          capture=request.step == "probe", records=self.records)
        self.active[c.key] = request.step
        self._progress()
        return running

    # -- reporting --------------------------------------------------------------------

    def _failed(self, c: Component, error: str, result: Result | None) -> bool:
        self.active.pop(c.key, None)
        text = f"{c.phase}/{c.name}: {error}"
        if self.error is None:
            self.error, self.error_tail = text, (result.tail if result else ())
        log = Path(self.ledger.home.logs_dir) / self.uid / f"{c.name}.log"
        self.out.failure(f"{self.label} {text} (log: {log})", result.tail if result else ())
        return False

    def _finished(self, c: Component, text: str) -> None:
        self.done += 1
        self._say(c, self.label, text)

    def _say(self, c: Component, label: str, text: str) -> None:
        self.active.pop(c.key, None)
        self.out.line(f"{label} {c.phase}/{c.name}: {text}")
        self._progress()

    def _progress(self) -> None:
        running = ", ".join(f"{name} {step}" for (_, name), step in self.active.items())
        self.out.progress(self.done, self.total,
                          f"{self.label} {running}".strip() if running else self.label)

    def _component_states(self) -> dict[tuple[str, str], str]:
        doc = self.ledger.document()
        return {(p, n): c["state"] for p, phase in doc["phases"].items()
                for n, c in phase["components"].items()}


def command_env(home: Home, plan: Plan, upgrade_id: str, c: Component, *, step: str,
                from_version: str | None) -> dict[str, str]:
    """The environment of a plan command: the caller's, plus the LEDGER_* variables."""
    env = dict(os.environ)
    env.update({
        "LEDGER_HOME": str(home.root.absolute()),
        "LEDGER_UPGRADE_ID": upgrade_id,
        "LEDGER_PHASE": c.phase,
        "LEDGER_COMPONENT": c.name,
        "LEDGER_FROM_VERSION": from_version or "",
        "LEDGER_TO_VERSION": c.to_version,
        "LEDGER_BACKUP_DIR": str(backup_dir(home, upgrade_id, c)),
        "LEDGER_STEP": step,
        "LEDGER_PLAN_DIR": str(plan.base_dir),
    })
    return env


def _empty(folder: Path) -> None:
    """Give a backup command an empty folder (a half-made backup is thrown away)."""
    if folder.exists():
        shutil.rmtree(folder)
    make_private_dir(folder)


@contextlib.contextmanager
def _catching_signals(stop: Stop) -> Iterator[None]:
    """SIGINT and SIGTERM only set a flag; the run stops at its next safe point."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, stop.request)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
