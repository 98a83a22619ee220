"""``upgrade-ledger prune``: remove the files of upgrades past a retention policy.

The work is ``ledger.ops.prune``'s; this module parses the policy, prints what went
and how many bytes were freed. docs/operations.md describes retention.
"""

from __future__ import annotations

import click

from ledger.cli.app import Config, pass_config
from ledger.cli.output import output_option, pick, render

COLUMNS = ["upgrade_id", "outcome", "finished_at", "files", "bytes", "rows"]


@click.command()
@click.option("--keep-upgrades", "keep", type=click.IntRange(0, 1_000_000), metavar="N",
              help="The newest N upgrades keep their files.")
@click.option("--older-than", "older_than", metavar="AGE",
              help="Only upgrades that finished before this age (90d, 12w) or date "
                   "(2026-01-01) lose their files.")
@click.option("--rows", is_flag=True,
              help="Also delete the pruned upgrades' rows (phases, components, rollback "
                   "points; their events stay).")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@output_option()
@pass_config
def prune(cfg: Config, *, keep: int | None, older_than: str | None, rows: bool,
          dry_run: bool, fmt: str, as_json: bool) -> None:
    """Remove the backups, logs, history files and snapshots of upgrades past the
    retention policy, and say how many bytes that freed.

    The policy is --keep-upgrades and/or --older-than (with both, an upgrade goes
    only when both let it go); without them, the [retention] section of
    HOME/ledger.toml. Never touched: the current upgrade, one in progress, the
    rollback points of upgrades that stay, the newest snapshot. Each pruned upgrade
    is recorded as a ledger.prune event. See docs/operations.md.
    """
    from ledger.errors import BadInput  # noqa: PLC0415
    from ledger.ops import prune as retention  # noqa: PLC0415

    ledger = cfg.ledger()
    if keep is None and older_than is None:
        policy = retention.configured(ledger)
        if policy is None:
            raise BadInput("say what to keep: --keep-upgrades N and/or --older-than AGE (or "
                           f"a [retention] section in {retention.config_path(ledger)})")
        if rows and not policy.rows:
            policy = retention.Policy(policy.keep_upgrades, policy.older_than, rows=True)
    else:
        policy = retention.Policy(keep, older_than, rows)
    report = retention.prune(ledger, policy, dry_run=dry_run)
    out = pick(fmt, as_json)
    if out == "json":
        render(report.as_dict(), out)
        return
    render([{**p.as_dict(), "files": len(p.removed)} for p in report.upgrades], out, COLUMNS,
           empty="no upgrade is past the policy")
    if report.upgrades:
        verb = "would free" if dry_run else "freed"
        click.echo(f"{verb} {_size(report.bytes_freed)} ({report.bytes_freed} bytes) from "
                   f"{len(report.upgrades)} upgrade(s)", err=True)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


COMMANDS: list[click.Command] = [prune]
