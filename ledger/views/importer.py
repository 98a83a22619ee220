"""Importing a state document: a validated document becomes rows of the ledger.

This is how a legacy ``state.json`` or history file enters the ledger, and how the
legacy ``upgrade_state_save`` is honoured: the document's upgrade is created, or
replaced by the document's content. Validation happens before (``documents.parse``),
so everything here may trust its input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ledger.core import clock, states
from ledger.store.database import Tx


def import_upgrade(tx: Tx, doc: Mapping[str, Any]) -> str:
    """Replace (or create) the upgrade described by a validated document."""
    uid = doc["upgrade_id"]
    meta = doc["metadata"]
    started = doc["started_at"][:19] + ".000Z"
    updated = doc["updated_at"][:19] + ".000Z"
    state = doc["current_state"]
    # The ledger's own documents carry outcome, error and superseded_by; a legacy one
    # does not, and then the outcome follows from the state.
    outcome = doc.get("outcome") or (state if state in states.TERMINAL_STATES else None)
    tx.execute("DELETE FROM components WHERE host = :host AND upgrade_id = :u", {"u": uid})
    tx.execute("DELETE FROM phases WHERE host = :host AND upgrade_id = :u", {"u": uid})
    existing = tx.one("SELECT outcome FROM upgrades WHERE host = :host AND id = :u", {"u": uid})
    columns = {"u": uid, "s": state, "o": outcome, "st": started, "up": updated,
               "cp": doc["current_phase"], "cc": doc["current_component"],
               "h": meta["hostname"], "usr": meta["user"],
               "pid": int(meta["pid"]) if meta["pid"] else None,
               "f": updated if outcome else None,
               "e": doc.get("error"), "sb": doc.get("superseded_by")}
    if existing is None:
        tx.execute(
            "INSERT INTO upgrades (host, id, state, outcome, started_at, updated_at, finished_at, "
            "current_phase, current_component, hostname, username, pid, error, superseded_by) "
            "VALUES (:host, :u, :s, :o, :st, :up, :f, :cp, :cc, :h, :usr, :pid, :e, :sb)", columns)
    else:
        # A field the document does not carry (a legacy document) is left as it was.
        keep = "".join(f", {col} = :{key}" for col, key in
                       (("error", "e"), ("superseded_by", "sb")) if col in doc)
        tx.execute(
            "UPDATE upgrades SET state = :s, outcome = COALESCE(outcome, :o), started_at = :st, "
            "updated_at = :up, finished_at = COALESCE(finished_at, :f), current_phase = :cp, "
            "current_component = :cc, hostname = :h, username = :usr, pid = :pid"
            f"{keep} WHERE host = :host AND id = :u", columns)
    position = 0
    for ppos, (pname, phase) in enumerate(doc["phases"].items(), start=1):
        tx.execute(
            "INSERT INTO phases (host, upgrade_id, name, position, state, started_at, "
            "completed_at, "
            "failed_at, error) VALUES (:host, :u, :n, :pos, :s, :st, :co, :fa, :e)",
            {"u": uid, "n": pname, "pos": ppos, "s": phase["state"],
             **_stamps_of(phase), "e": phase.get("error")})
        for cname, comp in phase.get("components", {}).items():
            position += 1
            state_c = states.UPGRADING if comp["state"] == "IN_PROGRESS" else comp["state"]
            tx.execute(
                "INSERT INTO components (host, upgrade_id, phase, name, position, state, "
                "from_version, to_version, attempts, last_error, started_at, completed_at, "
                "failed_at, backup_path, note) VALUES (:host, :u, :p, :n, :pos, :s, :fv, :tv, :a, "
                ":le, :st, :co, :fa, :bp, :note)",
                {"u": uid, "p": pname, "n": cname, "pos": position, "s": state_c,
                 "fv": comp.get("from_version"), "tv": comp.get("to_version"),
                 "a": comp.get("attempts", 0), "le": comp.get("last_error"),
                 "note": comp.get("note"),
                 "bp": comp.get("backup_path"), **_stamps_of(comp)})
    _import_rollback_points(tx, uid, doc)
    return uid  # type: ignore[no-any-return]


def _stamps_of(record: Mapping[str, Any]) -> dict[str, str | None]:
    return {key: record[name][:19] + ".000Z" if record.get(name) else None
            for key, name in (("st", "started_at"), ("co", "completed_at"),
                              ("fa", "failed_at"))}


def _import_rollback_points(tx: Tx, uid: str, doc: Mapping[str, Any]) -> None:
    """Rollback points follow the document, live only when it says
    ``rollback_available``: its ``rollback_points`` when it carries them (the ledger's
    own documents), else its components' backup paths (a legacy document)."""
    at = clock.now()
    tx.execute("UPDATE rollback_points SET cleared_at = :at WHERE host = :host AND upgrade_id = :u "
               "AND cleared_at IS NULL", {"at": at, "u": uid})
    if not doc["rollback_available"]:
        return
    if doc.get("rollback_points"):
        phase_of = {cname: pname for pname, phase in reversed(doc["phases"].items())
                    for cname in phase.get("components", {})}
        for point in doc["rollback_points"]:
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
