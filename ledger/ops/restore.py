"""Restoring a snapshot in place of a damaged (or unwanted) ``ledger.db``.

``restore`` brings back the newest snapshot that passes ``PRAGMA integrity_check``,
and re-imports what the views know that the snapshot does not: the current upgrade
from state.json, and upgrades saved to history after the snapshot, when their
documents are newer (same lineage, higher serial).

Everything is checked and built before anything is replaced: the snapshot is copied
into a staging folder beside ``ledger.db`` (``.restore.<pid>.<random>.tmp``), the
views are validated and imported into that copy, and only a whole, sealed result is
swapped in. The damaged ``ledger.db`` (and its -wal/-shm) is kept aside under a new
name, never deleted. A restore that fails or is killed on the way leaves
``ledger.db`` and the views as they were.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.api import Ledger
from ledger.core import clock
from ledger.core.validate import MAX_NUMBER
from ledger.errors import Conflict, CorruptLedger, InvalidDocument, LedgerError, StorageError
from ledger.lock import DirLock
from ledger.ops.snapshots import Snapshot, check_file, check_live, find, newest_good, stamp
from ledger.store import meta
from ledger.store.files import fsync_dir, write_file_atomic
from ledger.store.home import Home
from ledger.store.sqlite import seal
from ledger.views import document

#: A view as read: its path, its bytes and the document parsed from them.
View = tuple[Path, bytes, dict[str, Any]]


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
    are imported (see the module docstring) and state.json is rewritten.
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
        moves = _aside_names(home, "corrupt" if problem is not None else "replaced")
        result.aside = [target.name for _source, target in moves]
        stage = home.db_path.parent / f".restore.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            set_aside = _stage(home, stage, snap, result, owner=owner, env=env, breaks=breaks,
                               detail={"snapshot": snap.name, "problem": problem,
                                       "aside": result.aside, "lock_breaks": len(breaks)})
            # Nothing was replaced up to here: now swap the whole, sealed ledger in.
            _swap_in(home, stage / home.db_path.name, moves)
        finally:
            shutil.rmtree(stage, ignore_errors=True)  # never follows links inside
        for path in set_aside:
            with contextlib.suppress(OSError):
                path.rename(path.with_name(f"{path.name}.skipped-{stamp(clock.now())}"))
        with Ledger(home.root, env=env, pid=owner, lock_timeout_s=lock_timeout_s) as led:
            led.write_views()
            result.current = led.current_id()
    finally:
        if not ours_before:
            with contextlib.suppress(LedgerError):
                lock.release(owner)
    return result


def _stage(home: Home, stage: Path, snap: Snapshot, result: Restored, *, owner: int,
           env: Mapping[str, str] | None, breaks: list[dict[str, Any]],
           detail: dict[str, Any]) -> list[Path]:
    """Build the restored ledger in *stage*: the snapshot, the restore event and the
    newer views imported; sealed (no -wal beside it) and fsynced. Returns the views to
    set aside once it is in place (an unreadable or foreign state.json)."""
    try:
        stage.mkdir(mode=0o700)
        write_file_atomic(stage / home.db_path.name, snap.path.read_bytes())
    except OSError as exc:  # StorageError included
        raise StorageError(f"cannot stage the restored ledger in {stage} "
                           f"({getattr(exc, 'strerror', None) or exc}); check free space; "
                           "nothing was restored") from exc
    # A bare ledger of the staging folder only: no UPGRADE_* path leads out of it, so
    # the home's own views and lock are not touched while it is built; the host it
    # writes as is the same (LEDGER_HOST, LEDGER_MACHINE_ID).
    stage_env = {k: v for k, v in (os.environ if env is None else env).items()
                 if not k.startswith("UPGRADE_")}
    with Ledger(stage, env=stage_env, pid=owner, wired=False) as led:
        with led.db.read() as tx:
            lineage = meta.lineage(tx)
        views, set_aside = _views(home, lineage, result)
        newer = _newest_per_upgrade(led, home, views)  # judged against the snapshot alone
        _record(led, views, detail)
        # A stale lock taken over on the way is recorded like every break, now that
        # there is a ledger to record it in.
        for info in breaks:
            led.record_lock_break(info)
        for path, data, doc in newer:
            led.import_document(data, make_current=path == home.state_file)
            result.imported.append(f"{path.name} ({doc['upgrade_id']})")
    seal(stage / home.db_path.name)
    return set_aside


def _aside_names(home: Home, why: str) -> list[tuple[Path, Path]]:
    """(file, new name) for ledger.db and its -wal/-shm/-journal, those that exist."""
    when = stamp(clock.now())
    moves = []
    for suffix in ("", "-wal", "-shm", "-journal"):
        source = Path(f"{home.db_path}{suffix}")
        if os.path.lexists(source):
            moves.append((source, source.with_name(f"{home.db_path.name}.{why}-{when}{suffix}")))
    return moves


def _swap_in(home: Home, restored: Path, moves: list[tuple[Path, Path]]) -> None:
    """Keep the old ledger.db aside and put *restored* in its place.

    ledger.db is kept aside by a hard link, so that the name is never missing: the
    rename of the restored file replaces it in one step. Its -wal and -shm are moved
    first, or SQLite would apply the old WAL to the restored file.
    """
    try:
        for source, target in moves:
            if source == home.db_path:
                try:
                    os.link(source, target, follow_symlinks=False)
                except OSError:  # a file system without hard links: rename instead
                    source.rename(target)
            else:
                source.rename(target)
        os.rename(restored, home.db_path)
    except OSError as exc:
        raise StorageError(f"cannot put the restored ledger in place of {home.db_path} "
                           f"({exc.strerror}); the old files are kept as "
                           f"{', '.join(t.name for _s, t in moves)}") from exc
    fsync_dir(home.db_path.parent)


def _views(home: Home, lineage: str | None, result: Restored) -> tuple[list[View], list[Path]]:
    """The readable documents of this ledger's lineage in *home*: history files, then
    state.json; and the state.json to set aside (unreadable or another ledger's), which
    the restored ledger will rewrite."""
    paths = sorted(home.history_dir.glob("*.json")) if home.history_dir.is_dir() else []
    if os.path.lexists(home.state_file):
        paths.append(home.state_file)
    views: list[View] = []
    set_aside = []
    for path in paths:
        try:
            with open(path, "rb", opener=_regular_file) as handle:
                data = document.read(handle)
            doc = document.parse(data)
            if doc.get("lineage") not in (None, lineage):
                raise InvalidDocument(f"it belongs to another ledger (lineage {doc['lineage']})")
        except (OSError, InvalidDocument) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            result.skipped.append(f"{path.name}: {why}")
            if path == home.state_file:
                set_aside.append(path)
            continue
        views.append((path, data, doc))
    return views, set_aside


def _record(led: Ledger, views: list[View], detail: dict[str, Any]) -> None:
    """Append the ``ledger.restore`` event, numbered above every serial the views carry.

    Event ids then keep growing across the restore, so a view written before it can
    never look newer than the restored ledger's own (serials are event ids).
    """
    serials = [doc["serial"] for _, _, doc in views
               if isinstance(doc.get("serial"), int) and not isinstance(doc["serial"], bool)]
    with led.db.write() as tx:
        top = max([tx.scalar("SELECT COALESCE(MAX(id), 0) FROM events"), *serials])
        if top >= MAX_NUMBER:  # validated documents cannot get here; a damaged ledger could
            raise CorruptLedger(f"event id {top} leaves no room for new events; nothing was "
                                "restored")
        tx.execute(
            "INSERT INTO events (id, host, at, upgrade_id, kind, subject, from_value, "
            "to_value, username, hostname, pid, detail) VALUES (:id, :host, :at, NULL, "
            "'ledger.restore', 'ledger.db', NULL, :snap, :user, :hostname, :pid, :detail)",
            {"id": top + 1, "at": clock.now(), "snap": detail["snapshot"], "user": led.user,
             "hostname": led.hostname, "pid": led.pid,
             "detail": json.dumps(detail, sort_keys=True)})


def _newest_per_upgrade(led: Ledger, home: Home, views: list[View]) -> list[View]:
    """Of the views of each upgrade, the newest (state.json on a tie: it names the
    current upgrade), when it is newer than the restored ledger; state.json last."""
    best: dict[str, View] = {}
    for view in views:  # history files first, state.json last: it wins ties
        uid = view[2]["upgrade_id"]
        if uid not in best or _serial(view[2]) >= _serial(best[uid][2]):
            best[uid] = view
    chosen = [view for view in best.values() if _newer(led, view[2])]
    return sorted(chosen, key=lambda view: view[0] == home.state_file)


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


def _regular_file(path: str, flags: int) -> int:
    """Open a view without following a link or blocking on a FIFO; a regular file only."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd
