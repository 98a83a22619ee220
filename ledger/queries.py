"""Read-side queries: history, one upgrade in full, the audit trail, the summary.

Functions take an open transaction so the API decides the snapshot, and the
transaction's host scope decides whose rows they see: one host's, or every host's
(``in_scope``). History
queries select the page of upgrades first (by the ``started_at`` index) and only then
count their components, so they stay fast with 100,000 upgrades in the ledger.
"""

from __future__ import annotations

import json
from typing import Any

from ledger.core import clock, states
from ledger.core.validate import MAX_NAME, MAX_ROW_ID, check_id, check_name, unprintable
from ledger.errors import BadInput, NotFound
from ledger.store.database import Row, Tx
from ledger.views.document import add_kept, second

#: The annotation ``apply`` records when it starts an upgrade: the plan file driving it.
PLAN_EVENT = "apply.plan"

_COMPONENT_KEYS = ("phase", "name", "state", "from_version", "to_version", "attempts",
                   "last_error", "note", "started_at", "completed_at", "failed_at",
                   "backup_path")


def in_scope(tx: Tx, alias: str) -> str:
    """The condition that keeps the rows of table *alias* in the transaction's scope:
    its host's, or every host's."""
    return "1 = 1" if tx.host is None else f"{alias}.host = :host"


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
                 "THEN 1 ELSE 0 END) AS done FROM components WHERE host = :host AND "
                 "upgrade_id = :u", {"u": upgrade["id"], "host": upgrade["host"]})
    total, done = (row["total"] or 0, row["done"] or 0) if row is not None else (0, 0)
    if total == 0:
        return 100 if (upgrade["outcome"] or upgrade["state"]) == states.COMPLETED else 0
    return done * 100 // total


def summary_data(tx: Tx, upgrade: Row) -> dict[str, Any]:
    """What the summary says, as data: state, where the run is, progress, components
    by state, live rollback points, phases and the error."""
    uid = upgrade["id"]
    counts = {r["state"]: r["n"] for r in tx.all(
        "SELECT state, COUNT(*) AS n FROM components WHERE host = :host AND upgrade_id = :u "
        "GROUP BY state ORDER BY state", {"u": uid})}
    return {
        "upgrade_id": uid, "state": upgrade["state"], "outcome": upgrade["outcome"],
        "started_at": second(upgrade["started_at"]),
        "updated_at": second(upgrade["updated_at"]),
        "phase": upgrade["current_phase"], "component": upgrade["current_component"],
        "progress_percent": progress(tx, upgrade),
        "done": counts.get("COMPLETED", 0) + counts.get("SKIPPED", 0),
        "total": sum(counts.values()), "components": counts,
        "rollback_points": tx.scalar("SELECT COUNT(*) FROM rollback_points WHERE "
                                     "host = :host AND upgrade_id = :u AND cleared_at IS NULL",
                                     {"u": uid}),
        "phases": [{"name": p["name"], "state": p["state"]} for p in tx.all(
            "SELECT name, state FROM phases WHERE host = :host AND upgrade_id = :u "
            "ORDER BY position",
            {"u": uid})],
        "error": upgrade["error"],
    }


def summary(tx: Tx, upgrade: Row) -> str:
    """The legacy ``upgrade_get_summary`` text, a few lines an operator reads at a glance."""
    data = summary_data(tx, upgrade)
    points = data["rollback_points"]
    lines = [
        f"Upgrade:   {data['upgrade_id']}",
        f"State:     {data['state']}"
        + (f" (outcome {data['outcome']})" if data["outcome"] and
           data["outcome"] != data["state"] else ""),
        f"Started:   {data['started_at']}   Updated: {data['updated_at']}",
        f"Phase:     {data['phase'] or '-'}",
        f"Component: {data['component'] or '-'}",
        f"Progress:  {data['progress_percent']}% ({data['done']}/{data['total']} components"
        + "".join(f", {n} {state_words(s)}" for s, n in sorted(data["components"].items())
                  if s not in ("COMPLETED", "SKIPPED")) + ")",
        f"Rollback:  {'available (' + str(points) + ' points)' if points else 'none'}",
    ]
    undone = tx.all("SELECT name, phase FROM components WHERE host = :host AND upgrade_id = :u "
                    "AND state = 'ROLLED_BACK' ORDER BY position DESC", {"u": data["upgrade_id"]})
    if undone:  # in the order a rollback undoes them: the reverse of the plan's
        lines.append("Rolled back: " + ", ".join(f"{c['name']} ({c['phase']})"
                                                 for c in undone))
    lines += [f"  phase {p['name']}: {p['state']}" for p in data["phases"]]
    if data["error"]:
        lines.append(f"Error:     {data['error']}")
    return "\n".join(lines)


def state_words(state: str) -> str:
    """A state as words in a sentence: ``ROLLED_BACK`` -> ``rolled back``."""
    return state.lower().replace("_", " ")


def _upgrade_dict(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"], "host": row["host"], "state": row["state"], "outcome": row["outcome"],
        "hostname": row["hostname"], "user": row["username"],
        "started_at": second(row["started_at"]), "updated_at": second(row["updated_at"]),
        "finished_at": second(row["finished_at"]),
        "duration_s": clock.seconds_between(row["started_at"], row["finished_at"]),
        "superseded_by": row["superseded_by"], "error": row["error"],
    }


def history(tx: Tx, *, limit: int | None = 10, state: str | None = None,
            since: str | None = None, until: str | None = None,
            component: str | None = None) -> list[dict[str, Any]]:
    """Upgrades newest first, of the transaction's host (or every host's). *state*
    matches the current state or the outcome (a COMPLETED run reset to IDLE is still
    found as COMPLETED); *since*/*until* bound ``started_at`` (dates, times or ages,
    see ``clock.parse_when``); *component* keeps upgrades that touched it."""
    if limit is not None and (isinstance(limit, bool) or not 0 < limit <= 1_000_000):
        raise BadInput("limit must be a whole number from 1 to 1000000")
    where: list[str] = [in_scope(tx, "u")]
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
        where.append("EXISTS (SELECT 1 FROM components c WHERE c.host = u.host "
                     "AND c.upgrade_id = u.id AND c.name = :component)")
        params["component"] = check_name(component, "component")
    sql = ("SELECT u.* FROM upgrades u WHERE " + " AND ".join(where)
           + " ORDER BY u.started_at DESC, u.id DESC, u.host"
           + (" LIMIT :limit" if limit is not None else ""))
    if limit is not None:
        params["limit"] = limit
    rows = tx.all(sql, params)
    if not rows:
        return []
    ids = {(r["host"], r["id"]): i for i, r in enumerate(rows)}
    out = [dict(_upgrade_dict(r), components=0, completed=0, failed=0) for r in rows]
    # Count the page's components in one query (bind ids in chunks: SQLite caps
    # the number of parameters).
    id_list = sorted({uid for _, uid in ids})
    for start in range(0, len(id_list), 500):
        chunk = id_list[start:start + 500]
        marks = ", ".join(f":i{n}" for n in range(len(chunk)))
        for c in tx.all(
            "SELECT c.host, c.upgrade_id, COUNT(*) AS total, "
            "SUM(CASE WHEN c.state = 'COMPLETED' THEN 1 ELSE 0 END) AS completed, "
            "SUM(CASE WHEN c.state = 'FAILED' THEN 1 ELSE 0 END) AS failed "
            f"FROM components c WHERE {in_scope(tx, 'c')} AND c.upgrade_id IN ({marks}) "
            "GROUP BY c.host, c.upgrade_id",
            {f"i{n}": uid for n, uid in enumerate(chunk)},
        ):
            if (c["host"], c["upgrade_id"]) not in ids:
                continue  # another host's upgrade of the same id, not on this page
            item = out[ids[c["host"], c["upgrade_id"]]]
            item.update(components=c["total"], completed=c["completed"], failed=c["failed"])
    return out


def show(tx: Tx, upgrade_id: str) -> dict[str, Any]:
    """One upgrade in full: phases with durations, components, rollback points, events."""
    row = tx.one("SELECT * FROM upgrades WHERE host = :host AND id = :u", {"u": upgrade_id})
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
        for p in tx.all("SELECT * FROM phases WHERE host = :host AND upgrade_id = :u ORDER BY "
                        "position",
                        {"u": upgrade_id})
    ]
    out["components"] = [component_dict(c) for c in tx.all(
        "SELECT * FROM components WHERE host = :host AND upgrade_id = :u ORDER BY "
        "position", {"u": upgrade_id})]
    out["rollback_points"] = [
        {"component": r["component"], "backup_path": r["backup_path"],
         "size_bytes": r["size_bytes"], "sha256": r["sha256"],
         "created_at": second(r["created_at"]), "cleared_at": second(r["cleared_at"])}
        for r in tx.all("SELECT * FROM rollback_points WHERE host = :host AND upgrade_id = :u "
                        "ORDER BY id",
                        {"u": upgrade_id})
    ]
    out["events"] = events(tx, upgrade_id=upgrade_id, limit=None)
    return out


def event_dict(row: Row) -> dict[str, Any]:
    """An event row as the API, CLI and notifications show it."""
    return {
        "id": row["id"], "host": row["host"], "at": row["at"], "upgrade_id": row["upgrade_id"],
        "kind": row["kind"], "subject": row["subject"], "from": row["from_value"],
        "to": row["to_value"], "user": row["username"], "hostname": row["hostname"],
        "pid": row["pid"],
        "detail": json.loads(row["detail"]) if row["detail"] else None,
    }


def events(tx: Tx, *, upgrade_id: str | None = None, component: str | None = None,
           kind: str | None = None, since: str | None = None, after_id: int = 0,
           pid: int | None = None, limit: int | None = 1000,
           newest: bool = False) -> list[dict[str, Any]]:
    """The audit trail oldest first, of the transaction's host (or every host's),
    filtered. *kind* matches exactly or as a prefix ending in '.' (``component.`` for
    every component event); *after_id* pages. *limit* keeps the first matching events
    after *after_id*, or with *newest* the last ones (as ``tail -n`` does), still
    returned oldest first. *pid* picks the changes made for one process."""
    if isinstance(after_id, bool) or not isinstance(after_id, int) or \
            not 0 <= after_id <= MAX_ROW_ID:
        raise BadInput(f"after_id must be a whole number from 0 to {MAX_ROW_ID}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or
                              not 0 < limit <= MAX_ROW_ID):
        raise BadInput(f"limit must be a whole number from 1 to {MAX_ROW_ID}")
    where = [in_scope(tx, "e"), "e.id > :after"]
    params: dict[str, Any] = {"after": after_id}
    if pid is not None:
        where.append("e.pid = :pid")
        params["pid"] = int(pid)
    if upgrade_id is not None:
        where.append("e.upgrade_id = :u")
        params["u"] = check_id(upgrade_id)
    if component is not None:
        where.append("e.subject = :c AND e.kind LIKE 'component.%'")
        params["c"] = check_name(component, "component")
    if kind is not None:
        if not isinstance(kind, str) or len(kind) > MAX_NAME or unprintable(kind):
            raise BadInput(f"event kind {kind!r} is not printable text of at most "
                           f"{MAX_NAME} characters")
        if kind.endswith("."):
            where.append("e.kind LIKE :k")
            params["k"] = kind + "%"
        else:
            where.append("e.kind = :k")
            params["k"] = kind
    if since is not None:
        where.append("e.at >= :since")
        params["since"] = clock.parse_when(since)
    sql = "SELECT e.* FROM events e WHERE " + " AND ".join(where)
    if limit is None:
        sql += " ORDER BY e.id"
    elif newest:
        sql = f"SELECT * FROM ({sql} ORDER BY e.id DESC LIMIT :limit) AS tail ORDER BY id"
    else:
        sql += " ORDER BY e.id LIMIT :limit"
    if limit is not None:
        params["limit"] = int(limit)
    return [event_dict(r) for r in tx.all(sql, params)]


def stuck(tx: Tx, upgrade_id: str, *, lock_live: bool, threshold_s: float,
          ) -> list[dict[str, Any]]:
    """Components UPGRADING with no live lock holder, or for longer than *threshold_s*."""
    now = clock.now()
    out = []
    for row in tx.all("SELECT * FROM components WHERE host = :host AND upgrade_id = :u AND state "
                      "= 'UPGRADING' "
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


def hosts(tx: Tx) -> list[dict[str, Any]]:
    """Every host with its current upgrade at a glance, by host name."""
    rows = tx.all(
        "SELECT h.name, h.machine_id, u.id, u.state, u.outcome, u.current_phase, "
        "u.current_component, u.updated_at, u.started_at, u.host FROM hosts h "
        "LEFT JOIN upgrades u ON u.host = h.name AND u.id = h.current_upgrade "
        "ORDER BY h.name")
    out = []
    for r in rows:
        out.append({
            "host": r["name"], "machine_id": r["machine_id"], "upgrade_id": r["id"],
            "state": r["state"] or states.IDLE, "outcome": r["outcome"],
            "phase": r["current_phase"], "component": r["current_component"],
            "progress_percent": 0 if r["id"] is None else progress(
                tx, {"id": r["id"], "host": r["name"], "outcome": r["outcome"],
                     "state": r["state"]}),
            "updated_at": second(r["updated_at"]),
        })
    return out


def plan_record(tx: Tx, upgrade_id: str) -> dict[str, Any] | None:
    """What ``apply`` recorded of the plan driving *upgrade_id* (``{sha256, path,
    name}``), or None for an upgrade driven some other way."""
    row = tx.one("SELECT detail FROM events WHERE host = :host AND upgrade_id = :u AND "
                 "kind = :k ORDER BY id DESC LIMIT 1", {"u": upgrade_id, "k": PLAN_EVENT})
    detail = json.loads(row["detail"]) if row is not None and row["detail"] else None
    return detail if isinstance(detail, dict) else None
