"""The ledger's facts about itself, in ``ledger_meta``: its lineage and the current upgrade.

Every reader and writer of these keys goes through here, in the caller's transaction.
"""

from __future__ import annotations

from ledger.store.database import Tx


def lineage(tx: Tx) -> str:
    """The ledger's id, made when it was created; views carry it to name their ledger."""
    return str(tx.scalar("SELECT value FROM ledger_meta WHERE key = 'lineage'"))


def current_upgrade(tx: Tx) -> str | None:
    """The id of the current upgrade (what state.json shows), or None before the first."""
    value = tx.scalar("SELECT value FROM ledger_meta WHERE key = 'current_upgrade'")
    return None if value is None else str(value)


def set_current_upgrade(tx: Tx, upgrade_id: str) -> None:
    """Make *upgrade_id* the current upgrade."""
    if not tx.execute("UPDATE ledger_meta SET value = :id WHERE key = 'current_upgrade'",
                      {"id": upgrade_id}):
        tx.execute("INSERT INTO ledger_meta (key, value) VALUES ('current_upgrade', :id)",
                   {"id": upgrade_id})
