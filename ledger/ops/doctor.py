"""Health checks of a ledger home (``upgrade-ledger doctor``), usable from Python.

``run_checks`` runs every check in ``CHECKS`` and returns one ``Finding`` per check:
``ok``, ``warn`` (worth knowing, nothing is wrong yet), ``fail`` (something needs
action) or ``skip`` (the check does not apply, or an earlier failure makes it
meaningless). Checking changes nothing: the database is opened without creating,
migrating or chmod-ing anything. With ``repair=True`` the safe fixes are applied
(views rewritten from the ledger, modes fixed, a proven-stale lock cleared through
the ledger so that the break is an event, dead temp files removed, the WAL
checkpointed) and every check runs again.

A check is a ``Check(name, run, repair)``; adding one (e.g. a snapshots check) is
one more entry in ``CHECKS``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sqlite3
import stat
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ledger import queries
from ledger.api import Ledger
from ledger.core import host
from ledger.errors import CorruptLedger, LedgerError
from ledger.fleet import status as fleet_status
from ledger.lock import DEFAULT_TIMEOUT_S
from ledger.observe import notify
from ledger.ops import snapshots
from ledger.ops.findings import FAIL, OK, SKIP, WARN, Check, Context, Finding, Unavailable
from ledger.store import meta
from ledger.store.database import SCHEMA_REVISION
from ledger.store.files import DIR_MODE, FILE_MODE, temp_writer_pid
from ledger.store.home import Home
from ledger.views import document

#: A WAL file larger than this is reported: SQLite's automatic checkpoints keep it
#: near 4 MiB, so a large one means a reader that never lets go blocks them.
WAL_WARN_BYTES = 64 * 1024 * 1024
DEFAULT_STUCK_AFTER_S = 3600.0
#: A view found behind the ledger is looked at again this many times (a writer may
#: be between its commit and its view rewrite) before it is called stale.
_VIEW_RETRIES = 3

_RESTORE_HINT = ("stop upgrade runs, copy the home aside (cp -a), then run 'upgrade-ledger "
                 "restore' (the latest snapshot; see docs/operations.md); without a snapshot, "
                 "the last state.json can be loaded into a new ledger with "
                 "'upgrade-ledger import'")


# -- integrity and schema --------------------------------------------------------------

def _connect(path: Path) -> sqlite3.Connection:
    """A connection that never creates the file (mode=rw)."""
    return sqlite3.connect(f"file:{quote(os.fspath(path))}?mode=rw", uri=True,
                           isolation_level=None, timeout=10.0)


def check_integrity(ctx: Context) -> Finding:  # noqa: PLR0911 (one return per verdict)
    """SQLite's integrity_check (or quick_check) and foreign_key_check."""
    name = "integrity"
    path = ctx.sqlite_path
    if path is None:
        return Finding(name, SKIP, "not a SQLite file: the database server checks its own "
                                   "integrity")
    if not path.exists():
        ctx.blocked = f"there is no ledger at {path}"
        lost = _lost_lineage(ctx.home)
        if lost:
            return Finding(name, FAIL, f"no ledger at {path}, but {ctx.home.state_file.name} "
                                       f"was written by ledger {lost}: it was deleted",
                           _RESTORE_HINT)
        return Finding(name, FAIL, f"no ledger at {path}",
                       "check --home (or LEDGER_HOME); 'upgrade-ledger init' creates a ledger")
    if not path.is_file():
        ctx.blocked = f"{path} is not a file"
        return Finding(name, FAIL, f"{path} is not a file", "move it aside; " + _RESTORE_HINT)
    pragma = "quick_check" if ctx.quick else "integrity_check"
    try:
        conn = _connect(path)
        try:
            problems = [r[0] for r in conn.execute(f"PRAGMA {pragma}")]
            orphans = conn.execute("PRAGMA foreign_key_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        ctx.blocked = f"{path} cannot be read ({exc})"
        return Finding(name, FAIL, f"{path} is corrupt or not a SQLite database ({exc})",
                       _RESTORE_HINT)
    if problems != ["ok"]:
        ctx.blocked = f"{path} failed the integrity check"
        shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)"
                                           if len(problems) > 3 else "")
        return Finding(name, FAIL, f"{pragma} found damage: {shown}", _RESTORE_HINT)
    if orphans:
        tables = sorted({r[0] for r in orphans})
        return Finding(name, FAIL, f"{len(orphans)} row(s) break foreign keys in "
                                   f"{', '.join(tables)}", _RESTORE_HINT)
    return Finding(name, OK, f"{pragma}: ok ({path.stat().st_size} bytes)")


def check_schema(ctx: Context) -> Finding:  # noqa: PLR0911 (one return per verdict)
    """The ledger's Alembic revision against the one this code expects."""
    name = "schema"
    try:
        current = ctx.database().revision()
    except Unavailable as exc:
        return Finding(name, SKIP, f"not checked: {exc}")
    except CorruptLedger as exc:  # tables, but no revision: not a ledger
        ctx.blocked = "not a ledger"
        return Finding(name, FAIL, str(exc), "point --home (or --db) at a ledger")
    except LedgerError as exc:
        ctx.blocked = str(exc)
        return Finding(name, FAIL, str(exc), _RESTORE_HINT)
    if current == SCHEMA_REVISION:
        return Finding(name, OK, f"revision {current} (expected {SCHEMA_REVISION})")
    if current is None:
        ctx.blocked = "the ledger has no schema yet"
        lost = _lost_lineage(ctx.home) if ctx.sqlite_path else None
        if lost:
            return Finding(name, FAIL, f"the ledger is empty, but {ctx.home.state_file.name} "
                                       f"was written by ledger {lost}: it was truncated",
                           _RESTORE_HINT)
        return Finding(name, WARN, "the ledger is empty (never migrated)",
                       "any upgrade-ledger command creates the schema")
    ctx.blocked = f"the schema is at revision {current}, not {SCHEMA_REVISION}"
    # Alembic is imported only when the revision is not the expected one.
    from ledger.store import migrate  # noqa: PLC0415

    if current in migrate.known_revisions():
        return Finding(name, WARN, f"revision {current}, behind {SCHEMA_REVISION}",
                       "the next upgrade-ledger command migrates it")
    return Finding(name, FAIL, f"revision {current} is newer than this upgrade-ledger knows "
                               f"({SCHEMA_REVISION})", "upgrade upgrade-ledger")


def _lost_lineage(home: Home) -> str | None:
    """The lineage in state.json, which says a ledger existed here (None if there is none)."""
    _raw, doc, _problem = _read_view(home.state_file)
    lineage = doc.get("lineage") if isinstance(doc, dict) else None
    return lineage if isinstance(lineage, str) and lineage else None


# -- the lock --------------------------------------------------------------------------

def check_lock(ctx: Context) -> Finding:
    """Who holds the lock, and whether it is stale (removable) or suspect (too old)."""
    name = "lock"
    st = ctx.lock().status()
    if not st.present:
        return Finding(name, OK, "free")
    who = f"PID {st.holder.pid} on {st.holder.hostname or '?'} since " \
          f"{st.holder.timestamp or '?'}" if st.holder else "an unknown holder"
    if st.stale:
        return Finding(name, WARN, f"stale lock of {who}: {st.reason}",
                       "the next 'lock acquire' takes it over; --repair (or 'upgrade-ledger "
                       "lock check-stale') removes it now")
    if st.suspect:
        return Finding(name, WARN, f"suspect: {st.reason}",
                       "if that process is not running an upgrade, remove the lock with "
                       "'upgrade-ledger lock break --reason TEXT'")
    return Finding(name, OK, f"held by {who}: {st.reason}")


def repair_lock(ctx: Context) -> str | None:
    lock = ctx.ledger().lock  # the ledger's lock records the break as an event
    status = lock.status()
    if status.stale and lock.check_stale():
        holder = status.holder
        return f"removed the stale lock of PID {holder.pid}" if holder else \
            "removed a stale lock"
    return None


# -- permissions -----------------------------------------------------------------------

def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _home_entries(home: Home) -> tuple[list[Path], list[Path]]:
    """(folders that must be 0700, files that must be 0600), that exist.

    The home is walked whole, links not followed, except ``backups/``: what is in it
    belongs to the upgrade scripts, so only the folder itself is checked. Folders
    moved elsewhere by the legacy ``UPGRADE_*`` variables add only what the ledger
    keeps in them.
    """
    folders: set[Path] = set()
    files: set[Path] = set()
    for tree in (home.root, home.tmp_dir, home.history_dir, home.logs_dir):
        if not _real_dir(tree):
            continue
        for top, dirs, names in os.walk(tree):  # os.walk never descends into links
            dirs[:] = [d for d in dirs if Path(top, d) != home.backups_dir]
            folders.add(Path(top))
            folders.update(Path(top, d) for d in dirs if _real_dir(Path(top, d)))
            files.update(Path(top, n) for n in names if _regular(Path(top, n)))
    for folder in (home.backups_dir, home.state_file.parent, home.lock_dir.parent,
                   home.lock_dir):
        if _real_dir(folder):
            folders.add(folder)
    for path in (home.state_file, home.lock_dir / "lock.info",
                 home.lock_dir.with_name(home.lock_dir.name + ".guard")):
        if _regular(path):
            files.add(path)
    return sorted(folders), sorted(files)


def _wrong_modes(home: Home) -> list[tuple[Path, int, int]]:
    """(path, mode, wanted) for every home path whose mode is not the private one."""
    folders, files = _home_entries(home)
    wrong = []
    for paths, wanted in ((folders, DIR_MODE), (files, FILE_MODE)):
        for path in paths:
            try:
                mode = stat.S_IMODE(path.lstat().st_mode)
            except OSError:
                continue
            if mode != wanted:
                wrong.append((path, mode, wanted))
    return wrong


def _listing(items: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_permissions(ctx: Context) -> Finding:
    """Folders 0700 and files 0600, whatever the umask of whoever wrote them."""
    name = "permissions"
    if not ctx.home.root.is_dir():
        return Finding(name, SKIP, f"no home folder at {ctx.home.root}")
    wrong = _wrong_modes(ctx.home)
    if not wrong:
        return Finding(name, OK, "folders 0700, files 0600")
    items = [f"{p} ({m:04o}, want {w:04o})" for p, m, w in wrong]
    return Finding(name, FAIL, f"{len(wrong)} path(s) with the wrong mode: {_listing(items)}",
                   "--repair sets the modes (chmod 0700 folders, 0600 files)")


def repair_permissions(ctx: Context) -> str | None:
    fixed, refused = 0, []
    me = os.geteuid()
    for path, _mode, wanted in _wrong_modes(ctx.home):
        try:
            if path.lstat().st_uid != me and me != 0:
                refused.append(str(path))
                continue
            path.chmod(wanted)
            fixed += 1
        except OSError:
            refused.append(str(path))
    if not fixed and not refused:
        return None
    return f"fixed the mode of {fixed} path(s)" + (
        f"; could not change {_listing(refused)} (owned by another user)" if refused else "")


# -- views -----------------------------------------------------------------------------

def _read_view(path: Path) -> tuple[bytes | None, Any, str | None]:
    """(raw bytes, parsed JSON or None, problem) of a view file; raw None when missing."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None, None
    except OSError as exc:
        return b"", None, f"cannot be read ({exc.strerror})"
    try:
        return raw, json.loads(raw), None
    except ValueError:
        return raw, None, "is not valid JSON (hand-edited or truncated)"


def _view_verdict(doc: Any, problem: str | None, fresh: dict[str, Any] | None,  # noqa: PLR0911
                  lineage: str | None) -> tuple[str, str]:
    """(kind, words) comparing a view with the ledger: kind is ok, missing, stale, ahead,
    edited, foreign or legacy."""
    if problem is not None:
        return "edited", problem
    if not isinstance(doc, dict):
        return "edited", "is not a JSON object (hand-edited)"
    if "lineage" not in doc and "serial" not in doc:
        return "legacy", "has no serial or lineage (written by the legacy library or by hand)"
    if doc.get("lineage") != lineage:
        return "foreign", (f"comes from another ledger (lineage {doc.get('lineage')}, this "
                           f"ledger {lineage})")
    if fresh is None:
        return "foreign", f"describes {doc.get('upgrade_id')!r}, which this ledger does not have"
    serial, current = doc.get("serial"), fresh["serial"]
    if isinstance(serial, bool) or not isinstance(serial, int):
        return "edited", "has a serial that is not a number (hand-edited)"
    if doc.get("upgrade_id") != fresh["upgrade_id"]:
        return "stale", (f"describes {doc.get('upgrade_id')!r}, but the current upgrade is "
                         f"{fresh['upgrade_id']!r}")
    if serial < current:
        return "stale", f"is stale (serial {serial}, ledger {current})"
    if serial > current:
        return "ahead", (f"is ahead of the ledger (serial {serial}, ledger {current}): the "
                         "ledger was restored from an older copy, or the view was edited")
    if doc != fresh:
        keys = sorted(k for k in set(doc) | set(fresh) if doc.get(k) != fresh.get(k))
        return "edited", f"was edited by hand ({', '.join(keys[:5])} differ from the ledger)"
    return "ok", f"current (serial {serial})"


def _state_view(ctx: Context) -> tuple[str, str, str | None]:
    """(kind, words, current upgrade id) for state.json, re-read while it looks stale."""
    kind, words, uid = "ok", "", None
    for attempt in range(_VIEW_RETRIES):
        with ctx.database().read() as tx:
            uid = meta.current_upgrade(tx)
            lineage = meta.lineage(tx)
            fresh = None if uid is None else document.build(tx, uid)
        raw, doc, problem = _read_view(ctx.home.state_file)
        if raw is None:
            return ("ok", "no current upgrade and no state.json", None) if uid is None else \
                ("missing", "is missing", uid)
        if uid is None and problem is None and isinstance(doc, dict) and \
                doc.get("lineage") == lineage:
            return "stale", "describes an upgrade although the ledger has no current one", None
        kind, words = _view_verdict(doc, problem, fresh, lineage)
        if kind != "stale" or attempt == _VIEW_RETRIES - 1:
            break
        time.sleep(0.05)  # a writer may be between its commit and its view rewrite
    return kind, words, uid


def check_state_view(ctx: Context) -> Finding:
    """state.json against the ledger: missing, stale, hand-edited, or another ledger's."""
    name = "state-view"
    try:
        kind, words, uid = _state_view(ctx)
    except Unavailable as exc:
        return Finding(name, SKIP, f"not checked: {exc}")
    path = ctx.home.state_file
    if kind == "ok":
        return Finding(name, OK, f"{path.name} {words}")
    if uid is None:
        return Finding(name, FAIL, f"{path} {words}; the ledger has no current upgrade",
                       f"load it with 'upgrade-ledger import {path}', or move it aside")
    keep = "" if kind in ("missing", "stale") else \
        " (the file found is kept beside it as state.json.doctor-TIMESTAMP)"
    return Finding(name, FAIL, f"{path} {words}",
                   f"--repair (or 'upgrade-ledger export') rewrites it from the ledger{keep}")


def _keep_aside(ctx: Context, path: Path) -> Path:
    """Copy a view about to be replaced to ``<name>.doctor-<UTC time>`` (0600)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.doctor-{stamp}")
    ctx.home.write_atomic(target, path.read_bytes())
    return target


def repair_state_view(ctx: Context) -> str | None:
    kind, _words, uid = _state_view(ctx)
    if kind == "ok" or uid is None:
        return None
    ledger = ctx.ledger()
    kept = None
    if kind not in ("missing", "stale") and ctx.home.state_file.is_file():
        kept = _keep_aside(ctx, ctx.home.state_file)
    ledger.write_views()
    return f"rewrote {ctx.home.state_file.name} from the ledger" + (
        f" (the old file is kept as {kept.name})" if kept else "")


def _history_problems(ctx: Context) -> tuple[list[str], list[str], list[str]]:
    """(saved upgrades whose file is missing or unreadable, files of another ledger or of
    an unknown upgrade, every history file name)."""
    with ctx.database().read() as tx:
        saved = {r[0] for r in tx.all("SELECT id FROM upgrades WHERE host = :host AND "
                                      "saved_at IS NOT NULL")}
        lineage = meta.lineage(tx)
        known = {r[0] for r in tx.all("SELECT id FROM upgrades WHERE host = :host")} if \
            ctx.home.history_dir.is_dir() else set()
    broken, foreign, names = [], [], []
    files = sorted(ctx.home.history_dir.glob("*.json")) if ctx.home.history_dir.is_dir() else []
    on_disk = {p.stem for p in files}
    for uid in sorted(saved - on_disk):
        broken.append(uid)
    for path in files:
        names.append(path.name)
        _raw, doc, problem = _read_view(path)
        if problem is not None or not isinstance(doc, dict):
            if path.stem in known:
                broken.append(path.stem)
            else:
                foreign.append(path.name)
        elif doc.get("lineage") not in (None, lineage) or path.stem not in known or \
                doc.get("upgrade_id") != path.stem:
            foreign.append(path.name)
    return broken, foreign, names


def check_history_views(ctx: Context) -> Finding:
    """history/<id>.json: one for every upgrade saved to history, each of this ledger."""
    name = "history-views"
    try:
        broken, foreign, names = _history_problems(ctx)
    except Unavailable as exc:
        return Finding(name, SKIP, f"not checked: {exc}")
    if not broken and not foreign:
        return Finding(name, OK, f"{len(names)} history file(s), all of this ledger")
    parts = []
    if broken:
        parts.append(f"missing or unreadable for {_listing(broken)}")
    if foreign:
        parts.append(f"not of this ledger: {_listing(foreign)}")
    hint = []
    if broken:
        hint.append("--repair (or 'upgrade-ledger export') rewrites the missing ones")
    if foreign:
        hint.append("load a foreign file with 'upgrade-ledger import --no-current FILE' "
                    "or move it aside")
    return Finding(name, FAIL if broken else WARN, "history files " + "; ".join(parts),
                   "; ".join(hint))


def repair_history_views(ctx: Context) -> str | None:
    broken, _foreign, _names = _history_problems(ctx)
    if not broken:
        return None
    ledger = ctx.ledger()
    for uid in broken:
        target = ctx.home.history_file(uid)
        if target.is_file():
            _keep_aside(ctx, target)
        ctx.home.write_atomic(target, ledger.export_document(uid))
    return f"rewrote {len(broken)} history file(s) from the ledger"


# -- WAL, stuck components, temp files -------------------------------------------------

def _wal_path(ctx: Context) -> Path | None:
    path = ctx.sqlite_path
    return None if path is None else path.with_name(path.name + "-wal")


def check_wal(ctx: Context) -> Finding:
    """The size of the write-ahead log (large: something blocks checkpoints)."""
    name = "wal"
    wal = _wal_path(ctx)
    if wal is None:
        return Finding(name, SKIP, "not a SQLite file")
    try:
        size = wal.stat().st_size
    except FileNotFoundError:
        return Finding(name, OK, "no WAL file (every connection closed cleanly)")
    limit = ctx.wal_warn_bytes
    if size > limit:
        return Finding(name, WARN, f"{wal.name} is {size} bytes (warn above {limit})",
                       "a long-lived reader may block checkpoints; --repair checkpoints it")
    return Finding(name, OK, f"{wal.name} is {size} bytes (warn above {limit})")


def repair_wal(ctx: Context) -> str | None:
    path = ctx.sqlite_path
    if path is None or ctx.blocked:
        return None
    conn = _connect(path)
    try:
        busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    return "checkpointed the WAL" if not busy else \
        "checkpoint incomplete: another connection is reading"


def check_stuck(ctx: Context) -> Finding:
    """Components UPGRADING while no live process holds the lock, or for too long."""
    name = "stuck"
    lock = ctx.lock().status()
    try:
        with ctx.database().read() as tx:
            uid = meta.current_upgrade(tx)
            stuck = [] if uid is None else queries.stuck(
                tx, uid, lock_live=lock.held, threshold_s=ctx.stuck_after_s)
            plan = None if uid is None else queries.plan_record(tx, uid)
    except Unavailable as exc:
        return Finding(name, SKIP, f"not checked: {exc}")
    if not stuck:
        return Finding(name, OK, "no component stuck in UPGRADING")
    items = [f"{s['name']} ({s['why']})" for s in stuck]
    hint = ("the run that started them stopped: 'upgrade-ledger resume' lists them; "
            "check each and record it with 'component complete' or 'component fail'")
    if plan is not None and plan.get("path"):
        # An apply run re-validates what it left UPGRADING and goes on by itself.
        command = shlex.join(["upgrade-ledger", "--home", str(ctx.home.root), "apply",
                              str(plan["path"])])
        hint = (f"upgrade {uid} was started by apply from the plan {plan['path']} (sha256 "
                f"{str(plan.get('sha256'))[:12]}): run the same apply again to resume it, "
                f"with that very file: {command}")
    return Finding(name, FAIL, f"{len(stuck)} component(s) stuck: {_listing(items)}", hint)


def _aside_pid(name: str, lock_name: str) -> int | None:
    """The PID in a lock folder moved aside (``<lock>.<stale|released>.<pid>.<hex>``)."""
    rest = name[len(lock_name) + 1:] if name.startswith(lock_name + ".") else ""
    parts = rest.split(".")
    if len(parts) == 3 and parts[0] in ("stale", "released") and parts[1].isdigit():
        return int(parts[1])
    return None


def _leftovers(home: Home) -> tuple[list[Path], list[Path]]:
    """(temp files and moved-aside lock folders of dead processes, unknown files in tmp/)."""
    dead: list[Path] = []
    unknown: list[Path] = []
    folders, files = _home_entries(home)
    for path in files:
        pid = temp_writer_pid(path.name)
        if pid is not None and path.name.startswith("."):
            if not host.pid_alive(pid):
                dead.append(path)
        elif path.parent == home.tmp_dir:
            unknown.append(path)
    for path in folders:
        pid = _aside_pid(path.name, home.lock_dir.name) \
            if path.parent == home.lock_dir.parent else None
        if pid is None and path.parent == home.db_path.parent and path.name.startswith("."):
            pid = temp_writer_pid(path.name)  # a ledger being built aside (restore)
        if pid is not None and not host.pid_alive(pid):
            dead.append(path)
    return sorted(set(dead)), unknown


def check_temp_files(ctx: Context) -> Finding:
    """Temp files and moved-aside lock folders left by processes that died mid-write."""
    name = "temp-files"
    dead, unknown = _leftovers(ctx.home)
    if not dead and not unknown:
        return Finding(name, OK, "no leftover temp files")
    parts, hints = [], []
    if dead:
        parts.append(f"{len(dead)} left by dead processes: {_listing([p.name for p in dead])}")
        hints.append("--repair removes them")
    if unknown:
        parts.append(f"{len(unknown)} unknown file(s) in {ctx.home.tmp_dir}: "
                     f"{_listing([p.name for p in unknown])}")
        hints.append("files not made by upgrade-ledger are left alone: look at them")
    return Finding(name, WARN, "; ".join(parts), "; ".join(hints))


def repair_temp_files(ctx: Context) -> str | None:
    dead, _unknown = _leftovers(ctx.home)
    removed = 0
    for path in dead:
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # never follows links inside
            else:
                path.unlink()
            removed += 1
    return f"removed {removed} leftover file(s)" if removed else None


# -- notifications -------------------------------------------------------------------


def check_notifications(ctx: Context) -> Finding:
    """doctor's ``notifications`` check: notify.toml readable, no subscriber failing."""
    name = "notifications"
    try:
        data = notify.summary(ctx.home, ctx.database())
    except Unavailable as exc:
        return Finding(name, SKIP, f"not checked: {exc}")
    except LedgerError as exc:  # e.g. a ledger older than the cursors table
        return Finding(name, SKIP, f"not checked: {exc}")
    if data["error"]:
        return Finding(name, FAIL, data["error"], "fix notify.toml (docs/observability.md); "
                       "until then no notification is delivered")
    if not data["failing"]:
        return Finding(name, OK, f"{data['subscribers']} subscriber(s), none failing"
                       + (f", {data['pending_events']} event(s) not yet delivered"
                          if data["pending_events"] else ""))
    items = [f"{f['name']} ({f['attempts']} attempt(s) at event {f['failing_event_id']}: "
             f"{f['last_error']})" for f in data["failing"]]
    return Finding(name, WARN, f"{len(items)} subscriber(s) failing: " + "; ".join(items[:3]),
                   "fix the subscriber; deliveries retry with backoff, or now with "
                   "'upgrade-ledger notify --force'")



# -- the fleet -------------------------------------------------------------------------


def check_fleet(ctx: Context) -> Finding:
    """doctor's ``fleet`` check: how this host's pushes to the fleet database went, from
    its own ledger (the fleet database itself is not contacted)."""
    name = "fleet"
    try:
        db = ctx.database()
        data = fleet_status.summary(db, ctx.fleet_url, ctx.home.root)
    except Unavailable as exc:
        return Finding(name, SKIP, f"not checked: {exc}")
    if ctx.fleet_url is None and data["pushed_at"] is None and not data["failures"]:
        return Finding(name, OK, "no fleet database is configured (LEDGER_FLEET_URL): this "
                                 "ledger stays local")
    if data["error"]:
        return Finding(name, FAIL, data["error"], "set LEDGER_FLEET_URL (or --fleet) to the "
                       "fleet database's postgresql:// URL; docs/fleet.md")
    behind = (f"{data['lag_events']} event(s) not shipped (the oldest {data['lag_s']:.0f} s "
              "old)") if data["lag_events"] else "everything shipped"
    if data["failures"]:
        return Finding(name, WARN, f"{data['failures']} failed push(es) in a row to "
                       f"{data['fleet']} (last: {data['last_error']}); {behind}; next try "
                       f"at {document.second(data['next_try_at'])}",
                       "check the fleet database and the network; steps go on locally, and "
                       "'upgrade-ledger fleet push' ships everything once it is back")
    if data["pushed_at"] is None and data["lag_events"]:
        return Finding(name, WARN, f"never pushed to {data['fleet']}; {behind}",
                       "run 'upgrade-ledger fleet push' (steps start a pusher by themselves)")
    return Finding(name, OK, f"last push {document.second(data['pushed_at']) or 'never'} to "
                   f"{data['fleet']}; {behind}")


CHECKS: list[Check] = [
    Check("integrity", check_integrity),
    Check("schema", check_schema),
    Check("lock", check_lock, repair_lock),
    Check("permissions", check_permissions, repair_permissions),
    Check("state-view", check_state_view, repair_state_view),
    Check("history-views", check_history_views, repair_history_views),
    Check("wal", check_wal, repair_wal),
    Check("stuck", check_stuck),
    Check("temp-files", check_temp_files, repair_temp_files),
    Check("notifications", check_notifications),
    Check("snapshots", snapshots.check_snapshots),
    Check("fleet", check_fleet),
]


#: What a check or a repair may meet on a damaged home; doctor reports it, never a traceback.
_TROUBLE = (LedgerError, OSError, sqlite3.Error)


def _run_one(check: Check, ctx: Context) -> Finding:
    try:
        return check.run(ctx)
    except _TROUBLE as exc:  # a check that could not look says so, as its finding
        return Finding(check.name, FAIL, f"could not check: {exc}")


def run_checks(
    where: Ledger | Home | str | os.PathLike[str] | None = None,
    *,
    db_url: str | None = None,
    env: Any = None,
    pid: int | None = None,
    lock_timeout_s: float = DEFAULT_TIMEOUT_S,
    stuck_after_s: float = DEFAULT_STUCK_AFTER_S,
    wal_warn_bytes: int = WAL_WARN_BYTES,
    quick: bool = False,
    repair: bool = False,
    checks: Sequence[Check] | None = None,
    host_name: str | None = None,
    fleet_url: str | None = None,
) -> list[Finding]:
    """Check the ledger at *where* (an open ``Ledger``, a ``Home`` or a home folder;
    default: resolved from the environment as the CLI does) and return one finding
    per check. With *repair*, apply the safe fixes, then check everything again; each
    finding's ``repaired`` says what was done for it."""
    ledger = where if isinstance(where, Ledger) else None
    if isinstance(where, Ledger):
        home = where.home
    elif isinstance(where, Home):
        home = where
    else:
        home = Home.at(where, env)
    ctx = Context(home, db_url=db_url, env=env, pid=pid, lock_timeout_s=lock_timeout_s,
                  stuck_after_s=stuck_after_s, wal_warn_bytes=int(wal_warn_bytes),
                  quick=quick, ledger=ledger, host_name=host_name, fleet_url=fleet_url)
    todo = list(CHECKS if checks is None else checks)
    try:
        findings = [_run_one(check, ctx) for check in todo]
        if not repair:
            return findings
        done: dict[str, str] = {}
        for check, finding in zip(todo, findings, strict=True):
            if check.repair is None or finding.status not in (WARN, FAIL):
                continue
            try:
                action = check.repair(ctx)
            except _TROUBLE as exc:
                action = f"not repaired: {exc}"
            if action:
                done[check.name] = action
        ctx.reset()
        return [replace(_run_one(check, ctx), repaired=done.get(check.name)) for check in todo]
    finally:
        ctx.close()


def healthy(findings: Sequence[Finding], *, strict: bool = False) -> bool:
    """True when no check failed (with *strict*, when none warned either)."""
    bad = {FAIL, WARN} if strict else {FAIL}
    return not any(f.status in bad for f in findings)


__all__ = ["CHECKS", "DEFAULT_STUCK_AFTER_S", "FAIL", "OK", "SKIP", "WAL_WARN_BYTES", "WARN",
           "Check", "Context", "Finding", "Unavailable", "healthy", "run_checks"]
