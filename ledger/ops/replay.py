"""Completing a call that may already have happened, without doing anything twice.

A command-line session runs many calls in one process; when that process dies in the
middle of a call, the caller cannot tell from its answer (there is none) whether the
change was made. The ledger can: every change appends its event, carrying the PID it
was made for, in the same transaction. ``Replay`` is a ``Ledger`` for running the same
call again: each change it is asked for is first looked up among the events the
caller's process wrote after the call began. Found, it is not made again, and returns
what it returned the first time (read back from that event); not found, it is made
now. So a call cut off at any point ends complete, each change made exactly once, and
the command prints what it would have printed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ledger import queries
from ledger.api import Ledger, PlannedComponent
from ledger.lock import Holder
from ledger.views import document


class Replay(Ledger):
    """A ledger on which a call that began after event *after* is run again (see the
    module's docstring). Takes ``Ledger``'s arguments; *pid* must be the process the
    first run was made for. ``replayed`` tells whether any change was found done.

    Lock moves are made again as they are (acquiring is re-entrant for the owner, and
    a release of a released lock changes nothing); the lock's breaks are events and
    are looked up like the other changes.
    """

    def __init__(self, *args: Any, after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The events of this host (a ledger's transactions see their host's rows).
        self._done = self.events(after_id=after, pid=self.pid, limit=None)
        self.replayed = False

    def _take(self, kind: str, subject: str | None = None) -> dict[str, Any] | None:
        """The first change of *kind* (on *subject*) the first run made and no change
        of this run has claimed yet, claimed now; None if it made none."""
        for i, event in enumerate(self._done):
            if event["kind"] == kind and (subject is None or event["subject"] == subject):
                del self._done[i]
                self.replayed = True
                return event
        return None

    def finish(self) -> None:
        """After the call: rewrite the views when a change was found done (the first
        run may have ended between its commit and its view), and tell the listeners."""
        if self.replayed:
            self.write_views()
            self._changed()

    # -- the changes: each one done at most once --------------------------------------

    def init(self, upgrade_id: str | None = None, *, supersede: bool = False) -> str:
        event = self._take("upgrade.init")
        if event is not None:
            return str(event["upgrade_id"])
        return super().init(upgrade_id, supersede=supersede)

    def import_document(self, doc: str | bytes | Mapping[str, Any], *,
                        make_current: bool = True) -> str:
        event = self._take("upgrade.import")
        if event is not None:
            return str(event["upgrade_id"])
        return super().import_document(doc, make_current=make_current)

    def save_document(self, doc: str | bytes | Mapping[str, Any]) -> str:
        event = self._take("upgrade.save")
        if event is not None:
            return str(event["upgrade_id"])
        return super().save_document(doc)

    def set_state(self, target: str, *, error: str | None = None) -> bool:
        if self._take("upgrade.state") is not None:
            return True
        return super().set_state(target, error=error)

    def plan(self, phases: Mapping[str, Sequence[PlannedComponent]]) -> None:
        if self._take("upgrade.plan") is None:
            super().plan(phases)

    def _phase_move(self, name: str, target: str, error: str | None = None) -> bool:
        if self._take("phase." + target.lower(), name) is not None:
            return True
        return super()._phase_move(name, target, error)

    def component_start(self, name: str, from_version: str | None = None,
                        to_version: str | None = None, *, phase: str | None = None) -> bool:
        if self._take("component.upgrading", name) is not None:
            return True
        return super().component_start(name, from_version, to_version, phase=phase)

    def _component_move(self, name: str, target: str, text: str | None = None,
                        phase: str | None = None) -> bool:
        if self._take("component." + target.lower(), name) is not None:
            return True
        return super()._component_move(name, target, text, phase)

    def resume(self) -> list[dict[str, Any]]:
        event = self._take("upgrade.resume")
        if event is None:
            return super().resume()
        names = list((event["detail"] or {}).get("interrupted") or [])
        with self.db.read() as tx:
            rows = tx.all("SELECT * FROM components WHERE host = :host AND upgrade_id = :u "
                          "ORDER BY position",
                          {"u": event["upgrade_id"]})
        return [queries.component_dict(r) for r in rows if r["name"] in names]

    def annotate(self, kind: str, subject: str | None = None,
                 detail: Mapping[str, Any] | None = None) -> None:
        if self._take(kind, subject) is None:
            super().annotate(kind, subject, detail)

    def mark_rollback_point(self, component: str, backup_path: str | os.PathLike[str], *,
                            size_bytes: int | None = None, sha256: str | None = None,
                            phase: str | None = None) -> None:
        if self._take("rollback.mark", component) is None:
            super().mark_rollback_point(component, backup_path, size_bytes=size_bytes,
                                        sha256=sha256, phase=phase)

    def clear_rollback_points(self) -> int:
        event = self._take("rollback.clear")
        if event is not None:
            return int((event["detail"] or {}).get("cleared") or 0)
        return super().clear_rollback_points()

    def save_to_history(self, upgrade_id: str | None = None) -> Path:
        event = self._take("upgrade.history")
        if event is None:
            return super().save_to_history(upgrade_id)
        # The file is written after the commit: write it again, it may be missing.
        uid = str(event["upgrade_id"])
        target = self.home.history_file(uid)
        with self.db.read() as tx:
            data = document.dumps(document.build(tx, uid))
        self.home.write_atomic(target, data)
        return target

    def check_stale_lock(self) -> bool:
        if self._take("lock.break") is not None:
            return True
        return super().check_stale_lock()

    def break_lock(self, reason: str) -> Holder | None:
        event = self._take("lock.break")
        if event is None:
            return super().break_lock(reason)
        previous = (event["detail"] or {}).get("previous")
        return Holder(**previous) if previous else None


__all__ = ["Replay"]
