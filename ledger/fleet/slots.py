"""Rolling-upgrade slots: at most N hosts run a plan at once.

A slot is a PostgreSQL session advisory lock, ``pg_try_advisory_lock(plan key, slot
number)``, held by ``apply`` on a connection of its own for the whole run. The
server frees it when that session ends, however it ends: a host that dies, reboots
or loses its connection frees its slot without anyone's help. Beside the lock, a
``fleet_slots`` row says who took it and since when; a row is believed only while
``pg_locks`` shows its session holding the lock, so a dead holder's row is ignored
(and overwritten by the next taker).

The key is the plan's name (``[upgrade] name``), not its sha256: a new release of
the same plan file counts against the same limit, as "at most N hosts upgrading the
stack at once" means (docs/fleet.md).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

from ledger.errors import LedgerError
from ledger.fleet.ship import SERVER_NOW
from ledger.store.database import Database


def plan_key(plan: str) -> int:
    """The advisory lock key of a plan's slots (the first 31 bits of a digest of its
    name: positive, so it reads the same in ``pg_locks.classid``)."""
    digest = hashlib.sha256(b"upgrade-ledger slots\0" + plan.encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


class Slots:
    """The slots of plan *plan* on the fleet connection *db* (one of its own: the
    locks live as long as its session)."""

    def __init__(self, db: Database, plan: str, sha256: str, pid: int) -> None:
        self.db = db
        self.plan = plan
        self.sha256 = sha256
        self.pid = pid
        self.key = plan_key(plan)
        #: The slot this process holds (1 to N), or None.
        self.slot: int | None = None

    def take(self, max_hosts: int) -> int | None:
        """Take a free slot of the *max_hosts* (the lowest); None when all are held."""
        got = None
        try:
            with self.db.write() as tx:
                for n in range(1, max_hosts + 1):
                    if tx.scalar("SELECT pg_try_advisory_lock(:k, :n)", {"k": self.key,
                                                                        "n": n}):
                        got = n
                        tx.execute(
                            "INSERT INTO fleet_slots (plan, slot, host, pid, backend_pid, "
                            f"plan_sha256, taken_at) VALUES (:plan, :n, :host, :pid, "
                            f"pg_backend_pid(), :sha, {SERVER_NOW}) ON CONFLICT (plan, slot) "
                            "DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                            "backend_pid = excluded.backend_pid, "
                            "plan_sha256 = excluded.plan_sha256, taken_at = excluded.taken_at",
                            {"plan": self.plan, "n": n, "pid": self.pid, "sha": self.sha256})
                        break
        except BaseException:
            if got is not None:  # a session lock outlives the transaction: let it go
                self._unlock(got)
            raise
        self.slot = got
        return got

    def holders(self, *, every_plan: bool = False) -> list[dict[str, Any]]:
        """Who holds this plan's slots (or every plan's), by slot: plan, slot, host,
        pid, taken_at, plan_sha256. Rows of sessions that no longer hold their lock
        are left out."""
        with self.db.read() as tx:
            return live_holders(tx, None if every_plan else self.plan)

    def release(self) -> bool:
        """Free the slot held; False when the session had lost it already (the
        connection broke: the server freed it then)."""
        slot, self.slot = self.slot, None
        if slot is None:
            return True
        with contextlib.suppress(LedgerError), self.db.write() as tx:
            tx.execute("DELETE FROM fleet_slots WHERE plan = :plan AND slot = :n "
                       "AND backend_pid = pg_backend_pid()", {"plan": self.plan, "n": slot})
        return self._unlock(slot)

    def _unlock(self, slot: int) -> bool:
        try:
            with self.db.write() as tx:
                return bool(tx.scalar("SELECT pg_advisory_unlock(:k, :n)",
                                      {"k": self.key, "n": slot}))
        except LedgerError:
            return False

    def close(self) -> None:
        """End the session (which frees whatever it still holds)."""
        with contextlib.suppress(Exception):
            self.db.close()


def live_holders(tx: Any, plan: str | None) -> list[dict[str, Any]]:
    """The slot rows (of *plan*, or of every plan) whose session holds the lock."""
    held = {(int(r[0]), int(r[1]), int(r[2])) for r in tx.all(
        "SELECT pid, CAST(classid AS bigint), CAST(objid AS bigint) FROM pg_locks "
        "WHERE locktype = 'advisory' AND granted AND objsubid = 2")}
    rows = tx.all("SELECT plan, slot, host, pid, backend_pid, plan_sha256, taken_at "
                  "FROM fleet_slots" + ("" if plan is None else " WHERE plan = :plan")
                  + " ORDER BY plan, slot", {"plan": plan})
    return [{"plan": r["plan"], "slot": r["slot"], "host": r["host"], "pid": r["pid"],
             "taken_at": r["taken_at"], "plan_sha256": r["plan_sha256"]}
            for r in rows if (r["backend_pid"], plan_key(r["plan"]), r["slot"]) in held]
