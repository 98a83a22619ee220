"""``upgrade-ledger doctor`` and ``ledger.doctor.run_checks``: each check finds what it
names, checking changes nothing, and --repair applies only the safe fixes."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import walk_to_upgrading

from ledger.api import Ledger
from ledger.core.host import boot_id as local_boot_id
from ledger.lock.record import local_hostname
from ledger.ops import doctor

FINDING_KEYS = ["check", "status", "detail", "hint", "repaired"]
CHECK_NAMES = ["integrity", "schema", "lock", "permissions", "state-view", "history-views",
               "wal", "stuck", "temp-files", "notifications", "snapshots", "fleet"]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process to stand for a shell that holds the lock."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def start_ticks(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data.rpartition(b")")[2].split()[19].decode()


def plant_lock(home: Path, pid: int, ticks: str = "") -> None:
    """A lock folder written by process *pid* on this host and boot."""
    lock = home / "upgrade.lock.d"
    lock.mkdir(mode=0o700)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = f"{pid}|{stamp}|{local_hostname()}|someone|{ticks}|{local_boot_id() or ''}"
    (lock / "lock.info").write_text(line + "\n")
    (lock / "lock.info").chmod(0o600)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished upgrade, saved to history, with one run still going after it."""
    home = tmp_path_factory.mktemp("doctor") / "home"
    with Ledger(home) as led:
        walk_to_upgrading(led, "u-done")
        led.phase_start("p")
        led.component_start("alpha", "1", "2")
        led.component_complete("alpha")
        led.set_state("VALIDATING")
        led.set_state("COMPLETED")
        led.save_to_history()
        led.set_state("IDLE")
        led.init("u-now")
        led.set_state("PLANNING")
    return home


@pytest.fixture
def done_run(home: Path, template: Path):
    """Put a copy of the template ledger at *home* (call it to do so)."""
    return lambda _home: shutil.copytree(template, home, symlinks=True)


def by_check(findings: list[dict]) -> dict[str, dict]:
    return {f["check"]: f for f in findings}


def events(home: Path) -> int:
    conn = sqlite3.connect(home / "ledger.db")
    try:
        return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        conn.close()


def run_doctor(cli, *args: str) -> tuple[int, dict[str, dict], str]:
    result = cli("doctor", "--json", *args)
    assert result.err == ""
    return result.code, by_check(json.loads(result.out)), result.out


# -- a healthy ledger ------------------------------------------------------------------

def test_a_healthy_ledger_is_all_ok_and_exits_0(done_run, home, cli) -> None:
    done_run(home)
    code, found, out = run_doctor(cli)
    assert code == 0
    assert list(found) == CHECK_NAMES
    for finding in json.loads(out):
        assert list(finding) == FINDING_KEYS
    assert {f["status"] for f in found.values()} == {"ok"}
    assert "1 history file(s)" in found["history-views"]["detail"]


@pytest.mark.parametrize("fmt", ["table", "plain", "csv"])
def test_one_line_per_check_in_every_text_format(done_run, home, cli, fmt) -> None:
    done_run(home)
    result = cli("doctor", "-f", fmt)
    assert result.code == 0
    lines = result.out.splitlines()
    body = {"table": lines[2:], "csv": lines[1:], "plain": lines}[fmt]
    assert len(body) == len(CHECK_NAMES)
    for name, line in zip(CHECK_NAMES, body, strict=True):
        assert line.startswith(name)
        assert " ok " in line or "\tok\t" in line or ",ok," in line


def test_checking_changes_nothing(done_run, home, cli) -> None:
    done_run(home)
    (home / "state.json").chmod(0o644)
    os.chmod(home, 0o755)
    before = sorted((str(p), p.stat().st_mode, p.stat().st_size) for p in home.rglob("*")
                    if not p.name.startswith("ledger.db"))
    count = events(home)
    code, found, _ = run_doctor(cli)
    assert code == 1 and found["permissions"]["status"] == "fail"
    after = sorted((str(p), p.stat().st_mode, p.stat().st_size) for p in home.rglob("*")
                   if not p.name.startswith("ledger.db"))
    assert after == before
    assert events(home) == count


# -- integrity and schema --------------------------------------------------------------

def test_a_corrupt_ledger_is_reported_with_what_to_do_not_a_traceback(done_run, home, cli) -> None:
    done_run(home)
    (home / "ledger.db").write_bytes(os.urandom(8192))
    for suffix in ("-wal", "-shm"):
        (home / f"ledger.db{suffix}").unlink(missing_ok=True)
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert found["integrity"]["status"] == "fail"
    assert "corrupt or not a SQLite database" in found["integrity"]["detail"]
    assert "restore" in found["integrity"]["hint"]
    for name in ("schema", "state-view", "history-views", "stuck"):
        assert found[name]["status"] == "skip", name
    result = cli("doctor")
    assert "Traceback" not in result.out + result.err


def test_damaged_pages_fail_the_integrity_check(home, cli) -> None:
    with Ledger(home) as led:
        led.init("u1")
        led.set_state("PLANNING")
        led.plan({"p": [(f"c{i:03d}", "1", "2") for i in range(300)]})
    data = bytearray((home / "ledger.db").read_bytes())
    page = 4096
    # Scribble over the middle of the file (index and table pages), not the header.
    for offset in range(3 * page, len(data) - page, page):
        data[offset + 40: offset + 200] = os.urandom(160)
    (home / "ledger.db").write_bytes(bytes(data))
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert found["integrity"]["status"] == "fail"


def test_a_missing_ledger_is_reported_and_nothing_is_created(tmp_path, cli) -> None:
    home = tmp_path / "nowhere"
    result = cli("--home", str(home), "doctor", "--json")
    assert result.code == 1
    found = by_check(json.loads(result.out))
    assert found["integrity"]["status"] == "fail"
    assert f"no ledger at {home / 'ledger.db'}" == found["integrity"]["detail"]
    assert not home.exists()


def test_a_database_that_is_not_a_ledger(home, cli) -> None:
    home.mkdir(mode=0o700)
    conn = sqlite3.connect(home / "ledger.db")
    conn.execute("CREATE TABLE recipes (name TEXT)")
    conn.commit()
    conn.close()
    (home / "ledger.db").chmod(0o600)
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert found["schema"]["status"] == "fail"
    assert "not a ledger" in found["schema"]["detail"]
    assert found["state-view"]["status"] == "skip"


def test_a_schema_newer_than_this_code_fails(done_run, home, cli) -> None:
    done_run(home)
    conn = sqlite3.connect(home / "ledger.db")
    conn.execute("UPDATE alembic_version SET version_num = '9999'")
    conn.commit()
    conn.close()
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert found["schema"]["status"] == "fail"
    assert "9999 is newer" in found["schema"]["detail"]


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_lost_ledger_beside_its_views_says_restore(done_run, home, cli, how) -> None:
    done_run(home)
    for suffix in ("", "-wal", "-shm"):
        (home / f"ledger.db{suffix}").unlink(missing_ok=True)
    if how == "truncated":
        (home / "ledger.db").touch(mode=0o600)
    code, found, _ = run_doctor(cli)
    assert code == 1
    finding = found["integrity" if how == "deleted" else "schema"]
    assert finding["status"] == "fail"
    assert "state.json was written by ledger " in finding["detail"]
    assert f"it was {how}" in finding["detail"]
    assert "upgrade-ledger restore" in finding["hint"]


def test_an_empty_ledger_file_is_a_warning(home, cli) -> None:
    home.mkdir(mode=0o700)
    (home / "ledger.db").touch(mode=0o600)
    code, found, _ = run_doctor(cli)
    assert code == 0
    assert found["schema"]["status"] == "warn"
    assert "never migrated" in found["schema"]["detail"]


# -- lock --------------------------------------------------------------------------------

def test_a_live_holder_is_ok_and_named(done_run, home, cli, sleeper) -> None:
    done_run(home)
    assert cli("lock", "acquire", "--owner", str(sleeper.pid)).code == 0
    code, found, _ = run_doctor(cli)
    assert code == 0
    assert found["lock"]["status"] == "ok"
    assert f"PID {sleeper.pid}" in found["lock"]["detail"]


def test_a_stale_lock_is_reported_then_cleared_through_the_ledger(done_run, home, cli) -> None:
    done_run(home)
    gone = dead_pid()
    plant_lock(home, gone)
    code, found, _ = run_doctor(cli)
    assert code == 0  # a stale lock is a warning: the next acquire takes it over
    assert found["lock"]["status"] == "warn"
    assert f"PID {gone} no longer exists" in found["lock"]["detail"]
    assert (home / "upgrade.lock.d").exists()
    _code, found, _ = run_doctor(cli, "--repair")
    assert found["lock"]["status"] == "ok"
    assert found["lock"]["repaired"] == f"removed the stale lock of PID {gone}"
    assert not (home / "upgrade.lock.d").exists()
    breaks = json.loads(cli("events", "--kind", "lock.break", "--json").out)
    assert len(breaks) == 1
    assert breaks[0]["from"] == str(gone)
    assert breaks[0]["detail"]["forced"] is False


def test_a_stale_lock_stays_when_the_ledger_cannot_record_its_break(
        done_run, home, cli) -> None:
    done_run(home)
    plant_lock(home, dead_pid())
    (home / "ledger.db").write_bytes(os.urandom(8192))
    for suffix in ("-wal", "-shm"):
        (home / f"ledger.db{suffix}").unlink(missing_ok=True)
    code, found, _ = run_doctor(cli, "--repair")
    assert code == 1
    assert found["lock"]["status"] == "warn"
    assert found["lock"]["repaired"].startswith("not repaired: ")
    assert (home / "upgrade.lock.d" / "lock.info").exists()
    assert found["integrity"]["repaired"] is None  # a damaged ledger is never touched


def test_a_live_holder_is_never_removed_by_repair(done_run, home, cli, sleeper) -> None:
    done_run(home)
    plant_lock(home, sleeper.pid, start_ticks(sleeper.pid))
    _code, found, _ = run_doctor(cli, "--repair", "--stuck-after", "0")
    assert found["lock"]["status"] == "ok"
    assert found["lock"]["repaired"] is None
    assert (home / "upgrade.lock.d" / "lock.info").read_text().startswith(f"{sleeper.pid}|")


# -- permissions -------------------------------------------------------------------------

def test_modes_are_reported_and_repaired(done_run, home, cli) -> None:
    done_run(home)
    os.chmod(home / "history", 0o755)
    (home / "state.json").chmod(0o644)
    (home / "history" / "u-done.json").chmod(0o640)
    code, found, _ = run_doctor(cli)
    assert code == 1
    detail = found["permissions"]["detail"]
    assert detail.startswith("3 path(s) with the wrong mode")
    assert f"{home / 'history'} (0755, want 0700)" in detail
    code, found, _ = run_doctor(cli, "--repair")
    assert code == 0
    assert found["permissions"]["status"] == "ok"
    assert found["permissions"]["repaired"] == "fixed the mode of 3 path(s)"
    assert (home / "state.json").stat().st_mode & 0o777 == 0o600
    assert (home / "history").stat().st_mode & 0o777 == 0o700


# -- views -------------------------------------------------------------------------------

def test_a_missing_view_is_rewritten(done_run, home, cli) -> None:
    done_run(home)
    expected = (home / "state.json").read_bytes()
    (home / "state.json").unlink()
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert found["state-view"]["detail"].endswith("state.json is missing")
    code, found, _ = run_doctor(cli, "--repair")
    assert code == 0
    assert found["state-view"]["repaired"] == "rewrote state.json from the ledger"
    assert (home / "state.json").read_bytes() == expected


def test_a_stale_view_is_found_by_its_serial(done_run, home, cli) -> None:
    done_run(home)
    old = (home / "state.json").read_bytes()
    assert cli("phase", "start", "p1").code == 0
    (home / "state.json").write_bytes(old)
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert "is stale (serial" in found["state-view"]["detail"]
    code, found, _ = run_doctor(cli, "--repair")
    assert found["state-view"]["status"] == "ok"
    assert json.loads((home / "state.json").read_text())["current_phase"] == "p1"
    assert not list(home.glob("state.json.doctor-*"))  # nothing of value in a stale view


def test_a_hand_edited_view_is_kept_aside_when_rewritten(done_run, home, cli) -> None:
    done_run(home)
    doc = json.loads((home / "state.json").read_text())
    doc["current_state"] = "COMPLETED"
    edited = json.dumps(doc).encode()
    (home / "state.json").write_bytes(edited)
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert "edited by hand (current_state differ" in found["state-view"]["detail"]
    assert "import" not in found["state-view"]["hint"]
    code, found, _ = run_doctor(cli, "--repair")
    assert found["state-view"]["status"] == "ok"
    kept = list(home.glob("state.json.doctor-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == edited
    assert kept[0].stat().st_mode & 0o777 == 0o600
    assert json.loads((home / "state.json").read_text())["current_state"] == "PLANNING"


@pytest.mark.parametrize(("change", "words"), [
    (lambda d: d.update(lineage="0f0f0f0f-another-ledger"), "comes from another ledger"),
    (lambda d: [d.pop("lineage"), d.pop("serial")], "has no serial or lineage"),
    (lambda d: d.update(serial=d["serial"] + 5), "is ahead of the ledger"),
    (lambda d: d.update(serial="7"), "serial that is not a number"),
])
def test_view_drift_is_named(done_run, home, cli, change, words) -> None:
    done_run(home)
    doc = json.loads((home / "state.json").read_text())
    change(doc)
    (home / "state.json").write_text(json.dumps(doc))
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert found["state-view"]["status"] == "fail"
    assert words in found["state-view"]["detail"]


def test_a_view_that_is_not_json(done_run, home, cli) -> None:
    done_run(home)
    (home / "state.json").write_bytes(b'{"upgrade_id": "u-now", ')
    code, found, _ = run_doctor(cli)
    assert "is not valid JSON" in found["state-view"]["detail"]
    code, found, _ = run_doctor(cli, "--repair")
    assert code == 0 and found["state-view"]["status"] == "ok"


def test_a_legacy_view_without_a_current_upgrade_is_not_overwritten(home, cli) -> None:
    home.mkdir(mode=0o700)
    legacy = b'{"upgrade_id": "old", "current_state": "FAILED"}\n'
    (home / "state.json").write_bytes(legacy)
    (home / "state.json").chmod(0o600)
    Ledger(home).close()
    code, found, _ = run_doctor(cli, "--repair")
    assert code == 1
    assert found["state-view"]["status"] == "fail"
    assert "upgrade-ledger import" in found["state-view"]["hint"]
    assert (home / "state.json").read_bytes() == legacy


def test_history_files_missing_or_foreign(done_run, home, cli) -> None:
    done_run(home)
    (home / "history" / "u-done.json").unlink()
    foreign = home / "history" / "elsewhere.json"
    foreign.write_text(json.dumps({"upgrade_id": "elsewhere", "lineage": "x"}))
    foreign.chmod(0o600)
    code, found, _ = run_doctor(cli)
    assert code == 1
    detail = found["history-views"]["detail"]
    assert "missing or unreadable for u-done" in detail
    assert "not of this ledger: elsewhere.json" in detail
    code, found, _ = run_doctor(cli, "--repair")
    assert found["history-views"]["status"] == "warn"  # the foreign file stays
    assert found["history-views"]["repaired"] == "rewrote 1 history file(s) from the ledger"
    assert json.loads((home / "history" / "u-done.json").read_text())["upgrade_id"] == "u-done"
    assert foreign.exists()


# -- WAL, stuck, temp files --------------------------------------------------------------

def test_a_large_wal_warns_and_is_checkpointed(ledger: Ledger) -> None:
    ledger.init("u1")
    ledger.set_state("PLANNING")  # the open connection keeps its WAL
    wal = ledger.home.db_path.with_name("ledger.db-wal")
    assert wal.stat().st_size > 100
    found = {f.check: f for f in doctor.run_checks(ledger, wal_warn_bytes=100)}
    assert found["wal"].status == doctor.WARN
    assert doctor.healthy(found.values())
    assert not doctor.healthy(found.values(), strict=True)
    found = {f.check: f for f in doctor.run_checks(ledger, wal_warn_bytes=100, repair=True)}
    assert found["wal"].status == doctor.OK
    assert found["wal"].repaired == "checkpointed the WAL"
    assert wal.stat().st_size == 0
    assert ledger.state() == "PLANNING"  # the ledger given stays open and usable


def test_fail_on_warn_turns_warnings_into_exit_1(done_run, home, cli) -> None:
    done_run(home)
    plant_lock(home, dead_pid())
    assert cli("doctor").code == 0
    assert cli("doctor", "--fail-on-warn").code == 1


def test_stuck_components(done_run, home, cli, sleeper) -> None:
    done_run(home)
    for args in (("state", "set", "BACKING_UP"), ("state", "set", "UPGRADING"),
                 ("phase", "start", "p"), ("component", "start", "beta", "1", "2")):
        assert cli(*args).code == 0
    code, found, _ = run_doctor(cli)
    assert code == 1
    assert found["stuck"]["detail"] == ("1 component(s) stuck: beta (upgrading while no live "
                                        "process holds the lock)")
    assert cli("lock", "acquire", "--owner", str(sleeper.pid)).code == 0
    code, found, _ = run_doctor(cli)
    assert code == 0 and found["stuck"]["status"] == "ok"
    code, found, _ = run_doctor(cli, "--stuck-after", "0")
    assert code == 1
    assert "beta (upgrading for" in found["stuck"]["detail"]
    status = json.loads(cli("status", "--json", "--stuck-after", "0").out)
    assert [s["name"] for s in status["stuck"]] == ["beta"]


def test_leftover_temp_files_of_dead_writers_are_removed(done_run, home, cli) -> None:
    done_run(home)
    gone, alive = dead_pid(), os.getpid()
    (home / "snapshots").mkdir(mode=0o700, exist_ok=True)
    dead_files = [home / f".state.json.{gone}.0a1b2c3d.tmp",
                  home / "history" / f".u-done.json.{gone}.0a1b2c3d.tmp",
                  home / "snapshots" / f".snapshot.{gone}.0a1b2c3d.tmp"]
    live_file = home / f".state.json.{alive}.0a1b2c3d.tmp"
    aside = home / f"upgrade.lock.d.stale.{gone}.0a1b2c3d4e5f"
    live_aside = home / f"upgrade.lock.d.released.{alive}.0a1b2c3d4e5f"
    stranger = home / "tmp" / "notes.txt"
    for path in (*dead_files, live_file, stranger):
        path.write_bytes(b"x")
        path.chmod(0o600)
    for folder in (aside, live_aside):
        folder.mkdir(mode=0o700)
        (folder / "lock.info").write_text("1|x|y|z\n")
        (folder / "lock.info").chmod(0o600)
    code, found, _ = run_doctor(cli)
    assert code == 0
    detail = found["temp-files"]["detail"]
    assert found["temp-files"]["status"] == "warn"
    assert detail.startswith("4 left by dead processes")
    assert "1 unknown file(s)" in detail and "notes.txt" in detail
    code, found, _ = run_doctor(cli, "--repair")
    assert found["temp-files"]["repaired"] == "removed 4 leftover file(s)"
    assert not any(p.exists() for p in (*dead_files, aside))
    # In use, or not ours: left alone.
    assert live_file.exists() and live_aside.exists() and stranger.exists()


# -- the API -----------------------------------------------------------------------------

def test_checks_are_a_list_open_to_more(done_run, home) -> None:
    done_run(home)

    def snapshots(ctx: doctor.Context) -> doctor.Finding:
        return doctor.Finding("snapshots", doctor.WARN, f"none in {ctx.home.root}")

    checks = [*doctor.CHECKS, doctor.Check("snapshots", snapshots)]
    found = doctor.run_checks(home, checks=checks)
    assert [f.check for f in found] == [*CHECK_NAMES, "snapshots"]
    assert found[-1].detail == f"none in {home}"


def test_run_checks_reads_the_home_from_the_environment(done_run, home) -> None:
    done_run(home)
    found = doctor.run_checks(env={"UPGRADE_STATE_DIR": str(home)})
    assert all(f.status == doctor.OK for f in found), found
