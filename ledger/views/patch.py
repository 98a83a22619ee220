"""Rewrite state.json after a small change without rebuilding the whole document.

state.json holds every component of the upgrade, so building and encoding it grows
with their number: about 100 ms at 10,000 components, which every per-step call
would pay. Most steps change one component (start, complete, fail, skip, a rollback
point) or none (resume, an annotation). After such a change the new view is the
old file with three kinds of edit:

- the head (the fields before ``phases``) and the tail (the fields after it) are
  rendered again from the ledger: they are small;
- each touched component's text is replaced by its new rendering, or appended to
  its phase when the change created it (a new component has the highest position,
  so it is the last of its phase);
- every other byte is kept.

The result is byte for byte what ``document.dumps(document.build(...))`` gives (the
tests check it). It is only done when the old file is provably the view this ledger
wrote at the serial just before the change: ``views.sig`` in the home records the
state file's path, inode, size and modification time, the upgrade and the serial of
the view written last, so a hand edit, a restore or any other writer makes the
caller build the whole view as before. Every decision here falls back to that.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ledger.views import document

if TYPE_CHECKING:
    from pathlib import Path

    from ledger.store.database import Tx
    from ledger.store.home import Home

SIGNATURE_NAME = "views.sig"

_PHASES = b'\n  "phases": {'
#: The phases object closes; rollback_available always follows it (searched for from
#: the end of the file, so only the tail is scanned).
_PHASES_END = b'\n  },\n  "rollback_available": '
_PHASE_END = b"\n    }"
_COMPONENTS = b'\n      "components": {'
_COMPONENTS_END = b"\n      }"
_COMPONENT_INDENT = b"\n        "
_COMPONENT_END = b"\n        }"


class Change(NamedTuple):
    """What one committed transaction did, as far as the view is concerned."""

    upgrade_id: str
    before: int  # the upgrade's serial (last event id) before the transaction
    after: int  # ... and after it
    components: Sequence[tuple[str, str, bool]]  # (phase, name, created) touched


def serial(tx: Tx, upgrade_id: str) -> int:
    """The upgrade's serial: the id of its last event (0 before any)."""
    return document.upgrade_serial(tx, upgrade_id)


def signature_path(home: Home) -> Path:
    return home.root / SIGNATURE_NAME


class _Unpatchable(Exception):
    """The view cannot be patched with certainty: build it whole."""


def _find(data: bytes, pattern: bytes, start: int, end: int | None = None) -> int:
    at = data.find(pattern, start, len(data) if end is None else end)
    if at < 0:
        raise _Unpatchable
    return at


def patched(home: Home, tx: Tx, change: Change) -> list[bytes | memoryview] | None:
    """The new state.json after *change*, as pieces to write one after the other (most
    of it is the old file's bytes, not copied), read in the view writer's transaction;
    None when the whole view must be built instead."""
    try:
        return _patch(home, tx, change)
    except _Unpatchable:
        return None


def _patch(home: Home, tx: Tx, change: Change) -> list[bytes | memoryview]:
    old = _our_view(home, change)
    if serial(tx, change.upgrade_id) != change.after:
        raise _Unpatchable  # another change was committed since
    u = tx.one("SELECT * FROM upgrades WHERE host = :host AND id = :id", {"id": change.upgrade_id})
    if u is None:
        raise _Unpatchable
    skeleton = document.dumps(document.frame(tx, u, {}))
    at = _find(skeleton, _PHASES + b"}", 0) + len(_PHASES)
    start = _find(old, _PHASES, 0) + len(_PHASES)
    if old[start:start + 1] == b"}":  # no phases: then none could change
        if change.components:
            raise _Unpatchable
        return [skeleton]
    end = old.rfind(_PHASES_END)
    if end < start:
        raise _Unpatchable
    edits = []
    for phase, name, created in change.components:
        row = tx.one(f"SELECT {document.COMPONENT_COLUMNS} FROM components "
                     "WHERE host = :host AND upgrade_id = :u AND phase = :p AND name = :n",
                     {"u": change.upgrade_id, "p": phase, "n": name})
        if row is None:
            raise _Unpatchable
        after = tx.scalar(  # the phase that follows in the document, if any
            "SELECT name FROM phases WHERE host = :host AND upgrade_id = :u AND position > "
            "(SELECT position FROM phases WHERE host = :host AND upgrade_id = :u AND name = :p) "
            "ORDER BY position LIMIT 1", {"u": change.upgrade_id, "p": phase}
        ) if created else None
        edits.append(_edit(old, start, end, phase=phase, name=name, created=created,
                           next_phase=after, comp=document.component(row)))
    # Assemble once: the new head, the old body with the edits, the new tail.
    view = memoryview(old)
    pieces: list[bytes | memoryview] = [skeleton[:at]]
    pos = start
    for first, last, text in sorted(edits, key=lambda e: e[0]):  # stable: creation order
        if first < pos:
            raise _Unpatchable  # one component twice
        pieces += [view[pos:first], text]
        pos = last
    pieces += [view[pos:end], b"\n  }", skeleton[at + 1:]]
    return pieces


def _edit(old: bytes, start: int, end: int, *, phase: str, name: str, created: bool,
          next_phase: str | None, comp: dict[str, Any]) -> tuple[int, int, bytes]:
    """Where component *name* of *phase* is in *old* (between *start* and *end*, the
    text inside ``"phases": {...}``) and its new text: ``(first, last, text)`` replaces
    ``old[first:last]``; an empty span inserts a component the change created at the
    end of its phase (*next_phase* is the phase after it, or None for the last).

    Structure, not content, is searched for: a raw newline only ever comes from the
    indentation (strings escape theirs), and each level has its own indent. Needles
    start with a name where they can: ``bytes.find`` skips fast over indentation only
    when the needle is distinctive.
    """
    p = _find(old, b"\n    " + _key(phase) + b": {\n", start, end)
    c_open = _find(old, _COMPONENTS, p, end) + len(_COMPONENTS)
    if old.find(_PHASE_END, p, c_open) >= 0:
        raise _Unpatchable  # that "components" belongs to a later phase
    key = _COMPONENT_INDENT + _key(name) + b": "
    text = key + _render(comp)
    if not created:
        # The view matched the ledger before the change, where this phase holds the
        # component: its first entry of that name from here on is this one.
        found = _find(old, key + b"{\n", c_open, end)
        return found, _find(old, _COMPONENT_END, found + 1, end) + len(_COMPONENT_END), text
    if old[c_open:c_open + 1] == b"}":  # "components": {} gets its first entry
        return c_open, c_open + 1, text + _COMPONENTS_END
    if next_phase is None:
        p_close = end - len(_PHASE_END)
    else:
        p_close = _find(old, _PHASE_END + b",\n    " + _key(next_phase) + b": {\n",
                        c_open, end)
    c_close = p_close - len(_COMPONENTS_END)
    if old[c_close:p_close + len(_PHASE_END)] != _COMPONENTS_END + _PHASE_END or \
            old.find(key + b"{\n", c_open, c_close) >= 0:
        raise _Unpatchable
    return c_close, c_close, b"," + text


def _key(name: str) -> bytes:
    return json.dumps(name, ensure_ascii=False).encode()


def _render(comp: dict[str, Any]) -> bytes:
    """A component object as ``json.dumps(indent=2)`` writes it at its depth (its
    fields indented by 10 spaces, its closing brace by 8)."""
    return json.dumps(comp, indent=2, ensure_ascii=False).replace(
        "\n", "\n        ").encode()


def _our_view(home: Home, change: Change) -> bytes:
    """The state file's bytes if it is the view this ledger wrote last, at the serial
    the change started from."""
    try:
        sig = json.loads(signature_path(home).read_bytes())
        fd = os.open(home.state_file, os.O_RDONLY | os.O_NOFOLLOW)
    except (OSError, ValueError):
        raise _Unpatchable from None
    try:
        st = os.fstat(fd)
        if sig != {"path": str(home.state_file), "ino": st.st_ino, "size": st.st_size,
                   "mtime_ns": st.st_mtime_ns, "upgrade_id": change.upgrade_id,
                   "serial": change.before}:
            raise _Unpatchable
        data = os.read(fd, st.st_size)  # one read, one buffer: it may be megabytes
        while len(data) < st.st_size:
            more = os.read(fd, st.st_size - len(data))
            if not more:
                raise _Unpatchable
            data += more
        return data
    except OSError:
        raise _Unpatchable from None
    finally:
        os.close(fd)


def remember(home: Home, upgrade_id: str, view_serial: int) -> None:
    """Record the signature of the state file just written (an optimisation only:
    without it, the next change builds the whole view)."""
    path = signature_path(home)
    try:
        st = home.state_file.lstat()
        data = json.dumps({"path": str(home.state_file), "ino": st.st_ino,
                           "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                           "upgrade_id": upgrade_id, "serial": view_serial}).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        forget(home)
        return
    try:
        # Overwritten in place, padded with spaces (JSON allows them) to at least the
        # old length: truncating costs ~0.15 ms of file-system work per step here. A
        # torn write cannot match a real file, so it only means a whole build.
        os.pwrite(fd, data.ljust(max(os.fstat(fd).st_size, len(data))), 0)
    except OSError:
        forget(home)
    finally:
        os.close(fd)


def forget(home: Home) -> None:
    """Drop the signature: the next change builds the whole view."""
    with contextlib.suppress(OSError):
        signature_path(home).unlink()
