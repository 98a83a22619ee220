"""Everything a plan command started, found and stopped.

A command runs in a process group of its own, but what it starts may leave that
group (``setsid``, coreutils ``timeout``, a daemon that forks twice). So each run of
a command carries a random id in its environment, ``LEDGER_COMMAND_ID``, which every
process it starts inherits; ``apply`` finds them all by that id in
``/proc/<pid>/environ``, whatever their group or parent. While a run lasts, ``apply``
is also a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): orphans of its
commands become its children instead of init's, so that one which dropped the id
from its environment is still found while its command runs alone, and none is left a
zombie.

Linux only (``/proc``); elsewhere only the process group is stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

TOKEN_VAR = "LEDGER_COMMAND_ID"  # noqa: S105 (a variable name, not a secret)
#: How long stopped processes get to exit after SIGKILL before they count as survivors.
KILL_WAIT_S = 10.0
_PR_SET_CHILD_SUBREAPER = 36

#: The shells of the commands running now (``subprocess`` reaps them itself: a
#: ``waitpid`` here would steal their exit status).
SHELLS: set[int] = set()
#: While this process is a subreaper: its children from before (never strays).
_before: set[int] | None = None


@dataclass(frozen=True)
class Proc:
    """One line of the process table."""

    pid: int
    ppid: int
    pgrp: int
    state: str

    @property
    def alive(self) -> bool:
        """Not a zombie (a zombie has ended; only its exit status is left)."""
        return self.state not in ("Z", "X")


def table() -> dict[int, Proc]:
    """Every process this one can see, from ``/proc``."""
    out: dict[int, Proc] = {}
    try:
        names = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return out
    for name in names:
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read(4096).rpartition(b")")[2].split()
        except OSError:
            continue
        # After the command name: state, ppid, pgrp (fields 3 to 5 of proc(5)).
        if len(fields) > 2:
            out[int(name)] = Proc(int(name), int(fields[1]), int(fields[2]),
                                  fields[0].decode("ascii", "replace"))
    return out


def carries(pid: int, token: str) -> bool:
    """Whether process *pid* was started with ``LEDGER_COMMAND_ID=<token>``."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = fh.read()
    except OSError:
        return False
    return f"{TOKEN_VAR}={token}".encode() in env.split(b"\0")


def _stray(p: Proc) -> bool:
    """An orphan this subreaper adopted: its child, but neither a running command's
    shell nor a child it had before the run."""
    return _before is not None and p.ppid == os.getpid() and p.pid not in SHELLS \
        and p.pid not in _before


def members(token: str, pgid: int | None = None, *, strays: bool = False,
            procs: dict[int, Proc] | None = None) -> set[int]:
    """The live processes of one command run: those carrying *token*, the members of
    its process group *pgid*, and their descendants; with *strays*, also the orphans
    this process adopted as a subreaper."""
    procs = table() if procs is None else procs
    found = {p.pid for p in procs.values() if p.alive and (
        p.pgrp == pgid or carries(p.pid, token) or (strays and _stray(p)))}
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found and procs[child].alive:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return found


def stop(token: str, pgid: int | None, *, grace_s: float, strays: bool = False,
         ) -> list[int]:
    """End every process of a command run: SIGTERM, then after *grace_s* SIGKILL, and
    wait until they are gone. Returns the pids still alive after that (none, unless a
    process cannot be killed: another user's, or stuck in the kernel)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, KILL_WAIT_S)):
        left = members(token, pgid, strays=strays)
        if not left:
            return []
        signal_all(left, pgid, sig)
        deadline = time.monotonic() + wait_s
        while left and time.monotonic() < deadline:
            time.sleep(0.02)
            reap()
            left = members(token, pgid, strays=strays)
            if left and sig == signal.SIGKILL:
                signal_all(left, pgid, sig)  # started meanwhile by one not yet killed
    reap()
    return sorted(members(token, pgid, strays=strays))


def kill_now(token: str, pgid: int | None, *, strays: bool = False) -> list[int]:
    """What a command left behind when its shell exited: killed without a grace (the
    documented rule for what a command leaves running), then waited for as ``stop``
    does."""
    return stop(token, pgid, grace_s=0.0, strays=strays)


def signal_all(pids: Iterable[int], pgid: int | None, sig: signal.Signals) -> None:
    """Send *sig* to the process group *pgid* (if any) and to each of *pids*."""
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def reap() -> None:
    """Collect the exit status of the orphans this subreaper adopted that ended (no
    ``subprocess.Popen`` waits for them; left alone they stay zombies)."""
    for p in table().values():
        if not p.alive and _stray(p):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """While inside, this process adopts the orphans of its descendants (Linux);
    yields whether it could. Adopted orphans that ended are collected on the way out."""
    global _before  # noqa: PLW0603 -- one process, one subreaper setting
    if _before is not None or not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
        yield _before is not None
        return
    _before = {p.pid for p in table().values() if p.ppid == os.getpid()}
    try:
        yield True
    finally:
        reap()
        _before = None
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
