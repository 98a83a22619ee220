"""The ledger's facts about itself and its hosts: its lineage, each host's current upgrade.

Every reader and writer of these goes through here, in the caller's transaction.
The current upgrade is per host (``hosts.current_upgrade``), in the transaction's
host scope; the transaction read it as it began (``Database._enter``), so asking
again costs no round trip.
"""

from __future__ import annotations

from ledger.store.database import Tx


def lineage(tx: Tx) -> str:
    """The ledger's id, made when it was created; views carry it to name their ledger."""
    if "lineage" not in tx.memo:
        tx.memo["lineage"] = tx.scalar("SELECT value FROM ledger_meta WHERE key = 'lineage'")
    return str(tx.memo["lineage"])


def current_upgrade(tx: Tx) -> str | None:
    """The id of the host's current upgrade (what state.json shows), or None before
    the first."""
    if "current_upgrade" not in tx.memo:
        tx.memo["current_upgrade"] = tx.scalar(
            "SELECT current_upgrade FROM hosts WHERE name = :host")
    value = tx.memo["current_upgrade"]
    return None if value is None else str(value)


def set_current_upgrade(tx: Tx, upgrade_id: str) -> None:
    """Make *upgrade_id* the host's current upgrade (the host is registered: the
    write transaction did that as it began)."""
    tx.execute("UPDATE hosts SET current_upgrade = :id WHERE name = :host", {"id": upgrade_id})
    tx.memo["current_upgrade"] = upgrade_id


def hosts(tx: Tx) -> list[str]:
    """Every host the ledger knows, by name."""
    return [str(r[0]) for r in tx.all("SELECT name FROM hosts ORDER BY name")]
