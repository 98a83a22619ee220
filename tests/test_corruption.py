"""Corruption: a damaged ledger is detected, and restored from a snapshot.

A truncated, garbled, random, foreign, emptied or deleted ledger.db is refused on
open with exit 7 and a line that says what to do; damage deep in the file, which a
per-step command does not read, is found by ``doctor`` and before ``resume``.
Snapshots are taken at each save to history (0600, folder 0700, retention), online,
and ``restore`` brings back the newest good one, keeping the damaged file aside and
re-importing the views that are newer. Both runbooks of docs/operations.md are run
line by line, as written.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import faultchild as fc
import pytest
from conftest import REPO, child_env

from ledger.api import Ledger
from ledger.ops import snapshots
from ledger.store.home import Home
from ledger.views import document

CHILD = Path(fc.__file__).resolve()
EXIT_CORRUPT, EXIT_NOT_FOUND, EXIT_BAD_INPUT, EXIT_CONFLICT, EXIT_LOCK = 7, 5, 6, 9, 4


def drive(home: Path, stop_after: int | None = None, components: int = 50) -> None:
    """Run the fault child (to the end, or stopping dead after a step)."""
    args = [sys.executable, str(CHILD), str(home), "--components", str(components)]
    if stop_after is not None:
        args += ["--stop-after", str(stop_after)]
    subprocess.run(args, env=child_env(), check=True, capture_output=True, timeout=300)


def cli(home: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return fc.cli(home, *args, **kw)  # type: ignore[arg-type]


def checkpoint(home: Path) -> None:
    """Fold the WAL into ledger.db, as the last connection to close does."""
    conn = sqlite3.connect(home / "ledger.db")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    (home / "ledger.db-wal").unlink(missing_ok=True)
    (home / "ledger.db-shm").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose 50-component run completed and was saved (so it has a snapshot)."""
    home = tmp_path_factory.mktemp("finished") / "home"
    drive(home)
    checkpoint(home)
    return home


@pytest.fixture
def finished(tmp_path: Path, finished_template: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(finished_template, home, symlinks=True)
    return home


# -- ways to damage a ledger ------------------------------------------------------------


def truncated(db: Path) -> None:
    db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])


def header_only(db: Path) -> None:
    db.write_bytes(db.read_bytes()[:4096])


def garbled(db: Path) -> None:
    data = bytearray(db.read_bytes())
    rng = random.Random(7)
    for at in range(4096, len(data), 509):
        data[at] = rng.randrange(256)
    data[:16] = rng.randbytes(16)  # the magic header too
    db.write_bytes(bytes(data))


def random_bytes(db: Path) -> None:
    db.write_bytes(random.Random(8).randbytes(64 * 1024))


def foreign(db: Path) -> None:
    db.unlink()
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);"
                       "INSERT INTO users (name) VALUES ('alice');")
    conn.close()
    # As private as the ledger it replaces: a loose mode would be reported by doctor
    # (never changed by a command), and this damage is about the content.
    db.chmod(0o600)


def emptied(db: Path) -> None:
    db.write_bytes(b"")


def deleted(db: Path) -> None:
    db.unlink()


DAMAGE: dict[str, Callable[[Path], None]] = {
    "truncated": truncated, "header-only": header_only, "garbled": garbled,
    "random": random_bytes, "foreign": foreign, "emptied": emptied, "deleted": deleted,
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damage_is_refused_on_open_and_restored(finished: Path, kind: str) -> None:
    db = finished / "ledger.db"
    DAMAGE[kind](db)
    damaged = db.read_bytes() if db.exists() else None
    for args in (("state", "get"), ("status",), ("component", "start", "c01"), ("resume",)):
        line = fc.one_line_error(cli(finished, *args), EXIT_CORRUPT)
        assert "restore" in line or "--home" in line, line
    if damaged is not None:
        assert db.read_bytes() == damaged, "a refused command wrote into the damaged ledger"
    doctor = cli(finished, "doctor", "--json")
    assert doctor.returncode == 1
    assert '"check": "integrity"' in doctor.stdout or '"check": "schema"' in doctor.stdout

    restored = cli(finished, "restore")
    assert restored.returncode == 0, restored.stderr
    assert "restored snapshot" in restored.stdout
    aside = sorted(finished.glob("ledger.db.corrupt-*"))
    if damaged:  # (doctor's schema check gives an emptied file an empty WAL header)
        assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] \
            == [damaged], "the damaged file must be kept aside, unchanged"
    assert cli(finished, "doctor").returncode == 0
    with Ledger(finished) as led:
        fc.check_finished(led, 50)
        assert len(led.events(kind="ledger.restore")) == 1


@pytest.mark.slow
def test_damage_deep_in_the_file_is_found_by_doctor_and_before_resume(tmp_path: Path) -> None:
    home = tmp_path / "home"
    drive(home, stop_after=30)
    checkpoint(home)
    db = home / "ledger.db"
    conn = sqlite3.connect(db)
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = "
                        "'ix_events_kind_id'").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    data[(root - 1) * page + 8:(root - 1) * page + 400] = bytes(392)  # an index page
    db.write_bytes(bytes(data))
    assert cli(home, "state", "get").stdout.strip() == "UPGRADING"  # not read: not seen
    doctor = cli(home, "doctor")
    assert doctor.returncode == 1 and "integrity" in doctor.stdout
    line = fc.one_line_error(cli(home, "resume"), EXIT_CORRUPT)
    assert "integrity" in line and "restore" in line
    assert db.read_bytes() == bytes(data)
    with pytest.raises(Exception, match="integrity") as info, Ledger(home) as led:
        led.resume()
    assert type(info.value).__name__ == "CorruptLedger"


# -- snapshots ---------------------------------------------------------------------------


@pytest.mark.slow
def test_snapshots_are_private_and_kept_to_the_limit(finished: Path) -> None:
    for _ in range(5):
        saved = cli(finished, "save-history", env={"LEDGER_SNAPSHOT_KEEP": "3"}, umask=0)
        assert saved.returncode == 0, saved.stderr
    found = snapshots.listing(Home.at(finished))
    assert len(found) == 3
    assert [s.name for s in found] == sorted((s.name for s in found), reverse=True)
    folder = finished / "snapshots"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(s.path.stat().st_mode) == 0o600 for s in found)
    assert all(snapshots.check_file(s.path) is None for s in found)
    assert not list((finished / "tmp").iterdir())


def test_snapshot_keep_zero_and_bad_values(finished: Path) -> None:
    before = snapshots.listing(Home.at(finished))
    assert cli(finished, "save-history", env={"LEDGER_SNAPSHOT_KEEP": "0"}).returncode == 0
    assert snapshots.listing(Home.at(finished)) == before
    fc.one_line_error(cli(finished, "save-history", env={"LEDGER_SNAPSHOT_KEEP": "ten"}),
                      EXIT_BAD_INPUT)
    manual = cli(finished, "snapshot", env={"LEDGER_SNAPSHOT_KEEP": "0"})
    assert manual.returncode == 0
    assert Path(manual.stdout.strip()).is_file()
    assert len(snapshots.listing(Home.at(finished))) == len(before) + 1


@pytest.mark.slow
def test_snapshots_are_taken_online_and_consistent(tmp_path: Path) -> None:
    """Snapshots taken while another process drives the upgrade: each one is a whole,
    consistent ledger (every component row agrees with its events)."""
    home = tmp_path / "home"
    with Ledger(home):
        pass
    writer = subprocess.Popen([sys.executable, str(CHILD), str(home)],
                              env=child_env(LEDGER_SNAPSHOT_KEEP="1000"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    taken = []
    try:
        with Ledger(home) as led:
            while writer.poll() is None or not taken:
                snap = snapshots.take(led.home, led.db, "online", keep=1000, manual=True)
                assert snap is not None
                taken.append(snap)
    finally:
        writer.wait(timeout=300)
        assert writer.stderr is not None
        writer.stderr.close()
    assert writer.returncode == 0
    assert len(taken) >= 2
    for snap in taken:
        assert snapshots.check_file(snap.path) is None
        conn = sqlite3.connect(f"file:{snap.path}?mode=ro&immutable=1", uri=True)
        try:
            for name, state in conn.execute("SELECT name, state FROM components"):
                last = conn.execute(
                    "SELECT to_value FROM events WHERE subject = ? AND kind LIKE "
                    "'component.%' ORDER BY id DESC LIMIT 1", (name,)).fetchone()
                assert state == (last[0] if last else "PENDING"), (snap.name, name)
        finally:
            conn.close()


# -- restore -----------------------------------------------------------------------------


def midway_with_snapshot(home: Path, snap_at: int = 40, stop_at: int = 61) -> bytes:
    """A run stopped at step *stop_at*, with a snapshot taken at *snap_at*; return
    the state.json it left (newer than the snapshot)."""
    drive(home, stop_after=snap_at)
    assert cli(home, "snapshot").returncode == 0
    drive(home, stop_after=stop_at)
    checkpoint(home)
    return (home / "state.json").read_bytes()


@pytest.mark.slow
def test_restore_rebuilds_the_current_upgrade_from_a_newer_state_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    view = midway_with_snapshot(home)
    truncated(home / "ledger.db")
    out = cli(home, "restore", "--json")
    assert out.returncode == 0, out.stderr
    assert "state.json (crash-run)" in out.stdout
    with Ledger(home) as led:
        doc = led.document()
        before = document.parse(view)
        assert doc["phases"] == before["phases"]
        assert doc["current_state"] == before["current_state"]
        assert len(led.events(kind="upgrade.import")) == 1
        restore_event = led.events(kind="ledger.restore")[0]
        assert restore_event["id"] > before["serial"]  # ids go on above every old serial
    # The run resumes and finishes; nothing is completed twice.
    drive(home)
    with Ledger(home) as led, led.db.read() as tx:
        states = {r[0] for r in tx.all("SELECT state FROM components")}
        most = tx.scalar("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM events WHERE "
                         "kind = 'component.completed' GROUP BY subject)")
    assert states == {"COMPLETED"}
    assert most == 1


@pytest.mark.slow
@pytest.mark.parametrize("serial", [2**64, 2**63 - 2])
def test_restore_passes_over_a_view_whose_serial_is_out_of_range(tmp_path: Path,
                                                                 serial: int) -> None:
    """A history file claiming serial 2**64 crashed restore after it had replaced
    ledger.db; 2**63-2 made every later event id random. Such a view is refused like
    any invalid document: passed over, the rest restored, event ids in order."""
    home = tmp_path / "home"
    view = midway_with_snapshot(home)
    forged = json.loads(view)
    forged["serial"] = serial
    (home / "history" / "crash-run.json").write_text(json.dumps(forged))
    truncated(home / "ledger.db")
    out = cli(home, "restore", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert any(s.startswith("crash-run.json: serial must be a whole number from 0 to ")
               for s in result["skipped"]), result
    assert result["imported"] == ["state.json (crash-run)"]
    with Ledger(home) as led:  # nothing recorded after the snapshot was lost
        assert led.document()["phases"] == json.loads(view)["phases"]
    drive(home)  # the run resumes and finishes on the restored ledger
    with Ledger(home) as led:
        ids = [e["id"] for e in led.events(limit=None)]
    assert ids == sorted(ids) and ids[-1] < 2**53
    assert ids[-1] - ids[0] < 10 * len(ids)  # dense, not scattered at random


def test_a_restore_that_cannot_finish_leaves_the_ledger_as_it_was(finished: Path) -> None:
    """The restored ledger is built beside the damaged one and swapped in only once it
    is whole: a disk that fills up half-way (a real EFBIG) leaves ledger.db, its
    neighbours and the views exactly as they were, and a later restore works."""
    truncated(finished / "ledger.db")
    before = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    snap = snapshots.listing(Home.at(finished))[0]
    out = cli(finished, "restore", fsize=snap.size_bytes // 2)
    fc.one_line_error(out, 8)
    after = {p.name: p.read_bytes() for p in finished.iterdir() if p.is_file()}
    after.pop("upgrade.lock.d.guard", None)
    before.pop("upgrade.lock.d.guard", None)
    assert after == before
    assert [p.name for p in finished.iterdir() if p.name.endswith(".tmp")] == []
    assert list((finished / "tmp").iterdir()) == []
    done = cli(finished, "restore")
    assert done.returncode == 0, done.stderr
    with Ledger(finished) as led:
        assert led.state() == "COMPLETED"


def _staging(home: Path) -> bool:
    return any(p.name.startswith(".restore.") for p in home.iterdir())


def _kept_aside(home: Path) -> bool:
    return any(p.name.startswith("ledger.db.corrupt-") for p in home.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["staging", "kept-aside"])
def test_a_restore_killed_on_the_way_leaves_one_ledger_or_the_other(
        tmp_path: Path, finished_template: Path, moment: str) -> None:
    """SIGKILL as soon as a restore has begun to stage, or has begun to keep the damaged
    file aside: ledger.db is then always there, and is either the damaged file
    untouched (a new restore works) or the whole restored ledger, with its restore
    event; what the killed run staged is removed by the next opener."""
    trigger = _staging if moment == "staging" else _kept_aside
    outcomes = []
    for n in range(3):
        home = tmp_path / f"home{n}"
        shutil.copytree(finished_template, home, symlinks=True)
        truncated(home / "ledger.db")
        damaged = (home / "ledger.db").read_bytes()
        proc = subprocess.Popen([sys.executable, "-m", "ledger", "--home", str(home),
                                 "restore"], env=child_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and not trigger(home):
            pass  # watch as closely as a loop can
        proc.kill()
        proc.wait(timeout=60)
        if (home / "ledger.db").read_bytes() == damaged:
            outcomes.append("untouched")
            done = cli(home, "restore")
            assert done.returncode == 0, done.stderr
        else:
            outcomes.append("restored")
            assert fc.integrity(home / "ledger.db") == "ok"
        with Ledger(home) as led:
            assert len(led.events(kind="ledger.restore")) == 1
            assert led.state() == "COMPLETED"
            assert fc.leftover_temp_files(led) == []
        assert not _staging(home)
    if moment == "staging":
        assert outcomes == ["untouched"] * 3


def test_restore_keeps_the_snapshot_when_state_json_is_not_newer(finished: Path) -> None:
    header_only(finished / "ledger.db")
    out = cli(finished, "restore", "--json")
    assert out.returncode == 0
    assert '"imported": []' in out.stdout


def test_restore_sets_a_foreign_state_json_aside(finished: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    with Ledger(other) as led:  # another ledger (another lineage), same upgrade id
        led.init("crash-run")
    foreign_view = (other / "state.json").read_bytes()
    (finished / "state.json").write_bytes(foreign_view)
    random_bytes(finished / "ledger.db")
    out = cli(finished, "restore")
    assert out.returncode == 0
    assert "another ledger" in out.stdout
    kept = list(finished.glob("state.json.skipped-*"))
    assert [p.read_bytes() for p in kept] == [foreign_view]
    with Ledger(finished) as led:
        assert led.state() == "COMPLETED"  # the snapshot's, not the foreign view's IDLE


@pytest.mark.slow
def test_restore_passes_over_a_damaged_snapshot_and_imports_newer_history(
        finished: Path) -> None:
    """The newest snapshot is damaged: the older one is used, and the upgrade saved
    after it comes back from its history file."""
    for args in (("init", "second"), ("state", "set", "PLANNING"), ("state", "set", "FAILED"),
                 ("save-history",)):
        assert cli(finished, *args).returncode == 0
    found = snapshots.listing(Home.at(finished))
    assert [s.upgrade_id for s in found] == ["second", "crash-run"]
    garbled(found[0].path)
    truncated(finished / "ledger.db")
    out = cli(finished, "restore")
    assert out.returncode == 0, out.stderr
    assert found[1].name in out.stdout and f"skipped {found[0].name}" in out.stdout
    with Ledger(finished) as led:
        assert {h["id"]: h["state"] for h in led.history()} == {"second": "FAILED",
                                                                 "crash-run": "COMPLETED"}
        assert led.current_id() == "second"


@pytest.mark.slow
def test_restore_refusals_change_nothing(finished: Path) -> None:
    db = finished / "ledger.db"
    healthy = db.read_bytes()
    fc.one_line_error(cli(finished, "restore"), EXIT_CONFLICT)  # healthy: refused
    fc.one_line_error(cli(finished, "restore", "../ledger.db"), EXIT_BAD_INPUT)
    fc.one_line_error(cli(finished, "restore", "20200101T000000000Z-nope.db"), EXIT_NOT_FOUND)
    assert db.read_bytes() == healthy and not list(finished.glob("ledger.db.*-*"))

    sleeper = subprocess.Popen(["sleep", "300"])  # a live upgrade run holds the lock
    try:
        assert cli(finished, "--pid", str(sleeper.pid), "lock", "acquire").returncode == 0
        truncated(db)
        damaged = db.read_bytes()
        line = fc.one_line_error(cli(finished, "restore"), EXIT_LOCK)
        assert str(sleeper.pid) in line
    finally:
        sleeper.kill()
        sleeper.wait()
    assert db.read_bytes() == damaged and not list(finished.glob("ledger.db.*-*"))

    shutil.rmtree(finished / "snapshots")
    line = fc.one_line_error(cli(finished, "restore"), EXIT_NOT_FOUND)
    assert "no usable snapshot" in line and "import" in line
    assert db.read_bytes() == damaged


def test_restore_force_replaces_a_healthy_ledger_and_keeps_it(finished: Path) -> None:
    healthy = (finished / "ledger.db").read_bytes()
    assert cli(finished, "restore", "--force").returncode == 0
    kept = [p for p in finished.glob("ledger.db.replaced-*")
            if not p.name.endswith(("-wal", "-shm"))]
    assert [p.read_bytes() for p in kept] == [healthy]


# -- the runbooks, as written ------------------------------------------------------------


def runbook(name: str) -> list[tuple[str, int]]:
    """The command lines of a runbook block in docs/operations.md, with the exit code
    each one's comment announces (0 when it announces none)."""
    text = (REPO / "docs" / "operations.md").read_text()
    block = re.search(rf"<!-- runbook: {name} -->\s*```sh\n(.*?)```", text, re.S)
    assert block, f"docs/operations.md has no runbook {name}"
    lines = []
    for line in block.group(1).splitlines():
        if line.strip():
            code = re.search(r"#\s*exit (\d+)", line)
            lines.append((line, int(code.group(1)) if code else 0))
    return lines


def follow(name: str, home: Path, tmp_path: Path) -> list[str]:
    """Run each line of runbook *name* in bash with LEDGER_HOME=home and an
    ``upgrade-ledger`` on PATH (this checkout's); return their outputs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "upgrade-ledger"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ledger "$@"\n')
    shim.chmod(0o755)
    env = child_env(LEDGER_HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    outputs = []
    for line, expected in runbook(name):
        done = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == expected, (line, done.returncode, done.stdout, done.stderr)
        outputs.append(done.stdout + done.stderr)
    return outputs


@pytest.mark.slow
def test_runbook_damaged_ledger(tmp_path: Path) -> None:
    home = tmp_path / "home"
    view = midway_with_snapshot(home, stop_at=62)  # between two components
    truncated(home / "ledger.db")
    outputs = follow("damaged-ledger", home, tmp_path)
    assert any("restored snapshot" in out for out in outputs)
    with Ledger(home) as led:
        assert led.document()["phases"] == document.parse(view)["phases"]
    drive(home)  # the resumed run finishes
    with Ledger(home) as led:
        assert led.state() == "COMPLETED"


@pytest.mark.slow
def test_runbook_no_snapshot(finished: Path, tmp_path: Path) -> None:
    view = document.parse((finished / "state.json").read_bytes())
    shutil.rmtree(finished / "snapshots")
    garbled(finished / "ledger.db")
    fc.one_line_error(cli(finished, "restore"), EXIT_NOT_FOUND)
    follow("no-snapshot", finished, tmp_path)
    with Ledger(finished) as led:
        doc = led.document()
        assert doc["phases"] == view["phases"] and doc["lineage"] != view["lineage"]
    assert list(finished.glob("ledger.db.corrupt"))


def test_restore_records_the_stale_lock_it_takes_over(finished: Path) -> None:
    # A run killed mid-upgrade leaves its lock behind; restore takes it over, and the
    # break is an audit event like every other.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_dir = finished / "upgrade.lock.d"
    lock_dir.mkdir(mode=0o700)
    (lock_dir / "lock.info").write_text(
        f"{gone.pid}|2026-01-01T00:00:00Z|{os.uname().nodename}|root\n")
    truncated(finished / "ledger.db")
    restored = cli(finished, "restore")
    assert restored.returncode == 0, restored.stderr
    with Ledger(finished) as led:
        breaks = led.events(kind="lock.break")
        assert len(breaks) == 1
        assert breaks[0]["detail"]["previous"]["pid"] == gone.pid
