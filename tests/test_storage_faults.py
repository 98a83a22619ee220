"""Storage faults: a full disk, a read-only home, a view that cannot be renamed.

Each fault is real: a child process with a low RLIMIT_FSIZE (its writes past the
limit fail with EFBIG, SIGXFSZ ignored), a small tmpfs filled to the last block, a
read-only bind mount, a directory where a view's file should go. (Those two need
root and mount(2); the tests skip, saying so, where that is not possible. An fsync
that fails cannot be produced without a faulty block device, so a failed write or
rename stands for it: the same code path gives up before the rename.)

After every fault: the command exits non-zero with one line on stderr (8, storage),
``PRAGMA integrity_check`` is ok, every row agrees with its last event, nothing
partial is left (views parse, no temp files), state.json is never ahead of the
ledger, and no later call claims a success that did not happen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import faultchild as fc
import pytest
from conftest import walk_to_upgrading

from ledger.api import Ledger
from ledger.views import document

EXIT_STORAGE = 8
BIG_ERROR = "disk said no; " * 4500  # ~63 KB: makes state.json larger than one WAL commit


def cli(home: Path, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess[str]:
    return fc.cli(home, *args, fsize=fsize)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int = EXIT_STORAGE) -> str:
    return fc.one_line_error(proc, code)


def prepare(home: Path, components: int = 10) -> str:
    """An upgrade in UPGRADING with phase p1 current and components c1..cN planned;
    c1 failed with a large error, so that state.json is larger than a commit."""
    with Ledger(home) as led:
        uid = walk_to_upgrading(led, "disk-run")
        led.plan({"p1": [(f"c{i}", "1.0", "2.0") for i in range(1, components + 1)]})
        led.phase_start("p1")
        led.component_start("c1")
        led.component_fail("c1", BIG_ERROR)
    return uid


def consistent(home: Path, copy_to: Path | None = None) -> dict[str, str]:
    """Check the ledger after a fault; return {component: state}. On a full
    filesystem even a reader cannot start (SQLite must create ledger.db-shm), so the
    home's files are checked as copied elsewhere (*copy_to*), as a next opener with
    space would find them."""
    if copy_to is not None:
        shutil.rmtree(copy_to, ignore_errors=True)
        shutil.copytree(home, copy_to, ignore=shutil.ignore_patterns("*-shm"))
        home = copy_to
    assert fc.integrity(home / "ledger.db") == "ok"
    with Ledger(home) as led:
        assert fc.leftover_temp_files(led) == []
        with led.db.read() as tx:
            u = tx.one("SELECT id, state FROM upgrades WHERE id = 'disk-run'")
            last_state = tx.scalar(
                "SELECT to_value FROM events WHERE upgrade_id = :u AND kind IN "
                "('upgrade.init', 'upgrade.state') ORDER BY id DESC LIMIT 1", {"u": u["id"]})
            assert u["state"] == last_state
            comps = {}
            for row in tx.all("SELECT name, state FROM components WHERE upgrade_id = :u",
                              {"u": u["id"]}):
                last = tx.scalar(
                    "SELECT to_value FROM events WHERE upgrade_id = :u AND subject = :n "
                    "AND kind LIKE 'component.%' ORDER BY id DESC LIMIT 1",
                    {"u": u["id"], "n": row["name"]})
                assert row["state"] == (last or "PENDING"), (row["name"], row["state"], last)
                comps[row["name"]] = row["state"]
            top = tx.scalar("SELECT MAX(id) FROM events WHERE upgrade_id = :u", {"u": u["id"]})
        if led.home.state_file.is_file():
            doc = document.parse(led.home.state_file.read_bytes())  # whole, valid
            assert doc["serial"] <= top, "state.json is ahead of the ledger"
            for name, comp in doc["phases"]["p1"]["components"].items():
                # the view may be behind, never claiming what the ledger does not hold
                if comp["state"] == "COMPLETED":
                    assert comps[name] == "COMPLETED"
    return comps


def events(home: Path) -> int:
    with Ledger(home) as led, led.db.read() as tx:
        return int(tx.scalar("SELECT COUNT(*) FROM events"))


# -- a full disk --------------------------------------------------------------------------


def step_through_fault(home: Path, name: str, run: Callable[..., subprocess.CompletedProcess[str]],
                       copy_to: Path | None = None) -> set[str]:
    """Start and complete component *name* with *run* (a faulty CLI); check after each
    call; return the outcomes seen: ok, refused, "recorded, view failed"."""
    outcomes = set()
    for args, target in ((("component", "start", name), "UPGRADING"),
                         (("component", "complete", name), "COMPLETED")):
        proc = run(*args)
        comps = consistent(home, copy_to)
        happened = comps[name] == target
        if proc.returncode == 0:
            assert happened, f"{args} exited 0 but did not happen"
            outcomes.add("ok")
        else:
            line = one_line_error(proc)
            outcomes.add("recorded, view failed" if happened else "refused")
            assert ("recorded in the ledger" in line) == happened, line
        # no later call claims what did not happen (it may fail: that claims nothing)
        asked = run("component", "is-upgraded", name)
        if asked.returncode in (0, 1):
            assert asked.returncode == (0 if comps[name] == "COMPLETED" else 1)
        else:
            one_line_error(asked)
        if not happened:
            break
    return outcomes


def finish_after_fault(home: Path, name: str) -> None:
    """With the fault gone the run goes on from the ledger's truth, each change once."""
    comps = consistent(home)
    if comps[name] == "PENDING":
        assert cli(home, "component", "start", name).returncode == 0
    if comps[name] != "COMPLETED":
        proc = cli(home, "component", "complete", name)
        assert proc.returncode == 0, proc.stderr
    assert consistent(home)[name] == "COMPLETED"
    with Ledger(home) as led:
        assert len(led.events(component=name, kind="component.completed")) == 1
        assert len(led.events(component=name, kind="component.upgrading")) == 1


@pytest.mark.slow
def test_file_size_limit_never_loses_or_invents_a_step(home: Path) -> None:
    """A child whose writes past N bytes fail (RLIMIT_FSIZE): over a sweep of N each
    step either happened (then it is in the ledger, and an error says so) or did not
    (then nothing of it is); a success is never claimed for a step not in the ledger."""
    prepare(home)
    outcomes: set[str] = set()
    for n, limit in enumerate([2_000, 24_000, 56_000, 72_000, 400_000], start=2):
        name = f"c{n}"
        outcomes |= step_through_fault(home, name,
                                       lambda *args, lim=limit: cli(home, *args, fsize=lim))
        finish_after_fault(home, name)
    assert outcomes == {"ok", "refused", "recorded, view failed"}, outcomes


# -- a full disk: a small tmpfs ------------------------------------------------------------


@contextlib.contextmanager
def mounted(*args: str) -> Iterator[None]:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not possible here: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", args[-1]], check=True)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root)."""
    point = tmp_path / "small"
    point.mkdir()
    with mounted("-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(point)):
        yield point


def fill(folder: Path) -> Path:
    """Fill the filesystem of *folder* to the last block; return the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def free_only(filler: Path, wanted: int) -> None:
    """Shrink *filler* so that about *wanted* bytes of its filesystem are free."""
    st = os.statvfs(filler.parent)
    free = st.f_bavail * st.f_frsize
    os.truncate(filler, max(0, filler.stat().st_size - (wanted - free)))


@pytest.mark.slow
def test_full_filesystem(small_fs: Path, tmp_path: Path) -> None:
    """A home on a filesystem with 0 to 400 KB left: every step fails with one line or
    happens whole; once space is freed the run goes on from the ledger's truth."""
    home = small_fs / "home"
    prepare(home)
    filler = fill(small_fs)
    outcomes: set[str] = set()
    for n, free in enumerate([0, 40_000, 80_000, 400_000], start=2):
        free_only(filler, free)
        name = f"c{n}"
        outcomes |= step_through_fault(home, name, lambda *args: cli(home, *args),
                                       copy_to=tmp_path / "copy")
        filler.unlink()
        finish_after_fault(home, name)
        filler = fill(small_fs)
    filler.unlink()
    assert outcomes == {"ok", "refused", "recorded, view failed"}, outcomes
    assert cli(home, "export").returncode == 0
    doc = json.loads((home / "state.json").read_bytes())
    assert doc["phases"]["p1"]["components"]["c5"]["state"] == "COMPLETED"


# -- a read-only home --------------------------------------------------------------------


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_read_only_home(tmp_path: Path, home: Path) -> None:
    """A home on a read-only mount (root ignores chmod, so a read-only bind mount):
    one line that names the home and the fix; not a byte changes."""
    prepare(home)
    view = tmp_path / "ro"
    view.mkdir()
    with mounted("--bind", "-o", "ro", str(home), str(view)):
        probe = view / "probe"
        with pytest.raises(OSError):
            probe.write_bytes(b"x")  # the mount really is read-only, even for root
        before = digest(view)
        for args in (("component", "start", "c2"), ("state", "set", "FAILED"),
                     ("snapshot",), ("save-history",)):
            line = one_line_error(cli(view, *args))
            assert str(view) in line and "--home" in line, line
        assert digest(view) == before
    consistent(home)


# -- a view that cannot be renamed into place -------------------------------------------------


def test_state_view_rename_fails(home: Path) -> None:
    """state.json replaced by a folder: the change is recorded, the command says so in
    one line (exit 8), the folder is untouched, no temp file is left; once the folder
    is gone, export writes the current view."""
    prepare(home)
    state_file = home / "state.json"
    state_file.unlink()
    state_file.mkdir()
    (state_file / "keep").write_text("mine")
    line = one_line_error(cli(home, "component", "start", "c2"))
    assert "recorded in the ledger" in line and "export" in line, line
    assert consistent(home)["c2"] == "UPGRADING"
    assert [p.name for p in state_file.iterdir()] == ["keep"]
    assert (state_file / "keep").read_text() == "mine"
    (state_file / "keep").unlink()
    state_file.rmdir()
    assert cli(home, "export").returncode == 0
    with Ledger(home) as led:
        assert state_file.read_bytes() == led.export_document()


def test_history_view_rename_fails(home: Path) -> None:
    """history/<id>.json replaced by a folder: save-history fails with one line and
    takes no snapshot; export writes the file once the folder is gone."""
    uid = prepare(home)
    target = home / "history" / f"{uid}.json"
    target.mkdir(parents=True)
    one_line_error(cli(home, "save-history"))
    consistent(home)
    assert not (home / "snapshots").exists() or not list((home / "snapshots").iterdir())
    target.rmdir()
    assert cli(home, "export").returncode == 0
    assert json.loads(target.read_bytes())["upgrade_id"] == uid
