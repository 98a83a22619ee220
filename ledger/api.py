"""The Python API: ``Ledger``, one method per operation of the legacy library and more.

Every method that changes anything is one transaction: read, validate, write,
append its event, commit. Only then is the ``state.json`` view rewritten, so a view
is never ahead of the ledger. Read-side queries (history, show, summary) live in
``ledger.queries``; the lock protocol in ``ledger.lock``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ledger import queries
from ledger.core import clock, host, states
from ledger.core.host import check_host
from ledger.core.validate import (
    MAX_NUMBER,
    check_id,
    check_name,
    check_path,
    check_text,
    check_version,
    clip_text,
)
from ledger.core.values import Value
from ledger.errors import (
    BadInput,
    Conflict,
    InvalidDocument,
    NoCurrentPhase,
    NotFound,
    NotLockOwner,
    StorageError,
    UpgradeInProgress,
)
from ledger.lock import DirLock, Holder, LockStatus
from ledger.store import meta
from ledger.store.connect import open_database
from ledger.store.database import ALL_HOSTS, REPORT_TIMEOUT_S, Database, Row, Rows, Tx
from ledger.store.home import Home
from ledger.views import document, patch

if TYPE_CHECKING:
    from ledger.core.rollout import Rollout

T = TypeVar("T")

_ANNOTATION_KIND = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: The longest a reporting query may be allowed to run.
MAX_REPORT_TIMEOUT_S = 86400.0

#: SQL for a component's attempt in progress: its ``attempts``, and at least 1 once
#: it has started. ``attempts`` counts as the old bash library did: 1 at the first
#: start, + 1 at each failure (docs/state-json.md).
_ATTEMPT_IN_PROGRESS = "CASE WHEN attempts < 1 THEN 1 ELSE attempts END"

#: A planned component: (name, from_version, to_version).
PlannedComponent = tuple[str, str | None, str | None]
#: Where the fleet database is, unless ``Ledger(fleet_url=...)`` says (docs/fleet.md).
FLEET_URL_ENV = "LEDGER_FLEET_URL"


class RunContext(Value):
    """What an ``apply`` run tells its ``during_run`` listeners as it starts: the plan
    (name, sha256 of its file, path), its rolling-upgrade limits, whether it resumes
    an upgrade of this plan in progress or has nothing to do (the plan is applied
    already), a function that says whether the run was asked to stop, and one that
    tells the operator something. (A ``Value``, not a dataclass: ``api`` is on the
    per-step path.)"""

    FIELDS = ("plan_name", "plan_sha256", "plan_path", "rollout", "resuming", "idle",
              "stopping", "say")
    __slots__ = FIELDS

    plan_name: str
    plan_sha256: str
    plan_path: str
    rollout: Rollout
    resuming: bool
    idle: bool
    stopping: Callable[[], bool]
    say: Callable[[str], None]

    def __init__(self, *, plan_name: str, plan_sha256: str, plan_path: str,
                 rollout: Rollout, resuming: bool, idle: bool,
                 stopping: Callable[[], bool], say: Callable[[str], None]) -> None:
        self._set(plan_name=plan_name, plan_sha256=plan_sha256, plan_path=plan_path,
                  rollout=rollout, resuming=resuming, idle=idle, stopping=stopping,
                  say=say)


class Ledger:
    """A durable ledger of upgrades in a home folder (or behind a database URL).

    The ledger is this host's (``identity``): every change and every read is scoped
    to its rows, so many hosts can share one database; ``history``, ``show``,
    ``events`` and ``status`` can also read another host's rows or every host's.

    *pid* is the process the changes are attributed to and that owns the lock
    (default: this process; the CLI passes its caller's). With *strict*, every
    change is refused unless *pid* holds the lock. A home (or database) without a
    ledger gets a new one; with *create* False it is refused with ``NoLedger`` and
    nothing is made: the way to open a ledger only to read it.

    Effects beyond the ledger (the metrics textfile, snapshots, notifications) are
    listeners: callables in ``after_change``, ``after_save``, ``during_run`` and
    ``status_sections``, which the ledger calls without knowing what they do. Every
    new ``Ledger`` is handed to each function in ``default_wiring`` first
    (``ledger.wiring`` registers the documented defaults there); ``wired=False``
    gives a bare ledger.

    *db* is a database already open on this ledger, used instead of opening one
    (the command-line session keeps one open between calls); closing the ledger
    closes it.
    """

    #: Functions that register the default listeners on each new Ledger.
    default_wiring: ClassVar[list[Callable[[Ledger], None]]] = []

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        db_url: str | None = None,
        env: Mapping[str, str] | None = None,
        pid: int | None = None,
        strict: bool = False,
        lock_timeout_s: float = 4 * 3600,
        wired: bool = True,
        host_name: str | None = None,
        create: bool = True,
        db: Database | None = None,
        fleet_url: str | None = None,
    ) -> None:
        #: The environment the ledger's settings are read from (default: os.environ).
        self.env: Mapping[str, str] = os.environ if env is None else env
        #: The fleet database this host's ledger is shipped to (*fleet_url*, else
        #: ``LEDGER_FLEET_URL``), or None; the fleet part (``ledger.fleet``) ships it.
        self.fleet_url: str | None = fleet_url or self.env.get(FLEET_URL_ENV) or None
        #: Whose rows this ledger reads and writes: *host_name*, else ``LEDGER_HOST``,
        #: else the kernel's node name; with this machine's id.
        self.identity = host.identity(self.env, host_name)
        self.home = Home.at(home, env)
        self.db: Database = self._open(db_url, create) if db is None else self._adopt(db)
        self.pid = os.getpid() if pid is None else pid
        self.user = host.user_name() or str(os.geteuid())
        self.hostname = self.identity.name
        self.strict = strict
        self.lock = DirLock(self.home.lock_dir, timeout_s=lock_timeout_s,
                            on_break=self.record_lock_break)
        #: Called after every committed change and lock move. Must never raise: the
        #: change is committed and must not look failed.
        self.after_change: list[Callable[[], object]] = []
        #: Called with the upgrade id after ``save_to_history`` wrote its file.
        self.after_save: list[Callable[[str], object]] = []
        #: Context managers entered around an ``apply`` run, given this ledger and the
        #: run's ``RunContext`` (notifications are delivered as the run goes this way,
        #: and cut short when it stops; the fleet takes a slot and ships the changes).
        self.during_run: list[Callable[[Ledger, RunContext],
                                       AbstractContextManager[object]]] = []
        #: Extra sections of ``status()``: name -> function returning its data.
        self.status_sections: dict[str, Callable[[], object]] = {}
        if wired:
            for wire in Ledger.default_wiring:
                wire(self)

    def _open(self, db_url: str | None, create: bool) -> Database:
        """Prepare the home and open the database (see the class docstring)."""
        if db_url is None:
            if not create:
                self.home.require_ledger()  # before anything is made
            self.home.ensure()
            self.home.clean_tmp()
            self.home.prepare_db_file()
            return open_database(None, self.home.db_path, self.identity, create=create)
        if create:
            self.home.ensure()
        db = open_database(db_url, None, self.identity, create=create)
        try:
            self.home.ensure()  # the views and the lock of a --db ledger live here
            self.home.clean_tmp()
        except BaseException:
            db.close()
            raise
        return db

    def _adopt(self, db: Database) -> Database:
        """Prepare the home for *db*, a database already open on this ledger."""
        self.home.ensure()
        self.home.clean_tmp()
        return db

    def close(self) -> None:
        """Release the database connection."""
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------

    def _change(self, action: Callable[[Tx], T],
                touched: list[tuple[str, str, bool]] | None = None) -> T:
        """Run *action* as one write transaction, with the state.json view built in it
        and put in place once it committed: one transaction per step.

        An action that changes no component row beyond those it lists in *touched*
        (``(phase, name, created)``, filled as it runs) lets the view be patched
        rather than rebuilt whole; see ``ledger.views.patch``. The view is built
        under the home's views lock, taken after the change and kept until the view
        is in place, so this home's views land in commit order and never run ahead
        of the ledger.
        """
        if self.strict:
            self._require_lock()
        with contextlib.ExitStack() as held:
            with self.db.write() as tx:
                upgrade_id = None if touched is None else meta.current_upgrade(tx)
                before = None if upgrade_id is None else patch.serial(tx, upgrade_id)
                result = action(tx)
                change = None
                if upgrade_id is not None and before is not None and touched is not None:
                    change = patch.Change(upgrade_id, before, patch.serial(tx, upgrade_id),
                                          touched)
                held.enter_context(self.home.views_lock())
                view = self._build_view(tx, change)
            try:
                self._put_view(view)
            except StorageError as exc:
                # Committed is committed: say so, or a caller would redo a step that
                # happened.
                raise StorageError(f"the change was recorded in the ledger, but {exc}; then "
                                   "run 'upgrade-ledger export' to rewrite the views") from exc
        self._changed()
        return result

    def _changed(self) -> None:
        """After a change or a lock move: tell the ``after_change`` listeners."""
        for listener in list(self.after_change):
            listener()

    def _require_lock(self) -> None:
        status = self.lock.status()
        holder = status.holder
        if not status.held or holder is None or holder.pid != self.pid:
            raise NotLockOwner(
                f"strict mode: process {self.pid} must hold the lock before changing the "
                "ledger; take it with 'upgrade-ledger lock acquire'"
            )

    def _event(self, tx: Tx, kind: str, upgrade_id: str | None, subject: str | None = None,
               old: str | None = None, new: str | None = None,
               detail: Mapping[str, Any] | None = None, at: str | None = None) -> None:
        event_id = tx.insert(
            "INSERT INTO events (host, at, upgrade_id, kind, subject, from_value, to_value, "
            "username, hostname, pid, detail) VALUES (:host, :at, :upgrade_id, :kind, "
            ":subject, :old, :new, :user, :hostname, :pid, :detail)",
            {"at": at or clock.now(), "upgrade_id": upgrade_id, "kind": kind,
             "subject": subject, "old": old, "new": new, "user": self.user,
             "hostname": self.hostname, "pid": self.pid,
             "detail": None if detail is None else json.dumps(detail, sort_keys=True)},
        )
        if upgrade_id is not None:
            tx.memo["serial", upgrade_id] = event_id  # the upgrade's serial, now

    def _current(self, tx: Tx) -> Row:
        upgrade_id = meta.current_upgrade(tx)
        row = None if upgrade_id is None else tx.one(
            "SELECT * FROM upgrades WHERE host = :host AND id = :id", {"id": upgrade_id})
        if row is None:
            if tx.host == self.identity.name:
                raise NotFound("no upgrade in this ledger yet; start one with "
                               "'upgrade-ledger init'")
            raise NotFound(f"no upgrade of host {tx.host!r} in this ledger yet")
        return row

    def _touch(self, tx: Tx, upgrade_id: str, at: str, **columns: Any) -> None:
        sets = ", ".join(f"{c} = :{c}" for c in columns)
        tx.execute(f"UPDATE upgrades SET updated_at = :at{', ' if sets else ''}{sets} "
                   "WHERE host = :host AND id = :id", {"at": at, "id": upgrade_id, **columns})

    def write_views(self) -> None:
        """Rewrite state.json from the ledger (done after every change; also on demand),
        in turn with this home's other writers (see ``_change``)."""
        with contextlib.ExitStack() as held:
            with self.db.write() as tx:
                held.enter_context(self.home.views_lock())
                view = self._build_view(tx, None)
            self._put_view(view)

    def _build_view(self, tx: Tx, change: patch.Change | None,
                    ) -> tuple[str, bytes | list[bytes | memoryview], int] | None:
        """``(upgrade id, state.json bytes, serial)`` of the current upgrade: patched
        after *change* when that is provably right, else built whole; None before the
        first upgrade."""
        upgrade_id = meta.current_upgrade(tx)
        if upgrade_id is None:
            return None
        if change is not None and change.upgrade_id == upgrade_id:
            pieces = patch.patched(self.home, tx, change)
            if pieces is not None:
                return upgrade_id, pieces, change.after
        doc = document.build(tx, upgrade_id)
        return upgrade_id, document.dumps(doc), int(doc["serial"])

    def _put_view(self, view: tuple[str, bytes | list[bytes | memoryview], int] | None,
                  ) -> None:
        if view is not None:
            upgrade_id, data, serial = view
            self.home.write_atomic(self.home.state_file, data)
            patch.remember(self.home, upgrade_id, serial)

    def record_lock_break(self, info: Mapping[str, Any]) -> None:
        """Append a ``lock.break`` event for a lock taken over or broken (*info* as
        ``DirLock``'s ``on_break`` gives it)."""
        with self.db.write() as tx:
            previous = info.get("previous") or {}
            self._event(tx, "lock.break", None, "lock",
                        old=str(previous.get("pid")) if previous else None,
                        new=str(self.pid), detail=dict(info))

    # -- upgrades ------------------------------------------------------------------

    def init(self, upgrade_id: str | None = None, *, supersede: bool = False) -> str:
        """Start a new upgrade (state IDLE) and make it current; return its id.

        An upgrade still in progress is never lost: unless *supersede*, this raises
        ``UpgradeInProgress``; with it, the old upgrade ends FAILED, marked
        ``superseded_by`` the new one, and stays in the ledger.
        """
        if upgrade_id is not None:
            check_id(upgrade_id)

        def action(tx: Tx) -> str:
            at = clock.now()
            new_id = upgrade_id or self._free_id(tx, at)
            if tx.scalar("SELECT 1 FROM upgrades WHERE host = :host AND id = :id", {"id": new_id}):
                raise Conflict(f"upgrade {new_id} exists already; choose another id")
            old_id = meta.current_upgrade(tx)
            old = old_id and tx.one("SELECT id, state FROM upgrades WHERE host = :host AND id = "
                                    ":id",
                                    {"id": old_id})
            if old and states.is_in_progress(old["state"]):
                if not supersede:
                    raise UpgradeInProgress(old["id"], old["state"])
                self._supersede(tx, old["id"], old["state"], new_id, at)
            tx.execute(
                "INSERT INTO upgrades (host, id, state, started_at, updated_at, hostname, "
                "username, pid) VALUES (:host, :id, 'IDLE', :at, :at, :hostname, :user, :pid)",
                {"id": new_id, "at": at, "hostname": self.hostname, "user": self.user,
                 "pid": self.pid},
            )
            meta.set_current_upgrade(tx, new_id)
            self._event(tx, "upgrade.init", new_id, new="IDLE", at=at,
                        detail={"superseded": old["id"]} if old and supersede and
                        states.is_in_progress(old["state"]) else None)
            return new_id

        return self._change(action)

    @staticmethod
    def _free_id(tx: Tx, at: str) -> str:
        base = "upgrade-" + at[:10].replace("-", "") + "-" + at[11:19].replace(":", "")
        taken = {r[0] for r in tx.all("SELECT id FROM upgrades WHERE host = :host AND id LIKE :p",
                                       {"p": base + "%"})}
        if base not in taken:
            return base
        n = 2
        while f"{base}-{n}" in taken:
            n += 1
        return f"{base}-{n}"

    def superseded(self, upgrade_id: str) -> tuple[str, str] | None:
        """``(old id, the state it was in)`` when *upgrade_id* superseded an upgrade still
        in progress as it started (``init(supersede=True)``), else None.

        Read from the events that the init wrote in its own transaction, so it is
        race-free, unlike looking at the state before the init.
        """
        started = self.events(upgrade_id=check_id(upgrade_id), kind="upgrade.init")
        old_id = ((started[-1]["detail"] or {}) if started else {}).get("superseded")
        if not old_id:
            return None
        ended = self.events(upgrade_id=old_id, kind="upgrade.superseded")
        return old_id, ended[-1]["from"] if ended else "in progress"

    def _supersede(self, tx: Tx, old_id: str, old_state: str, new_id: str, at: str) -> None:
        error = f"superseded by {new_id}"
        tx.execute(
            "UPDATE upgrades SET state = 'FAILED', outcome = COALESCE(outcome, 'FAILED'), "
            "finished_at = :at, updated_at = :at, error = :error, superseded_by = :new "
            "WHERE host = :host AND id = "
            ":id", {"at": at, "error": error, "new": new_id, "id": old_id})
        self._event(tx, "upgrade.superseded", old_id, old=old_state, new="FAILED", at=at,
                    detail={"superseded_by": new_id})

    def current_id(self) -> str | None:
        """The id of the current upgrade, or None before the first."""
        with self.db.read() as tx:
            return meta.current_upgrade(tx)

    def document(self, upgrade_id: str | None = None) -> dict[str, Any]:
        """The state document of an upgrade (default: the current one), built fresh."""
        with self.db.read() as tx:
            if upgrade_id is None:
                upgrade_id = self._current(tx)["id"]
            elif not tx.scalar("SELECT 1 FROM upgrades WHERE host = :host AND id = :id",
                               {"id": check_id(upgrade_id)}):
                raise NotFound(f"no upgrade {upgrade_id!r} in this ledger")
            return document.build(tx, upgrade_id)

    def import_document(self, doc: str | bytes | Mapping[str, Any], *,
                        make_current: bool = True) -> str:
        """Load a legacy state document (state.json or a history file) into the ledger.

        The document is validated first; a bad one changes nothing. An upgrade with the
        same id is replaced by the document's content (one ``upgrade.import`` event
        records it), which is how the legacy ``upgrade_state_save`` is honoured. With
        *make_current*, another upgrade still in progress is superseded, not orphaned.
        """
        from ledger.views import importer  # noqa: PLC0415 (imports and saves only)

        data = document.parse(_json_text(doc))

        def action(tx: Tx) -> str:
            current = meta.current_upgrade(tx)
            old = None if current in (None, data["upgrade_id"]) or not make_current else \
                tx.one("SELECT id, state FROM upgrades WHERE host = :host AND id = "
                       ":id", {"id": current})
            upgrade_id = importer.import_upgrade(tx, data)
            if make_current:
                # Replacing the current upgrade never orphans a run in progress: it
                # is superseded, as init(supersede=True) does.
                if old is not None and states.is_in_progress(old["state"]):
                    self._supersede(tx, old["id"], old["state"], upgrade_id, clock.now())
                meta.set_current_upgrade(tx, upgrade_id)
            self._event(tx, "upgrade.import", upgrade_id, new=data["current_state"],
                        detail={"phases": len(data["phases"])})
            return upgrade_id

        return self._change(action)

    def save_document(self, doc: str | bytes | Mapping[str, Any]) -> str:
        """Save a state document into the current upgrade, as the legacy
        ``upgrade_state_save`` is honoured; return the upgrade's id.

        The known fields the document has are validated and applied; those it lacks
        keep their value (``updated_at`` becomes now). Keys the ledger does not know
        are kept verbatim and written back in every later view (``document``,
        ``importer``), so ``{"ticket": "OPS-1"}`` alone is a valid document. A
        document whose ``upgrade_id`` names another upgrade is saved into that one,
        which becomes current (an upgrade in progress is superseded, as by
        ``import_document``); one the ledger does not have needs a whole document.
        Anything invalid (bad JSON, a bad field, too many kept bytes) changes nothing.
        """
        from ledger.views import importer  # noqa: PLC0415 (imports and saves only)

        data = document.validate(document.load(_json_text(doc)), whole=False)

        def action(tx: Tx) -> str:
            current = meta.current_upgrade(tx)
            upgrade_id = data.get("upgrade_id") or current
            if upgrade_id is None:
                raise NotFound("no upgrade to save the document into; start one with "
                               "'upgrade-ledger init' (upgrade_state_init), or give a whole "
                               "document with its upgrade_id")
            row = tx.one("SELECT state, current_phase FROM upgrades WHERE id = :id",
                         {"id": upgrade_id})
            if row is None:
                importer.import_upgrade(tx, document.validate(data))
            else:
                if "phases" in data:
                    document.check_current_phase(
                        data.get("current_phase", row["current_phase"]), data["phases"])
                elif "current_phase" in data:
                    document.check_current_phase(data["current_phase"], {r[0] for r in tx.all(
                        "SELECT name FROM phases WHERE upgrade_id = :u", {"u": upgrade_id})},
                        f"upgrade {upgrade_id}'s")
                importer.merge_upgrade(tx, upgrade_id, data)
            old = None if current in (None, upgrade_id) else tx.one(
                "SELECT id, state FROM upgrades WHERE id = :id", {"id": current})
            if old is not None and states.is_in_progress(old["state"]):
                self._supersede(tx, old["id"], old["state"], upgrade_id, clock.now())
            meta.set_current_upgrade(tx, upgrade_id)
            self._event(tx, "upgrade.save", upgrade_id,
                        old=None if row is None else row["state"],
                        new=tx.scalar("SELECT state FROM upgrades WHERE id = :id",
                                      {"id": upgrade_id}),
                        detail={"fields": [k for k in data if k in document.TOP_KEYS],
                                "kept_bytes": importer.kept_size(tx, upgrade_id)})
            return upgrade_id

        return self._change(action)

    # -- state ---------------------------------------------------------------------

    def state(self) -> str:
        """The current upgrade's state (IDLE when there is no upgrade yet)."""
        with self.db.read() as tx:
            try:
                return self._current(tx)["state"]  # type: ignore[no-any-return]
            except NotFound:
                return states.IDLE

    @staticmethod
    def validate_transition(current: str, target: str) -> bool:
        """Whether the upgrade state machine allows *current* → *target*."""
        states.check_state("upgrade", current)
        return states.is_valid_transition("upgrade", current, target)

    def set_state(self, target: str, *, error: str | None = None) -> bool:
        """Move the current upgrade to *target*; False when it was there already."""
        states.check_state("upgrade", target)
        error = check_text(clip_text(error), "error")

        def action(tx: Tx) -> bool:
            u = self._current(tx)
            if not states.check_transition("upgrade", u["state"], target):
                return False
            at = clock.now()
            columns: dict[str, Any] = {"state": target}
            if target in states.TERMINAL_STATES:
                columns["finished_at"] = at
                if u["outcome"] is None:
                    columns["outcome"] = target
            if error is not None:
                columns["error"] = error
            self._touch(tx, u["id"], at, **columns)
            self._event(tx, "upgrade.state", u["id"], old=u["state"], new=target, at=at,
                        detail={"error": error} if error else None)
            return True

        return self._change(action)

    def in_progress(self) -> bool:
        """True while the current upgrade is running (PLANNING … ROLLING_BACK)."""
        return states.is_in_progress(self.state())

    # -- phases --------------------------------------------------------------------

    def plan(self, phases: Mapping[str, Sequence[PlannedComponent]]) -> None:
        """Register phases and their components as PENDING, in order, before they run.

        Already registered phases and components are left as they are, so planning
        again on resume is harmless.
        """
        checked = [(check_name(p, "phase"),
                    [(check_name(c, "component"), check_version(f, "from version"),
                      check_version(t, "to version")) for c, f, t in comps])
                   for p, comps in phases.items()]

        def action(tx: Tx) -> None:
            u = self._current(tx)
            at = clock.now()
            added = 0
            # Positions counted here, not looked up per component: planning n
            # components stays O(n log n), not O(n^2).
            position = tx.scalar("SELECT COALESCE(MAX(position), 0) FROM components "
                                 "WHERE host = :host AND upgrade_id = :u", {"u": u["id"]})
            for phase, comps in checked:
                if self._ensure_phase(tx, u["id"], phase):
                    added += 1
                for name, frm, to in comps:
                    if tx.scalar("SELECT 1 FROM components WHERE host = :host AND upgrade_id = "
                                 ":u AND "
                                 "phase = :p AND name = :n", {"u": u["id"], "p": phase,
                                                              "n": name}):
                        continue
                    position += 1
                    self._insert_component(tx, u["id"], phase, name, "PENDING", frm, to,
                                           position)
                    added += 1
            self._touch(tx, u["id"], at)
            self._event(tx, "upgrade.plan", u["id"], at=at,
                        detail={"phases": [p for p, _ in checked], "added": added})

        self._change(action)

    def _ensure_phase(self, tx: Tx, upgrade_id: str, phase: str) -> bool:
        if tx.scalar("SELECT 1 FROM phases WHERE host = :host AND upgrade_id = :u AND name = :p",
                     {"u": upgrade_id, "p": phase}):
            return False
        position = tx.scalar("SELECT COALESCE(MAX(position), 0) + 1 FROM phases "
                             "WHERE host = :host AND upgrade_id = :u", {"u": upgrade_id})
        tx.execute("INSERT INTO phases (host, upgrade_id, name, position, state) "
                   "VALUES (:host, :u, :p, :pos, 'PENDING')",
                   {"u": upgrade_id, "p": phase, "pos": position})
        return True

    @staticmethod
    def _insert_component(tx: Tx, upgrade_id: str, phase: str, name: str, state: str,
                          frm: str | None, to: str | None, position: int | None = None,
                          ) -> None:
        """Insert a component at *position* (default: after every other one)."""
        if position is None:
            position = tx.scalar("SELECT COALESCE(MAX(position), 0) + 1 FROM components "
                                 "WHERE host = :host AND upgrade_id = :u", {"u": upgrade_id})
        tx.execute(
            "INSERT INTO components (host, upgrade_id, phase, name, position, state, from_version, "
            "to_version, attempts) VALUES (:host, :u, :p, :n, :pos, :s, :f, :t, 0)",
            {"u": upgrade_id, "p": phase, "n": name, "pos": position, "s": state,
             "f": frm, "t": to})

    def _phase_move(self, name: str, target: str, error: str | None = None) -> bool:
        check_name(name, "phase")
        error = check_text(clip_text(error), "error")

        def action(tx: Tx) -> bool:
            u = self._current(tx)
            if target == states.IN_PROGRESS:
                self._ensure_phase(tx, u["id"], name)
            row = tx.one("SELECT state FROM phases WHERE host = :host AND upgrade_id = :u AND "
                         "name = :p",
                         {"u": u["id"], "p": name})
            if row is None:
                raise NotFound(f"no phase {name!r} in upgrade {u['id']}; start it first")
            changed = states.check_transition("phase", row["state"], target)
            at = clock.now()
            stamp_column = {states.IN_PROGRESS: "started_at", states.COMPLETED: "completed_at",
                            states.FAILED: "failed_at", states.SKIPPED: "completed_at"}[target]
            if changed:
                tx.execute(
                    f"UPDATE phases SET state = :s, {stamp_column} = :at"
                    + (", error = :e" if target in (states.FAILED, states.SKIPPED) else "")
                    + (", completed_at = NULL, failed_at = NULL, error = NULL"
                       if target == states.IN_PROGRESS else "")
                    + " WHERE host = :host AND upgrade_id = :u AND name = :p",
                    {"s": target, "at": at, "e": error, "u": u["id"], "p": name})
            current = name if target == states.IN_PROGRESS else u["current_phase"]
            if not changed and current == u["current_phase"]:
                return False
            self._touch(tx, u["id"], at, current_phase=current)
            self._event(tx, "phase." + target.lower(), u["id"], name, row["state"], target,
                        at=at, detail={"error": error} if error else None)
            return changed

        return self._change(action)

    def phase_start(self, name: str) -> bool:
        """Start (or restart) a phase and make it current; it is created if unplanned."""
        return self._phase_move(name, states.IN_PROGRESS)

    def phase_complete(self, name: str) -> bool:
        """Mark a started phase COMPLETED."""
        return self._phase_move(name, states.COMPLETED)

    def phase_fail(self, name: str, error: str | None = None) -> bool:
        """Mark a started phase FAILED with an optional error."""
        return self._phase_move(name, states.FAILED, error)

    def phase_skip(self, name: str, reason: str | None = None) -> bool:
        """Mark a phase SKIPPED (with the reason as its error text)."""
        return self._phase_move(name, states.SKIPPED, reason)

    def next_phase(self) -> str | None:
        """The first PENDING phase in planned order, or None."""
        with self.db.read() as tx:
            u = self._current(tx)
            return tx.scalar(  # type: ignore[no-any-return]
                "SELECT name FROM phases WHERE host = :host AND upgrade_id = :u AND state = "
                "'PENDING' "
                "ORDER BY position LIMIT 1", {"u": u["id"]})

    # -- components ----------------------------------------------------------------

    @staticmethod
    def _find_component(tx: Tx, u: Row, name: str, phase: str | None = None) -> Row | None:
        """The component *name*: in *phase*, else in the current phase, else its latest."""
        if phase is None and u["current_phase"] is not None:
            row = tx.one("SELECT * FROM components WHERE host = :host AND upgrade_id = :u AND "
                         "phase = :p "
                         "AND name = :n", {"u": u["id"], "p": u["current_phase"], "n": name})
            if row is not None:
                return row
        if phase is not None:
            return tx.one("SELECT * FROM components WHERE host = :host AND upgrade_id = :u AND "
                          "phase = :p "
                          "AND name = :n", {"u": u["id"], "p": phase, "n": name})
        return tx.one("SELECT * FROM components WHERE host = :host AND upgrade_id = :u AND name "
                      "= :n "
                      "ORDER BY position DESC LIMIT 1", {"u": u["id"], "n": name})

    def component_start(self, name: str, from_version: str | None = None,
                        to_version: str | None = None, *, phase: str | None = None) -> bool:
        """Start upgrading a component in the current phase (or *phase*); its first
        start makes ``attempts`` 1, a retry's start leaves it as the failure left it."""
        check_name(name, "component")
        check_version(from_version, "from version")
        check_version(to_version, "to version")
        if phase is not None:
            check_name(phase, "phase")
        touched: list[tuple[str, str, bool]] = []

        def action(tx: Tx) -> bool:
            u = self._current(tx)
            target_phase = phase or u["current_phase"]
            if target_phase is None:
                raise NoCurrentPhase(
                    f"component {name!r}: no phase is current; start one first "
                    "(upgrade-ledger phase start NAME)")
            if phase is not None and not tx.scalar(
                    "SELECT 1 FROM phases WHERE host = :host AND upgrade_id = :u AND name = :p",
                    {"u": u["id"], "p": phase}):
                raise NotFound(f"no phase {phase!r} in upgrade {u['id']}")
            row = tx.one("SELECT * FROM components WHERE host = :host AND upgrade_id = :u AND "
                         "phase = :p AND "
                         "name = :n", {"u": u["id"], "p": target_phase, "n": name})
            at = clock.now()
            if row is None:
                self._insert_component(tx, u["id"], target_phase, name, "UPGRADING",
                                       from_version, to_version)
                old = None
            else:
                old = row["state"]
                states.check_transition("component", old, states.UPGRADING)
            # attempts: 1 at the first start; a retry's start keeps the count that
            # its failure raised (the attempt in progress).
            tx.execute(
                "UPDATE components SET state = 'UPGRADING', started_at = :at, "
                "completed_at = NULL, failed_at = NULL, "
                f"attempts = {_ATTEMPT_IN_PROGRESS}, "
                "from_version = COALESCE(:f, from_version), to_version = COALESCE(:t, to_version) "
                "WHERE host = :host AND upgrade_id = :u AND phase = :p AND name = :n",
                {"at": at, "f": from_version, "t": to_version, "u": u["id"],
                 "p": target_phase, "n": name})
            self._touch(tx, u["id"], at, current_component=name)
            self._event(tx, "component.upgrading", u["id"], name, old, "UPGRADING", at=at,
                        detail={"phase": target_phase, "from_version": from_version,
                                "to_version": to_version})
            touched.append((target_phase, name, row is None))
            return old != states.UPGRADING

        return self._change(action, touched)

    def _component_move(self, name: str, target: str, text: str | None = None,
                        phase: str | None = None) -> bool:
        check_name(name, "component")
        text = check_text(clip_text(text), "error" if target == states.FAILED else "note")
        touched: list[tuple[str, str, bool]] = []

        def action(tx: Tx) -> bool:
            u = self._current(tx)
            row = self._find_component(tx, u, name, phase)
            if row is None and phase is None and u["current_phase"] is None:
                raise NoCurrentPhase(
                    f"component {name!r}: no phase is current and no phase has it; start "
                    "a phase, then the component (upgrade-ledger phase start NAME)")
            if row is None:
                raise NotFound(f"no component {name!r} in upgrade {u['id']}; start it first")
            if not states.check_transition("component", row["state"], target):
                return False
            at = clock.now()
            if target == states.FAILED:
                # the attempt that failed counts, and the next one is due
                sets = f"failed_at = :at, attempts = {_ATTEMPT_IN_PROGRESS} + 1, " \
                    "last_error = :text"
            elif target == states.COMPLETED:
                sets = "completed_at = :at"
            elif target == states.ROLLED_BACK:  # how it ended stays; the note says how
                sets = "note = :text"
            else:  # SKIPPED: the reason is kept as a note
                sets = "completed_at = :at, note = :text"
            tx.execute(f"UPDATE components SET state = :s, {sets} WHERE host = :host AND "
                       f"upgrade_id = :u "
                       "AND phase = :p AND name = :n",
                       {"s": target, "at": at, "text": text, "u": u["id"],
                        "p": row["phase"], "n": name})
            current = None if u["current_component"] == name else u["current_component"]
            self._touch(tx, u["id"], at, current_component=current)
            self._event(tx, "component." + target.lower(), u["id"], name, row["state"],
                        target, at=at, detail={"phase": row["phase"],
                                               **({"text": text} if text else {})})
            touched.append((row["phase"], name, False))
            return True

        return self._change(action, touched)

    def component_complete(self, name: str, *, phase: str | None = None) -> bool:
        """Mark an upgrading component COMPLETED."""
        return self._component_move(name, states.COMPLETED, phase=phase)

    def component_fail(self, name: str, error: str | None = None, *,
                       phase: str | None = None) -> bool:
        """Mark a component FAILED: attempts + 1 (the next attempt), last_error set."""
        return self._component_move(name, states.FAILED, error, phase)

    def component_skip(self, name: str, reason: str | None = None, *,
                       phase: str | None = None) -> bool:
        """Mark a component SKIPPED, keeping the reason (e.g. the probe's evidence)."""
        return self._component_move(name, states.SKIPPED, reason, phase)

    def component_rolled_back(self, name: str, note: str | None = None, *,
                              phase: str | None = None) -> bool:
        """Mark a component ROLLED_BACK: its backup was restored, its change undone.
        Its timestamps, attempts and last error stay (how the upgrade went); *note*
        says how it was undone."""
        return self._component_move(name, states.ROLLED_BACK, note, phase)

    def is_upgraded(self, name: str) -> bool:
        """True when the component is COMPLETED in the current upgrade."""
        return self.component_status(name).get("state") == states.COMPLETED

    def component_status(self, name: str, *, phase: str | None = None) -> dict[str, Any]:
        """The component's record (as in state.json, plus name and phase); {} if unknown.

        *phase* names the component's phase when it is planned in several; by default
        the current phase's, else the latest planned.
        """
        check_name(name, "component")
        if phase is not None:
            check_name(phase, "phase")
        with self.db.read() as tx:
            try:
                u = self._current(tx)
            except NotFound:
                return {}
            row = self._find_component(tx, u, name, phase)
            return {} if row is None else queries.component_dict(row)

    def installed_version(self, name: str) -> str | None:
        """The version this host runs, as far as the ledger knows, or None.

        That is the target of the component's latest COMPLETED upgrade, unless that
        upgrade ended ROLLED_BACK: a rollback restores every changed component, so the
        version it came from is what runs.
        """
        check_name(name, "component")
        with self.db.read() as tx:
            row = tx.one(
                "SELECT c.from_version, c.to_version, u.outcome FROM components c "
                "JOIN upgrades u ON u.host = c.host AND u.id = c.upgrade_id "
                "WHERE c.host = :host AND c.name = :n AND "
                "c.state = 'COMPLETED' ORDER BY c.completed_at DESC LIMIT 1", {"n": name})
        if row is None:
            return None
        restored = row["outcome"] == states.ROLLED_BACK
        return row["from_version"] if restored else row["to_version"]  # type: ignore[no-any-return]

    # -- resume --------------------------------------------------------------------

    def can_resume(self) -> bool:
        """True when the current upgrade stopped mid-run and can continue."""
        return states.is_resumable(self.state())

    def resume_point(self) -> dict[str, Any]:
        """Where a resumed run continues: ``{state, phase, component, can_resume}``."""
        with self.db.read() as tx:
            u = self._current(tx)
            return {"state": u["state"], "phase": u["current_phase"],
                    "component": u["current_component"],
                    "can_resume": states.is_resumable(u["state"])}

    def resume(self) -> list[dict[str, Any]]:
        """Record a resume and return the components left mid-upgrade (UPGRADING),
        which the caller must validate before going on."""
        self.db.verify()  # never build a resumed run on a damaged ledger

        def action(tx: Tx) -> list[dict[str, Any]]:
            u = self._current(tx)
            if not states.is_resumable(u["state"]):
                raise Conflict(f"upgrade {u['id']} is {u['state']}; only a run that stopped "
                               "mid-way (PLANNING … ROLLING_BACK) can be resumed")
            stuck = [queries.component_dict(r) for r in tx.all(
                "SELECT * FROM components WHERE host = :host AND upgrade_id = :u AND state = "
                "'UPGRADING' "
                "ORDER BY position", {"u": u["id"]})]
            self._event(tx, "upgrade.resume", u["id"], old=u["state"], new=u["state"],
                        detail={"interrupted": [c["name"] for c in stuck],
                                "phase": u["current_phase"]})
            return stuck

        return self._change(action, [])  # no component changes: the view can be patched

    #: Event kinds the API writes for its own changes; an annotation never uses them,
    #: so the trail of state changes stays exactly what the state machine did.
    CORE_EVENT_KINDS = ("upgrade.", "phase.", "component.", "rollback.", "lock.")

    def annotate(self, kind: str, subject: str | None = None,
                 detail: Mapping[str, Any] | None = None) -> None:
        """Append one event to the current upgrade's trail that changes no state.

        For what a runner does beside the state machine: which plan file drives the
        upgrade, a rollback's verified checksum, a leftover command stopped on resume.
        *kind* is ``word.word`` (lower case, at most 32 characters) outside
        ``CORE_EVENT_KINDS``; *detail* must be JSON.
        """
        self._check_annotation(kind, subject, detail)

        def action(tx: Tx) -> None:
            u = self._current(tx)
            self._event(tx, kind, u["id"], subject, detail=detail)

        self._change(action, [])  # no component changes: the view can be patched

    def note(self, kind: str, subject: str | None = None,
             detail: Mapping[str, Any] | None = None) -> None:
        """Append one event of this host that belongs to no upgrade (as ``annotate``
        checks it): what happened around the upgrades, such as a rolling-upgrade slot
        taken or freed. No view changes: state.json shows the current upgrade only."""
        self._check_annotation(kind, subject, detail)
        with self.db.write() as tx:
            self._event(tx, kind, None, subject, detail=detail)
        self._changed()

    def _check_annotation(self, kind: str, subject: str | None,
                          detail: Mapping[str, Any] | None) -> None:
        if not isinstance(kind, str) or not _ANNOTATION_KIND.fullmatch(kind) or \
                len(kind) > 32 or kind.startswith(self.CORE_EVENT_KINDS):
            raise BadInput(f"event kind {kind!r} is not allowed; use lower-case word.word "
                           f"(at most 32 characters) outside {', '.join(self.CORE_EVENT_KINDS)}")
        if subject is not None:
            check_name(subject, "event subject")
        try:
            text = json.dumps(dict(detail or {}), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"event detail must be JSON: {exc}") from None
        check_text(text, "event detail")

    # -- rollback points -----------------------------------------------------------

    def mark_rollback_point(self, component: str, backup_path: str | os.PathLike[str], *,
                            size_bytes: int | None = None, sha256: str | None = None,
                            phase: str | None = None) -> None:
        """Record where a component's backup is, so a rollback can find it.

        *phase* names the component's phase when the same component is planned in
        several phases (an upgrade in stages); by default the current phase's, else
        the latest planned.
        """
        check_name(component, "component")
        if phase is not None:
            check_name(phase, "phase")
        path = check_path(os.fspath(backup_path), "backup path")
        if size_bytes is not None and (isinstance(size_bytes, bool) or
                                       not isinstance(size_bytes, int) or
                                       not 0 <= size_bytes <= MAX_NUMBER):
            raise BadInput("backup size must be a whole number of bytes from 0 to "
                           f"{MAX_NUMBER}")
        if sha256 is not None and (len(sha256) != 64 or
                                   any(ch not in "0123456789abcdef" for ch in sha256)):
            raise BadInput("sha256 must be 64 lower-case hex digits")
        touched: list[tuple[str, str, bool]] = []

        def action(tx: Tx) -> None:
            u = self._current(tx)
            row = self._find_component(tx, u, component, phase)
            at = clock.now()
            tx.execute(
                "INSERT INTO rollback_points (host, upgrade_id, phase, component, backup_path, "
                "size_bytes, sha256, created_at) VALUES (:host, :u, :p, :c, :b, :s, :h, :at)",
                {"u": u["id"], "p": row["phase"] if row else phase or u["current_phase"],
                 "c": component, "b": path, "s": size_bytes, "h": sha256, "at": at})
            if row is not None:
                tx.execute("UPDATE components SET backup_path = :b WHERE host = :host AND "
                           "upgrade_id = :u "
                           "AND phase = :p AND name = :c",
                           {"b": path, "u": u["id"], "p": row["phase"], "c": component})
            self._touch(tx, u["id"], at)
            self._event(tx, "rollback.mark", u["id"], component, new=path, at=at,
                        detail={"size_bytes": size_bytes, "sha256": sha256})
            if row is not None:
                touched.append((row["phase"], component, False))

        self._change(action, touched)

    def rollback_info(self) -> dict[str, Any]:
        """``{rollback_available, components: [{name, backup_path, from_version,
        to_version, size_bytes, sha256}]}`` for the current upgrade's live points."""
        with self.db.read() as tx:
            u = self._current(tx)
            rows = tx.all(
                "SELECT r.component, r.backup_path, r.size_bytes, r.sha256, c.from_version, "
                "c.to_version FROM rollback_points r LEFT JOIN components c "
                "ON c.host = r.host AND c.upgrade_id = r.upgrade_id AND c.phase = r.phase "
                "AND c.name = r.component WHERE r.host = :host AND r.upgrade_id = :u "
                "AND r.cleared_at IS NULL ORDER BY r.id", {"u": u["id"]})
        return {"rollback_available": bool(rows), "components": [
            {"name": r["component"], "backup_path": r["backup_path"],
             "from_version": r["from_version"], "to_version": r["to_version"],
             "size_bytes": r["size_bytes"], "sha256": r["sha256"]} for r in rows]}

    def clear_rollback_points(self) -> int:
        """Clear every live rollback point of the current upgrade; return how many.

        Cleared points stay in the ledger (``cleared_at`` set) for the record.
        """

        def action(tx: Tx) -> int:
            u = self._current(tx)
            at = clock.now()
            count = tx.execute("UPDATE rollback_points SET cleared_at = :at WHERE "
                               "host = :host AND upgrade_id = :u AND cleared_at IS "
                               "NULL", {"at": at, "u": u["id"]})
            self._touch(tx, u["id"], at)
            self._event(tx, "rollback.clear", u["id"], at=at, detail={"cleared": count})
            return count

        return self._change(action)

    # -- progress, summary, history ------------------------------------------------

    def progress_percent(self) -> int:
        """Completed (or skipped) components as a whole percentage of those known."""
        with self.db.read() as tx:
            try:
                u = self._current(tx)
            except NotFound:
                return 0
            return queries.progress(tx, u)

    def summary(self) -> str:
        """A human-readable summary of the current upgrade."""
        with self.db.read() as tx:
            return queries.summary(tx, self._current(tx))

    def read_scope(self, host: str | None, all_hosts: bool) -> str | None:
        """The read scope for *host* / *all_hosts*: None for this host's rows, a host
        name, or ``ALL_HOSTS``."""
        if all_hosts:
            if host is not None:
                raise BadInput("name one host or every host, not both (--host, --all-hosts)")
            return ALL_HOSTS
        return None if host is None else check_host(host)

    def summary_data(self) -> dict[str, Any]:
        """The summary of the current upgrade as data (``summary --json``)."""
        with self.db.read() as tx:
            return queries.summary_data(tx, self._current(tx))

    def history(self, limit: int | None = 10, *, state: str | None = None,
                since: str | None = None, until: str | None = None,
                component: str | None = None, host: str | None = None,
                all_hosts: bool = False) -> list[dict[str, Any]]:
        """Upgrades newest first, filtered; this host's unless *host* names another or
        *all_hosts*; see ``queries.history``."""
        with self.db.read(self.read_scope(host, all_hosts)) as tx:
            return queries.history(tx, limit=limit, state=state, since=since, until=until,
                                   component=component)

    def show(self, upgrade_id: str | None = None, *, host: str | None = None,
             all_hosts: bool = False) -> dict[str, Any]:
        """Everything about one upgrade (default: the current one), events included;
        this host's unless *host* names another, or *all_hosts* finds the one host
        that has *upgrade_id*."""
        scope = self.read_scope(host, all_hosts)
        if scope == ALL_HOSTS:
            if upgrade_id is None:
                raise BadInput("show --all-hosts needs an upgrade id; or name a host with --host")
            with self.db.read(ALL_HOSTS) as tx:
                owners = [r[0] for r in tx.all("SELECT host FROM upgrades WHERE id = :u "
                                               "ORDER BY host", {"u": check_id(upgrade_id)})]
            if not owners:
                raise NotFound(f"no upgrade {upgrade_id!r} in this ledger")
            if len(owners) > 1:
                raise Conflict(f"upgrade {upgrade_id} exists on {len(owners)} hosts "
                               f"({', '.join(owners[:5])}); name one with --host")
            scope = owners[0]
        with self.db.read(scope) as tx:
            if upgrade_id is None:
                upgrade_id = self._current(tx)["id"]
            return queries.show(tx, check_id(upgrade_id))

    def events(self, *, host: str | None = None, all_hosts: bool = False,
               **filters: Any) -> list[dict[str, Any]]:
        """The audit trail, oldest first; this host's unless *host* names another or
        *all_hosts*; see ``queries.events`` (``newest=True`` with a ``limit``: the last
        events, as ``events -n`` prints them)."""
        with self.db.read(self.read_scope(host, all_hosts)) as tx:
            return queries.events(tx, **filters)

    def last_event_id(self) -> int:
        """The id of the newest event of any host (0 before any): every later change's
        event has a greater one."""
        with self.db.read() as tx:
            return int(tx.scalar("SELECT MAX(id) FROM events") or 0)

    def status(self, *, stuck_after_s: float = 3600.0, host: str | None = None,
               ) -> dict[str, Any]:
        """The current upgrade at a glance, with the lock and any stuck components;
        of this host, or of *host* (whose lock this home cannot see: ``lock`` is None).

        A component is stuck when it is UPGRADING while no live process holds the lock,
        or has been UPGRADING for longer than *stuck_after_s*.
        """
        scope = self.read_scope(host, False)
        here = scope in (None, self.identity.name)
        lock = self.lock.status() if here else None
        with self.db.read(scope) as tx:
            try:
                u = self._current(tx)
            except NotFound:
                u = None
            data: dict[str, Any] = {
                "host": tx.host,
                "upgrade_id": None, "state": states.IDLE, "outcome": None, "phase": None,
                "component": None, "progress_percent": 0, "components": {},
                "rollback_points": 0, "started_at": None, "updated_at": None,
            }
            stuck: list[dict[str, Any]] = []
            if u is not None:
                data.update(
                    upgrade_id=u["id"], state=u["state"], outcome=u["outcome"],
                    phase=u["current_phase"], component=u["current_component"],
                    progress_percent=queries.progress(tx, u),
                    started_at=document.second(u["started_at"]),
                    updated_at=document.second(u["updated_at"]),
                    components={r["state"]: r["n"] for r in tx.all(
                        "SELECT state, COUNT(*) AS n FROM components WHERE host = :host "
                        "AND upgrade_id = :u GROUP BY state ORDER BY state", {"u": u["id"]})},
                    rollback_points=tx.scalar(
                        "SELECT COUNT(*) FROM rollback_points WHERE host = :host AND "
                        "upgrade_id = :u AND cleared_at IS NULL", {"u": u["id"]}),
                )
                live = lock is None or lock.held
                stuck = queries.stuck(tx, u["id"], lock_live=live, threshold_s=stuck_after_s)
        data["lock"] = None if lock is None else lock.as_dict()
        data["stuck"] = stuck
        if here:
            for name, section in self.status_sections.items():
                data[name] = section()
        return data

    def hosts(self) -> list[dict[str, Any]]:
        """Every host of the ledger, with its current upgrade at a glance: ``host``,
        ``machine_id``, ``upgrade_id``, ``state``, ``outcome``, ``phase``,
        ``component``, ``progress_percent``, ``updated_at``."""
        with self.db.read(ALL_HOSTS) as tx:
            return queries.hosts(tx)

    def report(self, sql: str, params: Mapping[str, Any] | None = None, *,
               timeout_s: float | None = REPORT_TIMEOUT_S) -> Rows:
        """Start one read-only reporting query and stream its rows (``rows.columns``,
        then iterate; close it, or use ``with``). Writes and pragmas that set something
        are refused before they run; past *timeout_s* seconds (None: no limit) the query
        is stopped with ``QueryTimeout``, and Ctrl-C stops it too."""
        check_report(sql, params, timeout_s)
        return self.db.report(sql, params, timeout_s=timeout_s)

    def query(self, sql: str, params: Mapping[str, Any] | None = None, *,
              timeout_s: float | None = REPORT_TIMEOUT_S,
              ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """``report``, every row collected: ``(columns, rows)``, for small results."""
        with self.report(sql, params, timeout_s=timeout_s) as rows:
            return rows.columns, list(rows)

    def export_document(self, upgrade_id: str | None = None) -> bytes:
        """The state document of an upgrade (default: the current one), as file bytes."""
        return document.dumps(self.document(upgrade_id))

    def export_views(self) -> list[Path]:
        """Rewrite state.json and every history file from the ledger; return the paths."""
        written = []
        if self.current_id() is not None:
            self.write_views()
            written.append(self.home.state_file)
        with self.db.read() as tx:
            saved = [r[0] for r in tx.all(
                "SELECT id FROM upgrades WHERE host = :host AND saved_at IS NOT NULL "
                "ORDER BY started_at")]
        for uid in saved:
            target = self.home.history_file(uid)
            self.home.write_atomic(target, self.export_document(uid))
            written.append(target)
        return written

    def save_to_history(self, upgrade_id: str | None = None) -> Path:
        """Write ``history/<id>.json`` for an upgrade (default: the current one)."""

        def action(tx: Tx) -> str:
            uid = self._current(tx)["id"] if upgrade_id is None else check_id(upgrade_id)
            if not tx.execute("UPDATE upgrades SET saved_at = :at WHERE host = :host AND id = :id",
                              {"at": clock.now(), "id": uid}):
                raise NotFound(f"no upgrade {uid!r} in this ledger")
            self._event(tx, "upgrade.history", uid)
            return uid

        uid = self._change(action)
        target = self.home.history_file(uid)
        with self.db.read() as tx:
            doc = document.build(tx, uid)
        self.home.write_atomic(target, document.dumps(doc))
        for listener in list(self.after_save):
            listener(uid)
        return target

    def record_prune(self, upgrade_id: str, detail: Mapping[str, Any], *,
                     delete_rows: bool = False) -> dict[str, int]:
        """Record that retention removed an old upgrade's files (``ledger.ops.prune``).

        One transaction: its history file is gone, so it no longer counts as saved to
        history (``saved_at`` cleared); with *delete_rows* its rows go as well
        (components, phases, rollback points, then the upgrade) and their counts are
        returned. Its events stay, the trail being append-only, and a ``ledger.prune``
        event with *detail* (and the counts) records what went. The current upgrade
        and one in progress are refused (``Conflict``), whatever the caller checked.
        """
        check_id(upgrade_id)

        def action(tx: Tx) -> dict[str, int]:
            row = tx.one("SELECT state FROM upgrades WHERE host = :host AND id = :u",
                         {"u": upgrade_id})
            if row is None:
                raise NotFound(f"no upgrade {upgrade_id!r} in this ledger")
            if upgrade_id == meta.current_upgrade(tx) or states.is_in_progress(row["state"]):
                raise Conflict(f"upgrade {upgrade_id} is the current upgrade or in progress; "
                               "its files and rows are never pruned")
            counts: dict[str, int] = {}
            if delete_rows:
                for table in ("components", "phases", "rollback_points", "upgrades"):
                    column = "id" if table == "upgrades" else "upgrade_id"
                    counts[table] = tx.execute(
                        f"DELETE FROM {table} WHERE host = :host AND {column} = :u",
                        {"u": upgrade_id})
            else:
                tx.execute("UPDATE upgrades SET saved_at = NULL WHERE host = :host AND id = :u",
                           {"u": upgrade_id})
            self._event(tx, "ledger.prune", upgrade_id, "rows" if delete_rows else "files",
                        detail={**detail, **({"rows": counts} if delete_rows else {})})
            return counts

        return self._change(action, [])  # not the current upgrade: its view is unchanged

    def cleanup(self, owner_pid: int | None = None) -> None:
        """What a script does on exit: save the current upgrade to history, release the
        lock if *owner_pid* (default: this ledger's pid) holds it, and reset a finished
        upgrade to IDLE. A run still in progress is left as it is, resumable."""
        if self.current_id() is not None:
            self.save_to_history()
            if self.state() in states.TERMINAL_STATES:
                self.set_state(states.IDLE)
        # Another process's lock is not ours to release, and not a failure of cleanup:
        # the legacy upgrade_cleanup succeeded there too, leaving that lock alone.
        with contextlib.suppress(NotLockOwner):
            self.release_lock(owner_pid)

    # -- the lock ------------------------------------------------------------------

    def acquire_lock(self, owner_pid: int | None = None, *, wait_s: float = 0.0,
                     poll_s: float = 0.05) -> Holder:
        """Take the exclusive lock for *owner_pid* (default: this ledger's pid)."""
        holder = self.lock.acquire(self.pid if owner_pid is None else owner_pid,
                                   wait_s=wait_s, poll_s=poll_s)
        self._changed()
        return holder

    def release_lock(self, owner_pid: int | None = None) -> bool:
        """Release the lock if *owner_pid* holds it; only the owner's release counts."""
        released = self.lock.release(self.pid if owner_pid is None else owner_pid)
        self._changed()
        return released

    def check_stale_lock(self) -> bool:
        """Remove the lock if it is proven stale (a ``lock.break`` event); True if so."""
        removed = self.lock.check_stale()
        if removed:
            self._changed()
        return removed

    def lock_held(self) -> bool:
        """Whether a live process holds the lock (a stale lock is not held)."""
        return self.lock.is_held()

    def lock_status(self) -> LockStatus:
        """Who holds the lock, since when, from where, and whether it looks stale."""
        return self.lock.status()

    def break_lock(self, reason: str) -> Holder | None:
        """Remove the lock whoever holds it (recorded as a forced break with *reason*)."""
        previous = self.lock.break_lock(reason)  # which checks the reason first
        self._changed()
        return previous


def check_report(sql: str, params: Mapping[str, Any] | None,
                 timeout_s: float | None) -> None:
    """Refuse a reporting query that is empty or not UTF-8 text, a parameter that is
    not, or a timeout out of range (``BadInput``), before anything runs."""
    if not isinstance(sql, str) or not sql.strip():
        raise BadInput("sql: the query is empty")
    if _SURROGATE.search(sql):
        raise BadInput("sql: the query is not valid UTF-8 text")
    for name, value in (params or {}).items():
        if not isinstance(name, str) or (isinstance(value, str) and
                                         _SURROGATE.search(value)):
            raise BadInput(f"sql: parameter {name} is not valid UTF-8 text")
    if timeout_s is not None and (isinstance(timeout_s, bool) or
                                  not isinstance(timeout_s, int | float) or
                                  not 0 < timeout_s <= MAX_REPORT_TIMEOUT_S):
        raise BadInput(f"sql: the timeout must be a number of seconds from 0 to "
                       f"{MAX_REPORT_TIMEOUT_S:g}, or None for no limit")


def _json_text(doc: str | bytes | Mapping[str, Any]) -> str | bytes:
    """A document as JSON text; a mapping must hold what a file could (no NaN, no
    sets, no objects)."""
    if isinstance(doc, str | bytes):
        return doc
    try:
        return json.dumps(dict(doc), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidDocument(
            f"document is not JSON data ({exc}); use strings, numbers, true, false, "
            "null, lists and objects") from exc


__all__ = ["FLEET_URL_ENV", "Ledger", "PlannedComponent", "RunContext", "check_report"]

