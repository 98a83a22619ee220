"""The ledger home: where its files live, with safe permissions and atomic writes.

Layout (each path can be moved by the legacy ``UPGRADE_*`` variables)::

    ledger.db        the ledger (SQLite, WAL), the only source of truth
    state.json       view of the current upgrade
    views.sig        signature of the last state.json written, so that a step can
                     patch it (a cache: see ledger/viewpatch.py; safe to delete)
    upgrade.lock.d/  the exclusive lock
    tmp/             temporary files for atomic writes
    backups/         backups that upgrade scripts make
    history/         <upgrade_id>.json per upgrade saved to history
    logs/            command output of ``apply`` runs
    fleet-push.lock  held (flock) by the process pushing to the fleet database, if any

Folders and files the ledger creates are 0700 and 0600 whatever the caller's umask;
what exists already keeps its mode (``doctor`` reports a loose one and ``--repair``
fixes it). An existing folder is used as a home only when it is empty or looks like
one (``Home.ensure``); a new ``ledger.db`` is built aside and renamed into place
(``ledger.store.connect``), so it is never seen empty or half made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ledger.core import host
from ledger.core.values import Value
from ledger.errors import CorruptLedger, NoLedger, NotAHome, StorageError
from ledger.store.files import (
    make_private_dir,
    private_subdir,
    same_device,
    temp_writer_pid,
    write_file_atomic,
)

DEFAULT_HOME = "/var/lib/observability-upgrades"
#: Names that show an existing folder to be a ledger home although it has no
#: ledger.db yet: what a ``--db`` ledger keeps in its home, and what the old bash
#: library left behind (a host switching over).
HOME_MARKERS = ("ledger.db", "state.json", "views.sig", "upgrade.lock.d",
                "upgrade.lock.d.guard", "history")
#: What else the ledger keeps in a home: the folders it makes before its ledger.db
#: exists (another process may be making the same home right now) and the operator's
#: configuration files. A folder of these only is a home too.
HOME_NAMES = ("tmp", "backups", "logs", "snapshots", "notify.toml", "ledger.toml",
              "fleet-push.lock")


def resolve_root(option: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    """``--home``, else ``LEDGER_HOME``, else ``UPGRADE_STATE_DIR``, else the default."""
    for value in (option, env.get("LEDGER_HOME"), env.get("UPGRADE_STATE_DIR")):
        if value:
            return Path(value)
    return Path(DEFAULT_HOME)


class Home(Value):
    """Paths of one ledger home."""

    FIELDS = ("root", "db_path", "state_file", "lock_dir", "tmp_dir", "backups_dir",
              "history_dir", "logs_dir")
    __slots__ = FIELDS
    root: Path
    db_path: Path
    state_file: Path
    lock_dir: Path
    tmp_dir: Path
    backups_dir: Path
    history_dir: Path
    logs_dir: Path

    def __init__(self, root: Path, db_path: Path, state_file: Path, lock_dir: Path,
                 tmp_dir: Path, backups_dir: Path, history_dir: Path, logs_dir: Path) -> None:
        self._set(root=root, db_path=db_path, state_file=state_file, lock_dir=lock_dir,
                  tmp_dir=tmp_dir, backups_dir=backups_dir, history_dir=history_dir,
                  logs_dir=logs_dir)

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None = None,
           env: Mapping[str, str] | None = None) -> Home:
        """The home at *root* (resolved as ``resolve_root`` does), honouring the legacy
        ``UPGRADE_STATE_FILE``, ``UPGRADE_LOCK_FILE``, ``UPGRADE_TEMP_DIR``,
        ``UPGRADE_BACKUPS_DIR`` and ``UPGRADE_HISTORY_DIR`` overrides in *env*."""
        env = os.environ if env is None else env
        base = resolve_root(root, env)

        def path(var: str, default: Path) -> Path:
            value = env.get(var)
            return Path(value) if value else default

        lock_file = path("UPGRADE_LOCK_FILE", base / "upgrade.lock")
        return cls(
            root=base,
            db_path=base / "ledger.db",
            state_file=path("UPGRADE_STATE_FILE", base / "state.json"),
            lock_dir=lock_file.with_name(lock_file.name + ".d"),
            tmp_dir=path("UPGRADE_TEMP_DIR", base / "tmp"),
            backups_dir=path("UPGRADE_BACKUPS_DIR", base / "backups"),
            history_dir=path("UPGRADE_HISTORY_DIR", base / "history"),
            logs_dir=base / "logs",
        )

    def ensure(self) -> None:
        """Create the home's missing folders (0700); one clear error when that is
        impossible, or when the root exists but is not a ledger home."""
        # The root itself may be a symbolic link to a folder (a home moved to another
        # disk): the operator chose that path. Folders inside it may not be links.
        if not make_private_dir(self.root, follow=True):
            self._refuse_if_not_a_home()
        for folder in (self.tmp_dir, self.backups_dir, self.history_dir,
                       self.state_file.parent, self.lock_dir.parent):
            if folder != self.root:
                make_private_dir(folder)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(
                f"ledger home {self.root} is not writable; "
                "choose another with --home DIR (or LEDGER_HOME)"
            )

    def _refuse_if_not_a_home(self) -> None:
        """An existing root is a home when it holds what a home holds (``HOME_MARKERS``,
        or the paths the legacy variables put in it), or nothing but what the ledger
        makes in one (``HOME_NAMES``, temp files); anything else (``/``, ``/etc``, a
        typo that names a busy folder) is refused, untouched."""
        markers = [self.root / name for name in HOME_MARKERS]
        markers += [p for p in (self.db_path, self.state_file, self.lock_dir, self.history_dir)
                    if p.parent == self.root]
        if any(os.path.lexists(path) for path in markers):
            return
        known = {*HOME_MARKERS, *HOME_NAMES,
                 *(p.name for p in (self.tmp_dir, self.backups_dir) if p.parent == self.root)}
        try:
            others = sorted(entry.name for entry in self.root.iterdir()
                            if entry.name not in known and temp_writer_pid(entry.name) is None)
        except OSError as exc:
            raise StorageError(f"cannot read the ledger home {self.root} ({exc.strerror}); "
                               "choose another home with --home DIR (or LEDGER_HOME)") from exc
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more"
                                             if len(others) > 3 else "")
            raise NotAHome(f"{self.root} is not a ledger home: it holds other files "
                           f"({shown}) and no {self.db_path.name}; choose a new or empty "
                           "folder with --home DIR (or LEDGER_HOME)")

    def require_ledger(self) -> None:
        """Raise ``NoLedger`` unless this home has a ledger.db (for what only reads:
        nothing is created), ``CorruptLedger`` when it had one that was lost."""
        _refuse_lost_ledger(self)
        try:
            empty = os.lstat(self.db_path).st_size == 0
        except OSError:
            empty = True
        if empty:
            raise NoLedger(f"there is no ledger at {self.root} (no {self.db_path.name}); "
                           "check --home (or LEDGER_HOME); a command that records something "
                           "(init, apply) creates it")

    def prepare_db_file(self) -> None:
        """Make sure ledger.db, if there is one, is a regular file, and refuse to start
        a new ledger over one that was truncated or deleted. Its mode is left as it is
        (doctor reports a loose one); a new one is created whole, and private, by
        ``ledger.store.connect``."""
        _refuse_lost_ledger(self)
        try:
            st = os.lstat(self.db_path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _unusable(self.db_path, exc.strerror) from exc
        if not stat.S_ISREG(st.st_mode):
            raise _unusable(self.db_path, "a symbolic link" if stat.S_ISLNK(st.st_mode) else
                            "not a regular file")
        _refuse_linked_companions(self.db_path)

    def private_dir(self, folder: Path, *, create: bool = True) -> Path:
        """*folder*, a folder of this home (inside its root, or inside one of the
        folders the legacy variables moved), checked from the root (or from that
        folder) down with ``lstat`` right before use: a symbolic link planted
        anywhere on the way is refused, never followed (``private_subdir``)."""
        base = self._base_of(folder.absolute())
        if base is None:
            raise StorageError(f"{folder} is not a folder of the ledger home {self.root}")
        return private_subdir(base, folder.absolute(), create=create)

    def _base_of(self, folder: Path) -> Path | None:
        """Where the walk down to *folder* starts: the root, or above a moved folder."""
        if folder.is_relative_to(self.root.absolute()):
            return self.root.absolute()
        for moved in (self.backups_dir, self.history_dir, self.tmp_dir,
                      self.state_file.parent, self.lock_dir.parent):
            if folder.is_relative_to(moved.absolute()):
                return moved.absolute().parent
        return None

    def history_file(self, upgrade_id: str) -> Path:
        """``history/<id>.json``; ids are validated, so this never leaves the folder."""
        return self.history_dir / f"{upgrade_id}.json"

    def write_atomic(self, target: Path,
                     data: bytes | Sequence[bytes | memoryview]) -> None:
        """Replace *target* with *data* atomically (see ``write_file_atomic``), 0600,
        the temp file in the home's tmp/ when that is on the target's filesystem."""
        # The home's folders are looked at right before the write: a link planted
        # in the home since it was opened is refused, not written through. (A file
        # elsewhere, as ``export -o`` writes, is the caller's choice.)
        for checked in (target.parent.absolute(), self.tmp_dir.absolute()):
            base = self._base_of(checked)
            if base is not None:
                private_subdir(base, checked, create=False)
        folder = self.tmp_dir if same_device(self.tmp_dir, target.parent) else target.parent
        write_file_atomic(target, data, temp_dir=folder)

    @contextlib.contextmanager
    def views_lock(self) -> Iterator[None]:
        """An exclusive ``flock`` on the home folder while a writer builds its view,
        commits and puts the view in place: this home's writers then rewrite
        state.json in the order their changes committed, so the last view stays."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def clean_tmp(self) -> int:
        """Remove what writers that died mid-write left: temp files in tmp/, and temp
        files and staging folders (a ledger built aside) beside ledger.db. Only names of
        the ledger's own form (``.<name>.<pid>.<random>.tmp``) with a dead PID are
        touched. Returns how many were removed."""
        removed = 0
        for folder in dict.fromkeys((self.tmp_dir, self.db_path.parent)):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                pid = temp_writer_pid(entry.name)
                if pid is None or not entry.name.startswith(".") or host.pid_alive(pid):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        # Rare, so shutil is imported here, not on every start-up.
                        import shutil  # noqa: PLC0415

                        shutil.rmtree(entry.path)  # never follows links inside
                    else:
                        os.unlink(entry.path)
                    removed += 1
        return removed


def _unusable(path: Path, why: str | None) -> StorageError:
    return StorageError(f"cannot open {path} ({why}); choose another home with "
                        "--home DIR (or LEDGER_HOME)")


def _refuse_lost_ledger(home: Home) -> None:
    """An empty or missing ledger.db beside a state.json that a ledger wrote (it has a
    lineage) means the ledger was truncated or deleted: refuse to start a new, empty
    one over it, which would orphan the views and snapshots. One stat when all is well."""
    try:
        if home.db_path.stat().st_size:
            return
        how = "empty"
    except FileNotFoundError:
        how = "missing"
    except OSError:
        return
    try:
        lineage = json.loads(home.state_file.read_bytes()).get("lineage")
    except (OSError, ValueError, AttributeError):
        return
    if lineage:
        raise CorruptLedger(
            f"{home.db_path} is {how} but {home.state_file} was written by ledger {lineage}: "
            "the ledger was truncated or deleted; run 'upgrade-ledger restore' (see "
            "docs/operations.md), or move state.json aside to start a new ledger")


def _refuse_linked_companions(db_path: Path) -> None:
    """SQLite makes ``-wal``, ``-shm`` and ``-journal`` beside the database and will
    not open them through a link; say so plainly instead of "unable to open"."""
    for suffix in ("-wal", "-shm", "-journal"):
        companion = db_path.with_name(db_path.name + suffix)
        if companion.is_symlink():
            raise StorageError(f"ledger file {companion} is a symbolic link: the ledger "
                               "never writes through one; remove it (and find out who put "
                               "it there)")
