"""The ``apply`` command: run an upgrade plan, resumably.

A thin layer over ``ledger.runner`` (the run) and ``ledger.preview`` (``--dry-run``):
it loads the plan, draws progress (or streams JSON lines), and turns the outcome into
an exit code. Output nobody reads any more (``| head``, a dropped ssh session) is
dropped: the run goes on.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ledger.cli.app import EXIT_INTERRUPTED, MAX_SECONDS, Config, NumberRange, fail, pass_config
from ledger.cli.output import echo_or_drop, output_option, pick, render
from ledger.core import clock

if TYPE_CHECKING:
    from ledger.apply.plan import Plan
    from ledger.apply.runner import Outcome

#: Exit codes of ``apply`` beyond the common ones (docs/apply.md).
EXIT_ROLLED_BACK = 11
EXIT_FAILED = 12
EXIT_PREVIEW_FAILS = 13
PREVIEW_COLUMNS = ["phase", "component", "from", "to", "installed", "action"]


class Console:
    """Progress for an operator: plain time-stamped lines, plus a bar redrawn in place
    on the last line when stdout is a terminal."""

    def __init__(self, *, bar: bool) -> None:
        self.bar = bar
        self.drawn = False
        self.state = (0, 0, "")

    def line(self, text: str) -> None:
        self._clear()
        echo_or_drop(f"{time.strftime('%H:%M:%S')} {text}")
        self._draw()

    def progress(self, done: int, total: int, label: str) -> None:
        self.state = (done, total, label)
        self._draw()

    def failure(self, text: str, tail: Sequence[str]) -> None:
        self._clear()
        echo_or_drop(f"{time.strftime('%H:%M:%S')} ERROR {text}", err=True)
        for line in tail:
            echo_or_drop(f"    | {line}", err=True)
        self._draw()

    def event(self, event: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        self._clear()

    def _draw(self) -> None:
        done, total, label = self.state
        if not self.bar or not total:
            return
        width = shutil.get_terminal_size().columns
        cells = 24
        filled = cells * done // total if total else 0
        text = f"[{'#' * filled}{'-' * (cells - filled)}] {done}/{total} {label}"
        self.drawn = echo_or_drop("\r\x1b[K" + text[:max(width - 1, 10)], nl=False)

    def _clear(self) -> None:
        if self.drawn:
            echo_or_drop("\r\x1b[K", nl=False)
            self.drawn = False


class JsonLines:
    """``apply --json``: one JSON object per line on stdout, as things happen.

    ``{"type": "event", "event": {...}}`` for every change the run records (the
    object ``events --json`` prints), ``{"type": "message", "at", "text"}`` for what
    the run says, ``{"type": "failure", "at", "text", "tail"}`` for a step that
    failed for good, and last ``{"type": "outcome", ...}``.
    """

    def line(self, text: str) -> None:
        self._emit({"type": "message", "at": clock.now(), "text": text})

    def progress(self, done: int, total: int, label: str) -> None:
        pass

    def failure(self, text: str, tail: Sequence[str]) -> None:
        self._emit({"type": "failure", "at": clock.now(), "text": text, "tail": list(tail)})

    def event(self, event: Mapping[str, Any]) -> None:
        self._emit({"type": "event", "event": dict(event)})

    def outcome(self, outcome: Outcome | None, *, interrupted: str | None = None,
                upgrade_id: str | None = None, state: str | None = None) -> None:
        data: dict[str, Any] = {
            "type": "outcome", "upgrade_id": upgrade_id, "state": state, "error": None,
            "resumed": False, "already_applied": False, "rolled_back": [],
            "interrupted": interrupted}
        if outcome is not None:
            data.update(upgrade_id=outcome.upgrade_id, state=outcome.state,
                        error=outcome.error, resumed=outcome.resumed,
                        already_applied=outcome.already_applied,
                        rolled_back=list(outcome.rolled_back))
        self._emit(data)

    def close(self) -> None:
        pass

    @staticmethod
    def _emit(data: Mapping[str, Any]) -> None:
        echo_or_drop(json.dumps(data, ensure_ascii=False))


@click.command("apply")
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True,
              help="Print the plan and what would be skipped or run; change nothing "
                   "(probe commands do run: they must only read).")
@click.option("--no-rollback", is_flag=True,
              help="On failure, leave the upgrade FAILED for a human instead of rolling "
                   "back automatically.")
@click.option("--supersede", is_flag=True,
              help="If another plan's upgrade is in progress, end it as FAILED and start "
                   "this one (it stays in the ledger).")
@click.option("--again", is_flag=True,
              help="Start a new upgrade even if the current one already completed this plan.")
@click.option("--plain", is_flag=True,
              help="Plain lines only, even on a terminal (no progress bar).")
@click.option("--max-hosts", type=click.IntRange(1, 100_000), metavar="N",
              help="At most N hosts of the fleet run this plan at once (overrides the "
                   "plan's [fleet] max_hosts; docs/fleet.md).")
@click.option("--wait-timeout", "wait_timeout_s", type=NumberRange(0, MAX_SECONDS),
              metavar="SECONDS",
              help="Wait at most this long for a free slot [default: as long as it takes].")
@click.option("--no-wait", is_flag=True,
              help="When every slot is taken, exit 14 at once instead of waiting.")
@click.option("--ignore-brake", is_flag=True,
              help="Start even though halt_after_failures hosts ended this plan FAILED or "
                   "ROLLED_BACK (recorded as a brake.ignored event).")
@click.option("--fleet-optional", is_flag=True,
              help="When the fleet database cannot be reached, run without the plan's "
                   "[fleet] limits instead of refusing to start (exit 16).")
@output_option()
@pass_config
def apply_cmd(cfg: Config, *, plan_file: Path, dry_run: bool, no_rollback: bool,
              supersede: bool, again: bool, plain: bool, max_hosts: int | None,
              wait_timeout_s: float | None, no_wait: bool, ignore_brake: bool,
              fleet_optional: bool, fmt: str, as_json: bool) -> None:
    """Run the upgrade plan PLAN (TOML): back up, upgrade and validate every
    component, rolling back automatically on failure.

    Running it again after a crash, a reboot or Ctrl-C resumes where it stopped;
    once the plan is applied it does nothing. The lock is held for the whole run.
    --json streams one JSON object per line (every change, then the outcome).
    A plan's [fleet] table makes the run one of a rolling upgrade: it takes one of
    max_hosts slots first (waiting for one), and refuses to start once
    halt_after_failures hosts ended the plan badly (docs/fleet.md).
    Exit codes: 0 completed, 11 rolled back, 12 failed (needs a human), 13 the dry
    run found a component that would fail, 14 no free slot, 15 the failure brake is
    on, 16 the fleet database cannot be reached, 4 lock held, 6 bad plan, 9 another
    upgrade in progress, 129/130/143 interrupted (SIGHUP/SIGINT/SIGTERM). The plan
    format and every rule: docs/apply.md.
    """
    # Imported here, not at the top: every per-step command loads this module.
    from ledger.apply import plan as plans  # noqa: PLC0415

    plan = plans.load(plan_file)
    if dry_run:
        _dry_run(cfg, plan, supersede=supersede, again=again, fmt=pick(fmt, as_json))
        return

    from ledger.apply import runner  # noqa: PLC0415

    try:
        ledger = runner.open_ledger(cfg.home, db_url=cfg.db_url, strict=cfg.strict,
                                    lock_timeout_s=cfg.lock_timeout_s, host_name=cfg.host_name,
                                    fleet_url=cfg.fleet_url)
    except KeyboardInterrupt:
        # A new ledger is created whole or not at all, and nothing is recorded yet.
        fail("interrupted before the run started; nothing was recorded: run the same apply "
             "again", EXIT_INTERRUPTED)
    json_lines = pick(fmt, as_json) == "json"
    reporter: Console | JsonLines = JsonLines() if json_lines else \
        Console(bar=sys.stdout.isatty() and not plain)
    from ledger.core.rollout import Rollout  # noqa: PLC0415

    options = runner.Options(rollback=not no_rollback, supersede=supersede, again=again,
                             rollout=Rollout(max_hosts=max_hosts, wait=not no_wait,
                                             wait_timeout_s=wait_timeout_s,
                                             ignore_brake=ignore_brake,
                                             optional=fleet_optional))
    try:
        outcome = runner.apply(ledger, plan, options, reporter)
    except runner.Interrupted as exc:
        reporter.close()
        name = signal.Signals(exc.signum).name
        if isinstance(reporter, JsonLines):
            reporter.outcome(None, interrupted=name, upgrade_id=exc.upgrade_id,
                             state=exc.state)
        where = (f"; upgrade {exc.upgrade_id} left {exc.state} and unlocked: run the same "
                 "apply again to resume") if exc.upgrade_id else ""
        fail(f"interrupted by {name}{where}", 128 + exc.signum)
    finally:
        reporter.close()
        ledger.close()
    if isinstance(reporter, JsonLines):
        reporter.outcome(outcome)
    if outcome.already_applied:
        return
    if outcome.state != "COMPLETED":
        code = EXIT_ROLLED_BACK if outcome.state == "ROLLED_BACK" else EXIT_FAILED
        fail(f"upgrade {outcome.upgrade_id} {outcome.state}: {outcome.error}", code)


def _dry_run(cfg: Config, plan: Plan, *, supersede: bool, again: bool, fmt: str) -> None:
    from ledger.apply.preview import preview_home  # noqa: PLC0415

    data = preview_home(cfg.home, plan, db_url=cfg.db_url, lock_timeout_s=cfg.lock_timeout_s,
                        supersede=supersede, again=again, host_name=cfg.host_name)
    failing = [row for row in data["components"] if row["action"].startswith("fail")]
    if fmt == "json":
        render(data, fmt)
    else:
        click.echo(f"plan {data['plan']} (sha256 {data['sha256'][:12]}): {data['action']}")
        render(data["components"], fmt, PREVIEW_COLUMNS)
        for row in failing:
            click.echo(f"{row['phase']}/{row['component']}: {row['action']}", err=True)
            for line in row["stderr"]:
                click.echo(f"    | {line}", err=True)
    if failing:
        fail(f"{len(failing)} component(s) would fail: "
             + ", ".join(f"{r['phase']}/{r['component']}" for r in failing), EXIT_PREVIEW_FAILS)


COMMANDS: list[click.Command] = [apply_cmd]
