"""Restoring a snapshot in place of a damaged (or unwanted) ``ledger.db``.

``restore`` brings back the newest snapshot that passes ``PRAGMA integrity_check``,
keeps the damaged ``ledger.db`` (and its -wal/-shm) aside under a new name, never
deleting it, and then re-imports what the views know that the snapshot does not:
the current upgrade from state.json, and upgrades saved to history after the
snapshot, when their documents are newer (same lineage, higher serial).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.api import Ledger
from ledger.core import clock
from ledger.errors import Conflict, CorruptLedger, InvalidDocument, LedgerError, StorageError
from ledger.lock import DirLock
from ledger.ops.snapshots import check_file, check_live, find, newest_good, stamp
from ledger.store import meta
from ledger.store.files import fsync_dir
from ledger.store.home import Home
from ledger.views import document


@dataclass
class Restored:
    """What ``restore`` did."""

    snapshot: str
    aside: list[str] = field(default_factory=list)
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    current: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "aside": self.aside, "imported": self.imported,
                "skipped": self.skipped, "current": self.current}


def restore(home: Home, name: str | None = None, *, force: bool = False,
            pid: int | None = None, env: Mapping[str, str] | None = None,
            lock_timeout_s: float = 4 * 3600) -> Restored:
    """Put a snapshot (the newest good one, or *name*) in place of ``ledger.db``.

    Refused while another live process holds the upgrade lock, and, without *force*,
    when ledger.db is healthy. The replaced files are renamed
    ``ledger.db.corrupt-<stamp>`` (``.replaced-`` when it was healthy), never deleted.
    A ``ledger.restore`` event records the restore; documents newer than the snapshot
    are then imported (see the module docstring) and state.json is rewritten.
    """
    home.ensure()
    snap = find(home, name) if name is not None else None
    problem = check_live(home.db_path)
    if problem is None and not force:
        raise Conflict(f"{home.db_path} passes the integrity check; restoring would drop "
                       "what happened since the snapshot (use --force to restore anyway)")
    passed_over: list[str] = []
    if snap is None:
        snap, passed_over = newest_good(home)
    else:
        bad = check_file(snap.path)
        if bad is not None:
            raise CorruptLedger(f"snapshot {snap.name} is not usable: {bad}")

    owner = os.getpid() if pid is None else pid
    breaks: list[dict[str, Any]] = []
    lock = DirLock(home.lock_dir, timeout_s=lock_timeout_s, on_break=breaks.append)
    before = lock.status()
    ours_before = before.held and before.holder is not None and before.holder.pid == owner
    lock.acquire(owner)  # LockHeld while a live upgrade run holds it
    try:
        result = Restored(snapshot=snap.name, skipped=passed_over)
        result.aside = _move_aside(home, "corrupt" if problem is not None else "replaced")
        home.write_atomic(home.db_path, snap.path.read_bytes())
        with Ledger(home.root, env=env, pid=owner, lock_timeout_s=lock_timeout_s) as led:
            views = _views(led, result)
            newer = _newest_per_upgrade(led, views)  # judged against the snapshot alone
            _record(led, views, {"snapshot": snap.name, "problem": problem,
                                 "aside": result.aside, "lock_breaks": len(breaks)})
            # A stale lock taken over on the way is recorded like every break, now
            # that there is a ledger to record it in.
            for info in breaks:
                led.record_lock_break(info)
            for path, data, doc in newer:
                led.import_document(data, make_current=path == led.home.state_file)
                result.imported.append(f"{path.name} ({doc['upgrade_id']})")
            led.write_views()
            result.current = led.current_id()
    finally:
        if not ours_before:
            with contextlib.suppress(LedgerError):
                lock.release(owner)
    return result


def _move_aside(home: Home, why: str) -> list[str]:
    """Rename ledger.db and its -wal/-shm/-journal out of the way; return the new names."""
    when = stamp(clock.now())
    moved = []
    for suffix in ("", "-wal", "-shm", "-journal"):
        source = Path(f"{home.db_path}{suffix}")
        if not os.path.lexists(source):
            continue
        target = source.with_name(f"{home.db_path.name}.{why}-{when}{suffix}")
        try:
            source.rename(target)
        except OSError as exc:
            raise StorageError(f"cannot move {source} aside ({exc.strerror}); nothing was "
                               "restored") from exc
        moved.append(target.name)
    fsync_dir(home.db_path.parent)
    return moved


def _views(led: Ledger, result: Restored) -> list[tuple[Path, bytes, dict[str, Any]]]:
    """The readable documents of this ledger's lineage: history files, then state.json.

    An unreadable or foreign state.json is renamed aside (``state.json.skipped-<stamp>``)
    before the restored ledger rewrites it.
    """
    with led.db.read() as tx:
        lineage = meta.lineage(tx)
    paths = sorted(led.home.history_dir.glob("*.json")) if led.home.history_dir.is_dir() \
        else []
    if os.path.lexists(led.home.state_file):
        paths.append(led.home.state_file)
    views = []
    for path in paths:
        try:
            with open(path, "rb", opener=_no_follow) as handle:
                data = handle.read(document.MAX_DOCUMENT + 1)
            doc = document.parse(data)
            if doc.get("lineage") not in (None, lineage):
                raise InvalidDocument(f"it belongs to another ledger (lineage {doc['lineage']})")
        except (OSError, InvalidDocument) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            result.skipped.append(f"{path.name}: {why}")
            if path == led.home.state_file:
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(f"{path.name}.skipped-{stamp(clock.now())}"))
            continue
        views.append((path, data, doc))
    return views


def _record(led: Ledger, views: list[tuple[Path, bytes, dict[str, Any]]],
            detail: dict[str, Any]) -> None:
    """Append the ``ledger.restore`` event, numbered above every serial the views carry.

    Event ids then keep growing across the restore, so a view written before it can
    never look newer than the restored ledger's own (serials are event ids).
    """
    serials = [doc["serial"] for _, _, doc in views
               if isinstance(doc.get("serial"), int) and not isinstance(doc["serial"], bool)]
    with led.db.write() as tx:
        top = max([tx.scalar("SELECT COALESCE(MAX(id), 0) FROM events"), *serials])
        tx.execute(
            "INSERT INTO events (id, host, at, upgrade_id, kind, subject, from_value, "
            "to_value, username, hostname, pid, detail) VALUES (:id, :host, :at, NULL, "
            "'ledger.restore', 'ledger.db', NULL, :snap, :user, :hostname, :pid, :detail)",
            {"id": top + 1, "at": clock.now(), "snap": detail["snapshot"], "user": led.user,
             "hostname": led.hostname, "pid": led.pid,
             "detail": json.dumps(detail, sort_keys=True)})


def _newest_per_upgrade(led: Ledger, views: list[tuple[Path, bytes, dict[str, Any]]],
                        ) -> list[tuple[Path, bytes, dict[str, Any]]]:
    """Of the views of each upgrade, the newest (state.json on a tie: it names the
    current upgrade), when it is newer than the restored ledger; state.json last."""
    best: dict[str, tuple[Path, bytes, dict[str, Any]]] = {}
    for view in views:  # history files first, state.json last: it wins ties
        uid = view[2]["upgrade_id"]
        if uid not in best or _serial(view[2]) >= _serial(best[uid][2]):
            best[uid] = view
    chosen = [view for view in best.values() if _newer(led, view[2])]
    return sorted(chosen, key=lambda view: view[0] == led.home.state_file)


def _serial(doc: dict[str, Any]) -> int:
    serial = doc.get("serial")
    return serial if isinstance(serial, int) and not isinstance(serial, bool) else -1


def _newer(led: Ledger, doc: dict[str, Any]) -> bool:
    """Whether *doc* knows more about its upgrade than the restored ledger does."""
    uid = doc["upgrade_id"]
    with led.db.read() as tx:
        row = tx.one("SELECT updated_at FROM upgrades WHERE host = :host AND id = :u",
                     {"u": uid})
        known = tx.scalar("SELECT MAX(id) FROM events WHERE host = :host AND upgrade_id = :u "
                          "AND kind != 'ledger.restore'", {"u": uid}) or 0
    serial = doc.get("serial")
    if isinstance(serial, int) and not isinstance(serial, bool):
        return serial > known
    # A legacy document (no serial): newer when its last change is.
    return row is None or doc["updated_at"] > (row["updated_at"] or "")[:19] + "Z"



def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)
