"""Reading the fleet database: every host as it was shipped, one row per host, the
history across hosts, one host's upgrade in full, and read-only SQL.

The fleet database holds the ledger's own schema, so the same queries read it
(``ledger.queries``), in the scope of one host or of every host. Ages are the
server's (``clock_timestamp()``): hosts' clocks may disagree, the fleet's is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ledger import queries
from ledger.api import check_report
from ledger.core import states
from ledger.core.host import Identity, check_host
from ledger.core.validate import check_id
from ledger.errors import NotFound
from ledger.fleet import connect
from ledger.fleet.slots import live_holders
from ledger.store import meta
from ledger.store.database import ALL_HOSTS, REPORT_TIMEOUT_S, Rows
from ledger.views.document import second

#: A host with an upgrade in progress that has not pushed for this long is flagged
#: silent in ``status`` (crashed, or cut off from the fleet database).
SILENT_AFTER_S = 600.0


class Fleet:
    """The fleet database at *url*, read (nothing is created: a database nothing was
    pushed to is ``NoLedger``). *identity* is whoever reads (any host, or none)."""

    def __init__(self, url: str, identity: Identity) -> None:
        self.db = connect.open_fleet(url, identity, create=False)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def status(self, *, silent_after_s: float = SILENT_AFTER_S) -> list[dict[str, Any]]:
        """One row per host: its current (or last) upgrade, state, outcome, progress,
        phase and component, its last change, its last push and how long ago, whether
        it is ``silent`` (an upgrade in progress and no push for *silent_after_s*), and
        the rolling-upgrade slots it holds."""
        with self.db.read(ALL_HOSTS) as tx:
            rows = tx.all(
                "SELECT s.*, EXTRACT(EPOCH FROM (clock_timestamp() - CAST(COALESCE("
                "s.pushed_at, s.updated_at) AS timestamptz))) AS quiet_s "
                "FROM host_status s ORDER BY s.host")
            slots: dict[str, list[dict[str, Any]]] = {}
            for holder in live_holders(tx, None):
                slots.setdefault(holder["host"], []).append(holder)
        out = []
        for r in rows:
            quiet = None if r["quiet_s"] is None else round(float(r["quiet_s"]), 1)
            out.append({
                "host": r["host"], "upgrade_id": r["upgrade_id"], "state": r["state"],
                "outcome": r["outcome"], "progress_percent": int(r["progress_percent"]),
                "phase": r["phase"], "component": r["component"],
                "updated_at": second(r["updated_at"]), "pushed_at": second(r["pushed_at"]),
                "quiet_s": quiet,
                "silent": states.is_in_progress(r["state"]) and
                (quiet is None or quiet > silent_after_s),
                "slots": [{"plan": h["plan"], "slot": h["slot"],
                           "since": second(h["taken_at"])} for h in slots.get(r["host"], [])],
            })
        return out

    def history(self, limit: int | None = 10, *, state: str | None = None,
                since: str | None = None, until: str | None = None,
                component: str | None = None, host: str | None = None,
                ) -> list[dict[str, Any]]:
        """Upgrades of every host (or of *host*) newest first, filtered as
        ``Ledger.history`` filters them."""
        scope = ALL_HOSTS if host is None else check_host(host)
        with self.db.read(scope) as tx:
            return queries.history(tx, limit=limit, state=state, since=since, until=until,
                                   component=component)

    def show(self, host: str, upgrade_id: str | None = None) -> dict[str, Any]:
        """Everything about one upgrade of *host* (default: its current one), as
        ``Ledger.show`` has it."""
        with self.db.read(check_host(host)) as tx:
            if upgrade_id is None:
                upgrade_id = meta.current_upgrade(tx)
                if upgrade_id is None:
                    raise NotFound(f"host {host!r} has no upgrade in the fleet database")
            return queries.show(tx, check_id(upgrade_id))

    def report(self, sql: str, params: Mapping[str, Any] | None = None, *,
               timeout_s: float | None = REPORT_TIMEOUT_S) -> Rows:
        """One read-only query on the fleet database, streamed (as ``Ledger.report``)."""
        check_report(sql, params, timeout_s)
        return self.db.report(sql, params, timeout_s=timeout_s)
