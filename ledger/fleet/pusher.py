"""Pushing as changes happen: ``fleet push --follow``, and the pusher of an ``apply`` run.

A ``Pusher`` keeps one connection to the fleet database and pushes this host's ledger
(``ship.push``); a failure is recorded in the host's ledger (``pushstate``), the
connection dropped, and the next try waits (backoff). ``follow`` pushes whenever the
ledger changes, and at least every ``HEARTBEAT_S`` (the fleet then knows the host is
there), until stopped or, for a pusher a step started, once the host is idle.
``RunPusher`` is a thread that does the same beside an ``apply`` run, so that no
step of the run ever waits on the network.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ledger.api import Ledger
from ledger.core.host import Identity
from ledger.errors import BadInput, FleetUnavailable, LedgerError
from ledger.fleet import connect, pushstate, ship, spawn
from ledger.lock import DirLock
from ledger.store import urls
from ledger.store.database import Database
from ledger.store.home import Home
from ledger.store.sqlite import SqliteDatabase

#: How often a follower looks for changes of the host's ledger (seconds).
POLL_S = 0.2
#: A follower pushes at least this often, changes or not (seconds).
HEARTBEAT_S = 60.0
#: A pusher a step started gives up after this long idle while pushes keep failing.
GIVE_UP_S = 300.0
#: How long a new pusher tries to take the lock a step may be looking at (seconds).
LOCK_TRIES_S = 0.5


class Pusher:
    """Pushes the ledger at *db_path* (host *identity*) to the fleet at *fleet_url*."""

    def __init__(self, db_path: Path, identity: Identity, fleet_url: str, *,
                 batch: int = ship.BATCH) -> None:
        self.fleet_url = connect.check_url(fleet_url)
        self.shown_url = urls.mask(fleet_url)
        self.identity = identity
        self.batch = batch
        self.db_path = db_path
        self._file = _file_id(db_path)
        self.local: Database = _open_local(db_path, identity)
        self._fleet: Database | None = None
        record = pushstate.read(self.local) or {}
        #: The last event the fleet confirmed it has (0 before the first push).
        self.shipped = int(record.get("shipped_event_id") or 0)
        #: Whether the last push failed.
        self.failing = bool(record.get("failures"))

    def push(self) -> ship.Pushed:
        """Push now; on failure, record it (with its backoff) and raise
        ``FleetUnavailable`` (or the ``LedgerError`` that stopped it)."""
        try:
            if self._fleet is None:
                self._fleet = connect.open_fleet(self.fleet_url, self.identity)
            done = ship.push(self.local, self._fleet, batch=self.batch)
        except LedgerError as exc:
            self._drop()
            self.failing = True
            error = exc if isinstance(exc, FleetUnavailable) or \
                not isinstance(exc, OSError) else FleetUnavailable(str(exc))
            with contextlib.suppress(LedgerError):
                pushstate.failed(self.local, self.shown_url, str(error))
            if error is exc:
                raise
            raise error from exc
        self.shipped, self.failing = done.shipped_event_id, False
        pushstate.succeeded(self.local, self.shown_url, self.shipped)
        return done

    def try_push(self, *, wait: bool = True) -> bool:
        """Push unless the backoff says not yet (*wait*: honour it); True when the push
        was made and succeeded. Never raises a ``LedgerError``."""
        try:
            if wait and pushstate.wait_s(self.local) > 0:
                return False
            self.push()
        except LedgerError:
            return False
        return True

    def newest(self) -> int:
        """The newest event id of the host's ledger (0 when it has none). A ledger.db
        replaced since it was opened (``restore``) is opened again: the connection
        would go on reading the file set aside."""
        now = _file_id(self.db_path)
        if now is not None and now != self._file:
            self.local.close()
            self.local = _open_local(self.db_path, self.identity)
            self._file = now
            # What the new file says was shipped: the next push finds out the rest.
            self.shipped = int((pushstate.read(self.local) or {}).get("shipped_event_id")
                               or 0)
        with self.local.read() as tx:
            return int(tx.scalar("SELECT COALESCE(MAX(id), 0) FROM events "
                                 "WHERE host = :host") or 0)

    def _drop(self) -> None:
        if self._fleet is not None:
            with contextlib.suppress(Exception):
                self._fleet.close()
            self._fleet = None

    def close(self) -> None:
        self._drop()
        self.local.close()


def _open_local(path: Path, identity: Identity) -> Database:
    """The host's ledger, as a pusher reads it. Its only writes are its record of the
    pushes, which a power loss may lose (the next push writes it again): they are
    committed without an fsync each, not to take the disk from the steps."""
    db = SqliteDatabase(path, synchronous="NORMAL")
    db.identity = identity
    return db


def _file_id(path: Path) -> tuple[int, int] | None:
    """Which file *path* is (device, inode), or None when there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pusher_for(ledger: Ledger, *, batch: int = ship.BATCH) -> Pusher:
    """A ``Pusher`` of *ledger* to its fleet database (``ledger.fleet_url``)."""
    if ledger.fleet_url is None:
        raise BadInput("no fleet database is configured: give --fleet URL (or "
                       "LEDGER_FLEET_URL); docs/fleet.md")
    if not isinstance(ledger.db, SqliteDatabase):
        raise BadInput("the fleet ships a host's own ledger (SQLite, in its home); a --db "
                       "ledger is on its server already")
    return Pusher(ledger.db.path, ledger.identity, ledger.fleet_url, batch=batch)


def push(ledger: Ledger, *, batch: int = ship.BATCH) -> ship.Pushed:
    """Push *ledger* to its fleet database now (``fleet push``): every row the fleet
    lacks, in batches of *batch* events; ``FleetUnavailable`` when it cannot."""
    pusher = pusher_for(ledger, batch=batch)
    try:
        return pusher.push()
    finally:
        pusher.close()


def take_lock(home_root: Path) -> int | None:
    """The pusher lock of a home (its descriptor), or None when another pusher holds
    it. A step only glances at the lock; a pusher that finds it busy tries again for
    a moment before leaving it to the other pusher."""
    deadline = time.monotonic() + LOCK_TRIES_S
    while True:
        fd = spawn.try_lock(spawn.lock_path(home_root))
        if fd is not None or time.monotonic() >= deadline:
            return fd
        time.sleep(0.02)


def follow(pusher: Pusher, home: Home, *, stop: Callable[[], bool],
           idle_exit_s: float | None = None, lock_fd: int | None = None) -> None:
    """Push as the ledger changes until *stop* says so; with *idle_exit_s*, also once
    nothing changed for that long, the home's upgrade lock is not held by a live
    process, and everything was shipped (or, pushes failing, ``GIVE_UP_S`` passed).
    *lock_fd* is the pusher lock this follower holds (released as it leaves)."""
    lock = DirLock(home.lock_dir)
    seen = pusher.newest()
    changed_at = time.monotonic()
    pushed_at = float("-inf")
    try:
        while not stop():
            newest = pusher.newest()
            now = time.monotonic()
            if newest != seen:
                seen, changed_at = newest, now
            if (newest > pusher.shipped or now - pushed_at >= HEARTBEAT_S) and \
                    pusher.try_push():
                pushed_at = now
            if idle_exit_s is not None and _idle(pusher, lock, now - changed_at, idle_exit_s):
                # Leave, but not past a change made while the lock was being let go:
                # the step that made it saw a pusher running and started none.
                if lock_fd is not None:
                    os.close(lock_fd)
                    lock_fd = None
                if pusher.newest() == seen:
                    return
                lock_fd = take_lock(home.root)
                if lock_fd is None:
                    return  # another pusher took over
            time.sleep(POLL_S)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _idle(pusher: Pusher, lock: DirLock, quiet_s: float, idle_exit_s: float) -> bool:
    """Whether a pusher a step started may leave: quiet long enough, no script
    between its steps (the lock held), and nothing left to ship (or giving up)."""
    if quiet_s < idle_exit_s:
        return False
    with contextlib.suppress(LedgerError, OSError):
        if lock.is_held():
            return False  # a script is between steps: stay, and keep the fleet told
    if pusher.failing:
        return quiet_s >= max(GIVE_UP_S, idle_exit_s)
    return pusher.shipped >= pusher.newest()


class RunPusher:
    """Pushes beside an ``apply`` run: after each change (``poke``), and at least every
    ``HEARTBEAT_S``; ``finish`` makes a last push, waiting for it at most a budget.
    It holds the home's pusher lock when it can, so steps start no other pusher."""

    def __init__(self, db_path: Path, identity: Identity, fleet_url: str,
                 home_root: Path) -> None:
        self.pusher = Pusher(db_path, identity, fleet_url)
        self._lock_fd = take_lock(home_root)
        self._wake = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="fleet-push", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """A change was made: push it."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(HEARTBEAT_S)
            self._wake.clear()
            if self._done:
                self.pusher.try_push(wait=False)  # the last push: backoff or not
                return
            self.pusher.try_push()

    def finish(self, budget_s: float) -> bool:
        """Make the last push and wait for it at most *budget_s*; True when everything
        was shipped."""
        self._done = True
        self._wake.set()
        self._thread.join(budget_s)
        shipped = not self._thread.is_alive() and \
            self.pusher.shipped >= self.pusher.newest()
        if not self._thread.is_alive():
            self.pusher.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return shipped
