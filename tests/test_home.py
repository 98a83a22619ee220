"""The home folder: private modes under any umask, one clear line when it cannot be
used, and an atomic writer that never writes through a planted symlink."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from applyplans import component, write_plan
from conftest import child_env, run_ledger

from ledger.api import Ledger
from ledger.errors import NoLedger, NotAHome, StorageError
from ledger.ops import doctor
from ledger.store.database import SCHEMA_REVISION
from ledger.store.home import Home

#: Run in a child with umask 000: a whole small run, then the mode of everything under
#: the given root, reported while the ledger is still open (so -wal and -shm exist).
UMASK_RUN = textwrap.dedent("""
    import json, os, sys
    os.umask(0)
    from ledger.api import Ledger
    root, home = sys.argv[1], sys.argv[2]
    led = Ledger(home)
    led.init("u1")
    led.set_state("PLANNING")
    led.plan({"p": [("a", "1", "2")]})
    led.save_to_history()
    led.acquire_lock()
    led.export_views()
    modes = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            modes[os.path.relpath(path, root)] = os.lstat(path).st_mode
    led.release_lock()
    led.close()
    print(json.dumps(modes))
""")


@pytest.mark.slow
def test_folders_are_0700_and_files_0600_under_umask_000(tmp_path: Path) -> None:
    root = tmp_path / "new"
    home = root / "deeper" / "home"  # parents that do not exist yet are created too
    done = subprocess.run([sys.executable, "-c", UMASK_RUN, str(root), str(home)],
                          capture_output=True, text=True, env=child_env(), timeout=120,
                          check=True)
    modes = json.loads(done.stdout)
    folders = {p: m for p, m in modes.items() if stat.S_ISDIR(m)}
    files = {p: m for p, m in modes.items() if stat.S_ISREG(m)}
    h = "deeper/home/"
    for expected in ("deeper", "deeper/home", h + "tmp", h + "history", h + "backups",
                     h + "upgrade.lock.d"):
        assert expected in folders, sorted(modes)
    for expected in ("ledger.db", "ledger.db-wal", "ledger.db-shm", "state.json",
                     "history/u1.json", "upgrade.lock.d/lock.info"):
        assert h + expected in files, sorted(modes)
    wrong = {p: oct(stat.S_IMODE(m)) for p, m in folders.items() if stat.S_IMODE(m) != 0o700}
    wrong |= {p: oct(stat.S_IMODE(m)) for p, m in files.items() if stat.S_IMODE(m) != 0o600}
    assert wrong == {}
    assert all(stat.S_ISDIR(m) or stat.S_ISREG(m) for m in modes.values())  # no links


# -- modes are set only on what the ledger creates -----------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_folder_the_ledger_did_not_create_keeps_its_mode(tmp_path: Path) -> None:
    """mkdir -m 1777 D; --home D status once left D at 0700, before anything was
    checked. Now no command changes the mode of a folder it did not create: a loose
    home is reported by doctor, and fixed by doctor --repair."""
    home = tmp_path / "D"
    home.mkdir()
    home.chmod(0o1777)
    done = run_ledger("--home", home, "status")
    assert len(done.stderr.splitlines()) == 1
    assert mode(home) == 0o1777 and list(home.iterdir()) == []
    assert run_ledger("--home", home, "init", "u1").returncode == 0  # an empty folder is a home
    assert mode(home) == 0o1777
    (home / "history").chmod(0o755)
    assert run_ledger("--home", home, "state", "set", "PLANNING").returncode == 0
    assert (mode(home), mode(home / "history")) == (0o1777, 0o755)
    found = {f.check: f for f in doctor.run_checks(home)}
    assert found["permissions"].status == "fail"
    assert f"{home} (1777, want 0700)" in found["permissions"].detail
    assert f"{home / 'history'} (0755, want 0700)" in found["permissions"].detail
    fixed = {f.check: f for f in doctor.run_checks(home, repair=True)}
    assert fixed["permissions"].status == "ok" and fixed["permissions"].repaired
    assert (mode(home), mode(home / "history")) == (0o700, 0o700)


def test_what_the_ledger_creates_is_private(tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"
    assert run_ledger("--home", home, "init", "u1").returncode == 0
    assert (mode(tmp_path / "new"), mode(home), mode(home / "tmp")) == (0o700,) * 3
    assert mode(home / "ledger.db") == 0o600


BUSY = {"notes.txt": b"mine\n", "sub/data": b"also mine\n"}


def busy_folder(tmp_path: Path) -> Path:
    """A folder with someone else's files and a mode of its own: not a ledger home."""
    folder = tmp_path / "busy"
    (folder / "sub").mkdir(parents=True)
    for name, data in BUSY.items():
        (folder / name).write_bytes(data)
    folder.chmod(0o755)
    return folder


def snapshot_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.lstat().st_mode, p.read_bytes() if p.is_file()
                                         else b"") for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("args", [["init"], ["lock", "acquire"], ["state", "set", "PLANNING"]])
def test_a_folder_that_is_not_a_ledger_home_is_refused_untouched(tmp_path: Path,
                                                                 args: list[str]) -> None:
    folder = busy_folder(tmp_path)
    before = snapshot_of(folder)
    done = run_ledger("--home", folder, *args)
    assert done.returncode == 8, done
    assert done.stderr.splitlines() == [
        f"upgrade-ledger: error: {folder} is not a ledger home: it holds other files "
        "(notes.txt, sub) and no ledger.db; choose a new or empty folder with --home DIR "
        "(or LEDGER_HOME)"]
    assert snapshot_of(folder) == before
    with pytest.raises(NotAHome):
        Ledger(folder)
    assert snapshot_of(folder) == before


def test_system_folders_are_never_touched(tmp_path: Path) -> None:
    """--home /proc (or /, /etc) as root once ran chmod on it."""
    for folder in (Path("/proc"), Path("/etc"), Path("/")):
        before = folder.lstat()
        for args in (["status"], ["init"]):
            done = run_ledger("--home", folder, *args)
            assert done.returncode in (5, 8), done
            assert len(done.stderr.splitlines()) == 1
        after = folder.lstat()
        assert (after.st_mode, after.st_mtime) == (before.st_mode, before.st_mtime)
        assert not (folder / "ledger.db").exists()


def test_an_old_librarys_home_is_a_home(tmp_path: Path) -> None:
    """What the old bash library left (state.json, history/, backups/, tmp/) is taken
    over, as the drop-in does, not refused."""
    home = tmp_path / "legacy"
    for name in ("history", "backups", "tmp"):
        (home / name).mkdir(parents=True)
    (home / "state.json").write_text("{}")
    with Ledger(home) as led:
        assert led.current_id() is None


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "plain-file"
    path.write_text("not a folder\n")
    return path


UNUSABLE = {
    "under-a-file": (lambda f: f / "sub", "cannot create ledger folder {path} (Not a directory)"),
    "is-a-file": (lambda f: f, "ledger folder {path} is not a folder"),
    "under-proc": (lambda f: Path("/proc/ledger-home-test/home"),
                   "cannot create ledger folder /proc/ledger-home-test"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_an_unusable_home_is_one_line_naming_the_path_and_the_fix(a_file: Path,
                                                                   case: str) -> None:
    make, message = UNUSABLE[case]
    path = make(a_file)
    with pytest.raises(StorageError) as caught:
        Ledger(path)
    text = str(caught.value)
    assert message.format(path=path) in text
    assert "\n" not in text
    assert text.endswith("choose another home with --home DIR (or LEDGER_HOME)")
    assert text.count("--home") == 1
    assert a_file.read_text() == "not a folder\n"


def test_the_cli_says_it_in_one_line_with_the_storage_exit_code(a_file: Path) -> None:
    done = run_ledger("--home", a_file / "sub", "init")
    assert done.returncode == 8
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert str(a_file / "sub") in lines[0] and "--home DIR" in lines[0]
    assert done.stdout == ""


def test_a_home_in_a_read_only_place_is_refused(tmp_path: Path) -> None:
    """/proc accepts no new folders, even from root (who bypasses permission bits)."""
    with pytest.raises(StorageError, match="/proc/self/ledger"):
        Ledger("/proc/self/ledger")


# -- the atomic writer ---------------------------------------------------------------

def test_a_symlink_planted_at_state_json_is_replaced_not_followed(ledger: Ledger,
                                                                  tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    ledger.home.state_file.symlink_to(victim)
    ledger.init("u1")
    assert victim.read_bytes() == b"precious\n"
    assert not ledger.home.state_file.is_symlink()
    assert json.loads(ledger.home.state_file.read_text())["upgrade_id"] == "u1"
    assert stat.S_IMODE(ledger.home.state_file.stat().st_mode) == 0o600


def test_a_symlink_planted_at_a_history_file_is_replaced_not_followed(
        ledger: Ledger, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    ledger.init("u1")
    ledger.home.history_file("u1").symlink_to(victim)
    ledger.save_to_history()
    assert victim.read_bytes() == b"precious\n"
    assert not ledger.home.history_file("u1").is_symlink()


def test_the_writer_replaces_whole_files_and_leaves_no_temp_files(tmp_path: Path) -> None:
    home = Home.at(tmp_path / "home", env={})
    home.ensure()
    target = home.state_file
    target.write_bytes(b"old\n")
    inode = target.stat().st_ino
    home.write_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert target.stat().st_ino != inode  # a new file renamed in, not an edit in place
    assert list(home.tmp_dir.iterdir()) == []


def test_temp_files_of_dead_writers_are_cleaned_when_the_ledger_opens(tmp_path: Path) -> None:
    with Ledger(tmp_path / "home") as led:
        led.init("u1")
        tmp = led.home.tmp_dir
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftover = tmp / f".state.json.{dead}.abcd1234.tmp"
    leftover.write_bytes(b'{"half": ')
    mine = tmp / f".state.json.{os.getpid()}.abcd1234.tmp"  # a live writer's: kept
    mine.write_bytes(b"{")
    with Ledger(tmp_path / "home"):
        pass
    assert not leftover.exists()
    assert mine.exists()
    mine.unlink()


def test_a_home_that_is_a_link_to_a_folder_is_used(tmp_path: Path) -> None:
    # Operators move /var/lib/observability-upgrades to a bigger disk with a symlink.
    real = tmp_path / "disk" / "upgrades"
    real.mkdir(parents=True)
    link = tmp_path / "home"
    link.symlink_to(real)
    with Ledger(link) as led:
        led.init("u1")
    assert (real / "ledger.db").is_file()
    assert json.loads((real / "state.json").read_text())["upgrade_id"] == "u1"


def test_a_folder_inside_the_home_may_not_be_a_link(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Ledger(home).close()
    (tmp_path / "elsewhere").mkdir()
    (home / "history").rmdir()
    (home / "history").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="symbolic link"):
        Ledger(home)


# -- commands that only read create nothing ------------------------------------------------

#: The operator's commands that only read, and the predicates. (The per-step getters,
#: state get and the like, create the home as the old library's functions did: the
#: bash drop-in's upgrade_state_init_dirs relies on it.)
READERS = [["status"], ["history"], ["show"], ["events"], ["events", "--follow"],
           ["sql", "SELECT 1"], ["export"], ["export", "-o", "-"], ["metrics"],
           ["lock", "status"], ["lock", "held"], ["in-progress"], ["can-resume"],
           ["component", "is-upgraded", "c"]]


@pytest.mark.parametrize("args", READERS, ids=" ".join)
def test_a_command_that_only_reads_says_there_is_no_ledger_and_creates_nothing(
        tmp_path: Path, cli, home: Path, args: list[str]) -> None:
    result = cli(*args)
    assert result.code == 5, result
    assert result.err.splitlines() == [
        f"upgrade-ledger: error: there is no ledger at {home} (no ledger.db); check --home "
        "(or LEDGER_HOME); a command that records something (init, apply) creates it"]
    assert not home.exists()
    home.mkdir()  # an empty folder: still no ledger, and nothing made in it
    assert cli(*args).code == 5
    assert list(home.iterdir()) == []


def test_the_default_home_is_not_created_by_status(tmp_path: Path) -> None:
    default = Path("/var/lib/observability-upgrades")
    if default.exists():
        pytest.skip(f"{default} exists on this machine")
    env = child_env()
    done = run_ledger("status", env=env, cwd=tmp_path)
    assert done.returncode == 5, done
    assert str(default) in done.stderr
    assert not default.exists()


def test_python_opens_an_existing_ledger_only_when_asked(tmp_path: Path) -> None:
    home = tmp_path / "typo"
    with pytest.raises(NoLedger, match="there is no ledger at"):
        Ledger(home, create=False)
    assert not home.exists()
    with Ledger(home) as led:  # the default creates it, as every change does
        led.init("u1")
    with Ledger(home, create=False) as led:
        assert led.current_id() == "u1"


def test_a_dry_run_on_a_home_without_a_ledger_says_so_and_creates_nothing(
        tmp_path: Path, cli, home: Path) -> None:
    plan = write_plan(tmp_path / "work", [("one", 1, [component("a")])])
    result = cli("apply", "--dry-run", str(plan))
    assert result.code == 0, result
    assert f"start a new upgrade (there is no ledger at {home} yet: a run creates it)" in \
        result.out.splitlines()[0]
    assert not home.exists()


# -- a new ledger appears whole, or not at all ---------------------------------------------

def _first_apply(tmp_path: Path, home: Path) -> subprocess.Popen[str]:
    plan = write_plan(tmp_path / "work", [("one", 1, [component("a")])])
    return subprocess.Popen([sys.executable, "-m", "ledger", "--home", str(home), "apply",
                             str(plan)], env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _until_the_ledger_is_being_made(proc: subprocess.Popen[str], home: Path) -> None:
    """Watch, as closely as a loop can, until the ledger file (or the folder it is
    built in) appears."""
    while proc.poll() is None:
        try:
            names = os.listdir(home)
        except FileNotFoundError:
            continue
        if any(n.startswith(("ledger.db", ".create.")) for n in names):
            return


def _revision(db: Path) -> str | None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    except sqlite3.Error:
        return None
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("round_no", range(3))
def test_a_first_apply_killed_while_the_ledger_is_made_leaves_none_or_a_whole_one(
        tmp_path: Path, round_no: int) -> None:
    """An interrupted first apply once left an empty, never-migrated ledger.db. The
    ledger is built aside and renamed into place: after a SIGKILL at that moment there
    is no ledger.db, or a whole one; the next apply runs, and what was staged is gone."""
    home = tmp_path / "home"
    proc = _first_apply(tmp_path, home)
    _until_the_ledger_is_being_made(proc, home)
    proc.kill()
    proc.communicate(timeout=60)
    db = home / "ledger.db"
    assert not db.exists() or _revision(db) == SCHEMA_REVISION, (round_no, db.stat())
    again = _first_apply(tmp_path, home)
    _out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert [n for n in os.listdir(home) if n.startswith(".create.")] == []


def test_ctrl_c_while_the_first_ledger_is_made_says_what_to_run_next(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = _first_apply(tmp_path, home)
    _until_the_ledger_is_being_made(proc, home)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert err.splitlines() == [
        "upgrade-ledger: interrupted before the run started; nothing was recorded: run the "
        "same apply again"]
    db = home / "ledger.db"
    assert not db.exists() or _revision(db) == SCHEMA_REVISION
    assert [n for n in os.listdir(home) if n.startswith(".create.")] == []
