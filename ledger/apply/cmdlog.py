"""A command's log: a header, its output (capped: the head and the tail), a footer.

``apply`` reads each command's output from a pipe and writes it here, so that one
command printing a gigabyte cannot fill the home: the first ``LOG_HEAD_BYTES`` go to
the log as they come, then only the last ``LOG_TAIL_BYTES`` are kept, and at the end
a line says how many bytes were cut between them. The last lines are also kept in
memory, for the operator's view of a failing step (``tail``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ledger.core import clock
from ledger.store.files import open_private_file, write_all

LOG_HEAD_BYTES = 1024 * 1024
LOG_TAIL_BYTES = 1024 * 1024
#: What a failing step shows of its output: its last lines, each cut to a length.
TAIL_LINES = 20
TAIL_LINE_CHARS = 240
TAIL_BYTES = 64 * 1024


class CommandLog:
    """Where one run of one command writes: the log file at *path* (a symlink there
    is refused, StorageError), or nowhere when *path* is None (a dry run)."""

    def __init__(self, path: Path | None, header: str) -> None:
        self.written = 0  # output bytes written to the file (the head)
        self.cut = 0  # output bytes dropped between the head and the tail
        self._tail = bytearray()  # held back once the head is full
        self._last = bytearray()  # the last TAIL_BYTES of output, for ``tail``
        self._last_written = b""
        self.fd: int | None = None
        if path is not None:
            self.fd = open_private_file(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            self._write(header.encode())

    def feed(self, data: bytes) -> None:
        """Take *data*, the next bytes of the command's output."""
        self._last += data
        del self._last[:-TAIL_BYTES]
        room = LOG_HEAD_BYTES - self.written
        if room > 0:
            self._write(data[:room])
            self.written += min(room, len(data))
            data = data[room:]
        if data:
            self._tail += data
            over = len(self._tail) - LOG_TAIL_BYTES
            if over > 0:
                del self._tail[:over]
                self.cut += over

    def note(self, text: str) -> None:
        """Add a line of the ledger's own (not the command's output) to the log."""
        self._flush_tail()
        self._write(text.encode("utf-8", "replace"))

    def close(self, footer: str) -> None:
        """Write what was held back and *footer*; the log is complete."""
        self._flush_tail()
        self._write(footer.encode())
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def tail(self) -> list[str]:
        """The last ``TAIL_LINES`` lines of output, each at most ``TAIL_LINE_CHARS``."""
        text = self._last.decode("utf-8", "replace")
        lines = text.splitlines()[-TAIL_LINES:]
        return [line if len(line) <= TAIL_LINE_CHARS else
                f"{line[:TAIL_LINE_CHARS]}… ({len(line) - TAIL_LINE_CHARS} more characters)"
                for line in lines]

    def _flush_tail(self) -> None:
        if self.cut:
            self._write(f"{_newline(self._last_written)}[... {self.cut} bytes cut: the log "
                        f"keeps the first {LOG_HEAD_BYTES} and the last {LOG_TAIL_BYTES} bytes "
                        f"of each command's output ...]\n".encode())
            self.cut = 0
        if self._tail:
            self._write(bytes(self._tail))
            self._tail.clear()
        if self._last_written not in (b"", b"\n"):
            self._write(b"\n")  # the ledger's own lines start on a line of their own

    def _write(self, data: bytes) -> None:
        if data:
            self._last_written = data[-1:]
            if self.fd is not None:
                write_all(self.fd, data)


def header(label: str, timeout_s: float, command: str) -> str:
    """``==> <time> <label> (timeout <s> s)`` and the command, indented."""
    shown = command.strip().replace("\n", "\n    ")
    return f"==> {clock.now()} {label} (timeout {timeout_s:g} s)\n  $ {shown}\n"


def _newline(last: bytes) -> str:
    return "" if last in (b"", b"\n") else "\n"
