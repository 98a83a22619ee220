"""Snapshots: online backups of a SQLite ledger (``ledger.ops.restore`` brings one back).

A snapshot is a whole copy of ``ledger.db`` taken with SQLite's online backup API
(``sqlite3.Connection.backup``) while the ledger stays in use: one read transaction
copies every page, so the copy is a consistent state of the ledger. One is taken at
each save to history (``Ledger.save_to_history``) and on demand
(``upgrade-ledger snapshot``), into ``snapshots/<UTC stamp>-<upgrade id>.db``
(folder 0700, files 0600). Only the newest ``LEDGER_SNAPSHOT_KEEP`` (default 10)
are kept; 0 turns the automatic snapshots off.

Snapshots exist for the SQLite ledger only; a ``--db URL`` ledger (PostgreSQL) is
backed up with that server's own tools.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ledger.api import Ledger
from ledger.core import clock
from ledger.core.validate import check_id
from ledger.errors import (
    BadInput,
    Conflict,
    CorruptLedger,
    LedgerError,
    NotFound,
    StorageError,
)
from ledger.ops.findings import OK, SKIP, WARN, Context, Finding
from ledger.store.database import BUSY_TIMEOUT_S, SCHEMA_REVISION, Database
from ledger.store.files import FILE_MODE, fsync_dir, make_private_dir, same_device
from ledger.store.home import Home
from ledger.store.sqlite import SqliteDatabase

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
    label = check_id(upgrade_id) if upgrade_id else "ledger"
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


def take_now(ledger: Ledger, keep: int | None = None) -> Snapshot:
    """An on-demand snapshot of *ledger* (``upgrade-ledger snapshot``), labelled with
    its current upgrade; see ``take``."""
    snap = take(ledger.home, ledger.db, ledger.current_id(), keep=keep, manual=True)
    assert snap is not None  # a manual snapshot of a SQLite ledger is always taken
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
        target = target_dir / f"{stamp(at)}-{label}.db"
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


def stamp(at: str) -> str:
    """``2026-11-27T05:19:35.123Z`` as ``20261127T051935123Z`` (a file name part)."""
    return at[:19].replace("-", "").replace(":", "") + at[20:23] + "Z"


def _translate(exc: sqlite3.Error, path: Path) -> LedgerError:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return CorruptLedger(f"{path} is corrupt ({text}); no snapshot was taken; see "
                             "'upgrade-ledger doctor' and docs/operations.md")
    return StorageError(f"cannot snapshot {path} ({text}); check free space and permissions")


# -- doctor ------------------------------------------------------------------------------
# Restoring is not one of doctor's repairs: it replaces the
# ledger file, so it stays an explicit step ('upgrade-ledger restore', after stopping
# upgrade runs), which doctor's hint for a damaged ledger names.


def check_snapshots(ctx: Context) -> Finding:  # noqa: PLR0911 (one return per verdict)
    """doctor's ``snapshots`` check: is there a snapshot to restore, and is the newest
    one whole? (Only the newest is read through, unless it is damaged.)"""
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
