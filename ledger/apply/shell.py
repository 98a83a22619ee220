"""Running one plan command: ``/bin/sh -c``, its own session, its output pumped into
a capped log, a timeout, and a stop that reaches everything it started.

A command runs in a new session (so a Ctrl-C at the terminal reaches ``apply``
only, which then stops its commands itself) and is polled, never waited on, so one
process can drive several at once. Its output comes back through a pipe that
``apply`` reads as it polls (``ledger.apply.cmdlog`` caps the log). A timeout or a
stop sends SIGTERM to the command's group and to every process it started
(``ledger.apply.contain``), SIGKILL after ``KILL_GRACE_S``; when the command's
shell exits, whatever it left running is killed too, and the result is only
returned once all of it is gone.

While a command runs, a record of it (its process group, the id every process it
starts carries, boot id) sits in ``<home>/logs/.running/``. If ``apply`` itself is
killed (SIGKILL, power loss), its commands outlive it; the next ``apply`` calls
``stop_leftovers`` before it touches anything, so an old upgrade command never runs
beside a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ledger.apply import contain
from ledger.apply.cmdlog import CommandLog, header
from ledger.core import clock, host
from ledger.store.files import open_private_file, write_all
from ledger.store.home import Home

SHELL = "/bin/sh"
KILL_GRACE_S = 5.0
MAX_CAPTURE = 4096  # a probe prints one version; more is not read
READ_CHUNK = 64 * 1024
#: Reads per poll: one loud command cannot hold up the others for long.
READS_PER_POLL = 64
#: Pipe buffer asked for (Linux ``F_SETPIPE_SZ``; the default is 64 KiB).
PIPE_BYTES = 1024 * 1024
_F_SETPIPE_SZ = 1031


@dataclass
class Result:
    """How a command ended."""

    returncode: int | None
    duration_s: float
    timed_out: bool = False
    stopped: bool = False
    output: str = ""  # stdout, only for captured commands (probes)
    tail: list[str] = field(default_factory=list)
    timeout_s: float | None = None
    #: Processes the command started that could not be stopped (pids).
    survivors: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.stopped \
            and not self.survivors

    @property
    def verdict(self) -> str:
        """``exit 1``, ``timed out``, ``stopped``, ``killed by SIGKILL``…"""
        if self.timed_out:
            return "timed out"
        if self.stopped:
            return "stopped"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exit {self.returncode}"

    def describe(self) -> str:
        """The verdict in a message: ``exit 1``, ``timed out after 5 s``…"""
        text = self.verdict
        if self.timed_out:
            text += f" after {self.duration_s:.3g} s"
        if self.survivors:
            text += (f"; {len(self.survivors)} process(es) it started could not be "
                     f"stopped ({', '.join(map(str, self.survivors))})")
        return text


class Running:
    """One command started with ``/bin/sh -c``; ``poll`` it until it returns a Result.

    *log* receives the command's output (stdout and stderr) after a header line;
    ``None`` keeps only its last lines in memory (a dry run writes nothing under the
    home). With *capture*, stdout is kept apart and returned as ``output``.
    """

    def __init__(self, command: str, *, env: Mapping[str, str], cwd: Path, timeout_s: float,
                 log: Path | None, label: str, capture: bool = False,
                 records: Path | None = None) -> None:
        self.timeout_s = timeout_s
        self.label = label
        self.token = os.urandom(16).hex()
        self._kill_at: float | None = None
        self._timed_out = False
        self._stopped = False
        self._result: Result | None = None
        self._record: Path | None = None
        self._log = CommandLog(log, header(label, timeout_s, command))
        if records is not None:
            self._record = _write_record(records, self.token, None, log, label)
        # Closed in _finish, once the command has ended.
        self._capture: IO[bytes] | None = (
            tempfile.TemporaryFile() if capture else None)  # noqa: SIM115
        reader, writer = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(writer, _F_SETPIPE_SZ, PIPE_BYTES)
        try:
            self.proc = subprocess.Popen(
                [SHELL, "-c", command], stdin=subprocess.DEVNULL,
                stdout=self._capture or writer, stderr=writer, cwd=cwd,
                env={**env, contain.TOKEN_VAR: self.token}, start_new_session=True,
                close_fds=True)
        except OSError:
            os.close(reader)
            self._log.close("<== could not start\n")
            if self._record is not None:
                self._record.unlink()
            raise
        finally:
            os.close(writer)
        self.started = time.monotonic()
        contain.SHELLS.add(self.proc.pid)
        os.set_blocking(reader, False)
        self._pipe: int | None = reader
        if self._record is not None:
            _write_record(self._record.parent, self.token, self.proc.pid, log, label)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int | None:
        """The pipe its output comes through, while open (to wait on it)."""
        return self._pipe

    def stop(self) -> None:
        """Ask the command to end now (SIGTERM to all it started, SIGKILL after a grace)."""
        if self._kill_at is None and self._result is None:
            self._stopped = True
            self._signal(signal.SIGTERM)
            self._kill_at = time.monotonic() + KILL_GRACE_S

    def poll(self) -> Result | None:
        """The result once the command and all it started have ended, else None (and
        enforce the timeout). Once there is a result, every later call returns it."""
        if self._result is not None:
            return self._result
        self._pump(READS_PER_POLL)
        now = time.monotonic()
        code = self.proc.poll()
        if code is None:
            if self._kill_at is None and now - self.started > self.timeout_s:
                self._timed_out = True
                self._signal(signal.SIGTERM)
                self._kill_at = now + KILL_GRACE_S
            elif self._kill_at is not None and now >= self._kill_at:
                self._signal(signal.SIGKILL)
                self._kill_at = now + 3600.0
            return None
        contain.SHELLS.discard(self.proc.pid)
        # The shell is gone; whatever it left running goes with it, before the
        # result says the step is over.
        survivors = contain.kill_now(self.token, self.proc.pid, strays=not contain.SHELLS)
        self._pump(None)
        self._result = self._finish(code, now - self.started, survivors)
        return self._result

    def wait(self) -> Result:
        """Poll until the command ends (used where only one command runs)."""
        while (result := self.poll()) is None:
            wait_readable([self], 0.01)
        return result

    def _signal(self, sig: signal.Signals) -> None:
        strays = {self.proc.pid} == contain.SHELLS
        contain.signal_all(contain.members(self.token, self.proc.pid, strays=strays),
                           self.proc.pid, sig)

    def _pump(self, reads: int | None) -> None:
        """Move what the command printed from the pipe to the log: at most *reads*
        chunks, or (None) all there is, never waiting for more."""
        count = 0
        while self._pipe is not None and (reads is None or count < reads):
            count += 1
            try:
                data = os.read(self._pipe, READ_CHUNK)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if data:
                self._log.feed(data)
                continue
            os.close(self._pipe)  # end of output: every writer has closed it
            self._pipe = None
        if reads is None and self._pipe is not None:
            # A process out of reach still holds the pipe: never wait on it.
            os.close(self._pipe)
            self._pipe = None

    def _finish(self, code: int, duration: float, survivors: list[int]) -> Result:
        result = Result(code, round(duration, 3), timed_out=self._timed_out,
                        stopped=self._stopped and not self._timed_out,
                        timeout_s=self.timeout_s, survivors=survivors)
        if self._capture is not None:
            self._capture.seek(0)
            result.output = self._capture.read(MAX_CAPTURE).decode("utf-8", "replace")
            self._capture.close()
            if result.output:
                self._log.note(f"  (printed) {result.output.strip()[:200]}\n")
        limit = f" (timeout {self.timeout_s:g} s)" if self._timed_out else ""
        left = (f"; still running: {' '.join(map(str, survivors))}" if survivors else "")
        self._log.close(f"<== {result.verdict} after {duration:.3f} s{limit}{left}\n")
        result.tail = self._log.tail()
        if self._record is not None and not survivors:
            # Kept while something survives, so that a later run stops it.
            with contextlib.suppress(OSError):
                self._record.unlink()
        return result


def wait_readable(commands: list[Running], timeout_s: float) -> None:
    """Sleep up to *timeout_s*, waking early when one of *commands* printed something."""
    fds = [fd for c in commands if (fd := c.fileno()) is not None]
    if fds:
        select.select(fds, [], [], timeout_s)
    else:
        time.sleep(timeout_s)


# -- leftovers of a killed run ---------------------------------------------------------

# A record is one line: pid|start ticks|boot id|command id|log|label.


def _write_record(records: Path, token: str, pid: int | None, log: Path | None,
                  label: str) -> Path:
    """Write the record of a command run in *records* (a folder the caller checked)."""
    path = records / token
    ticks = host.start_ticks(pid) if pid is not None else None
    line = (f"{pid or ''}|{ticks or ''}|{host.boot_id() or ''}|{token}|{log or ''}|"
            f"{label}\n")
    fd = open_private_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(fd, line.encode("utf-8", "replace"))
    finally:
        os.close(fd)
    return path


def stop_leftovers(home: Home, records: Path,
                   grace_s: float = KILL_GRACE_S) -> list[dict[str, str]]:
    """Stop the commands a dead ``apply`` left running; return what was stopped.

    Every process carrying a recorded command's id is stopped, and its process group
    when the group's leader is the very process recorded (same boot, same start time:
    not a reused PID) or is gone while members remain. The caller must hold the
    upgrade lock: then no live ``apply`` owns any record here. The records' folder
    (a folder of *home*) is looked at first: a link planted there is refused.
    """
    home.private_dir(records, create=False)
    stopped = []
    try:
        entries = sorted(records.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            fields = entry.read_text().strip().split("|", 5)
        except (OSError, UnicodeDecodeError):
            fields = []
        if len(fields) == 5 or (len(fields) == 6 and fields[3].startswith("/")):
            # Written before command ids: pid|ticks|boot|log|label.
            fields = [*fields[:3], "", *"|".join(fields[3:]).split("|", 1)]
        if len(fields) == 6 and fields[2] in ("", host.boot_id() or ""):
            pgid = int(fields[0]) if fields[0].isdigit() and _ours(fields) else None
            token = fields[3]
            if pgid is not None or contain.members(token):
                contain.stop(token, pgid, grace_s=grace_s)
                if fields[4]:
                    _note(home, Path(fields[4]), f"<== {clock.now()} stopped by a later "
                          "apply: the run that started this command was gone\n")
                stopped.append({"pid": fields[0], "command": fields[5], "log": fields[4]})
        with contextlib.suppress(OSError):
            entry.unlink()
    return stopped


def _note(home: Home, log: Path, text: str) -> None:
    """Append *text* to a command's log, if it is still a log of *home* (best effort)."""
    with contextlib.suppress(OSError):  # StorageError included: a note is not worth more
        home.private_dir(log.parent, create=False)
        fd = open_private_file(log, os.O_WRONLY | os.O_APPEND)
        try:
            write_all(fd, text.encode())
        finally:
            os.close(fd)


def _ours(fields: list[str]) -> bool:
    """Whether the recorded group leader is the very process recorded (or is gone
    while members of its group remain)."""
    pid, ticks = int(fields[0]), fields[1]
    now_ticks = host.start_ticks(pid)
    if now_ticks is not None:
        return str(now_ticks) == ticks
    try:
        os.killpg(pid, 0)  # the leader is gone; are members of its group left?
    except (ProcessLookupError, PermissionError):
        return False
    return True
