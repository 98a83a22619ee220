"""Retention: remove the files of old upgrades (``upgrade-ledger prune``).

Every ``apply`` keeps a full backup of each component, its command logs, a history
file and a snapshot of the ledger; without retention they pile up forever. A policy
names what to keep: the newest N upgrades, and every upgrade that finished within an
age. An upgrade that neither keeps loses its files: ``backups/<id>/``, the rollback
points it recorded inside the backups folder, ``logs/<id>/``, ``history/<id>.json``
and the snapshots labelled with its id. Never touched: the current upgrade, an
upgrade in progress, anything an upgrade that stays still points at (its rollback
points), the newest snapshot, and anything outside the home's folders. The rows
stay (they are small) unless the policy asks for them too. Each pruned upgrade gets
a ``ledger.prune`` event that lists what went and how many bytes.

A policy comes from the caller or from the ``[retention]`` section of
``HOME/ledger.toml``, which the default wiring applies after each completed upgrade.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ledger.api import Ledger
from ledger.core import clock, states
from ledger.core.validate import check_id
from ledger.errors import BadInput, LedgerError, StorageError
from ledger.ops import snapshots
from ledger.store import meta
from ledger.views.document import second

#: The home's configuration file; retention reads its ``[retention]`` section.
CONFIG_NAME = "ledger.toml"
_KEYS = {"keep_upgrades", "older_than", "rows"}


@dataclass(frozen=True)
class Policy:
    """What retention keeps. *keep_upgrades*: the N newest upgrades keep their files.
    *older_than*: an age (``90d``) or a date; only upgrades that finished before it may
    lose their files. With both, an upgrade is pruned only when both let it go.
    *rows*: also delete the pruned upgrades' rows (their events stay)."""

    keep_upgrades: int | None = None
    older_than: str | None = None
    rows: bool = False

    def __post_init__(self) -> None:
        keep = self.keep_upgrades
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)
                                 or not 0 <= keep <= 1_000_000):
            raise BadInput(f"keep_upgrades must be a whole number from 0 to 1000000, "
                           f"not {keep!r}")
        if self.older_than is not None:
            if not isinstance(self.older_than, str):
                raise BadInput(f"older_than must be an age such as '90d' or a date, not "
                               f"{self.older_than!r}")
            clock.parse_when(self.older_than)  # refused here, before anything is touched
        if not isinstance(self.rows, bool):
            raise BadInput(f"rows must be true or false, not {self.rows!r}")
        if keep is None and self.older_than is None:
            raise BadInput("a retention policy needs keep_upgrades (the newest N upgrades "
                           "keep their files), older_than (an age such as 90d), or both")

    def as_dict(self) -> dict[str, Any]:
        return {"keep_upgrades": self.keep_upgrades, "older_than": self.older_than,
                "rows": self.rows}


@dataclass
class Pruned:
    """One upgrade past the policy: what of it was (or, in a dry run, would be) removed."""

    upgrade_id: str
    outcome: str
    finished_at: str | None
    removed: list[str] = field(default_factory=list)
    bytes: int = 0
    rows: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"upgrade_id": self.upgrade_id, "outcome": self.outcome,
                "finished_at": self.finished_at, "removed": self.removed,
                "bytes": self.bytes, "rows": self.rows}


@dataclass
class Report:
    """What a prune did (or would do, with *dry_run*)."""

    policy: Policy
    dry_run: bool
    upgrades: list[Pruned] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(p.bytes for p in self.upgrades)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "policy": self.policy.as_dict(),
                "upgrades": [p.as_dict() for p in self.upgrades],
                "bytes_freed": self.bytes_freed}


def config_path(ledger: Ledger) -> Path:
    """``HOME/ledger.toml``."""
    return ledger.home.root / CONFIG_NAME


def configured(ledger: Ledger) -> Policy | None:
    """The policy in the ``[retention]`` section of ``HOME/ledger.toml``; None when
    there is no such file or section."""
    path = config_path(ledger)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path} ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path} is not valid TOML: {exc}") from exc
    section = data.get("retention")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise BadInput(f"{path}: [retention] must be a table")
    unknown = sorted(set(section) - _KEYS)
    if unknown:
        raise BadInput(f"{path}: [retention] does not know {', '.join(unknown)}; "
                       f"use {', '.join(sorted(_KEYS))}")
    try:
        return Policy(section.get("keep_upgrades"), section.get("older_than"),
                      section.get("rows", False))
    except BadInput as exc:
        raise BadInput(f"{path}: [retention]: {exc}") from None


def prune(ledger: Ledger, policy: Policy, *, dry_run: bool = False) -> Report:
    """Remove the files (and with ``policy.rows`` the rows) of the upgrades past
    *policy*; with *dry_run* only say what would go. Returns what went, per upgrade.

    Each upgrade is one step: its files are removed, then one transaction records
    them (``Ledger.record_prune``). A file that cannot be removed stops the prune with
    ``StorageError``; what was removed before it is recorded, and its rows stay.
    """
    report = Report(policy, dry_run)
    candidates, protected = _sort_out(ledger, policy)
    if policy.rows and not dry_run and candidates:
        ledger.db.verify()  # never delete rows of a damaged ledger
    labelled: dict[str, list[Path]] = {}
    for snap in snapshots.listing(ledger.home)[1:]:  # the newest is never pruned
        labelled.setdefault(snap.upgrade_id, []).append(snap.path)
    for row, points in candidates:
        paths = _files_of(ledger, row["id"], points, protected) + labelled.get(row["id"], [])
        sizes = [(path, _size(path)) for path in paths if _exists(path)]
        if not sizes and not policy.rows:
            continue  # pruned before: nothing left to remove
        item = Pruned(row["id"], row["outcome"] or row["state"], second(row["finished_at"]),
                      [_shown(ledger, path) for path, _ in sizes],
                      sum(size for _, size in sizes), policy.rows)
        report.upgrades.append(item)
        if not dry_run:
            _prune_one(ledger, policy, item, sizes)
    return report


def _prune_one(ledger: Ledger, policy: Policy, item: Pruned,
               sizes: list[tuple[Path, int]]) -> None:
    """Remove one upgrade's files, then record what went (and delete its rows)."""
    item.removed, item.bytes, failure = [], 0, None
    for path, size in sizes:
        try:
            _remove(path)
        except StorageError as exc:
            failure = exc
            break
        item.removed.append(_shown(ledger, path))
        item.bytes += size
    item.rows = policy.rows and failure is None
    if item.removed or item.rows:
        ledger.record_prune(item.upgrade_id, {"removed": item.removed, "bytes": item.bytes,
                                              "policy": policy.as_dict()},
                            delete_rows=item.rows)
    if failure is not None:
        raise failure


def after_upgrade(ledger: Ledger, upgrade_id: str) -> Report | None:
    """The default wiring's retention: after an upgrade that COMPLETED was saved to
    history, apply ``HOME/ledger.toml``'s policy, if it has one.

    It never fails the upgrade, which is done by now: a bad configuration or a file
    that cannot be removed is recorded on the current upgrade as a ``ledger.prune``
    event with the error, for doctor's eyes and the audit trail.
    """
    try:
        with ledger.db.read() as tx:
            outcome = tx.scalar("SELECT outcome FROM upgrades WHERE host = :host AND id = :u",
                                {"u": upgrade_id})
        if outcome != states.COMPLETED:
            return None
        policy = configured(ledger)
        return None if policy is None else prune(ledger, policy)
    except LedgerError as exc:
        with contextlib.suppress(LedgerError):
            ledger.annotate("ledger.prune", "retention", {"error": str(exc)})
        return None


# -- choosing --------------------------------------------------------------------------

def _sort_out(ledger: Ledger, policy: Policy,
              ) -> tuple[list[tuple[dict[str, Any], list[str]]], list[Path]]:
    """The upgrades past *policy* (each with its rollback points' paths), oldest first,
    and the paths that upgrades staying in the ledger point at."""
    cutoff = None if policy.older_than is None else clock.parse_when(policy.older_than)
    with ledger.db.read() as tx:
        current = meta.current_upgrade(tx)
        rows = [dict(r) for r in tx.all(
            "SELECT id, state, outcome, started_at, updated_at, finished_at FROM upgrades "
            "WHERE host = :host ORDER BY started_at DESC, id DESC")]
        points: dict[str, list[str]] = {}
        for r in tx.all("SELECT upgrade_id, backup_path FROM rollback_points "
                        "WHERE host = :host ORDER BY id"):
            points.setdefault(r["upgrade_id"], []).append(r["backup_path"])
    candidates, protected = [], []
    for rank, row in enumerate(rows):
        ended = row["finished_at"] or row["updated_at"] or row["started_at"]
        keep = (row["id"] == current or states.is_in_progress(row["state"])
                or (policy.keep_upgrades is not None and rank < policy.keep_upgrades)
                or (cutoff is not None and ended >= cutoff))
        if keep:
            protected += [Path(p) for p in points.get(row["id"], [])]
            protected += _own_folders(ledger, row["id"])
        else:
            candidates.append((row, points.get(row["id"], [])))
    return list(reversed(candidates)), protected


def _own_folders(ledger: Ledger, upgrade_id: str) -> list[Path]:
    home = ledger.home
    return [home.backups_dir / upgrade_id, home.logs_dir / upgrade_id]


def _files_of(ledger: Ledger, upgrade_id: str, points: list[str],
              protected: list[Path]) -> list[Path]:
    """What of an upgrade retention may remove: its folders, history file and the
    rollback points it recorded inside the backups folder; never a path that an
    upgrade staying in the ledger points at, nor one that holds or lies in such a path."""
    check_id(upgrade_id)
    home = ledger.home
    found = [*_own_folders(ledger, upgrade_id), home.history_file(upgrade_id)]
    for point in points:
        path = _normal(Path(point))
        if path.is_absolute() and _inside(path, home.backups_dir) and path not in found:
            found.append(path)
    keep = [_normal(p) for p in protected]
    chosen = [p for p in map(_normal, found)
              if not any(p == k or _nested(k, p) or _nested(p, k) for k in keep)]
    # A point inside the upgrade's own backups folder goes with the folder.
    return [p for p in chosen if not any(_nested(p, q) for q in chosen)]


def _normal(path: Path) -> Path:
    return Path(os.path.normpath(path.absolute()))


def _nested(path: Path, folder: Path) -> bool:
    """*path* is strictly below *folder* (both normalised)."""
    return folder in path.parents


def _inside(path: Path, folder: Path) -> bool:
    """*path* is strictly below *folder*, and no folder between them is a symbolic
    link (removing through one would reach outside the home)."""
    folder, path = _normal(folder), _normal(path)
    if not _nested(path, folder):
        return False
    step = folder
    for part in path.relative_to(folder).parts[:-1]:
        step = step / part
        try:
            if stat.S_ISLNK(step.lstat().st_mode):
                return False
        except OSError:
            return False
    return True


# -- measuring and removing ------------------------------------------------------------

def _exists(path: Path) -> bool:
    try:
        path.lstat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot look at {path} ({exc.strerror})") from exc
    return True


def _size(path: Path) -> int:
    """Bytes of the regular files at or under *path* (links are not followed)."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = Path(root, name).lstat()
            except OSError:
                continue  # gone meanwhile, or unreadable: it frees nothing we can count
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _remove(path: Path) -> None:
    try:
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)  # removes links inside, never what they point at
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"cannot remove {path} ({exc.strerror}); what was removed before "
                           "is recorded in the ledger") from exc


def _shown(ledger: Ledger, path: Path) -> str:
    """*path* relative to the home when it is in it (shorter in events and tables)."""
    try:
        return str(path.absolute().relative_to(ledger.home.root.absolute()))
    except ValueError:
        return str(path)

