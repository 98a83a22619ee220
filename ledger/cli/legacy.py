"""``upgrade-ledger legacy ...``: the few commands that ``scripts/upgrade-state.sh``
(the drop-in for the old bash library) needs where the old contract differs from the
regular commands. Operators use the regular commands; the bash functions call these so
that each function stays one ``upgrade-ledger`` process.
"""

from __future__ import annotations

import click

from ledger.cli.app import Config, pass_config


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


COMMANDS = [legacy]
