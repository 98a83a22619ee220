"""The ``apply`` command: run an upgrade plan, resumably.

A thin layer over ``ledger.runner`` (the run) and ``ledger.preview`` (``--dry-run``):
it loads the plan, draws progress, and turns the outcome into an exit code.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ledger.cli.app import EXIT_INTERRUPTED, Config, fail, pass_config
from ledger.cli.output import output_option, pick, render

if TYPE_CHECKING:
    from ledger.apply.plan import Plan

#: Exit codes of ``apply`` beyond the common ones (docs/apply.md).
EXIT_ROLLED_BACK = 11
EXIT_FAILED = 12
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
        click.echo(f"{time.strftime('%H:%M:%S')} {text}")
        self._draw()

    def progress(self, done: int, total: int, label: str) -> None:
        self.state = (done, total, label)
        self._draw()

    def failure(self, text: str, tail: Sequence[str]) -> None:
        self._clear()
        click.echo(f"{time.strftime('%H:%M:%S')} ERROR {text}", err=True)
        for line in tail:
            click.echo(f"    | {line}", err=True)
        self._draw()

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
        click.echo("\r\x1b[K" + text[:max(width - 1, 10)], nl=False)
        self.drawn = True

    def _clear(self) -> None:
        if self.drawn:
            click.echo("\r\x1b[K", nl=False)
            self.drawn = False


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
@output_option()
@pass_config
def apply_cmd(cfg: Config, *, plan_file: Path, dry_run: bool, no_rollback: bool,
              supersede: bool, again: bool, plain: bool, fmt: str, as_json: bool) -> None:
    """Run the upgrade plan PLAN (TOML): back up, upgrade and validate every
    component, rolling back automatically on failure.

    Running it again after a crash, a reboot or Ctrl-C resumes where it stopped;
    once the plan is applied it does nothing. The lock is held for the whole run.
    Exit codes: 0 completed, 11 rolled back, 12 failed (needs a human), 4 lock
    held, 6 bad plan, 9 another upgrade in progress, 130 interrupted. The plan
    format and every rule: docs/apply.md.
    """
    # Imported here, not at the top: every per-step command loads this module.
    from ledger.apply import plan as plans  # noqa: PLC0415

    plan = plans.load(plan_file)
    if dry_run:
        _dry_run(cfg, plan, supersede=supersede, again=again, fmt=pick(fmt, as_json))
        return

    from ledger.api import Ledger  # noqa: PLC0415
    from ledger.apply import runner  # noqa: PLC0415

    # The run itself owns the lock (not the calling shell, as per-step commands do).
    try:
        ledger = Ledger(cfg.home, db_url=cfg.db_url, pid=os.getpid(), strict=cfg.strict,
                        lock_timeout_s=cfg.lock_timeout_s, host_name=cfg.host_name)
    except KeyboardInterrupt:
        # A new ledger is created whole or not at all, and nothing is recorded yet.
        fail("interrupted before the run started; nothing was recorded: run the same apply "
             "again", EXIT_INTERRUPTED)
    console = Console(bar=sys.stdout.isatty() and not plain)
    options = runner.Options(rollback=not no_rollback, supersede=supersede, again=again)
    try:
        outcome = runner.apply(ledger, plan, options, console)
    except runner.Interrupted as exc:
        console.close()
        where = (f"; upgrade {exc.upgrade_id} left {exc.state} and unlocked: run the same "
                 "apply again to resume") if exc.upgrade_id else ""
        fail(f"interrupted by {signal.Signals(exc.signum).name}{where}", 128 + exc.signum)
    finally:
        console.close()
        ledger.close()
    if outcome.already_applied:
        return
    if outcome.state != "COMPLETED":
        code = EXIT_ROLLED_BACK if outcome.state == "ROLLED_BACK" else EXIT_FAILED
        fail(f"upgrade {outcome.upgrade_id} {outcome.state}: {outcome.error}", code)


def _dry_run(cfg: Config, plan: Plan, *, supersede: bool, again: bool, fmt: str) -> None:
    from ledger.apply.preview import preview_home  # noqa: PLC0415

    data = preview_home(cfg.home, plan, db_url=cfg.db_url, lock_timeout_s=cfg.lock_timeout_s,
                        supersede=supersede, again=again, host_name=cfg.host_name)
    if fmt == "json":
        render(data, fmt)
        return
    click.echo(f"plan {data['plan']} (sha256 {data['sha256'][:12]}): {data['action']}")
    render(data["components"], fmt, PREVIEW_COLUMNS)


COMMANDS: list[click.Command] = [apply_cmd]
