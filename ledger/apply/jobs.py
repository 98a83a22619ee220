"""One component's work in an ``apply`` run, as jobs for the scheduler.

A job probes, backs up, upgrades, validates or rolls back one component: it yields
the commands to run (``ledger.scheduler.Exec``), retries them with backoff, and
records each outcome through the ``Ledger`` API. The state flow that strings the
jobs together lives in ``ledger.runner``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from ledger.api import Ledger
from ledger.apply import backups
from ledger.apply.plan import Component, Plan
from ledger.apply.scheduler import Exec, Job, Pause, Stop, drive
from ledger.apply.shell import Result, Running
from ledger.core import states
from ledger.errors import StorageError
from ledger.store.home import Home

#: A piece of a job: yields requests, receives results, returns a value.
Steps = Generator[Exec | Pause, Result | None, Any]


class Reporter(Protocol):
    """Where a run tells the operator what happens (the CLI draws lines and a bar)."""

    def line(self, text: str) -> None: ...

    def progress(self, done: int, total: int, label: str) -> None: ...

    def failure(self, text: str, tail: Sequence[str]) -> None: ...

    def event(self, event: Mapping[str, Any]) -> None: ...


class Quiet:
    """A reporter that says nothing (the Python API's default)."""

    def line(self, text: str) -> None:
        pass

    def progress(self, done: int, total: int, label: str) -> None:
        pass

    def failure(self, text: str, tail: Sequence[str]) -> None:
        pass

    def event(self, event: Mapping[str, Any]) -> None:
        pass


def backup_dir(home: Home, upgrade_id: str, component: Component) -> Path:
    """``<home>/backups/<upgrade id>/<phase>/<component>``, absolute."""
    root = home.backups_dir.absolute()
    return root / upgrade_id / component.phase / component.name


class Jobs:
    """What happens to one component: probe, back up, upgrade, validate, roll back.

    Each job is a generator the scheduler drives (``ledger.scheduler``): it yields
    the commands to run and makes the ledger changes between them, one transaction
    each, in this process. ``Run`` (ledger.runner) builds on it with the state flow.
    """

    def __init__(self, ledger: Ledger, plan: Plan, reporter: Reporter) -> None:
        self.ledger = ledger
        self.plan = plan
        self.out = reporter
        self.stop = Stop()
        self.uid = ""
        self.versions: dict[tuple[str, str], str] = {}  # installed version seen per stage
        self.error: str | None = None  # the first failure of the current step
        self.done = 0
        self.total = sum(len(p.components) for p in plan.phases)
        self.active: dict[tuple[str, str], str] = {}
        #: Processes a step started that could not be stopped: no rollback beside them.
        self.survivors: list[int] = []
        self.label = ""
        self.records = ledger.home.logs_dir.absolute() / ".running"

    # -- jobs (generators driven by the scheduler) -----------------------------------

    def _backup_job(self, c: Component) -> Callable[[], Job]:
        def job() -> Job:
            if c.probe is not None:
                version, _ = yield from self._probe(c)
                if version is None:
                    return False
                if self._skip_if_done(c, version):
                    return True
            folder = backup_dir(self.ledger.home, self.uid, c)
            result = yield from self._attempts(
                c, "backup", before=lambda: _empty(self.ledger.home, folder))
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
                version, error = yield from self._probe(c)
                if version is not None and self._skip_if_done(c, version):
                    return True
                if version is not None and c.from_version not in (None, version):
                    error = (f"installed version is {version}, but the plan upgrades from "
                             f"{c.from_version}")
                    self._failed(c, error, None)
                if error is not None:  # recorded on the component, though it never began
                    led.component_start(c.name, version, c.to_version, phase=c.phase)
                    led.component_fail(c.name, error, phase=c.phase)
                    return False
            frm = self.versions.get(c.key) or c.from_version
            last = 0
            for tries in range(c.retries + 1):
                led.component_start(c.name, frm, c.to_version, phase=c.phase)
                # Numbered as the ledger counts attempts, so that the output, the log and
                # LEDGER_ATTEMPT say what `show` says, also across a resumed run.
                attempt = led.component_status(c.name, phase=c.phase)["attempts"]
                last = last or attempt + c.retries
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
                error = f"{step} {result.describe()} (attempt {attempt} of {last})"
                led.component_fail(c.name, error, phase=c.phase)
                if tries == c.retries or result.survivors:
                    return self._failed(c, error, result)
                delay = c.backoff_s * 2 ** tries
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
            if result.ok or attempt > c.retries or result.survivors:
                return result
            delay = c.backoff_s * 2 ** (attempt - 1)
            self._say(c, step.upper(), f"{step} {result.describe()} (attempt {attempt} of "
                      f"{c.retries + 1}); retrying in {delay:g} s")
            yield Pause(delay)
        raise AssertionError("unreachable")

    def _probe(self, c: Component) -> Steps:
        """Run the probe; return (the installed version it printed, None) or, when it
        failed, (None, why)."""
        result: Result = yield from self._attempts(c, "probe")
        version = result.output.strip().splitlines()[0].strip() if result.output.strip() else ""
        if not result.ok or not version or " " in version or len(version) > 128:
            error = (f"probe {result.describe()}" if not result.ok else
                     f"probe printed {version[:40]!r}, not a version")
            self._failed(c, error, result)
            return None, error
        self.versions[c.key] = version
        return version, None

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
        # Looked at right before each command, under the lock: a link planted in the
        # home since is refused, never written through.
        log_dir = self.ledger.home.private_dir(self.ledger.home.logs_dir / self.uid)
        self.ledger.home.private_dir(self.records)
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
        if result is not None:
            self.survivors += result.survivors
        text = f"{c.phase}/{c.name}: {error}"
        if self.error is None:
            self.error = text
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


def _empty(home: Home, folder: Path) -> None:
    """Give a backup command an empty folder (a half-made backup is thrown away); a
    link planted on the way to it is refused, never followed."""
    home.private_dir(folder)
    shutil.rmtree(folder)  # removes what is inside, never following a link
    home.private_dir(folder)
