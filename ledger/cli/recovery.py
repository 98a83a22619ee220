"""Recovery commands: ``snapshot`` (take one now), ``snapshots`` (list), ``restore``.

``snapshots`` and ``restore`` work on a damaged ledger too: they never open
ledger.db through the API before it has been put right. docs/operations.md is the
runbook that says when to use which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ledger.cli.app import Config, pass_config
from ledger.cli.output import output_option, pick, render

if TYPE_CHECKING:
    from ledger.store.home import Home

SNAPSHOT_COLUMNS = ["name", "taken_at", "upgrade_id", "size_bytes"]


def _home(cfg: Config) -> Home:
    """The SQLite ledger's home (Home is imported here, off the per-step path)."""
    from ledger.errors import BadInput  # noqa: PLC0415
    from ledger.store.home import Home  # noqa: PLC0415

    if cfg.db_url:
        raise BadInput("snapshots and restore are for a SQLite ledger file (--home); back up "
                       "and restore a --db ledger with its database server's own tools")
    return Home.at(cfg.home)


@click.command()
@click.option("--keep", type=click.IntRange(min=0, max=10_000), metavar="N",
              help="Keep only the newest N snapshots (0: prune nothing) "
                   "[default: LEDGER_SNAPSHOT_KEEP, else 10].")
@output_option(default="plain")
@pass_config
def snapshot(cfg: Config, keep: int | None, fmt: str, as_json: bool) -> None:
    """Take an online backup of the ledger now, into HOME/snapshots/.

    The ledger stays usable meanwhile. A snapshot is also taken at every save to
    history (save-history, cleanup); older ones beyond the limit are removed.
    """
    from ledger.ops import snapshots  # noqa: PLC0415

    _home(cfg)
    snap = snapshots.take_now(cfg.ledger(), keep)
    out = pick(fmt, as_json)
    if out == "plain":
        click.echo(snap.path)
    else:
        render(snap.as_dict(), out, [*SNAPSHOT_COLUMNS, "path"])


@click.command("snapshots")
@click.option("--check", is_flag=True,
              help="Also run an integrity check of each snapshot (reads them whole).")
@output_option()
@pass_config
def list_snapshots(cfg: Config, check: bool, fmt: str, as_json: bool) -> None:
    """List the snapshots, newest first (works even when ledger.db is damaged)."""
    from ledger.ops import snapshots  # noqa: PLC0415

    rows = []
    for snap in snapshots.listing(_home(cfg)):
        row = snap.as_dict()
        if check:
            row["check"] = snapshots.check_file(snap.path) or "ok"
        rows.append(row)
    render(rows, pick(fmt, as_json), [*SNAPSHOT_COLUMNS, *(["check"] if check else [])],
           empty="no snapshots")


@click.command()
@click.argument("name", metavar="[SNAPSHOT]", required=False)
@click.option("--force", is_flag=True,
              help="Restore even though ledger.db passes the integrity check "
                   "(what happened since the snapshot is then only in the files kept aside).")
@output_option(default="plain")
@pass_config
def restore(cfg: Config, name: str | None, force: bool, fmt: str, as_json: bool) -> None:
    """Replace a damaged ledger.db with the newest good snapshot (or SNAPSHOT).

    The damaged files are renamed ledger.db.corrupt-STAMP (never deleted); then
    state.json and history files newer than the snapshot are imported, so the
    current upgrade is as its last view showed it. Refused while a live process
    holds the upgrade lock, and when ledger.db is healthy (unless --force).
    """
    from ledger.ops.restore import restore as restore_snapshot  # noqa: PLC0415

    result = restore_snapshot(_home(cfg), name, force=force, pid=cfg.pid,
                              lock_timeout_s=cfg.lock_timeout_s)
    out = pick(fmt, as_json)
    if out != "plain":
        render(result.as_dict(), out)
        return
    click.echo(f"restored snapshot {result.snapshot}")
    for aside in result.aside:
        click.echo(f"kept the replaced file as {aside}")
    for imported in result.imported:
        click.echo(f"imported {imported}, newer than the snapshot")
    for skipped in result.skipped:
        click.echo(f"skipped {skipped}")
    click.echo(f"current upgrade: {result.current or '-'}")


COMMANDS: list[click.Command] = [snapshot, list_snapshots, restore]
