"""The home folder: private modes under any umask, one clear line when it cannot be
used, and an atomic writer that never writes through a planted symlink."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import child_env, run_ledger

from ledger.api import Ledger
from ledger.errors import StorageError
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


def test_an_existing_home_with_loose_modes_is_tightened(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    with Ledger(home) as led:
        led.init("u1")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


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
    home.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (home / "history").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="symbolic link"):
        Ledger(home)
