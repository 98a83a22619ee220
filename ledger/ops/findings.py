"""What doctor's checks share: their findings, the check type, and the context.

A check is a ``Check(name, run, repair)``: ``run(ctx)`` looks and returns a
``Finding``; ``repair(ctx)``, if any, applies the safe fix and says what it did.
Checks live beside what they check (``ledger.ops.doctor``, ``ledger.ops.snapshots``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.api import FLEET_URL_ENV, Ledger
from ledger.core.host import identity
from ledger.errors import LedgerError
from ledger.lock import DirLock
from ledger.store.connect import database_at
from ledger.store.database import Database
from ledger.store.home import Home
from ledger.store.sqlite import SqliteDatabase

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Finding:
    """What one check found. ``hint`` says what to do; ``repaired`` what --repair did."""

    check: str
    status: str
    detail: str
    hint: str | None = None
    repaired: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The stable JSON shape: check, status, detail, hint, repaired."""
        return {"check": self.check, "status": self.status, "detail": self.detail,
                "hint": self.hint, "repaired": self.repaired}


class Unavailable(LedgerError):
    """The database cannot be used by a check (the reason is the message)."""


class Context:
    """What the checks share: the home, the settings, and the database opened lazily.

    Checks only read; ``ledger()`` (a full ``Ledger``, which may create folders and
    fix modes as any command does) is opened only by repairs.
    """

    def __init__(self, home: Home, *, db_url: str | None, env: Any, pid: int | None,
                 lock_timeout_s: float, stuck_after_s: float, wal_warn_bytes: int,
                 quick: bool, ledger: Ledger | None = None,
                 host_name: str | None = None, fleet_url: str | None = None) -> None:
        self.home = home
        self.host_name = host_name
        #: The fleet database this host ships to (None: none configured).
        self.fleet_url = fleet_url if fleet_url is not None else (
            ledger.fleet_url if ledger is not None else
            (env or os.environ).get(FLEET_URL_ENV) or None)
        self.db_url = db_url
        self.env = env
        self.pid = pid
        self.lock_timeout_s = lock_timeout_s
        self.stuck_after_s = stuck_after_s
        self.wal_warn_bytes = wal_warn_bytes
        self.quick = quick
        #: Why the database must not be used (set by the integrity and schema checks).
        self.blocked: str | None = None
        self._given = ledger
        self._ledger = ledger
        self._db: Database | None = ledger.db if ledger is not None else None

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file of the ledger, or None for a ``--db URL`` ledger."""
        if self._given is not None:
            db = self._given.db
            return db.path if isinstance(db, SqliteDatabase) else None
        return None if self.db_url else self.home.db_path

    def database(self) -> Database:
        """The ledger database for reading; never created, never migrated."""
        if self.blocked:
            raise Unavailable(self.blocked)
        if self._db is None:
            path = self.sqlite_path
            if path is None:
                self._db = database_at(self.db_url or "", None)
            elif not path.is_file():
                raise Unavailable(f"there is no ledger at {path}")
            else:
                self._db = SqliteDatabase(path)
            # Checks read this host's rows, as the commands do.
            self._db.identity = identity(self.env or os.environ, self.host_name)
        return self._db

    def ledger(self) -> Ledger:
        """The full ledger, for repairs (changes go through it and are events)."""
        if self.blocked:
            raise Unavailable(self.blocked)
        if self._ledger is None:
            self.database()  # the same refusals as for reading (missing file ...)
            self._ledger = Ledger(self.home.root, db_url=self.db_url, env=self.env,
                                  pid=self.pid, lock_timeout_s=self.lock_timeout_s,
                                  host_name=self.host_name)
            self._drop_own_db()  # from now on, read through the ledger's connection
        return self._ledger

    def lock(self) -> DirLock:
        """The lock; the ledger's own when it is open (so a break is an event)."""
        if self._ledger is not None:
            return self._ledger.lock
        return DirLock(self.home.lock_dir, timeout_s=self.lock_timeout_s)

    def _drop_own_db(self) -> None:
        """Close the connection this context opened itself (not the ledger's)."""
        if self._db is not None and (self._ledger is None or self._db is not self._ledger.db):
            self._db.close()
        self._db = None if self._ledger is None else self._ledger.db

    def reset(self) -> None:
        """Forget what the last pass learnt, so that re-checks look afresh."""
        self.blocked = None
        self._drop_own_db()

    def close(self) -> None:
        """Close what this context opened (a ledger given by the caller stays open)."""
        self._drop_own_db()
        if self._ledger is not None and self._ledger is not self._given:
            self._ledger.close()
        self._db = self._ledger = None


@dataclass(frozen=True)
class Check:
    """One check: ``run`` looks, ``repair`` (if any) applies the safe fix and says what
    it did (None when there was nothing it could safely do)."""

    name: str
    run: Callable[[Context], Finding]
    repair: Callable[[Context], str | None] | None = None


