"""Following the audit trail as other processes write it (``events --follow``).

Events are append-only and their ids commit in increasing order (writers are
serialised by the database), so following is polling for ids above the last one
seen: one cheap ``MAX(id)`` per poll, and a filtered read only when it moved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from ledger import queries
from ledger.core import clock

if TYPE_CHECKING:
    from ledger.api import Ledger

#: Events read per query; a bigger backlog is read page by page without sleeping.
PAGE = 500
#: Longest sleep between two looks at *stop* (a signal ends a wait this fast).
_NAP_S = 0.05


def follow(ledger: Ledger, *, stop: Callable[[], bool], interval_s: float = 0.5,
           upgrade_id: str | None = None, component: str | None = None,
           kind: str | None = None, since: str | None = None,
           after_id: int = 0) -> Generator[list[dict[str, Any]], None, None]:
    """Yield the matching events after *after_id*, oldest first, then the new ones as
    they are committed, until *stop()* is true.

    Each poll yields a list (empty when nothing new matched), so the caller can check
    its output between polls. Filters are those of ``queries.events``. An age given
    as *since* (``0s``, ``10m``) is turned into a time here, once, when following
    starts: taken again at each poll, ``0s`` would always be later than every event.
    """
    anchored = None if since is None else clock.parse_when(since)
    return _poll(ledger, stop, interval_s, upgrade_id=upgrade_id, component=component,
                 kind=kind, since=anchored, after_id=after_id)


def _poll(ledger: Ledger, stop: Callable[[], bool], interval_s: float, *,
          upgrade_id: str | None, component: str | None, kind: str | None,
          since: str | None, after_id: int) -> Generator[list[dict[str, Any]], None, None]:
    last = int(after_id)  # every event up to here has been looked at
    while not stop():
        with ledger.db.read() as tx:
            newest = int(tx.scalar("SELECT COALESCE(MAX(id), 0) FROM events"))
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


def _nap(seconds: float, stop: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not stop():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, _NAP_S))
