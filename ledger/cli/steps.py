"""Per-step commands: init, state, phase, component, rollback, resume, predicates.

Shell scripts call these once per step, so they stay on the hot path: stdlib
``sqlite3`` only, never SQLAlchemy or Alembic (a test proves it).
"""

from __future__ import annotations

import click

from ledger.cli.app import Config, pass_config
from ledger.cli.output import output_option, pick, render, render_value, value_option
from ledger.cli.params import UPGRADE_STATE
from ledger.errors import UpgradeInProgress


def answer(ctx: click.Context, yes: bool, verbose: bool) -> None:
    """End a predicate: exit 0 for yes, 1 for no; print the answer only if asked."""
    if verbose:
        click.echo("yes" if yes else "no")
    ctx.exit(0 if yes else 1)


#: What ``resume -f FORMAT`` lists of each component left mid-upgrade.
RESUMED_COLUMNS = ["phase", "name", "state", "from_version", "to_version", "attempts",
                   "started_at"]

verbose_option = click.option("-v", "--verbose", is_flag=True,
                              help="Also print yes or no (the exit code is the answer).")


@click.command()
@click.argument("upgrade_id", required=False)
@click.option("--supersede", is_flag=True,
              help="If an upgrade is in progress, end it as FAILED (superseded) instead of "
                   "refusing; it stays in the ledger.")
@value_option()
@pass_config
def init(cfg: Config, upgrade_id: str | None, supersede: bool, fmt: str | None,
         as_json: bool) -> None:
    """Start a new upgrade (state IDLE) and print its id.

    Without UPGRADE_ID an id like upgrade-YYYYMMDD-HHMMSS is made (with a -N suffix
    when two start in the same second).
    """
    try:
        new_id = cfg.ledger().init(upgrade_id, supersede=supersede)
    except UpgradeInProgress as exc:  # the same refusal, in the command line's words
        raise UpgradeInProgress(exc.upgrade_id, exc.state,
                                remedy="supersede it explicitly (--supersede)") from None
    render_value({"upgrade_id": new_id}, pick(fmt, as_json), new_id)


@click.group()
def state() -> None:
    """Get, set or check the upgrade state."""


@state.command("get")
@value_option()
@pass_config
def state_get(cfg: Config, fmt: str | None, as_json: bool) -> None:
    """Print the current upgrade's state (IDLE when there is none)."""
    current = cfg.ledger().state()
    render_value({"state": current}, pick(fmt, as_json), current)


@state.command("set")
@click.argument("target", metavar="STATE", type=UPGRADE_STATE)
@click.option("--error", metavar="TEXT", help="Error text kept with the upgrade.")
@pass_config
def state_set(cfg: Config, target: str, error: str | None) -> None:
    """Move the current upgrade to STATE, in any case (the same state again is a no-op).

    An invalid transition changes nothing, exits 3 and names the allowed targets.
    """
    cfg.ledger().set_state(target, error=error)


@state.command("check")
@click.argument("current", metavar="FROM", type=UPGRADE_STATE)
@click.argument("target", metavar="TO", type=UPGRADE_STATE)
@verbose_option
@click.pass_context
def state_check(ctx: click.Context, current: str, target: str, verbose: bool) -> None:
    """Exit 0 if FROM -> TO is an allowed transition, 1 if not (touches no ledger)."""
    from ledger.api import Ledger  # noqa: PLC0415 (this predicate opens no ledger)

    answer(ctx, Ledger.validate_transition(current, target), verbose)


@click.group()
def phase() -> None:
    """Start, complete, fail or skip phases; find the next one."""


@phase.command("start")
@click.argument("name")
@pass_config
def phase_start(cfg: Config, name: str) -> None:
    """Start phase NAME (creating it if unplanned) and make it current."""
    cfg.ledger().phase_start(name)


@phase.command("complete")
@click.argument("name")
@pass_config
def phase_complete(cfg: Config, name: str) -> None:
    """Mark phase NAME completed."""
    cfg.ledger().phase_complete(name)


@phase.command("fail")
@click.argument("name")
@click.argument("error", required=False)
@pass_config
def phase_fail(cfg: Config, name: str, error: str | None) -> None:
    """Mark phase NAME failed, with an optional ERROR text."""
    cfg.ledger().phase_fail(name, error)


@phase.command("skip")
@click.argument("name")
@click.argument("reason", required=False)
@pass_config
def phase_skip(cfg: Config, name: str, reason: str | None) -> None:
    """Mark phase NAME skipped, with an optional REASON."""
    cfg.ledger().phase_skip(name, reason)


@phase.command("next")
@value_option()
@pass_config
def phase_next(cfg: Config, fmt: str | None, as_json: bool) -> None:
    """Print the first pending phase (nothing when none is left)."""
    name = cfg.ledger().next_phase()
    render_value({"phase": name}, pick(fmt, as_json), name)


@click.group()
def component() -> None:
    """Track components: plan, start, complete, fail, skip, status."""


@component.command("plan")
@click.argument("name")
@click.argument("from_version", required=False)
@click.argument("to_version", required=False)
@click.option("--phase", "phase_name", required=True, help="Phase the component belongs to.")
@pass_config
def component_plan(cfg: Config, name: str, from_version: str | None, to_version: str | None,
                   phase_name: str) -> None:
    """Register component NAME as PENDING in a phase, before it starts."""
    cfg.ledger().plan({phase_name: [(name, from_version, to_version)]})


@component.command("start")
@click.argument("name")
@click.argument("from_version", required=False)
@click.argument("to_version", required=False)
@click.option("--phase", "phase_name", help="Phase to use instead of the current one.")
@pass_config
def component_start(cfg: Config, name: str, from_version: str | None,
                    to_version: str | None, phase_name: str | None) -> None:
    """Start upgrading NAME from FROM_VERSION to TO_VERSION in the current phase."""
    cfg.ledger().component_start(name, from_version, to_version, phase=phase_name)


in_phase_option = click.option(
    "--phase", "phase_name", metavar="PHASE",
    help="The phase the component is in [default: the current phase, else its latest].")


@component.command("complete")
@click.argument("name")
@in_phase_option
@pass_config
def component_complete(cfg: Config, name: str, phase_name: str | None) -> None:
    """Mark component NAME completed."""
    cfg.ledger().component_complete(name, phase=phase_name)


@component.command("fail")
@click.argument("name")
@click.argument("error", required=False)
@in_phase_option
@pass_config
def component_fail(cfg: Config, name: str, error: str | None, phase_name: str | None) -> None:
    """Mark component NAME failed (attempts + 1: the next attempt; last error kept)."""
    cfg.ledger().component_fail(name, error, phase=phase_name)


@component.command("skip")
@click.argument("name")
@click.argument("reason", required=False)
@in_phase_option
@pass_config
def component_skip(cfg: Config, name: str, reason: str | None, phase_name: str | None) -> None:
    """Mark component NAME skipped, keeping REASON (e.g. already at the target)."""
    cfg.ledger().component_skip(name, reason, phase=phase_name)


@component.command("status")
@click.argument("name")
@output_option(default="json")
@pass_config
def component_status(cfg: Config, name: str, fmt: str, as_json: bool) -> None:
    """Print component NAME's record ({} in JSON when unknown)."""
    render(cfg.ledger().component_status(name), pick(fmt, as_json))


@component.command("is-upgraded")
@click.argument("name")
@verbose_option
@pass_config
@click.pass_context
def component_is_upgraded(ctx: click.Context, cfg: Config, name: str, verbose: bool) -> None:
    """Exit 0 if NAME is completed in the current upgrade, 1 if not."""
    answer(ctx, cfg.ledger().is_upgraded(name), verbose)


@component.command("version")
@click.argument("name")
@value_option()
@pass_config
@click.pass_context
def component_version(ctx: click.Context, cfg: Config, name: str, fmt: str | None,
                      as_json: bool) -> None:
    """Print the version of NAME installed by the ledger's last completed upgrade of it
    (exit 1 and print nothing, or a null version, when the ledger has never completed
    one)."""
    version = cfg.ledger().installed_version(name)
    render_value({"component": name, "version": version}, pick(fmt, as_json), version)
    if version is None:
        ctx.exit(1)


@click.group()
def rollback() -> None:
    """Rollback points: mark, show, clear."""


@rollback.command("mark")
@click.argument("name")
@click.argument("backup_path")
@click.option("--size", "size_bytes", type=click.IntRange(min=0), help="Backup size in bytes.")
@click.option("--sha256", help="Backup checksum (64 hex digits).")
@pass_config
def rollback_mark(cfg: Config, name: str, backup_path: str, size_bytes: int | None,
                  sha256: str | None) -> None:
    """Record BACKUP_PATH as component NAME's rollback point."""
    cfg.ledger().mark_rollback_point(name, backup_path, size_bytes=size_bytes, sha256=sha256)


@rollback.command("info")
@output_option(default="json")
@pass_config
def rollback_info(cfg: Config, fmt: str, as_json: bool) -> None:
    """Print the live rollback points: {rollback_available, components: [...]}."""
    info = cfg.ledger().rollback_info()
    out = pick(fmt, as_json)
    render(info if out == "json" else info["components"], out,
           ["name", "backup_path", "from_version", "to_version", "size_bytes", "sha256"],
           empty="no live rollback points")


@rollback.command("clear")
@pass_config
def rollback_clear(cfg: Config) -> None:
    """Clear the current upgrade's rollback points (they stay in the ledger as cleared)."""
    cfg.ledger().clear_rollback_points()


@click.group(invoke_without_command=True)
@click.option("--quiet", "-q", is_flag=True, help="Do not list interrupted components.")
@value_option()
@pass_config
@click.pass_context
def resume(ctx: click.Context, cfg: Config, quiet: bool, fmt: str | None,
           as_json: bool) -> None:
    """Resume the current upgrade: record it and list components left mid-upgrade
    (on stderr; with -f or --json, as data on stdout), which must be validated before
    going on."""
    if ctx.invoked_subcommand is not None:
        return
    stuck = cfg.ledger().resume()
    out = pick(fmt, as_json)
    if out is not None:
        render(stuck, out, None if out == "json" else RESUMED_COLUMNS,
               empty="no component was left mid-upgrade")
    elif not quiet:
        for comp in stuck:
            click.echo(f"component {comp['name']} (phase {comp['phase']}) was left "
                       f"mid-upgrade to {comp['to_version'] or '?'}: validate it", err=True)


@resume.command("point")
@output_option(default="json")
@pass_config
def resume_point(cfg: Config, fmt: str, as_json: bool) -> None:
    """Print where a resumed run continues: {state, phase, component, can_resume}."""
    render(cfg.ledger().resume_point(), pick(fmt, as_json))


@click.command("can-resume")
@verbose_option
@pass_config
@click.pass_context
def can_resume(ctx: click.Context, cfg: Config, verbose: bool) -> None:
    """Exit 0 if the current upgrade stopped mid-run and can be resumed, 1 if not."""
    answer(ctx, cfg.ledger().can_resume(), verbose)


@click.command("in-progress")
@verbose_option
@pass_config
@click.pass_context
def in_progress(ctx: click.Context, cfg: Config, verbose: bool) -> None:
    """Exit 0 while an upgrade is running (PLANNING ... ROLLING_BACK), 1 if not."""
    answer(ctx, cfg.ledger().in_progress(), verbose)


@click.command()
@value_option()
@pass_config
def progress(cfg: Config, fmt: str | None, as_json: bool) -> None:
    """Print the current upgrade's progress as a whole percentage."""
    percent = cfg.ledger().progress_percent()
    render_value({"progress_percent": percent}, pick(fmt, as_json), str(percent))


@click.command()
@value_option()
@pass_config
def summary(cfg: Config, fmt: str | None, as_json: bool) -> None:
    """Print a human-readable summary of the current upgrade (with -f or --json: the
    same as data)."""
    out = pick(fmt, as_json)
    if out is None:
        click.echo(cfg.ledger().summary())
    else:
        render(cfg.ledger().summary_data(), out)


COMMANDS = [init, state, phase, component, rollback, resume, can_resume, in_progress,
            progress, summary]
