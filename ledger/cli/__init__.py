"""The ``upgrade-ledger`` command line: a thin layer over ``ledger.api``."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``upgrade-ledger`` command."""
    from ledger.cli.app import run

    run()
