"""Running one plan command: ``/bin/sh -c``, its own process group, its output
appended to a log, a timeout, and a clean stop.

A command runs in a new session (so a Ctrl-C at the terminal reaches ``apply``
only, which then stops its commands itself) and is polled, never waited on, so one
process can drive several at once. A timeout or a stop sends SIGTERM to the whole
process group and SIGKILL after ``KILL_GRACE_S``.

While a command runs, a record of its process group (pid, start time, boot id) sits
in ``<home>/logs/.running/``. If ``apply`` itself is killed (SIGKILL, power loss),
its commands outlive it; the next ``apply`` calls ``stop_leftovers`` before it
touches anything, so an old upgrade command never runs beside a new one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ledger.core import clock, host
from ledger.store.files import FILE_MODE, make_private_dir

SHELL = "/bin/sh"
KILL_GRACE_S = 5.0
TAIL_LINES = 20
TAIL_BYTES = 64 * 1024
MAX_CAPTURE = 4096  # a probe prints one version; more is not read


@dataclass
class Result:
    """How a command ended."""

    returncode: int | None
    duration_s: float
    timed_out: bool = False
    stopped: bool = False
    output: str = ""  # stdout, only for captured commands (probes)
    tail: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.stopped

    def describe(self) -> str:
        """``exit 1``, ``timed out after 5 s``, ``killed by SIGKILL``…"""
        if self.timed_out:
            return f"timed out after {self.duration_s:.3g} s"
        if self.stopped:
            return "stopped"
        if self.returncode is not None and self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exit {self.returncode}"


class Running:
    """One command started with ``/bin/sh -c``; ``poll`` it until it returns a Result.

    *log* receives the command's output (stdout and stderr) after a header line;
    ``None`` sends it to an anonymous temporary file instead (a dry run writes nothing
    under the home). With *capture*, stdout is kept apart and returned as ``output``.
    """

    def __init__(self, command: str, *, env: Mapping[str, str], cwd: Path, timeout_s: float,
                 log: Path | None, label: str, capture: bool = False,
                 records: Path | None = None) -> None:
        self.timeout_s = timeout_s
        self.log = log
        self.label = label
        self.started = time.monotonic()
        self._kill_at: float | None = None
        self._timed_out = False
        self._stopped = False
        self._record: Path | None = None
        out = self._open_log(command)
        self._offset = out.tell()
        # Closed in _finish, once the command has ended.
        self._capture: IO[bytes] | None = (
            tempfile.TemporaryFile() if capture else None)  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [SHELL, "-c", command], stdin=subprocess.DEVNULL,
                stdout=self._capture or out, stderr=out, cwd=cwd, env=dict(env),
                start_new_session=True, close_fds=True)
        except OSError:
            out.close()
            raise
        self._out = out
        if records is not None:
            self._record = _write_record(records, self.proc.pid, log, label)

    def _open_log(self, command: str) -> IO[bytes]:
        if self.log is None:
            return tempfile.TemporaryFile()
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                     FILE_MODE)
        out = os.fdopen(fd, "ab")
        shown = command.strip().replace("\n", "\n    ")
        out.write(f"==> {clock.now()} {self.label} (timeout {self.timeout_s:g} s)\n"
                  f"  $ {shown}\n".encode())
        out.flush()
        return out

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """Ask the command to end now (SIGTERM to its group, SIGKILL after a grace)."""
        if self._kill_at is None:
            self._stopped = True
            self._signal(signal.SIGTERM)
            self._kill_at = time.monotonic() + KILL_GRACE_S

    def poll(self) -> Result | None:
        """The result once the command has ended, else None (and enforce the timeout)."""
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
        # The shell is gone; whatever it left in its group goes with it.
        self._signal(signal.SIGKILL)
        return self._finish(code, now - self.started)

    def wait(self) -> Result:
        """Poll until the command ends (used where only one command runs)."""
        while (result := self.poll()) is None:
            time.sleep(0.01)
        return result

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def _finish(self, code: int, duration: float) -> Result:
        result = Result(code, round(duration, 3), timed_out=self._timed_out,
                        stopped=self._stopped and not self._timed_out)
        if self._capture is not None:
            self._capture.seek(0)
            result.output = self._capture.read(MAX_CAPTURE).decode("utf-8", "replace")
            self._capture.close()
            if self.log is not None and result.output:
                self._out.write(f"  (printed) {result.output.strip()[:200]}\n".encode())
        self._out.write(f"<== {result.describe()} after {duration:.3f} s\n".encode())
        self._out.flush()
        result.tail = _tail(self.log, self._out, self._offset)
        self._out.close()
        if self._record is not None:
            with contextlib.suppress(OSError):
                self._record.unlink()
        return result


def _tail(log: Path | None, out: IO[bytes], offset: int) -> list[str]:
    """The last lines this command wrote to its log (header lines excluded)."""
    try:
        # The command's own log is opened write-only (O_APPEND): read it anew.
        fh = out if log is None else open(log, "rb")  # noqa: SIM115 -- closed below
        try:
            end = fh.seek(0, os.SEEK_END)
            start = max(offset, end - TAIL_BYTES)
            fh.seek(start)
            text = fh.read(end - start).decode("utf-8", "replace")
        finally:
            if fh is not out:
                fh.close()
    except OSError:
        return []
    lines = [line for line in text.splitlines() if not line.startswith(("==> ", "  $ ", "<== "))]
    return lines[-TAIL_LINES:]


# -- leftovers of a killed run ---------------------------------------------------------


def _write_record(records: Path, pid: int, log: Path | None, label: str) -> Path:
    make_private_dir(records)
    path = records / str(pid)
    line = f"{pid}|{host.start_ticks(pid) or ''}|{host.boot_id() or ''}|{log or ''}|{label}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "w") as fh:
        fh.write(line + "\n")
    return path


def stop_leftovers(records: Path, grace_s: float = KILL_GRACE_S) -> list[dict[str, str]]:
    """Stop the commands a dead ``apply`` left running; return what was stopped.

    Only a process group whose leader is the very process recorded (same boot, same
    start time: not a reused PID), or whose leader is gone while members remain, is
    signalled. The caller must hold the upgrade lock: then no live ``apply`` owns
    any record here.
    """
    stopped = []
    try:
        entries = sorted(records.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            fields = entry.read_text().strip().split("|", 4)
        except OSError:
            continue
        if len(fields) == 5 and fields[0].isdigit() and _ours(fields):
            pgid = int(fields[0])
            _end_group(pgid, grace_s)
            if fields[3]:
                with contextlib.suppress(OSError), open(fields[3], "ab") as log:
                    log.write(f"<== {clock.now()} stopped by a later apply: the run that "
                              "started this command was gone\n".encode())
            stopped.append({"pid": fields[0], "command": fields[4], "log": fields[3]})
        with contextlib.suppress(OSError):
            entry.unlink()
    return stopped


def _ours(fields: list[str]) -> bool:
    pid, ticks, boot = int(fields[0]), fields[1], fields[2]
    if boot and boot != (host.boot_id() or ""):
        return False  # recorded before a reboot: that process is long gone
    now_ticks = host.start_ticks(pid)
    if now_ticks is not None:
        return str(now_ticks) == ticks
    try:
        os.killpg(pid, 0)  # the leader is gone; are members of its group left?
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _end_group(pgid: int, grace_s: float) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.02)


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a member that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pids = [entry.name for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    except OSError:
        return True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read(4096).rpartition(b")")[2].split()
        except OSError:
            continue
        # After the command name: field 3 (state) is index 0, field 5 (pgrp) index 2.
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] not in (b"Z", b"X"):
            return True
    return False
