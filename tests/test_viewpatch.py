"""state.json patched after a small change is byte for byte the view built whole, and
the patch is refused whenever the file on disk is not provably the ledger's last view."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any

import pytest

from ledger.api import Ledger
from ledger.errors import LedgerError
from ledger.views import document, patch

PHASES = ["backup", "exporters", 'odd "phase" {x}: [y]']
NAMES = ["node_exporter", "prometheus", "ü-名前", 'q"uote', "x{y}: {", "back\\slash"]


def whole(led: Ledger) -> bytes:
    """The view as a full build writes it."""
    upgrade_id = led.current_id()
    assert upgrade_id is not None
    with led.db.read() as tx:
        return document.dumps(document.build(tx, upgrade_id))


def patch_of(led: Ledger, change: patch.Change) -> bytes | None:
    """The patched view's bytes, or None when the patch is refused."""
    with led.db.write() as tx:
        pieces = patch.patched(led.home, tx, change)
        return None if pieces is None else b"".join(pieces)


def started(home: Path, plan: dict[str, list[tuple[str, str | None, str | None]]]) -> Ledger:
    led = Ledger(home)
    led.init("up-1")
    led.set_state("PLANNING")
    led.plan(plan)
    led.phase_start(next(iter(plan)))
    return led


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(6))
def test_random_steps_leave_the_same_bytes_as_a_whole_build(home: Path, seed: int) -> None:
    rnd = random.Random(seed)
    led = started(home, {PHASES[0]: [("node_exporter", "1", "2")], PHASES[1]: [],
                         PHASES[2]: [(NAMES[2], None, None)]})
    steps = [
        lambda n: led.component_start(n, rnd.choice([None, "1.0"]), rnd.choice([None, "2.0"])),
        lambda n: led.component_start(n, phase=rnd.choice(PHASES)),
        led.component_complete,
        lambda n: led.component_fail(n, rnd.choice([None, 'boom\nline "2"'])),
        lambda n: led.component_skip(n, rnd.choice([None, "already there"])),
        lambda n: led.mark_rollback_point(n, f"/backups/{n}.tgz", size_bytes=5),
        lambda n: led.annotate("runner.note", n, {"n": n}),
        lambda _: led.resume(),
        lambda _: led.clear_rollback_points(),
        lambda _: led.phase_start(rnd.choice(PHASES)),
    ]
    for _ in range(150):
        with contextlib.suppress(LedgerError):  # a refused step changes nothing
            rnd.choice(steps)(rnd.choice(NAMES))
        assert led.home.state_file.read_bytes() == whole(led)
    led.close()


@pytest.mark.parametrize(("phase", "name"), [
    ("backup", "new-one"),             # appended to the first of three phases
    ("exporters", "new-one"),          # appended to a phase with no components yet
    (PHASES[2], "new-one"),            # appended to the last phase
])
def test_a_created_component_lands_at_the_end_of_its_phase(home: Path, phase: str,
                                                           name: str) -> None:
    led = started(home, {"backup": [("a", "1", "2"), ("b", "1", "2")], "exporters": [],
                         PHASES[2]: [("c", None, None)]})
    led.component_start(name, "1", "2", phase=phase)
    assert led.home.state_file.read_bytes() == whole(led)
    doc = document.parse(led.home.state_file.read_bytes())
    assert list(doc["phases"][phase]["components"])[-1] == name
    led.close()


def test_patches_are_what_the_steps_use(home: Path) -> None:
    """The step that completes a component is patched (not rebuilt) and right."""
    led = started(home, {"p": [(f"c{i}", "1", "2") for i in range(50)]})
    led.component_start("c7")
    with led.db.write() as tx:
        tx.execute("UPDATE components SET state = 'COMPLETED', completed_at = "
                   "'2026-01-01T00:00:00.000Z' WHERE name = 'c7'")
        before = patch.serial(tx, "up-1")
        led._event(tx, "component.completed", "up-1", "c7")
        after = patch.serial(tx, "up-1")
    data = patch_of(led, patch.Change("up-1", before, after, [("p", "c7", False)]))
    assert data is not None
    assert data == whole(led)
    led.close()


#: Keys a script keeps, shaped to look like the structure the patch searches for.
KEPT_TOP = {"maintenance_window": "sun", "x": {"phases": {"components": {}}},
            "rollback_available ": [{"\n  },": "}"}]}
KEPT_PHASE = {"owner": {"components": {"a": {"state": "x"}}, "  }": ["\n    }"]}}
KEPT_COMPONENT = {"ticket": {"id": "OPS-1", "components": {"z": [1, {"y": None}]}},
                  "phases": "not the phases"}


def test_kept_keys_survive_patched_views(home: Path) -> None:
    rnd = random.Random(7)
    led = started(home, {PHASES[0]: [("node_exporter", "1", "2"), (NAMES[3], "1", "2")],
                         PHASES[2]: [(NAMES[2], None, None)]})
    doc = led.document()
    doc.update(KEPT_TOP)
    doc["metadata"]["ticket"] = "OPS-1"
    for phase in doc["phases"].values():
        phase.update(KEPT_PHASE)
        for comp in phase["components"].values():
            comp.update(KEPT_COMPONENT)
    led.save_document(doc)
    led.component_start("node_exporter")
    change = _note_change(led, "node_exporter", PHASES[0])
    data = patch_of(led, change)
    assert data is not None and data == whole(led)  # patched, not rebuilt, and right
    led.write_views()
    steps = [
        lambda n: led.component_start(n, rnd.choice([None, "1.0"]), phase=rnd.choice(PHASES)),
        led.component_complete,
        lambda n: led.component_fail(n, "boom"),
        lambda n: led.mark_rollback_point(n, f"/backups/{n}.tgz"),
        lambda _: led.phase_start(rnd.choice(PHASES)),
    ]
    for _ in range(60):
        with contextlib.suppress(LedgerError):
            rnd.choice(steps)(rnd.choice(NAMES[:4]))
        assert led.home.state_file.read_bytes() == whole(led)
    view = document.parse(led.home.state_file.read_bytes())
    assert {k: view[k] for k in KEPT_TOP} == KEPT_TOP
    assert view["metadata"]["ticket"] == "OPS-1"
    assert {k: view["phases"][PHASES[0]][k] for k in KEPT_PHASE} == KEPT_PHASE
    comp = view["phases"][PHASES[0]]["components"]["node_exporter"]
    assert {k: comp[k] for k in KEPT_COMPONENT} == KEPT_COMPONENT
    led.close()


def _note_change(led: Ledger, name: str = "c1", phase: str = "p") -> patch.Change:
    with led.db.write() as tx:
        before = patch.serial(tx, "up-1")
        tx.execute("UPDATE components SET note = 'changed' WHERE name = :n", {"n": name})
        led._event(tx, "component.note", "up-1", name)
        return patch.Change("up-1", before, patch.serial(tx, "up-1"), [(phase, name, False)])


def test_a_hand_edited_view_is_rebuilt_whole_not_patched(home: Path) -> None:
    led = started(home, {"p": [("c1", "1", "2"), ("c2", "1", "2")]})
    text = led.home.state_file.read_bytes()
    edited = text.replace(b'"from_version": "1"', b'"from_version": "9"', 1)
    assert edited != text and len(edited) == len(text)
    led.home.state_file.write_bytes(edited)  # same size, in place: only mtime tells
    change = _note_change(led)
    assert patch_of(led, change) is None
    led.component_start("c2")
    assert led.home.state_file.read_bytes() == whole(led)
    led.close()


def test_no_signature_or_a_foreign_one_means_a_whole_build(home: Path) -> None:
    led = started(home, {"p": [("c1", "1", "2")]})
    change = _note_change(led)
    patch.signature_path(led.home).write_text("{not json")
    assert patch_of(led, change) is None
    patch.forget(led.home)
    assert patch_of(led, change) is None
    led.close()


def test_a_change_committed_in_between_means_a_whole_build(home: Path) -> None:
    led = started(home, {"p": [("c1", "1", "2"), ("c2", "1", "2")]})
    led.write_views()
    change = _note_change(led)
    with led.db.write() as tx:  # another writer's change lands before the view is written
        led._event(tx, "runner.other", "up-1")
    assert patch_of(led, change) is None
    led.close()


def test_a_view_from_before_the_change_started_is_not_patched(home: Path) -> None:
    led = started(home, {"p": [("c1", "1", "2")]})
    with led.db.write() as tx:  # a change whose view was never written (a crash)
        led._event(tx, "runner.lost", "up-1")
    change = _note_change(led)
    assert patch_of(led, change) is None
    led.close()


def _worker(home: str, names: list[str], barrier: Any) -> None:
    with Ledger(home) as led:
        barrier.wait(timeout=120)
        for name in names:
            led.component_start(name, "1", "2")
            led.component_complete(name)


@pytest.mark.slow
def test_concurrent_writers_leave_the_whole_view(home: Path) -> None:
    names = [f"c{i:03d}" for i in range(120)]
    led = started(home, {"p": [(n, "1", "2") for n in names[::2]]})  # half created later
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    workers = [ctx.Process(target=_worker, args=(str(home), names[i::4], barrier))
               for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0
    assert led.home.state_file.read_bytes() == whole(led)
    doc = document.parse(led.home.state_file.read_bytes())
    assert all(c["state"] == "COMPLETED" for c in doc["phases"]["p"]["components"].values())
    assert len(doc["phases"]["p"]["components"]) == len(names)
    led.close()


def test_the_signature_is_private(home: Path) -> None:
    old = os.umask(0o002)
    try:
        led = started(home, {"p": [("c1", "1", "2")]})
    finally:
        os.umask(old)
    assert patch.signature_path(led.home).stat().st_mode & 0o777 == 0o600
    led.close()


def test_a_shorter_signature_overwrites_a_longer_one_whole(home: Path) -> None:
    """The signature is rewritten in place (no truncation): padding keeps it one
    readable JSON text, so the next step is patched again."""
    led = started(home, {"p": [("c1", "1", "2"), ("c2", "1", "2")]})
    sig = patch.signature_path(led.home)
    sig.write_bytes(b'{"padding": "' + b"x" * 3000 + b'"}')  # longer than any real one
    led.component_start("c1")  # whole build (no valid signature), then remember
    assert len(sig.read_bytes()) >= 3000
    data = patch_of(led, _note_change(led))  # a change the signature allows
    assert data is not None
    assert data == whole(led)
    led.close()
