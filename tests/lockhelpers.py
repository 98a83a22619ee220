"""A child process for the lock tests: ``python tests/lockhelpers.py COMMAND LOCK ...``.

Each command is one role a real process plays against the lock. Children talk to the
test over lines: they print what happened on stdout, and the commands that wait
read lines from stdin (``go``, ``release``, ``exit``), so a test can start many of
them together and decide when each one lets go. Only ``ledger.lock`` is imported, to
keep start-up quick.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ledger.errors import BadInput, LockHeld, LockTimeout, NotLockOwner
from ledger.lock import DirLock

breaks: list[dict[str, object]] = []


def say(*words: object) -> None:
    print(*words, flush=True)


def make_lock(path: str) -> DirLock:
    return DirLock(Path(path), on_break=breaks.append)


def try_acquire(lock: DirLock, wait_s: float = 0.0, poll_s: float = 0.05) -> bool:
    """Acquire, print the outcome (and any break), return whether it was acquired."""
    try:
        lock.acquire(wait_s=wait_s, poll_s=poll_s)
    except LockTimeout as exc:
        say("timeout", exc)
        return False
    except LockHeld as exc:
        say("held", exc)
        return False
    for event in breaks:
        say("break", json.dumps(event, sort_keys=True))
    say("acquired", os.getpid())
    return True


def obey(lock: DirLock) -> None:
    """Wait for orders on stdin: ``release``, ``exit`` (no release) or end of input."""
    for line in sys.stdin:
        order = line.strip()
        if order == "release":
            try:
                say("released", lock.release())
            except NotLockOwner as exc:
                say("notowner", exc)
        elif order == "exit":
            break
    os._exit(0)  # leave without releasing: the lock stays behind, as after a crash


def cmd_hold(path: str) -> None:
    """Take the lock at once (no waiting), report, then obey."""
    lock = make_lock(path)
    try_acquire(lock)
    obey(lock)


def cmd_try(path: str, wait_s: str = "0") -> None:
    """Say ready, wait for ``go``, try once (waiting up to wait_s), report, then obey."""
    lock = make_lock(path)
    say("ready")
    sys.stdin.readline()
    try_acquire(lock, float(wait_s), 0.01)
    obey(lock)


def cmd_release(path: str) -> None:
    """Release as this process, which never held the lock."""
    try:
        say("released", make_lock(path).release())
    except NotLockOwner as exc:
        say("notowner", exc)


def cmd_reenter(path: str) -> None:
    """Acquire twice in one process, report both records, then obey."""
    lock = make_lock(path)
    first = lock.acquire()
    second = lock.acquire()
    say("twice", first == second, json.dumps(second.as_dict()))
    obey(lock)


def cmd_umask(path: str, umask: str) -> None:
    """Acquire under the given (octal) umask and exit without releasing."""
    os.umask(int(umask, 8))
    make_lock(path).acquire()
    say("acquired", os.getpid())


def cmd_counter(path: str, counter: str, rounds: str, pause: str) -> None:
    """Increment a counter file under the lock, ``rounds`` times.

    The read and the write are apart by ``pause`` seconds, and a marker file made with
    O_EXCL while inside proves that no two processes are ever inside together.
    """
    lock = make_lock(path)
    marker = counter + ".inside"
    for _ in range(int(rounds)):
        lock.acquire(wait_s=60, poll_s=0.001)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            say("overlap")
            os._exit(3)
        os.close(fd)
        value = int(Path(counter).read_text() or "0")
        if float(pause):
            time.sleep(float(pause))
        Path(counter).write_text(str(value + 1))
        os.unlink(marker)
        lock.release()
    say("done")


def cmd_append(path: str, state: str, worker: str, rounds: str) -> None:
    """Read-modify-write a JSON document under the lock: append one entry per round."""
    lock = make_lock(path)
    for i in range(int(rounds)):
        lock.acquire(wait_s=60, poll_s=0.001)
        doc = json.loads(Path(state).read_text())
        doc["entries"].append(f"{worker}-{i}")
        time.sleep(0.0005)
        Path(state).write_text(json.dumps(doc))
        lock.release()
    say("done")


def cmd_race(path: str) -> None:
    """One racer per round: on each ``go ROUND`` line, try to take the (stale) lock once."""
    lock = make_lock(path)
    say("ready")
    for line in sys.stdin:
        round_no = line.split()[1]
        before = len(breaks)
        try:
            lock.acquire()
            outcome = "won"
        except LockHeld:
            outcome = "held"
        say(round_no, outcome, len(breaks) - before)


def cmd_badpid(path: str, pid: str) -> None:
    """Acquire for a PID given on the command line; report whether it was refused."""
    try:
        make_lock(path).acquire(int(pid))
    except BadInput as exc:
        say("badinput", exc)
    else:
        say("acquired", pid)


def cmd_status_as(path: str, uid: str) -> None:
    """Drop to another user (started as root), then report the lock's status as JSON."""
    os.setgid(int(uid))
    os.setuid(int(uid))
    say(json.dumps(DirLock(Path(path), timeout_s=60).status().as_dict()))


COMMANDS = {
    "status-as": cmd_status_as,
    "hold": cmd_hold,
    "try": cmd_try,
    "release": cmd_release,
    "reenter": cmd_reenter,
    "umask": cmd_umask,
    "counter": cmd_counter,
    "append": cmd_append,
    "race": cmd_race,
    "badpid": cmd_badpid,
}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
