"""One push: the rows of this host's ledger that the fleet database lacks, shipped.

Exactly once by construction. The fleet keeps, per host, a cursor: the id of the last
event of the host's ledger it has (``fleet_cursors``). A push ships, in batches, the
events after it, with the current rows of every upgrade those events touched (the
upgrade, its phases, components and rollback points, replaced whole), and moves the
cursor in the same PostgreSQL transaction as the rows. A push killed at any moment
leaves the fleet at the end of a batch; the next one goes on from there.

The fleet's copy of a host mirrors the host's ledger: an upgrade whose rows were
pruned there is removed from the fleet too (its events stay, as they do on the
host). A host ledger that is no longer the one the cursor was about (a new ledger,
or one restored from a snapshot that lacks the last event shipped) is shipped anew,
from its first event, the old copy removed in the same transaction as the first batch.

Every change of a host's ledger writes an event in its transaction (that is what the
ledger promises), so shipping what the events touched is shipping every change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ledger.store import meta
from ledger.store.database import Database, Row, Tx

#: Events per batch (one PostgreSQL transaction each).
BATCH = 1000
#: The server's time as a ledger timestamp: when a host last pushed is the fleet's
#: clock, not the host's (hosts' clocks may disagree).
SERVER_NOW = ("to_char(clock_timestamp() AT TIME ZONE 'UTC', "
              "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
#: The tables under an upgrade, parents first (deleting the upgrade cascades to them).
_TREE = ("phases", "components", "rollback_points")
#: Each host's rows in the fleet, children first: what a reset removes.
_HOST_TABLES = ("events", "rollback_points", "components", "phases", "upgrades")


@dataclass
class Pushed:
    """What a push did: events shipped, batches (transactions), upgrades whose rows
    were replaced, the cursor afterwards, and whether the host's copy was reset."""

    events: int = 0
    batches: int = 0
    upgrades: int = 0
    shipped_event_id: int = 0
    reset: bool = False


@dataclass
class _Batch:
    """What one batch read from the host's ledger, in one snapshot."""

    lineage: str
    after: int
    reset: bool
    events: list[dict[str, Any]]
    trees: dict[str, dict[str, Any]]
    current: str | None
    mark: str | None


def push(local: Database, fleet: Database, *, batch: int = BATCH) -> Pushed:
    """Ship this host's rows from *local* (its ledger) to *fleet*, batch by batch,
    until the fleet has them all; *local*'s and *fleet*'s identities name the host."""
    done = Pushed()
    while True:
        shipped, count, upgrades, reset = _push_batch(local, fleet, batch)
        done.batches += 1
        done.events += count
        done.upgrades += upgrades
        done.shipped_event_id = shipped
        done.reset = done.reset or reset
        if count < batch:
            return done


def mark(row: Row | None) -> str | None:
    """A fingerprint of an event row: the cursor keeps the one of the last event shipped,
    and a host ledger whose event of that id differs is no longer the one shipped."""
    if row is None:
        return None
    values = [row[k] for k in ("id", "at", "kind", "upgrade_id", "subject", "pid")]
    return hashlib.sha256(json.dumps(values, default=str).encode()).hexdigest()[:32]


def _push_batch(local: Database, fleet: Database, size: int) -> tuple[int, int, int, bool]:
    """One batch in one fleet transaction: (cursor after it, events shipped, upgrades
    replaced, whether the copy was reset)."""
    with fleet.write() as ftx:  # locks this host's row: pushes of one host take turns
        cursor = ftx.one("SELECT lineage, shipped_event_id, shipped_mark FROM fleet_cursors "
                         "WHERE host = :host")
        with local.read() as ltx:
            got = _read(ltx, cursor, size)
        if got.reset:
            _clear(ftx)
        _replace(ftx, got.trees)
        _insert(ftx, "events", got.events)
        ftx.execute("UPDATE hosts SET current_upgrade = :current WHERE name = :host",
                    {"current": got.current})
        shipped = got.events[-1]["local_id"] if got.events else got.after
        ftx.execute(
            "INSERT INTO fleet_cursors (host, lineage, shipped_event_id, shipped_mark, "
            f"pushed_at, first_pushed_at, resets) VALUES (:host, :lineage, :shipped, :mark, "
            f"{SERVER_NOW}, {SERVER_NOW}, 0) ON CONFLICT (host) DO UPDATE SET "
            "lineage = excluded.lineage, shipped_event_id = excluded.shipped_event_id, "
            "shipped_mark = excluded.shipped_mark, pushed_at = excluded.pushed_at, "
            "resets = fleet_cursors.resets + :reset",
            {"lineage": got.lineage, "shipped": shipped, "mark": got.mark,
             "reset": 1 if got.reset and cursor is not None else 0})
    return shipped, len(got.events), len(got.trees), got.reset


def _read(ltx: Tx, cursor: Row | None, size: int) -> _Batch:
    """The next batch from the host's ledger (one read snapshot)."""
    lineage = meta.lineage(ltx)
    after = 0 if cursor is None else int(cursor["shipped_event_id"])
    reset = cursor is None or cursor["lineage"] != lineage or (after > 0 and mark(ltx.one(
        "SELECT * FROM events WHERE host = :host AND id = :id", {"id": after}))
        != cursor["shipped_mark"])
    if reset:
        after = 0
    rows = ltx.all("SELECT * FROM events WHERE host = :host AND id > :after ORDER BY id "
                   "LIMIT :n", {"after": after, "n": size})
    events = [_shipped(row) for row in rows]
    touched = sorted({e["upgrade_id"] for e in events if e["upgrade_id"] is not None})
    if after == 0:
        # The first batch of a copy also takes any upgrade no event names (none should
        # exist: every upgrade is made by a change, and every change is an event).
        touched += [r[0] for r in ltx.all(
            "SELECT u.id FROM upgrades u WHERE u.host = :host AND NOT EXISTS (SELECT 1 "
            "FROM events e WHERE e.host = u.host AND e.upgrade_id = u.id) ORDER BY u.id")]
    return _Batch(lineage=lineage, after=after, reset=reset, events=events,
                  trees={uid: _tree(ltx, uid) for uid in touched},
                  current=meta.current_upgrade(ltx),
                  mark=mark(rows[-1]) if rows else (cursor["shipped_mark"]
                                                     if cursor is not None and not reset
                                                     else None))


def _shipped(row: Row) -> dict[str, Any]:
    """A host row as the fleet stores it: the fleet numbers it, ``local_id`` keeps the
    host's id."""
    out = dict(zip(row.keys(), row, strict=True))
    out["local_id"] = out.pop("id")
    return out


def _tree(ltx: Tx, upgrade_id: str) -> dict[str, Any]:
    """The rows of one upgrade in the host's ledger (``upgrade`` None when it has none:
    pruned)."""
    upgrade = ltx.one("SELECT * FROM upgrades WHERE host = :host AND id = :u",
                      {"u": upgrade_id})
    tree: dict[str, Any] = {"upgrade": None if upgrade is None else
                            dict(zip(upgrade.keys(), upgrade, strict=True))}
    for table in _TREE:
        rows = [] if upgrade is None else ltx.all(
            f"SELECT * FROM {table} WHERE host = :host AND upgrade_id = :u ORDER BY "
            + ("id" if table == "rollback_points" else "position"), {"u": upgrade_id})
        tree[table] = [_shipped(r) if table == "rollback_points" else
                       dict(zip(r.keys(), r, strict=True)) for r in rows]
    return tree


def _replace(ftx: Tx, trees: dict[str, dict[str, Any]]) -> None:
    """Make the fleet's rows of these upgrades of this host those of *trees* (a few
    statements whatever their number: a batch may touch hundreds)."""
    if not trees:
        return
    # Their phases, components and rollback points go with them (ON DELETE CASCADE).
    ftx.execute("DELETE FROM upgrades WHERE host = :host AND id = ANY(:ids)",
                {"ids": list(trees)})
    kept = [tree for tree in trees.values() if tree["upgrade"] is not None]
    _insert(ftx, "upgrades", [tree["upgrade"] for tree in kept])
    for table in _TREE:
        _insert(ftx, table, [row for tree in kept for row in tree[table]])


def _insert(ftx: Tx, table: str, rows: Sequence[dict[str, Any]]) -> None:
    """Insert this host's *rows* into the fleet's *table* (their ``host`` is the
    transaction's)."""
    if not rows:
        return
    columns = ["host", *(c for c in rows[0] if c != "host")]
    ftx.insert_rows(table, columns, ([ftx.host, *(row[c] for c in columns[1:])]
                                     for row in rows))


def _clear(ftx: Tx) -> None:
    """Remove the fleet's copy of this host (its rows and events), to ship it anew."""
    for table in _HOST_TABLES:
        ftx.execute(f"DELETE FROM {table} WHERE host = :host")
