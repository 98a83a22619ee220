"""Snapshots: online backups of a SQLite ledger, and restoring one after corruption.

A snapshot is a whole copy of ``ledger.db`` taken with SQLite's online backup API
(``sqlite3.Connection.backup``) while the ledger stays in use: one read transaction
copies every page, so the copy is a consistent state of the ledger. One is taken at
each save to history (``Ledger.save_to_history``) and on demand
(``upgrade-ledger snapshot``), into ``snapshots/<UTC stamp>-<upgrade id>.db``
(folder 0700, files 0600). Only the newest ``LEDGER_SNAPSHOT_KEEP`` (default 10)
are kept; 0 turns the automatic snapshots off.

``restore`` brings back the newest snapshot that passes ``PRAGMA integrity_check``,
keeps the damaged ``ledger.db`` (and its -wal/-shm) aside under a new name, never
deleting it, and then re-imports what the views know that the snapshot does not:
the current upgrade from state.json, and upgrades saved to history after the
snapshot, when their documents are newer (same lineage, higher serial).

Snapshots exist for the SQLite ledger only; a ``--db URL`` ledger (PostgreSQL) is
backed up with that server's own tools.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ledger import clock, documents
from ledger.api import Ledger
from ledger.db import BUSY_TIMEOUT_S, SCHEMA_REVISION, Database, SqliteDatabase
from ledger.errors import (
    BadInput,
    Conflict,
    CorruptLedger,
    InvalidDocument,
    LedgerError,
    NotFound,
    StorageError,
)
from ledger.home import FILE_MODE, Home, fsync_dir, make_private_dir, same_device
from ledger.lock import DirLock

#: How many snapshots are kept when LEDGER_SNAPSHOT_KEEP is not set.
DEFAULT_KEEP = 10
KEEP_ENV = "LEDGER_SNAPSHOT_KEEP"
MAX_KEEP = 10_000
FOLDER = "snapshots"
#: ``20261127T051935123Z-<upgrade id>.db``: the stamp has a fixed width and sorts as text.
_NAME = re.compile(r"(?P<stamp>[0-9]{8}T[0-9]{9}Z)-(?P<upgrade>[A-Za-z0-9][A-Za-z0-9._-]*)\.db")


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file."""

    path: Path
    taken_at: str
    upgrade_id: str
    size_bytes: int

    @property
    def name(self) -> str:
        return self.path.name

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "taken_at": self.taken_at, "upgrade_id": self.upgrade_id,
                "size_bytes": self.size_bytes, "path": str(self.path)}


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


def folder(home: Home) -> Path:
    """Where a home keeps its snapshots."""
    return home.root / FOLDER


def keep_from_env(env: Mapping[str, str] | None = None) -> int:
    """The retention limit: ``LEDGER_SNAPSHOT_KEEP`` (0 = no automatic snapshots)."""
    value = (os.environ if env is None else env).get(KEEP_ENV, "").strip()
    if not value:
        return DEFAULT_KEEP
    if not value.isdigit() or int(value) > MAX_KEEP:
        raise BadInput(f"{KEEP_ENV}={value!r}: expected a whole number from 0 to {MAX_KEEP}")
    return int(value)


def listing(home: Home) -> list[Snapshot]:
    """The home's snapshots, newest first (files with other names are ignored)."""
    found = []
    try:
        entries = list(os.scandir(folder(home)))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read {folder(home)} ({exc.strerror})") from exc
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        try:
            size = entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue  # pruned meanwhile by another process
        s = match["stamp"]
        taken = f"{s[:4]}-{s[4:6]}-{s[6:8]}T{s[9:11]}:{s[11:13]}:{s[13:15]}.{s[15:18]}Z"
        found.append(Snapshot(Path(entry.path), taken, match["upgrade"], size))
    return sorted(found, key=lambda snap: snap.name, reverse=True)


def take(home: Home, db: Database, upgrade_id: str | None, *,
         keep: int | None = None, manual: bool = False) -> Snapshot | None:
    """Back the ledger up into ``snapshots/`` now; prune to *keep*; return the snapshot.

    *keep* defaults to ``keep_from_env()``. An automatic snapshot (at a save to
    history) is skipped, returning None, when *keep* is 0 or the ledger is not a SQLite
    file; a *manual* one is always taken (and, with *keep* 0, nothing is pruned).
    The copy is written to a temp file in tmp/ (removed by the next opener if this
    process dies), fsynced, then given its name.
    """
    keep = keep_from_env() if keep is None else keep
    if not isinstance(db, SqliteDatabase):
        if manual:
            raise Conflict("snapshots are kept for a SQLite ledger file; back up a --db "
                           "ledger with its database server's own tools")
        return None
    if keep <= 0 and not manual:
        return None
    label = documents.check_id(upgrade_id) if upgrade_id else "ledger"
    target_dir = folder(home)
    make_private_dir(target_dir)
    same_fs = same_device(home.tmp_dir, target_dir)
    temp = (home.tmp_dir if same_fs else target_dir) / \
        f".snapshot.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        _backup(db.path, temp)
        snap = _publish(temp, target_dir, label)
    except sqlite3.Error as exc:
        raise _translate(exc, db.path) from exc
    except OSError as exc:
        raise StorageError(f"cannot write a snapshot in {target_dir} ({exc.strerror or exc}); "
                           "check free space and permissions") from exc
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    if keep > 0:
        prune(home, keep)
    return snap


def _backup(source: Path, temp: Path) -> None:
    """Copy the ledger into *temp*: all pages in one step, so one read transaction."""
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    src = sqlite3.connect(source, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        dst = sqlite3.connect(temp, isolation_level=None)
        try:
            # The copy needs no journal of its own: if this process dies, the temp
            # file is garbage that the next opener removes; durability comes from the
            # fsync below, before the rename.
            dst.execute("PRAGMA journal_mode=OFF")
            dst.execute("PRAGMA synchronous=OFF")
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    fd = os.open(temp, os.O_RDWR | os.O_NOFOLLOW)
    try:
        # The copy carries the ledger's WAL mode in its header (bytes 18-19 = 2). A
        # snapshot is a closed, self-contained file: mark it rollback-journal (1), as
        # PRAGMA journal_mode=DELETE would, so that opening it (sqlite3 -readonly)
        # needs no -wal or -shm beside it. It has no WAL content, so nothing is lost.
        if os.pread(fd, 2, 18) == b"\x02\x02":
            os.pwrite(fd, b"\x01\x01", 18)
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temp: Path, target_dir: Path, label: str) -> Snapshot:
    """Give *temp* its final name without ever replacing another snapshot."""
    while True:
        at = clock.now()
        target = target_dir / f"{_stamp(at)}-{label}.db"
        try:
            os.link(temp, target)  # fails if a snapshot of the same millisecond exists
        except FileExistsError:
            continue
        break
    fsync_dir(target_dir)
    return Snapshot(target, at, label, target.stat().st_size)


def prune(home: Home, keep: int) -> list[Path]:
    """Remove all but the newest *keep* snapshots; return what was removed."""
    removed = []
    for snap in listing(home)[max(keep, 0):]:
        with contextlib.suppress(FileNotFoundError):
            snap.path.unlink()
            removed.append(snap.path)
    if removed:
        fsync_dir(folder(home))
    return removed


# -- checking ------------------------------------------------------------------------

def check_file(path: Path) -> str | None:
    """Why the snapshot (or any closed SQLite file) at *path* is not a usable ledger;
    None when it is.

    Runs ``PRAGMA integrity_check`` (reads every page) and looks for the schema
    revision and the lineage. The file is opened read-only and immutable: checking
    never writes next to it (no -wal or -shm).
    """
    return _check(path, live=False)


def check_live(path: Path) -> str | None:
    """Like ``check_file`` for the live ``ledger.db``, whose -wal is part of it: it is
    opened normally, with read-only queries only."""
    return _check(path, live=True)


def _check(path: Path, *, live: bool) -> str | None:
    try:
        if path.stat().st_size == 0:
            return "it is empty"
    except OSError as exc:
        return f"cannot read it ({exc.strerror})"
    problem = None
    try:
        if live:
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute("PRAGMA query_only=ON")
        else:
            conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro&immutable=1", uri=True,
                                   isolation_level=None)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        if rows != ["ok"]:
            problem = "integrity check: " + "; ".join(rows[:3])
        else:
            revision = conn.execute("SELECT version_num FROM alembic_version").fetchone()
            lineage = conn.execute(
                "SELECT value FROM ledger_meta WHERE key = 'lineage'").fetchone()
            if revision is None or lineage is None:
                problem = "it is a SQLite database but not a ledger"
            elif revision[0] > SCHEMA_REVISION:  # revisions are zero-padded numbers
                problem = f"its schema {revision[0]} is newer than this upgrade-ledger knows"
    except sqlite3.Error as exc:
        problem = "it is a SQLite database but not a ledger" if "no such table" in str(exc) \
            else str(exc)
    finally:
        conn.close()
    return problem


def newest_good(home: Home) -> tuple[Snapshot, list[str]]:
    """The newest snapshot that passes ``check_file``, and why newer ones were passed over."""
    passed_over: list[str] = []
    for snap in listing(home):
        problem = check_file(snap.path)
        if problem is None:
            return snap, passed_over
        passed_over.append(f"{snap.name}: {problem}")
    detail = f" ({'; '.join(passed_over)})" if passed_over else ""
    raise NotFound(f"no usable snapshot in {folder(home)}{detail}; restore ledger.db from a "
                   "backup, or start a new ledger and import state.json (docs/operations.md)")


def find(home: Home, name: str) -> Snapshot:
    """The snapshot called *name* (a name from ``listing``, not a path)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadInput(f"snapshot {name!r} is not a snapshot name like "
                       "20261127T051935123Z-upgrade-1.db (see 'upgrade-ledger snapshots')")
    for snap in listing(home):
        if snap.name == name:
            return snap
    raise NotFound(f"no snapshot {name!r} in {folder(home)} (see 'upgrade-ledger snapshots')")


# -- restoring -----------------------------------------------------------------------

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
                led._record_lock_break(info)
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
    stamp = _stamp(clock.now())
    moved = []
    for suffix in ("", "-wal", "-shm", "-journal"):
        source = Path(f"{home.db_path}{suffix}")
        if not os.path.lexists(source):
            continue
        target = source.with_name(f"{home.db_path.name}.{why}-{stamp}{suffix}")
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
        lineage = tx.scalar("SELECT value FROM ledger_meta WHERE key = 'lineage'")
    paths = sorted(led.home.history_dir.glob("*.json")) if led.home.history_dir.is_dir() \
        else []
    if os.path.lexists(led.home.state_file):
        paths.append(led.home.state_file)
    views = []
    for path in paths:
        try:
            with open(path, "rb", opener=_no_follow) as handle:
                data = handle.read(documents.MAX_DOCUMENT + 1)
            doc = documents.parse(data)
            if doc.get("lineage") not in (None, lineage):
                raise InvalidDocument(f"it belongs to another ledger (lineage {doc['lineage']})")
        except (OSError, InvalidDocument) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            result.skipped.append(f"{path.name}: {why}")
            if path == led.home.state_file:
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(f"{path.name}.skipped-{_stamp(clock.now())}"))
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
            "INSERT INTO events (id, at, upgrade_id, kind, subject, from_value, to_value, "
            "username, hostname, pid, detail) VALUES (:id, :at, NULL, 'ledger.restore', "
            "'ledger.db', NULL, :snap, :user, :host, :pid, :detail)",
            {"id": top + 1, "at": clock.now(), "snap": detail["snapshot"], "user": led.user,
             "host": led.hostname, "pid": led.pid,
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
        row = tx.one("SELECT updated_at FROM upgrades WHERE id = :u", {"u": uid})
        known = tx.scalar("SELECT MAX(id) FROM events WHERE upgrade_id = :u AND "
                          "kind != 'ledger.restore'", {"u": uid}) or 0
    serial = doc.get("serial")
    if isinstance(serial, int) and not isinstance(serial, bool):
        return serial > known
    # A legacy document (no serial): newer when its last change is.
    return row is None or doc["updated_at"] > (row["updated_at"] or "")[:19] + "Z"


def _stamp(at: str) -> str:
    """``2026-11-27T05:19:35.123Z`` as ``20261127T051935123Z`` (a file name part)."""
    return at[:19].replace("-", "").replace(":", "") + at[20:23] + "Z"


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _translate(exc: sqlite3.Error, path: Path) -> LedgerError:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return CorruptLedger(f"{path} is corrupt ({text}); no snapshot was taken; see "
                             "'upgrade-ledger doctor' and docs/operations.md")
    return StorageError(f"cannot snapshot {path} ({text}); check free space and permissions")


# -- doctor ------------------------------------------------------------------------------
# ledger.doctor lists this check; it imports this module, so its names are imported
# inside the function. Restoring is not one of doctor's repairs: it replaces the
# ledger file, so it stays an explicit step ('upgrade-ledger restore', after stopping
# upgrade runs), which doctor's hint for a damaged ledger names.


def doctor_check(ctx: Any) -> Any:  # noqa: PLR0911 (one return per verdict)
    """doctor's ``snapshots`` check: is there a snapshot to restore, and is the newest
    one whole? (Only the newest is read through, unless it is damaged.)"""
    from ledger.doctor import OK, SKIP, WARN, Finding  # noqa: PLC0415

    name = "snapshots"
    if ctx.sqlite_path is None:
        return Finding(name, SKIP, "not a SQLite file: back the database server up with its "
                                   "own tools")
    try:
        found = listing(ctx.home)
    except StorageError as exc:
        return Finding(name, WARN, str(exc), "fix the permissions of the snapshots folder")
    saved = any(ctx.home.history_dir.glob("*.json")) if ctx.home.history_dir.is_dir() else False
    if not found:
        if not saved:
            return Finding(name, OK, "none yet (one is taken at each save to history)")
        return Finding(name, WARN, f"no snapshot in {folder(ctx.home)} although upgrades were "
                                   "saved to history", "take one: 'upgrade-ledger snapshot' "
                                   f"(and check {KEEP_ENV})")
    for n, snap in enumerate(found):
        problem = check_file(snap.path)
        if problem is None:
            detail = f"{len(found)} snapshot(s), newest good: {snap.name}"
            if n == 0:
                return Finding(name, OK, detail)
            return Finding(name, WARN, f"{detail}; {n} newer one(s) damaged",
                           "take a new one: 'upgrade-ledger snapshot'")
    return Finding(name, WARN, f"all {len(found)} snapshot(s) are damaged",
                   "take a new one: 'upgrade-ledger snapshot' (once the ledger is healthy)")
