"""``upgrade-ledger legacy ...``: the few commands that ``scripts/upgrade-state.sh``
(the drop-in for the old bash library) needs where the old contract differs from the
regular commands. Operators use the regular commands; the bash functions call these so
that each function stays one ``upgrade-ledger`` process.
"""

from __future__ import annotations

from typing import BinaryIO

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
    old = ledger.superseded(new_id)
    if old is not None:
        click.echo(f"WARNING: upgrade {old[0]} was still in progress ({old[1]}); it is "
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


@legacy.command("save")
@click.argument("source", type=click.File("rb"), default="-")
@pass_config
def legacy_save(cfg: Config, source: BinaryIO) -> None:
    """``upgrade_state_save``: save a state document (SOURCE, '-' for stdin, the
    default) into the current upgrade, and print its id.

    The old library wrote whatever JSON it was given. The known fields the document
    has are validated and applied, those it lacks are left as they are, and keys the
    ledger does not know are kept in every later state.json and history file.
    """
    from ledger.views.document import read  # noqa: PLC0415 (only save needs it)

    # At most the documented maximum and one byte: /dev/zero is refused, not read whole.
    click.echo(cfg.ledger().save_document(read(source)))


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
    from ledger.ops.adopt import adopt_legacy_files  # noqa: PLC0415 (once per host)

    adoption = adopt_legacy_files(cfg.ledger())
    for warning in adoption.warnings:
        click.echo(f"WARNING: {warning}", err=True)
    if adoption.loaded:
        click.echo(f"NOTE: loaded {len(adoption.loaded)} upgrade(s) from the old "
                   f"library's files into the ledger in {adoption.home}", err=True)


COMMANDS = [legacy]
