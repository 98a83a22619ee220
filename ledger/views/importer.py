"""Loading a state document into the ledger: a validated document becomes rows.

``import_upgrade`` creates an upgrade from a whole document, or replaces one with
it: a legacy ``state.json`` or history file, or a document the ledger exported.
``merge_upgrade`` applies a document saved into an upgrade the ledger has, field by
field, and leaves what the document does not carry: that is how the legacy
``upgrade_state_save`` is honoured. Validation happens before
(``document.validate``), so everything here may trust its input.

Keys the ledger does not know are kept verbatim in ``extra`` columns, level by level:
the document's top-level ones always (the document is what the script wants
``state.json`` to say, so a key it dropped is dropped); those of ``metadata`` and of
the phases and components when the document carries them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ledger.core import clock, states
from ledger.errors import InvalidDocument
from ledger.store.database import Tx
from ledger.views.document import (
    COMPONENT_KEYS,
    MAX_KEPT,
    METADATA_KEYS,
    PHASE_KEYS,
    TOP_KEYS,
    kept_text,
)


def import_upgrade(tx: Tx, doc: Mapping[str, Any]) -> str:
    """Replace (or create) the upgrade described by a validated whole document."""
    uid: str = doc["upgrade_id"]
    if not tx.scalar("SELECT 1 FROM upgrades WHERE host = :host AND id = :u", {"u": uid}):
        # The row, then every field as for an existing upgrade.
        tx.execute("INSERT INTO upgrades (host, id, state, started_at, updated_at) "
                   "VALUES (:host, :u, :s, :st, :up)",
                   {"u": uid, "s": doc["current_state"], "st": _stamp(doc["started_at"]),
                    "up": _stamp(doc["updated_at"])})
    merge_upgrade(tx, uid, doc)
    return uid


def merge_upgrade(tx: Tx, uid: str, doc: Mapping[str, Any]) -> None:
    """Apply the fields a validated document carries to the upgrade *uid*; those it
    lacks keep their value (``updated_at`` becomes now). Raises ``InvalidDocument``
    when the kept keys would pass ``MAX_KEPT``; the caller's transaction then changes
    nothing."""
    updated = _stamp(doc["updated_at"]) if "updated_at" in doc else clock.now()
    columns: dict[str, Any] = {"updated_at": updated,
                               "extra": kept_text(doc, TOP_KEYS, "at the top level")}
    if "current_state" in doc:
        columns["state"] = doc["current_state"]
    if "started_at" in doc:
        columns["started_at"] = _stamp(doc["started_at"])
    for key in ("current_phase", "current_component", "error", "superseded_by"):
        if key in doc:
            columns[key] = doc[key]
    if "metadata" in doc:
        meta = doc["metadata"]
        columns.update(hostname=meta["hostname"], username=meta["user"],
                       pid=int(meta["pid"]) if meta["pid"] else None,
                       metadata_extra=kept_text(meta, METADATA_KEYS, "in metadata"))
    sets = [f"{column} = :{column}" for column in columns]
    # The ledger's own documents carry the outcome; a legacy one does not, and then it
    # follows from the state. The first outcome reached is never replaced.
    state = doc.get("current_state")
    outcome = doc.get("outcome") or (state if state in states.TERMINAL_STATES else None)
    if outcome:
        sets += ["outcome = COALESCE(outcome, :outcome)",
                 "finished_at = COALESCE(finished_at, :updated_at)"]
        columns["outcome"] = outcome
    tx.execute(f"UPDATE upgrades SET {', '.join(sets)} WHERE host = :host AND id = :id",
               {**columns, "id": uid})
    if "phases" in doc:
        _replace_phases(tx, uid, doc["phases"])
    _import_rollback_points(tx, uid, doc)
    size = kept_size(tx, uid)
    if size > MAX_KEPT:
        raise InvalidDocument(
            f"document: the keys the ledger does not know and keeps for upgrade {uid} "
            f"would take {size} bytes; at most {MAX_KEPT} are kept per upgrade (keep "
            "bigger data in a file of your own, and its path in the document)")


def kept_size(tx: Tx, uid: str) -> int:
    """Bytes of kept keys (their JSON text) the upgrade *uid* holds, all levels."""
    rows = tx.all(
        "SELECT extra FROM upgrades WHERE host = :host AND id = :u UNION ALL "
        "SELECT metadata_extra FROM upgrades WHERE host = :host AND id = :u UNION ALL "
        "SELECT extra FROM phases WHERE host = :host AND upgrade_id = :u "
        "AND extra IS NOT NULL UNION ALL "
        "SELECT extra FROM components WHERE host = :host AND upgrade_id = :u "
        "AND extra IS NOT NULL",
        {"u": uid})
    return sum(len(row[0].encode()) for row in rows if row[0])


def _replace_phases(tx: Tx, uid: str, phases: Mapping[str, Any]) -> None:
    """The upgrade's phases and components become the document's, in its order."""
    tx.execute("DELETE FROM components WHERE host = :host AND upgrade_id = :u", {"u": uid})
    tx.execute("DELETE FROM phases WHERE host = :host AND upgrade_id = :u", {"u": uid})
    position = 0
    for ppos, (pname, phase) in enumerate(phases.items(), start=1):
        tx.execute(
            "INSERT INTO phases (host, upgrade_id, name, position, state, started_at, "
            "completed_at, failed_at, error, extra) "
            "VALUES (:host, :u, :n, :pos, :s, :st, :co, :fa, :e, :x)",
            {"u": uid, "n": pname, "pos": ppos, "s": phase["state"],
             **_stamps_of(phase), "e": phase.get("error"),
             "x": kept_text(phase, PHASE_KEYS, f"in phase {pname!r}")})
        for cname, comp in phase.get("components", {}).items():
            position += 1
            state_c = states.UPGRADING if comp["state"] == "IN_PROGRESS" else comp["state"]
            tx.execute(
                "INSERT INTO components (host, upgrade_id, phase, name, position, state, "
                "from_version, to_version, attempts, last_error, started_at, completed_at, "
                "failed_at, backup_path, note, extra) VALUES (:host, :u, :p, :n, :pos, :s, :fv, "
                ":tv, :a, :le, :st, :co, :fa, :bp, :note, :x)",
                {"u": uid, "p": pname, "n": cname, "pos": position, "s": state_c,
                 "fv": comp.get("from_version"), "tv": comp.get("to_version"),
                 "a": comp.get("attempts", 0), "le": comp.get("last_error"),
                 "note": comp.get("note"), "bp": comp.get("backup_path"),
                 **_stamps_of(comp),
                 "x": kept_text(comp, COMPONENT_KEYS, f"in component {cname!r}")})


def _stamp(value: str) -> str:
    """A document's second-precision timestamp as the ledger stores it."""
    return value[:19] + ".000Z"


def _stamps_of(record: Mapping[str, Any]) -> dict[str, str | None]:
    return {key: _stamp(record[name]) if record.get(name) else None
            for key, name in (("st", "started_at"), ("co", "completed_at"),
                              ("fa", "failed_at"))}


def _import_rollback_points(tx: Tx, uid: str, doc: Mapping[str, Any]) -> None:
    """Rollback points follow the document, live only when it says
    ``rollback_available``: its ``rollback_points`` when it carries them (the ledger's
    own documents), else its components' backup paths (a legacy document). A document
    that says neither (saved into an upgrade) leaves them as they are."""
    points = doc.get("rollback_points")
    available = doc.get("rollback_available", bool(points))
    if ("rollback_available" not in doc and points is None) or \
            (available and not points and "phases" not in doc):
        return
    at = clock.now()
    tx.execute("UPDATE rollback_points SET cleared_at = :at WHERE host = :host AND upgrade_id = :u "
               "AND cleared_at IS NULL", {"at": at, "u": uid})
    if not available:
        return
    if points:
        # A component's phase: its first in the document, else in the ledger.
        pairs = [(cname, pname) for pname, phase in doc["phases"].items()
                 for cname in phase.get("components", {})] if "phases" in doc else \
            [(r["name"], r["phase"]) for r in tx.all(
                "SELECT name, phase FROM components WHERE host = :host AND upgrade_id = :u "
                "ORDER BY position",
                {"u": uid})]
        phase_of = dict(reversed(pairs))
        for point in points:
            tx.execute(
                "INSERT INTO rollback_points (host, upgrade_id, phase, component, backup_path, "
                "size_bytes, sha256, created_at) VALUES (:host, :u, :p, :c, :b, :s, :h, :at)",
                {"u": uid, "p": phase_of.get(point["component"]), "c": point["component"],
                 "b": point["backup_path"], "s": point.get("size_bytes"),
                 "h": point.get("sha256"), "at": at})
        return
    for pname, phase in doc["phases"].items():
        for cname, comp in phase.get("components", {}).items():
            if comp.get("backup_path"):
                tx.execute(
                    "INSERT INTO rollback_points (host, upgrade_id, phase, component, backup_path, "
                    "created_at) VALUES (:host, :u, :p, :c, :b, :at)",
                    {"u": uid, "p": pname, "c": cname, "b": comp["backup_path"], "at": at})
