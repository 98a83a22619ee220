"""``upgrade-ledger legacy ...``: the few commands that ``scripts/upgrade-state.sh``
(the drop-in for the old bash library) needs where the old contract differs from the
regular commands. Operators use the regular commands; the bash functions call these so
that each function stays one ``upgrade-ledger`` process.
"""

from __future__ import annotations

import click

from ledger.cli.app import Config, pass_config
from ledger.errors import LedgerError


@click.group()
def legacy() -> None:
    """Commands behind scripts/upgrade-state.sh, the drop-in for the old bash
    library (see docs/bash.md)."""


@legacy.command("init")
@click.argument("upgrade_id", required=False)
@pass_config
def legacy_init(cfg: Config, upgrade_id: str | None) -> None:
    """``upgrade_state_init``: start a new upgrade, superseding one still in progress.

    The old library silently overwrote a running upgrade. Here the running upgrade
    ends FAILED, marked superseded (it stays in the ledger), one WARNING line says so
    on stderr, and the new id is printed: the script goes on as before.
    """
    ledger = cfg.ledger()
    new_id = ledger.init(upgrade_id or None, supersede=True)
    # The init event records, in the same transaction, which upgrade it superseded:
    # reading it back is race-free, unlike looking at the state before the init.
    init_events = ledger.events(upgrade_id=new_id, kind="upgrade.init")
    detail = (init_events[-1]["detail"] or {}) if init_events else {}
    old_id = detail.get("superseded")
    if old_id:
        ended = ledger.events(upgrade_id=old_id, kind="upgrade.superseded")
        was = ended[-1]["from"] if ended else "in progress"
        click.echo(f"WARNING: upgrade {old_id} was still in progress ({was}); it is "
                   f"superseded by {new_id} and kept in the ledger as FAILED", err=True)
    click.echo(new_id)


@legacy.command("component-start")
@click.argument("name")
@click.argument("from_version", required=False)
@click.argument("to_version", required=False)
@pass_config
def legacy_component_start(cfg: Config, name: str, from_version: str | None,
                           to_version: str | None) -> None:
    """``upgrade_component_start``: an empty FROM or TO version means "unknown".

    Legacy scripts pass "" for the version of a component that was not installed
    yet; the ledger records that as no version (null) rather than refusing it.
    """
    cfg.ledger().component_start(name, from_version or None, to_version or None)


@legacy.command("adopt")
@pass_config
def legacy_adopt(cfg: Config) -> None:
    """Load the old library's files into a new ledger: history/*.json, then state.json.

    Run by the drop-in, once, when it finds a state.json or a history folder but no
    ledger yet (a host switching over), so that nothing the old library recorded is
    lost: the first change would otherwise overwrite state.json. A ledger that already
    holds upgrades is left alone. A file that cannot be read is named in a WARNING
    line and left where it is (an unreadable state.json is renamed state.json.legacy,
    since the next change rewrites state.json).
    """
    ledger = cfg.ledger()
    if ledger.history(1):
        return
    home = ledger.home
    adopted = []
    for path in sorted(home.history_dir.glob("*.json")):
        try:
            adopted.append(ledger.import_document(path.read_bytes(), make_current=False))
        except (LedgerError, OSError) as exc:
            click.echo(f"WARNING: {path} was not loaded into the ledger: {exc}", err=True)
    for upgrade_id in adopted:
        ledger.save_to_history(upgrade_id)  # rewritten as this ledger's own files
    if home.state_file.is_file():
        try:
            adopted.append(ledger.import_document(home.state_file.read_bytes()))
        except (LedgerError, OSError) as exc:
            aside = home.state_file.with_name(home.state_file.name + ".legacy")
            home.state_file.replace(aside)
            click.echo(f"WARNING: {home.state_file} was not loaded into the ledger ({exc}); "
                       f"it is kept as {aside}", err=True)
    if adopted:
        click.echo(f"NOTE: loaded {len(set(adopted))} upgrade(s) from the old "
                   f"library's files into the ledger in {home.root}", err=True)


COMMANDS = [legacy]
