"""Read-side queries: history, one upgrade in full, the audit trail, the summary.

Functions take an open transaction so the API decides the snapshot. History
queries select the page of upgrades first (by the ``started_at`` index) and only then
count their components, so they stay fast with 100,000 upgrades in the ledger.
"""

from __future__ import annotations

import json
from typing import Any

from ledger.core import clock, states
from ledger.core.validate import check_name
from ledger.errors import BadInput, NotFound
from ledger.store.database import Row, Tx
from ledger.views.document import add_kept, second

_COMPONENT_KEYS = ("phase", "name", "state", "from_version", "to_version", "attempts",
                   "last_error", "note", "started_at", "completed_at", "failed_at",
                   "backup_path")


def component_dict(row: Row) -> dict[str, Any]:
    """A component row as the API and CLI show it (second-precision timestamps), with
    the keys a saved document kept in it after the ledger's own."""
    out = {key: row[key] for key in _COMPONENT_KEYS}
    for key in ("started_at", "completed_at", "failed_at"):
        out[key] = second(out[key])
    out["duration_s"] = clock.seconds_between(row["started_at"],
                                              row["completed_at"] or row["failed_at"])
    return add_kept(out, row["extra"])


def progress(tx: Tx, upgrade: Row) -> int:
    """Done (COMPLETED or SKIPPED) components as a whole percentage; a finished upgrade
    with no components counts as 100."""
    row = tx.one("SELECT COUNT(*) AS total, SUM(CASE WHEN state IN ('COMPLETED', 'SKIPPED') "
                 "THEN 1 ELSE 0 END) AS done FROM components WHERE upgrade_id = :u",
                 {"u": upgrade["id"]})
    total, done = (row["total"] or 0, row["done"] or 0) if row is not None else (0, 0)
    if total == 0:
        return 100 if (upgrade["outcome"] or upgrade["state"]) == states.COMPLETED else 0
    return done * 100 // total


def summary(tx: Tx, upgrade: Row) -> str:
    """The legacy ``upgrade_get_summary`` text, a few lines an operator reads at a glance."""
    uid = upgrade["id"]
    counts = {r["state"]: r["n"] for r in tx.all(
        "SELECT state, COUNT(*) AS n FROM components WHERE upgrade_id = :u GROUP BY state",
        {"u": uid})}
    total = sum(counts.values())
    done = counts.get("COMPLETED", 0) + counts.get("SKIPPED", 0)
    points = tx.scalar("SELECT COUNT(*) FROM rollback_points WHERE upgrade_id = :u AND "
                       "cleared_at IS NULL", {"u": uid})
    lines = [
        f"Upgrade:   {uid}",
        f"State:     {upgrade['state']}"
        + (f" (outcome {upgrade['outcome']})" if upgrade["outcome"] and
           upgrade["outcome"] != upgrade["state"] else ""),
        f"Started:   {second(upgrade['started_at'])}   Updated: {second(upgrade['updated_at'])}",
        f"Phase:     {upgrade['current_phase'] or '-'}",
        f"Component: {upgrade['current_component'] or '-'}",
        f"Progress:  {progress(tx, upgrade)}% ({done}/{total} components"
        + "".join(f", {n} {s.lower()}" for s, n in sorted(counts.items())
                  if s not in ("COMPLETED", "SKIPPED")) + ")",
        f"Rollback:  {'available (' + str(points) + ' points)' if points else 'none'}",
    ]
    for p in tx.all("SELECT name, state FROM phases WHERE upgrade_id = :u ORDER BY position",
                    {"u": uid}):
        lines.append(f"  phase {p['name']}: {p['state']}")
    if upgrade["error"]:
        lines.append(f"Error:     {upgrade['error']}")
    return "\n".join(lines)


def _upgrade_dict(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"], "state": row["state"], "outcome": row["outcome"],
        "hostname": row["hostname"], "user": row["username"],
        "started_at": second(row["started_at"]), "updated_at": second(row["updated_at"]),
        "finished_at": second(row["finished_at"]),
        "duration_s": clock.seconds_between(row["started_at"], row["finished_at"]),
        "superseded_by": row["superseded_by"], "error": row["error"],
    }


def history(tx: Tx, *, limit: int | None = 10, state: str | None = None,
            since: str | None = None, until: str | None = None,
            component: str | None = None, host: str | None = None) -> list[dict[str, Any]]:
    """Upgrades newest first. *state* matches the current state or the outcome (a
    COMPLETED run reset to IDLE is still found as COMPLETED); *since*/*until* bound
    ``started_at`` (dates, times or ages, see ``clock.parse_when``); *component* keeps
    upgrades that touched it; *host* matches the hostname."""
    if limit is not None and (isinstance(limit, bool) or not 0 < limit <= 1_000_000):
        raise BadInput("limit must be a whole number from 1 to 1000000")
    where: list[str] = []
    params: dict[str, Any] = {}
    if state is not None:
        states.check_state("upgrade", state)
        where.append("(u.state = :state OR u.outcome = :state)")
        params["state"] = state
    if since is not None:
        where.append("u.started_at >= :since")
        params["since"] = clock.parse_when(since)
    if until is not None:
        where.append("u.started_at < :until")
        params["until"] = clock.parse_when(until)
    if component is not None:
        where.append("EXISTS (SELECT 1 FROM components c WHERE c.upgrade_id = u.id "
                     "AND c.name = :component)")
        params["component"] = check_name(component, "component")
    if host is not None:
        where.append("u.hostname = :host")
        params["host"] = host
    sql = ("SELECT u.* FROM upgrades u" + (" WHERE " + " AND ".join(where) if where else "")
           + " ORDER BY u.started_at DESC, u.id DESC"
           + (" LIMIT :limit" if limit is not None else ""))
    if limit is not None:
        params["limit"] = limit
    rows = tx.all(sql, params)
    if not rows:
        return []
    ids = {r["id"]: i for i, r in enumerate(rows)}
    out = [dict(_upgrade_dict(r), components=0, completed=0, failed=0) for r in rows]
    # Count the page's components in one query (bind ids in chunks: SQLite caps
    # the number of parameters).
    id_list = list(ids)
    for start in range(0, len(id_list), 500):
        chunk = id_list[start:start + 500]
        marks = ", ".join(f":i{n}" for n in range(len(chunk)))
        for c in tx.all(
            "SELECT upgrade_id, COUNT(*) AS total, "
            "SUM(CASE WHEN state = 'COMPLETED' THEN 1 ELSE 0 END) AS completed, "
            "SUM(CASE WHEN state = 'FAILED' THEN 1 ELSE 0 END) AS failed "
            f"FROM components WHERE upgrade_id IN ({marks}) GROUP BY upgrade_id",
            {f"i{n}": uid for n, uid in enumerate(chunk)},
        ):
            item = out[ids[c["upgrade_id"]]]
            item.update(components=c["total"], completed=c["completed"], failed=c["failed"])
    return out


def show(tx: Tx, upgrade_id: str) -> dict[str, Any]:
    """One upgrade in full: phases with durations, components, rollback points, events."""
    row = tx.one("SELECT * FROM upgrades WHERE id = :u", {"u": upgrade_id})
    if row is None:
        raise NotFound(f"no upgrade {upgrade_id!r} in this ledger")
    out = _upgrade_dict(row)
    out["current_phase"] = row["current_phase"]
    out["current_component"] = row["current_component"]
    out["progress_percent"] = progress(tx, row)
    out["phases"] = [
        {"name": p["name"], "state": p["state"], "started_at": second(p["started_at"]),
         "ended_at": second(p["completed_at"] or p["failed_at"]),
         "duration_s": clock.seconds_between(p["started_at"],
                                             p["completed_at"] or p["failed_at"]),
         "error": p["error"]}
        for p in tx.all("SELECT * FROM phases WHERE upgrade_id = :u ORDER BY position",
                        {"u": upgrade_id})
    ]
    out["components"] = [component_dict(c) for c in tx.all(
        "SELECT * FROM components WHERE upgrade_id = :u ORDER BY position", {"u": upgrade_id})]
    out["rollback_points"] = [
        {"component": r["component"], "backup_path": r["backup_path"],
         "size_bytes": r["size_bytes"], "sha256": r["sha256"],
         "created_at": second(r["created_at"]), "cleared_at": second(r["cleared_at"])}
        for r in tx.all("SELECT * FROM rollback_points WHERE upgrade_id = :u ORDER BY id",
                        {"u": upgrade_id})
    ]
    out["events"] = events(tx, upgrade_id=upgrade_id, limit=None)
    return out


def event_dict(row: Row) -> dict[str, Any]:
    """An event row as the API, CLI and notifications show it."""
    return {
        "id": row["id"], "at": row["at"], "upgrade_id": row["upgrade_id"],
        "kind": row["kind"], "subject": row["subject"], "from": row["from_value"],
        "to": row["to_value"], "user": row["username"], "hostname": row["hostname"],
        "pid": row["pid"],
        "detail": json.loads(row["detail"]) if row["detail"] else None,
    }


def events(tx: Tx, *, upgrade_id: str | None = None, component: str | None = None,
           kind: str | None = None, since: str | None = None, after_id: int = 0,
           pid: int | None = None, hostname: str | None = None,
           limit: int | None = 1000) -> list[dict[str, Any]]:
    """The audit trail oldest first, filtered. *kind* matches exactly or as a prefix
    ending in '.' (``component.`` for every component event); *after_id* pages; *pid*
    and *hostname* pick the changes of one process."""
    where = ["e.id > :after"]
    params: dict[str, Any] = {"after": int(after_id)}
    if pid is not None:
        where.append("e.pid = :pid")
        params["pid"] = int(pid)
    if hostname is not None:
        where.append("e.hostname = :host")
        params["host"] = hostname
    if upgrade_id is not None:
        where.append("e.upgrade_id = :u")
        params["u"] = upgrade_id
    if component is not None:
        where.append("e.subject = :c AND e.kind LIKE 'component.%'")
        params["c"] = component
    if kind is not None:
        if kind.endswith("."):
            where.append("e.kind LIKE :k")
            params["k"] = kind + "%"
        else:
            where.append("e.kind = :k")
            params["k"] = kind
    if since is not None:
        where.append("e.at >= :since")
        params["since"] = clock.parse_when(since)
    sql = "SELECT e.* FROM events e WHERE " + " AND ".join(where) + " ORDER BY e.id"
    if limit is not None:
        sql += " LIMIT :limit"
        params["limit"] = int(limit)
    return [event_dict(r) for r in tx.all(sql, params)]


def stuck(tx: Tx, upgrade_id: str, *, lock_live: bool, threshold_s: float,
          ) -> list[dict[str, Any]]:
    """Components UPGRADING with no live lock holder, or for longer than *threshold_s*."""
    now = clock.now()
    out = []
    for row in tx.all("SELECT * FROM components WHERE upgrade_id = :u AND state = 'UPGRADING' "
                      "ORDER BY position", {"u": upgrade_id}):
        age = clock.seconds_between(row["started_at"], now) or 0.0
        if not lock_live:
            why = "upgrading while no live process holds the lock"
        elif age > threshold_s:
            why = f"upgrading for {age:.0f} s (threshold {threshold_s:.0f} s)"
        else:
            continue
        out.append({"name": row["name"], "phase": row["phase"], "age_s": age, "why": why})
    return out
