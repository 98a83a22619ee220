"""Starting a pusher from a step, without waiting for it.

A step of a shell script (``upgrade-ledger component complete ...``) must not wait on
the network, and must not pay for the PostgreSQL driver: after its change it only
looks whether a pusher runs for its home (a ``flock`` the pusher holds on
``HOME/fleet-push.lock``) and, when none does and this host has events the fleet
lacks, starts one in the background (``fleet push --follow --exit-when-idle``), in a
session of its own, its output to /dev/null. The pusher ships the change within a
second or so, follows the next steps, and exits once the host is idle.

Standard library only: this runs on the per-step path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ledger.api import Ledger

#: The pusher's lock file in the home; it holds the pusher's PID.
LOCK_NAME = "fleet-push.lock"
#: How long a pusher started by a step stays once nothing happens (seconds).
IDLE_EXIT_S = 30.0
#: What the started pusher must not inherit: the run's owner and a plan command's id
#: (``apply`` stops every process that carries its command's id).
_NOT_INHERITED = ("LEDGER_PID", "LEDGER_COMMAND_ID", "LEDGER_DB_URL")
#: Pushers this process started and has not reaped yet: a long-lived process (an
#: ``apply`` run, a Python program, a session serving a script's steps) reaps them
#: as they exit, so none stays a zombie.
_started: set[int] = set()


def lock_path(home_root: Path) -> Path:
    """The pusher's lock file of a home."""
    return home_root / LOCK_NAME


def open_lock(path: Path) -> int:
    """A descriptor on the lock file (made 0600 if missing, never through a link)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def try_lock(path: Path) -> int | None:
    """The lock file's descriptor, holding its ``flock``, or None when another
    process holds it. The holder writes its PID in it."""
    fd = open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def pusher_pid(home_root: Path) -> int | None:
    """The PID of the pusher running for this home, or None when none runs."""
    path = lock_path(home_root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            return int(text) if text.isdigit() else 0
        return None  # nobody holds it
    finally:
        os.close(fd)


def after_change(ledger: Ledger) -> None:
    """After a change of *ledger* (a SQLite ledger with a fleet URL): start a pusher
    when none runs and the fleet lacks some of this host's events. Never raises: the
    change is committed, and shipping it is never a reason for a step to fail."""
    with contextlib.suppress(Exception):
        _reap()
        root = ledger.home.root
        if pusher_pid(root) is not None or not _unshipped(ledger):
            return
        start(ledger)


def _reap() -> None:
    """Collect the exit status of the pushers this process started that ended."""
    for pid in list(_started):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere
            done = pid
        if done:
            _started.discard(pid)


def _open_fds() -> list[int]:
    """This process's open descriptors (every one that could be, without /proc). A
    descriptor closed meanwhile is no harm: posix_spawn ignores closing it."""
    try:
        return [int(entry.name) for entry in Path("/proc/self/fd").iterdir()]
    except OSError:
        return list(range(3, 1024))


def _unshipped(ledger: Ledger) -> bool:
    """Whether the ledger has events past those the last push shipped (by any host:
    checking every host's costs one index lookup and errs only towards a push)."""
    with ledger.db.read() as tx:
        row = tx.one("SELECT (SELECT MAX(id) FROM events) AS top, (SELECT shipped_event_id "
                     "FROM fleet_push WHERE host = :host) AS shipped")
    return row is not None and (row["top"] or 0) > (row["shipped"] or 0)


def start(ledger: Ledger) -> int | None:
    """Start a detached pusher for *ledger*'s home and host; return its PID (None when
    this interpreter cannot start one)."""
    if not sys.executable or ledger.fleet_url is None:
        return None
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    # The URL travels in the environment, not in the arguments everyone can read in ps.
    env["LEDGER_FLEET_URL"] = ledger.fleet_url
    argv = [sys.executable, "-m", "ledger", "--home", str(Path(ledger.home.root).absolute()),
            "--host-name", ledger.identity.name, "fleet", "push", "--follow",
            "--exit-when-idle", f"{IDLE_EXIT_S:g}", "--quiet"]
    null = os.devnull
    # A session of its own: the script's terminal, its Ctrl-C and its end are not the
    # pusher's. Its output goes nowhere: a script reading a step's output through a
    # pipe ($(...)) must not wait for the pusher to close it.
    # Nor does it keep any other descriptor the step inherited: a script's held flock
    # (`flock -n LOCK script`) or a pipe must be let go when the step ends.
    pid = os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, null, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, null, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, null, os.O_WRONLY, 0),
        *((os.POSIX_SPAWN_CLOSE, fd) for fd in _open_fds() if fd > 2)])
    _started.add(pid)
    return pid
