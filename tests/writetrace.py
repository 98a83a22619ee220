"""Run ``upgrade-ledger`` and record every path it writes (a test helper, run as a child).

    python writetrace.py TRACE ARGS...

Runs ``upgrade-ledger ARGS...`` in this process with a Python audit hook (and a thin
wrapper around ``os.open``, whose audit event lacks ``dir_fd``) that appends one JSON
line to TRACE for each write the ledger's own code makes: ``{"op", "path", "flags"}``,
``path`` absolute and not resolved (a symlink in it stays visible). Opens for
writing, mkdir, rename and link (both ends), symlink, unlink, rmdir, chmod, rmtree
and SQLite databases are recorded. What the plan's shell commands write is not:
they are other processes.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

TRACE = open(sys.argv[1], "a", encoding="utf-8")  # noqa: SIM115 -- open for the whole run
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_open = os.open


def _where(path: Any, dir_fd: Any = None) -> str | None:
    if isinstance(path, int) or path is None:
        return None
    name = os.fsdecode(path)
    if os.path.isabs(name):
        return os.path.normpath(name)
    base = os.getcwd() if not isinstance(dir_fd, int) or dir_fd < 0 else \
        os.readlink(f"/proc/self/fd/{dir_fd}")
    return os.path.normpath(os.path.join(base, name))


def _note(op: str, path: Any, dir_fd: Any = None, flags: int = 0) -> None:
    where = _where(path, dir_fd)
    if where is not None:
        TRACE.write(json.dumps({"op": op, "path": where, "flags": flags}) + "\n")
        TRACE.flush()


def _traced_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
    if flags & WRITING:
        _note("open", path, dir_fd, flags)
    return _open(path, flags, mode, dir_fd=dir_fd)


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and args[1] is not None and isinstance(args[2], int) \
            and args[2] & WRITING:  # the built-in open(); os.open is wrapped above
        _note("open", args[0], None, args[2])
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.chmod", "shutil.rmtree"):
        _note(event.split(".", 1)[1], args[0], args[-1])
    elif event in ("os.rename", "os.replace", "os.link"):
        _note(event.split(".", 1)[1] + "-from", args[0], args[2])
        _note(event.split(".", 1)[1] + "-to", args[1], args[3])
    elif event == "os.symlink":
        _note("symlink-to", args[1], args[-1])
    elif event == "sqlite3.connect" and args[0] not in (":memory:", b":memory:"):
        _note("sqlite", args[0])


os.open = _traced_open  # type: ignore[assignment]
sys.addaudithook(_hook)
sys.argv = ["upgrade-ledger", *sys.argv[2:]]

from ledger.cli import main  # noqa: E402 -- after the hook, so that imports are seen too

main()
