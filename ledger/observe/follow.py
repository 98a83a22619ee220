"""Following the audit trail as other processes write it (``events --follow``).

Events are append-only and one host's ids commit in increasing order (its writers
are serialised by the database), so following a host is polling for ids above the
last one seen: one cheap ``MAX(id)`` per poll, and a filtered read only when it
moved. Different hosts of a shared ledger commit side by side, so an id can commit
after a higher one of another host: following every host keeps one such mark per
host (``_follow_every_host``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from ledger import queries
from ledger.core import clock
from ledger.store.database import ALL_HOSTS

if TYPE_CHECKING:
    from ledger.api import Ledger

#: Events read per query; a bigger backlog is read page by page without sleeping.
PAGE = 500
#: Longest sleep between two looks at *stop* (a signal ends a wait this fast).
_NAP_S = 0.05


def follow(ledger: Ledger, *, stop: Callable[[], bool], interval_s: float = 0.5,
           upgrade_id: str | None = None, component: str | None = None,
           kind: str | None = None, since: str | None = None,
           after_id: int = 0, host: str | None = None,
           ) -> Generator[list[dict[str, Any]], None, None]:
    """Yield the matching events after *after_id*, oldest first, then the new ones as
    they are committed, until *stop()* is true.

    Each poll yields a list (empty when nothing new matched), so the caller can check
    its output between polls. Filters are those of ``queries.events``; the events are
    this host's, *host*'s, or every host's (``ALL_HOSTS``). An age given as *since*
    (``0s``, ``10m``) is turned into a time here, once, when following starts: taken
    again at each poll, ``0s`` would always be later than every event.
    """
    anchored = None if since is None else clock.parse_when(since)
    if host == ALL_HOSTS:
        return _follow_every_host(ledger, stop=stop, interval_s=interval_s,
                                  after_id=int(after_id),
                                  filters={"upgrade_id": upgrade_id, "component": component,
                                           "kind": kind, "since": anchored})
    return _poll(ledger, stop, interval_s, host=host, upgrade_id=upgrade_id,
                 component=component, kind=kind, since=anchored, after_id=after_id)


def _poll(ledger: Ledger, stop: Callable[[], bool], interval_s: float, *, host: str | None,
          upgrade_id: str | None, component: str | None, kind: str | None,
          since: str | None, after_id: int) -> Generator[list[dict[str, Any]], None, None]:
    """``follow`` over one host's events."""
    last = int(after_id)  # every event up to here has been looked at
    while not stop():
        with ledger.db.read(host) as tx:
            newest = int(tx.scalar("SELECT COALESCE(MAX(id), 0) FROM events e WHERE "
                                   + queries.in_scope(tx, "e")))
            rows = [] if newest <= last else queries.events(
                tx, upgrade_id=upgrade_id, component=component, kind=kind, since=since,
                after_id=last, limit=PAGE)
        if len(rows) == PAGE:
            last = rows[-1]["id"]
            yield rows
            continue  # more backlog: no sleep
        # Fewer than a page: every match up to *newest* (same snapshot) is in hand.
        last = max(last, newest)
        yield rows
        _nap(interval_s, stop)


def _follow_every_host(ledger: Ledger, *, stop: Callable[[], bool], interval_s: float,
                       after_id: int, filters: dict[str, Any],
                       ) -> Generator[list[dict[str, Any]], None, None]:
    """``follow`` over every host: a mark per host (each host's ids commit in order),
    and each poll reads from the lowest mark, keeping what is above its host's."""
    marks: dict[str, int] = {}  # host -> every event of it up to here was looked at
    while not stop():
        with ledger.db.read(ALL_HOSTS) as tx:
            tops = {str(r[0]): int(r[1]) for r in tx.all(
                "SELECT host, MAX(id) FROM events WHERE id > :after GROUP BY host",
                {"after": after_id})}
            floor = min([marks.get(h, after_id) for h in tops], default=after_id)
            moved = any(top > marks.get(h, after_id) for h, top in tops.items())
            rows = queries.events(tx, after_id=floor, limit=PAGE, **filters) if moved else []
        fresh = [r for r in rows if r["id"] > marks.get(r["host"], after_id)]
        full = len(rows) == PAGE
        edge = rows[-1]["id"] if full else None  # a full page: only up to its last id
        for name, top in tops.items():
            mark = top if edge is None else min(top, edge)
            marks[name] = max(marks.get(name, after_id), mark)
        yield fresh
        if not full:
            _nap(interval_s, stop)


def _nap(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, _NAP_S))
