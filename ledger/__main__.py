"""``python -m ledger`` runs the ``upgrade-ledger`` command."""

from ledger.cli import main

main()
