"""The failure brake: a bad release stops spreading.

A plan's ``halt_after_failures = K``: once K hosts ended their last run of this plan
(the same plan file: the same sha256) FAILED or ROLLED_BACK, ``apply`` refuses to
start it on another host. It is a query over the runs the hosts shipped to the fleet
database (``plan_runs``): each host's last run of the plan counts, so a host that
failed and then completed on a retry no longer does.
"""

from __future__ import annotations

from typing import Any

from ledger.core import states
from ledger.store.database import Tx

#: How a run ends that counts against the brake.
BAD_ENDS = (states.FAILED, states.ROLLED_BACK)


def failed_hosts(tx: Tx, sha256: str) -> list[dict[str, Any]]:
    """The hosts whose last run of the plan *sha256* ended FAILED or ROLLED_BACK: host,
    upgrade_id, outcome, finished_at; by host name."""
    last: dict[str, Any] = {}
    for row in tx.all("SELECT host, upgrade_id, outcome, started_at, finished_at "
                      "FROM plan_runs WHERE plan_sha256 = :sha "
                      "ORDER BY host, started_at DESC, upgrade_id DESC", {"sha": sha256}):
        last.setdefault(row["host"], row)
    return [{"host": r["host"], "upgrade_id": r["upgrade_id"], "outcome": r["outcome"],
             "finished_at": r["finished_at"]}
            for r in last.values() if r["outcome"] in BAD_ENDS]
