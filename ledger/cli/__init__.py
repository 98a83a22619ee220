"""The ``upgrade-ledger`` command line: a thin layer over ``ledger.api``.

``app`` holds the root group, the shared configuration and the exit codes; each
other module holds one group of commands and lists them in ``COMMANDS``.
"""

from __future__ import annotations

from ledger.cli import apply, doctor, lockcmds, observe, recovery, reports, steps
from ledger.cli.app import cli

for _module in (steps, lockcmds, reports, doctor, recovery, apply, observe):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


def main() -> None:
    """Entry point of the ``upgrade-ledger`` command."""
    cli.main(prog_name="upgrade-ledger")


__all__ = ["cli", "main"]
