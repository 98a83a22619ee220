"""The exclusive lock, exercised by real processes (see tests/lockhelpers.py).

Holders that must be alive are real processes: helper children that took the lock,
or a plain ``sleep`` whose PID and start time a test writes into lock.info. Holders
that must be gone are processes that exited or were killed.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ledger.core.host import boot_id as local_boot_id
from ledger.errors import BadInput, LockHeld, LockTimeout, NotLockOwner, StorageError
from ledger.lock import DirLock, Holder, LockStatus
from ledger.lock.dirlock import _LockMoved, _snapshot
from ledger.lock.record import local_hostname

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).resolve().with_name("lockhelpers.py")
CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}


# --- real processes ----------------------------------------------------------------


class Child:
    """A helper process; its stdout is read line by line with a timeout."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=CHILD_ENV, bufsize=0,
        )
        self.pid = self.proc.pid
        self._buf = b""

    def readline(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"child {self.pid} said nothing for {timeout}s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"child {self.pid} exited ({self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")

    def finish(self, timeout: float = 30.0) -> int:
        """Close stdin (the child leaves without releasing) and collect it."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        code = self.proc.wait(timeout)
        self.proc.stdout.close()
        return code


@pytest.fixture
def children():
    made: list[Child] = []

    def make(*args: str) -> Child:
        child = Child(*args)
        made.append(child)
        return child

    yield make
    for child in made:
        if child.proc.poll() is None:
            child.proc.kill()
        child.finish()


@pytest.fixture
def sleeper():
    """A live process that is not a lock user: a PID to write into lock.info."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "upgrade.lock.d"


def start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat (1 for a process that is gone)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return 1
    return int(data.rpartition(b")")[2].split()[19])


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def utc(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


def plant(lock_path: Path, line: str, *, age_s: float | None = None) -> None:
    """Make a lock folder holding a lock.info written by someone else."""
    lock_path.mkdir(mode=0o700)
    (lock_path / "lock.info").write_text(line + "\n")
    if age_s is not None:
        then = time.time() - age_s
        os.utime(lock_path, (then, then))


def record(pid: int, *, ts: str | None = None, host: str | None = None,
           ticks: int | None = None, boot: str | None = None) -> str:
    """A six-field lock.info line for pid, on this host and boot unless told otherwise."""
    return "|".join([
        str(pid), ts or utc(0), host or local_hostname(), "someone",
        str(start_ticks(pid) if ticks is None else ticks), boot or local_boot_id() or "",
    ])


def info(lock_path: Path) -> str:
    return (lock_path / "lock.info").read_text()


# --- the nine classic scenarios -------------------------------------------------------


@pytest.mark.slow
def test_concurrent_acquisition_has_exactly_one_winner(lock_path, children):
    racers = [children("try", str(lock_path)) for _ in range(8)]
    for child in racers:
        assert child.readline() == "ready"
    for child in racers:
        child.send("go")
    outcomes = [child.readline() for child in racers]
    winners = [c for c, said in zip(racers, outcomes, strict=True) if said.startswith("acquired")]
    assert len(winners) == 1, outcomes
    assert info(lock_path).split("|")[0] == str(winners[0].pid)
    for said in outcomes:
        assert said.startswith("acquired") or f"held by PID {winners[0].pid}" in said


@pytest.mark.slow
def test_concurrent_workers_never_overlap_and_lose_no_increment(lock_path, tmp_path, children):
    counter = tmp_path / "counter"
    counter.write_text("0")
    workers = [children("counter", str(lock_path), str(counter), "40", "0.0005")
               for _ in range(6)]
    assert [w.readline(60) for w in workers] == ["done"] * 6
    assert counter.read_text() == "240"
    assert not lock_path.exists()


@pytest.mark.slow
def test_sequential_acquisition_each_process_gets_the_lock(lock_path, tmp_path, children):
    counter = tmp_path / "counter"
    counter.write_text("0")
    for _ in range(4):
        child = children("counter", str(lock_path), str(counter), "1", "0")
        assert child.readline() == "done"
        assert child.finish() == 0
        assert not lock_path.exists()
    assert counter.read_text() == "4"


@pytest.mark.slow
def test_lock_prevents_lost_updates_to_a_shared_document(lock_path, tmp_path, children):
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"entries": []}))
    workers = [children("append", str(lock_path), str(state), f"w{n}", "20")
               for n in range(5)]
    assert [w.readline(60) for w in workers] == ["done"] * 5
    entries = json.loads(state.read_text())["entries"]
    assert sorted(entries) == sorted(f"w{n}-{i}" for n in range(5) for i in range(20))


def test_stale_lock_of_an_exited_holder_is_cleaned_up(lock_path, children):
    holder = children("hold", str(lock_path))
    assert holder.readline() == f"acquired {holder.pid}"
    holder.send("exit")
    holder.finish()
    events: list[dict] = []
    lock = DirLock(lock_path, on_break=events.append)
    status = lock.status()
    assert status.present and status.stale and f"PID {holder.pid} no longer exists" in status.reason
    assert not lock.is_held()
    assert lock.check_stale() is True
    assert not lock_path.exists()
    assert lock.check_stale() is False
    assert len(events) == 1
    assert events[0]["previous"]["pid"] == holder.pid
    assert events[0]["forced"] is False
    next_one = children("hold", str(lock_path))
    assert next_one.readline() == f"acquired {next_one.pid}"


def test_only_the_owner_can_release(lock_path, children):
    holder = children("hold", str(lock_path))
    assert holder.readline() == f"acquired {holder.pid}"
    before = info(lock_path)
    other = children("release", str(lock_path))
    said = other.readline()
    assert said.startswith("notowner") and f"held by PID {holder.pid}" in said
    with pytest.raises(NotLockOwner):
        DirLock(lock_path).release()
    assert info(lock_path) == before
    holder.send("release")
    assert holder.readline() == "released True"
    assert not lock_path.exists()
    assert DirLock(lock_path).release() is False


@pytest.mark.slow
def test_long_running_holder_keeps_others_out(lock_path, children):
    holder = children("hold", str(lock_path))
    assert holder.readline() == f"acquired {holder.pid}"
    tries = [children("try", str(lock_path)) for _ in range(3)]
    waiter = children("try", str(lock_path), "0.3")
    for child in [*tries, waiter]:
        assert child.readline() == "ready"
        child.send("go")
    for child in tries:
        assert child.readline().startswith(f"held lock held by PID {holder.pid} on ")
    assert waiter.readline().startswith("timeout timed out after 0.3s")
    with pytest.raises(LockTimeout) as caught:
        DirLock(lock_path).acquire(wait_s=0.1, poll_s=0.02)
    assert caught.value.holder.pid == holder.pid
    assert DirLock(lock_path).is_held()
    holder.send("release")
    assert holder.readline() == "released True"
    late = children("try", str(lock_path))
    assert late.readline() == "ready"
    late.send("go")
    assert late.readline() == f"acquired {late.pid}"


@pytest.mark.slow
def test_rapid_acquire_release_cycles(lock_path, tmp_path, children):
    counter = tmp_path / "counter"
    counter.write_text("0")
    workers = [children("counter", str(lock_path), str(counter), "300", "0") for _ in range(2)]
    assert [w.readline(60) for w in workers] == ["done"] * 2
    assert counter.read_text() == "600"
    assert not lock_path.exists()
    assert sorted(os.listdir(lock_path.parent)) == ["counter", "upgrade.lock.d.guard"]


def test_holder_killed_with_sigkill_is_taken_over(lock_path, children):
    holder = children("hold", str(lock_path))
    assert holder.readline() == f"acquired {holder.pid}"
    holder.proc.send_signal(signal.SIGKILL)
    # Not reaped yet on purpose: a zombie has exited, so its lock is stale already.
    deadline = time.monotonic() + 10
    while Path(f"/proc/{holder.pid}/stat").read_text().split(")")[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    events: list[dict] = []
    mine = DirLock(lock_path, on_break=events.append).acquire()
    assert mine.pid == os.getpid()
    assert len(events) == 1
    event = events[0]
    assert event["previous"]["pid"] == holder.pid
    assert event["reason"] == f"PID {holder.pid} no longer exists"
    assert event["forced"] is False and event["by_pid"] == os.getpid()
    assert set(event) >= {"previous", "age_s", "reason", "forced", "by_pid"}


# --- takeover races and the staleness rules ---------------------------------------------


@pytest.mark.slow
def test_sixteen_processes_racing_for_one_stale_lock_have_one_winner(lock_path, children):
    racers = [children("race", str(lock_path)) for _ in range(16)]
    for child in racers:
        assert child.readline() == "ready"
    me = os.getpid()
    stale_lines = [
        record(me, ticks=start_ticks(me) + 1),          # PID reused
        record(dead_pid()),                              # PID gone
        record(me, boot="00000000-0000-0000-0000-000000000000"),  # rebooted since
    ]
    for round_no in range(50):
        shutil.rmtree(lock_path, ignore_errors=True)
        plant(lock_path, stale_lines[round_no % 3])
        for child in racers:
            child.send(f"go {round_no}")
        results = [child.readline().split() for child in racers]
        assert all(r[0] == str(round_no) for r in results)
        winners = [c.pid for c, r in zip(racers, results, strict=True) if r[1] == "won"]
        assert len(winners) == 1, (round_no, results)
        assert sum(int(r[2]) for r in results) == 1, (round_no, results)
        assert info(lock_path).split("|")[0] == str(winners[0])
        leftovers = [n for n in os.listdir(lock_path.parent) if ".stale." in n]
        assert leftovers == []


def test_reused_pid_is_reclaimed(lock_path, sleeper):
    plant(lock_path, record(sleeper.pid, ticks=start_ticks(sleeper.pid) + 7))
    events: list[dict] = []
    lock = DirLock(lock_path, on_break=events.append)
    status = lock.status()
    assert status.stale and "PID reuse" in status.reason
    assert lock.acquire().pid == os.getpid()
    assert "PID reuse" in events[0]["reason"]
    assert events[0]["previous"]["pid"] == sleeper.pid


def test_live_holder_with_matching_start_time_is_not_reclaimed(lock_path, sleeper):
    line = record(sleeper.pid)
    plant(lock_path, line)
    with pytest.raises(LockHeld) as caught:
        DirLock(lock_path).acquire()
    assert str(caught.value).startswith(f"lock held by PID {sleeper.pid} on {local_hostname()}")
    assert info(lock_path) == line + "\n"


def test_live_holder_older_than_the_timeout_is_suspect_but_kept(lock_path, sleeper):
    line = record(sleeper.pid, ts="2001-01-01T00:00:00Z")
    plant(lock_path, line, age_s=10 * 86400)
    events: list[dict] = []
    lock = DirLock(lock_path, timeout_s=60, on_break=events.append)
    status = lock.status()
    assert status.present and status.suspect and not status.stale
    assert "suspect" in status.reason and "forced break" in status.reason
    assert lock.is_held()
    with pytest.raises(LockHeld) as caught:
        lock.acquire()
    assert "suspect" in str(caught.value)
    assert lock.check_stale() is False
    assert info(lock_path) == line + "\n"
    assert events == []


def test_lock_from_another_host_is_held_until_the_timeout(lock_path):
    lock = DirLock(lock_path, timeout_s=60)
    other = f"4242|{utc(30)}|elsewhere.example|ops|1234|{local_boot_id()}"
    plant(lock_path, other)
    status = lock.status()
    assert status.present and not status.stale and "another host" in status.reason
    with pytest.raises(LockHeld):
        lock.acquire()
    assert lock.check_stale() is False
    shutil.rmtree(lock_path)
    plant(lock_path, f"4242|{utc(120)}|elsewhere.example|ops|1234|{local_boot_id()}")
    events: list[dict] = []
    lock = DirLock(lock_path, timeout_s=60, on_break=events.append)
    assert lock.acquire().pid == os.getpid()
    assert "another host" in events[0]["reason"] and "timeout" in events[0]["reason"]
    assert events[0]["previous"]["hostname"] == "elsewhere.example"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_holder_of_another_user_is_judged_by_its_start_time(tmp_path, children):
    # kill(pid, 0) gives EPERM for another user's process: it exists, but only its start
    # time (readable in /proc) tells it from a process that reused the PID.
    shared = Path(tempfile.mkdtemp(prefix="locktest-"))
    try:
        shared.chmod(0o755)
        me = os.getpid()
        cases = {
            "live": (record(me), False),
            "reused": (record(me, ticks=start_ticks(me) + 1), True),
            "legacy-young": (f"{me}|{utc(10)}|{local_hostname()}|root", False),
            "legacy-old": (f"{me}|{utc(600)}|{local_hostname()}|root", True),
        }
        for name, (line, stale) in cases.items():
            path = shared / name
            plant(path, line)
            path.chmod(0o755)
            (path / "lock.info").chmod(0o644)
            status = json.loads(children("status-as", str(path), "65534").readline())
            assert status["held"] is not stale and status["stale"] is stale, (name, status)
            if name == "legacy-young":
                assert "belongs to another user" in status["reason"]
    finally:
        shutil.rmtree(shared)


def test_lock_from_before_a_reboot_is_stale(lock_path, sleeper):
    plant(lock_path, record(sleeper.pid, boot="11111111-2222-3333-4444-555555555555"))
    status = DirLock(lock_path).status()
    assert status.stale and "rebooted" in status.reason


@pytest.mark.parametrize("content", [None, "", "tempfile"])
def test_lock_folder_without_a_record_is_reclaimed_after_the_grace(lock_path, content):
    lock_path.mkdir()
    if content == "":
        (lock_path / "lock.info").write_bytes(b"")
    elif content == "tempfile":
        (lock_path / ".lock.info.999.abcd").write_text("half a li")
    events: list[dict] = []
    lock = DirLock(lock_path, grace_s=2, on_break=events.append)
    status = lock.status()
    assert status.present and not status.stale and "being created" in status.reason
    with pytest.raises(LockHeld):
        lock.acquire()
    then = time.time() - 3
    os.utime(lock_path, (then, then))
    assert lock.status().stale
    assert lock.acquire().pid == os.getpid()
    assert len(events) == 1 and events[0]["previous"] is None
    assert "grace" in events[0]["reason"]
    assert os.listdir(lock_path) == ["lock.info"]


def test_four_field_legacy_record_is_understood(lock_path, sleeper):
    line = f"{sleeper.pid}|{utc(5)}|{local_hostname()}|olduser"
    plant(lock_path, line)
    status = DirLock(lock_path).status()
    assert status.holder == Holder(sleeper.pid, line.split("|")[1], local_hostname(), "olduser")
    assert status.present and not status.stale and "4-field" in status.reason
    with pytest.raises(LockHeld):
        DirLock(lock_path).acquire()
    shutil.rmtree(lock_path)
    gone = dead_pid()
    plant(lock_path, f"{gone}|{utc(5)}|{local_hostname()}|olduser")
    assert DirLock(lock_path).status().stale
    assert DirLock(lock_path).acquire().pid == os.getpid()
    shutil.rmtree(lock_path)
    plant(lock_path, f"{gone}|{utc(5)}|elsewhere.example|olduser")
    assert not DirLock(lock_path, timeout_s=60).status().stale


def test_holder_parse_and_format():
    six = "123|2024-02-29T23:59:59Z|host-a|alice|98765|0f1e2d3c-aaaa-bbbb-cccc-0123456789ab"
    holder = Holder.parse(six + "\n")
    assert holder.start_ticks == 98765 and holder.user == "alice"
    assert holder.format() == six
    assert Holder.parse("7|2024-01-01T00:00:00Z|h|u").format() == "7|2024-01-01T00:00:00Z|h|u"
    weird = Holder(5, None, "a|b", "new\nline", 1, None)
    assert weird.format() == "5||a_b|new_line|1|"
    assert Holder.parse(weird.format()).hostname == "a_b"
    for bad in ["", "abc|x|y|z", "0|2024-01-01T00:00:00Z|h|u", "-3|||", "1|2|3", "1|||||||",
                "1|2024-13-01T00:00:00Z|h|u", "1|2023-02-29T00:00:00Z|h|u", "1|yesterday|h|u",
                "1||h|u|12x|b", "1||h|u|1|not a boot id", "1||h|u\n2||h|u", "1||h\x00|u",
                "9" * 5000 + "|||"]:
        with pytest.raises(BadInput):
            Holder.parse(bad)


HOSTILE = {
    "symlink": "lock.info is a symbolic link",
    "folder": "lock.info is a folder",
    "garbage": "lock.info is not a valid record (not UTF-8 text)",
    "overlong": "lock.info is longer than 4096 bytes",
    "lockpath-file": "the lock path is not a folder",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_lock_info_never_crashes_nor_makes_a_second_holder(lock_path, tmp_path, kind):
    # The link points at a record of a dead process: followed, it would read as stale.
    precious = tmp_path / "precious.txt"
    precious.write_text(record(dead_pid()) + "\n")
    kept = precious.read_text()
    old = time.time() - 1000
    os.utime(precious, (old, old))
    if kind == "lockpath-file":
        lock_path.write_text("not a folder\n")
    else:
        lock_path.mkdir()
    target = lock_path / "lock.info"
    if kind == "symlink":
        target.symlink_to(precious)
    elif kind == "folder":
        target.mkdir()
        (target / "inner").write_text("x")
    elif kind == "garbage":
        target.write_bytes(b"\x00\xff\xfe not | a | lock")
    elif kind == "overlong":
        target.write_text(record(dead_pid()) + " " * 5000)
    events: list[dict] = []
    lock = DirLock(lock_path, timeout_s=60, on_break=events.append)
    status = lock.status()
    assert status.present and not status.stale and status.holder is None
    assert status.reason.startswith(HOSTILE[kind] + ", so its holder cannot be judged")
    json.dumps(status.as_dict())
    with pytest.raises(LockHeld) as caught:
        lock.acquire()
    assert caught.value.holder is None
    assert lock.check_stale() is False
    with pytest.raises(NotLockOwner):
        lock.release()
    assert lock_path.exists() or lock_path.is_symlink()
    # Once older than the timeout it may be taken over; the link is never followed.
    then = time.time() - 120
    os.utime(lock_path, (then, then), follow_symlinks=False)
    assert lock.status().stale
    assert lock.acquire().pid == os.getpid()
    assert len(events) == 1 and events[0]["previous"] is None
    assert Holder.parse(info(lock_path)).pid == os.getpid()
    assert precious.read_text() == kept
    assert precious.stat().st_mtime == pytest.approx(old)
    assert sorted(os.listdir(tmp_path)) == ["precious.txt", "upgrade.lock.d",
                                            "upgrade.lock.d.guard"]


def test_lock_path_that_is_a_symlink_is_not_followed(lock_path, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    lock_path.symlink_to(elsewhere)
    lock = DirLock(lock_path, timeout_s=60)
    with pytest.raises(LockHeld):
        lock.acquire()
    assert lock.break_lock("a symlink is not a lock") is None
    assert not lock_path.is_symlink()
    assert (elsewhere / "keep").read_text() == "keep"
    lock.acquire()
    assert lock_path.is_dir() and not lock_path.is_symlink()


# --- input checks, modes, ownership ------------------------------------------------------


@pytest.mark.parametrize("pid", [0, -1, "abc", "123", True, False, 1.5, 2**64, None])
def test_bad_owner_pid_is_refused(lock_path, pid):
    if pid is None:
        pid = dead_pid()
    lock = DirLock(lock_path)
    with pytest.raises(BadInput):
        lock.acquire(pid)
    with pytest.raises(BadInput):
        lock.release(pid)
    assert not lock_path.exists()


def test_dead_owner_pid_is_refused_in_a_child_too(lock_path, children):
    gone = dead_pid()
    child = children("badpid", str(lock_path), str(gone))
    assert child.readline() == f"badinput owner PID {gone} names no running process"


@pytest.mark.parametrize("name", ["timeout_s", "grace_s"])
@pytest.mark.parametrize("value", [-1, -0.5, math.nan, math.inf, -math.inf, 10**12, 10**400,
                                   True, "5", None])
def test_bad_durations_are_refused(lock_path, name, value):
    with pytest.raises(BadInput):
        DirLock(lock_path, **{name: value})


@pytest.mark.parametrize("name", ["wait_s", "poll_s"])
@pytest.mark.parametrize("value", [-1, math.nan, math.inf, 10**9, True, "1"])
def test_bad_waits_are_refused(lock_path, name, value):
    with pytest.raises(BadInput):
        DirLock(lock_path).acquire(**{name: value})
    assert not lock_path.exists()


def test_bad_paths_and_reasons_are_refused(lock_path):
    for path in ["", ".", "..", "/", 42]:
        with pytest.raises(BadInput):
            DirLock(path)
    lock = DirLock(lock_path)
    lock.acquire()
    for reason in ["", "   ", None, "two\nlines", "x" * 2000]:
        with pytest.raises(BadInput):
            lock.break_lock(reason)
    assert lock.is_held()


@pytest.mark.parametrize("umask", ["000", "777"])
def test_modes_are_private_whatever_the_umask(lock_path, children, umask):
    child = children("umask", str(lock_path), umask)
    assert child.readline() == f"acquired {child.pid}"
    child.finish()
    assert stat.S_IMODE(lock_path.stat().st_mode) == 0o700
    assert stat.S_IMODE((lock_path / "lock.info").stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(f"{lock_path}.guard").stat().st_mode) == 0o600


def test_lock_info_is_one_line_that_cut_can_read(lock_path, children):
    holder = children("hold", str(lock_path))
    assert holder.readline() == f"acquired {holder.pid}"
    text = info(lock_path)
    assert text.count("\n") == 1 and text.endswith("\n")
    pid, ts, host, user, ticks, boot = text.strip().split("|")
    assert (pid, host, ticks, boot) == (str(holder.pid), local_hostname(),
                                         str(start_ticks(holder.pid)), local_boot_id())
    assert time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ")
    assert user
    cut = subprocess.run(["cut", "-d|", "-f1", str(lock_path / "lock.info")],
                         capture_output=True, text=True, check=True)
    assert cut.stdout == f"{holder.pid}\n"


def test_reentrant_acquire_by_the_owner(lock_path, children):
    owner = children("reenter", str(lock_path))
    said = owner.readline().split(" ", 2)
    assert said[:2] == ["twice", "True"] and json.loads(said[2])["pid"] == owner.pid
    with pytest.raises(LockHeld):
        DirLock(lock_path).acquire()
    owner.send("release")
    assert owner.readline() == "released True"
    assert not lock_path.exists()


def test_acquire_on_behalf_of_another_process(lock_path, sleeper):
    lock = DirLock(lock_path)
    first = lock.acquire(sleeper.pid)
    assert first.pid == sleeper.pid and first.start_ticks == start_ticks(sleeper.pid)
    assert lock.acquire(sleeper.pid) == first
    with pytest.raises(LockHeld):
        lock.acquire()
    with pytest.raises(NotLockOwner):
        lock.release()
    assert lock.release(sleeper.pid) is True
    assert lock.release(sleeper.pid) is False


def test_forced_break_of_a_live_holder(lock_path, children):
    holder = children("hold", str(lock_path))
    assert holder.readline() == f"acquired {holder.pid}"
    events: list[dict] = []
    lock = DirLock(lock_path, on_break=events.append)
    broken = lock.break_lock("operator: the holder hangs on a prompt")
    assert broken is not None and broken.pid == holder.pid
    assert not lock_path.exists()
    assert len(events) == 1
    event = events[0]
    assert event["forced"] is True and event["stale"] is False
    assert event["reason"] == "operator: the holder hangs on a prompt"
    assert event["previous"]["pid"] == holder.pid and event["by_pid"] == os.getpid()
    assert event["age_s"] >= 0
    assert lock.break_lock("nothing there") is None
    assert len(events) == 1
    # The old holder cannot release the new holder's lock.
    lock.acquire()
    holder.send("release")
    assert holder.readline().startswith(f"notowner PID {holder.pid} does not hold the lock")
    assert lock.status().holder.pid == os.getpid()


def test_failing_on_break_leaves_a_consistent_lock(lock_path):
    def refuse(event: dict) -> None:
        raise RuntimeError("audit log unavailable")

    plant(lock_path, record(dead_pid()))
    lock = DirLock(lock_path, on_break=refuse)
    with pytest.raises(RuntimeError):
        lock.acquire()
    assert not lock_path.exists()  # the stale lock is gone and nobody holds the lock
    plant(lock_path, record(dead_pid()))
    with pytest.raises(RuntimeError):
        lock.check_stale()
    assert not lock_path.exists()
    assert DirLock(lock_path).acquire().pid == os.getpid()


def test_lock_changed_between_judgement_and_removal_is_put_back(lock_path, sleeper):
    # Under the guard only a process outside the protocol (the old bash library) can
    # change the lock after it was judged; the re-check after the rename must notice
    # and put back what it moved, never delete a lock it did not judge.
    lock_path.mkdir()
    lock = DirLock(lock_path, grace_s=0)
    judged = _snapshot(str(lock_path))
    assert lock._judge(judged, time.time() + 1).stale
    line = record(sleeper.pid)
    (lock_path / "lock.info").write_text(line + "\n")  # the slow writer arrives
    with pytest.raises(_LockMoved):
        lock._remove(judged, "stale")
    assert info(lock_path) == line + "\n"
    assert [n for n in os.listdir(lock_path.parent) if ".stale." in n] == []
    assert lock.status().holder.pid == sleeper.pid


def test_status_as_dict_shape(lock_path):
    lock = DirLock(lock_path)
    empty = lock.status().as_dict()
    assert empty == {"path": str(lock_path), "held": False, "stale": False, "suspect": False,
                     "reason": "not held", "age_s": None, "holder": None}
    lock.acquire()
    shape = lock.status().as_dict()
    assert list(shape) == ["path", "held", "stale", "suspect", "reason", "age_s", "holder"]
    assert shape["holder"]["pid"] == os.getpid()
    assert set(shape["holder"]) == {"pid", "timestamp", "hostname", "user", "start_ticks",
                                    "boot_id"}
    assert isinstance(lock.status(), LockStatus)
    json.dumps(shape)


def test_missing_parent_folder_is_a_clear_error(tmp_path):
    lock = DirLock(tmp_path / "no" / "such" / "upgrade.lock.d")
    with pytest.raises(StorageError) as caught:
        lock.acquire()
    assert "no/such" in str(caught.value)
