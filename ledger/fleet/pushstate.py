"""How this host's pushes went, kept in its own ledger (``fleet_push``).

The fleet database's cursor is the authority on what was shipped; this is the host's
record of it, for ``status`` and ``doctor``: the event last shipped (as the fleet
confirmed it), the last push, and while pushes fail, how many failed in a row, the
last error and when to try again (backoff). It is written beside the ledger's rows,
never as a change of the ledger: no event, no view.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ledger.core import clock
from ledger.store.database import Database

#: The first retry after a failed push waits this long; each failure in a row doubles
#: it, up to ``BACKOFF_MAX_S``.
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0

_UPSERT = ("INSERT INTO fleet_push (host, fleet, shipped_event_id, pushed_at, attempted_at, "
           "failures, next_try_at, last_error, last_error_at) VALUES (:host, :fleet, "
           ":shipped, :pushed, :at, :failures, :next, :error, :error_at) "
           "ON CONFLICT (host) DO UPDATE SET fleet = excluded.fleet, "
           "shipped_event_id = excluded.shipped_event_id, pushed_at = excluded.pushed_at, "
           "attempted_at = excluded.attempted_at, failures = excluded.failures, "
           "next_try_at = excluded.next_try_at, last_error = excluded.last_error, "
           "last_error_at = excluded.last_error_at")


def backoff_s(failures: int) -> float:
    """How long to wait before the next try after *failures* failed pushes in a row."""
    if failures <= 0:
        return 0.0
    return float(min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(failures - 1, 16)))


def read(db: Database) -> dict[str, Any] | None:
    """This host's push record, or None before its first push."""
    with db.read() as tx:
        row = tx.one("SELECT * FROM fleet_push WHERE host = :host")
    return None if row is None else dict(zip(row.keys(), row, strict=True))


def succeeded(db: Database, fleet: str, shipped_event_id: int) -> None:
    """Record a push that shipped everything up to *shipped_event_id*."""
    at = clock.now()
    with db.write() as tx:
        tx.execute(_UPSERT, {"fleet": fleet, "shipped": shipped_event_id, "pushed": at,
                             "at": at, "failures": 0, "next": None, "error": None,
                             "error_at": None})


def failed(db: Database, fleet: str, error: str) -> dict[str, Any]:
    """Record a failed push (one more failure in a row; the next try backs off);
    return the record."""
    now = clock.now()
    with db.write() as tx:
        row = tx.one("SELECT * FROM fleet_push WHERE host = :host")
        failures = (row["failures"] if row is not None else 0) + 1
        wait = backoff_s(failures)
        record = {
            "fleet": fleet, "shipped": row["shipped_event_id"] if row is not None else 0,
            "pushed": row["pushed_at"] if row is not None else None, "at": now,
            "failures": failures,
            "next": clock.stamp(clock.parse(now) + timedelta(seconds=wait)),
            "error": error, "error_at": now}
        tx.execute(_UPSERT, record)
    return record


def wait_s(db: Database) -> float:
    """Seconds until the next try is due (0 when it is due now)."""
    record = read(db)
    if record is None or not record["next_try_at"]:
        return 0.0
    left = clock.seconds_between(clock.now(), record["next_try_at"]) or 0.0
    return max(0.0, left)


def unshipped(db: Database, shipped_event_id: int) -> tuple[int, str | None]:
    """(how many of this host's events are past *shipped_event_id*, the time of the
    oldest of them or None)."""
    with db.read() as tx:
        row = tx.one("SELECT COUNT(*) AS n, MIN(at) AS oldest FROM events "
                     "WHERE host = :host AND id > :after", {"after": shipped_event_id})
    return (int(row["n"]), row["oldest"]) if row is not None else (0, None)


def status(db: Database, fleet: str | None) -> dict[str, Any]:
    """The push record as ``status`` shows it: the fleet, the last push, what is not
    shipped yet (``lag_events``, ``lag_s``: the age of the oldest), the failures."""
    record = read(db) or {}
    shipped = int(record.get("shipped_event_id") or 0)
    count, oldest = unshipped(db, shipped)
    return {
        "fleet": fleet or record.get("fleet"),
        "pushed_at": record.get("pushed_at"),
        "shipped_event_id": shipped,
        "lag_events": count,
        "lag_s": clock.seconds_between(oldest, clock.now()) if oldest else 0.0,
        "failures": int(record.get("failures") or 0),
        "last_error": record.get("last_error"),
        "last_error_at": record.get("last_error_at"),
        "next_try_at": record.get("next_try_at"),
    }
