"""The ``upgrade-ledger`` command line: a thin layer over the library.

``app`` holds the root group, the shared configuration and the exit codes; ``lazy``
imports a command's module only when it runs; each other module holds one group of
commands and lists them in ``COMMANDS``. Commands only parse, call the library and
print (``output``).
"""

from __future__ import annotations

import atexit
import os
import sys

from ledger.cli.app import cli
from ledger.cli.lazy import COMMAND_MODULES, MODULES


def main() -> None:
    """Entry point of the ``upgrade-ledger`` command."""
    try:
        cli.main(prog_name="upgrade-ledger")
    except SystemExit as exc:
        _leave_now(exc.code)
        raise


def _leave_now(code: object) -> None:
    """End the process at once with *code* when interpreter shutdown has nothing to do.

    Shutdown frees every module and object one by one: about 8 ms of CPU per call on
    this machine, a good part of a per-step command. The command has closed the ledger
    by now (the root context's close), so when no other thread runs and no atexit
    handler is registered, flushing stdout and stderr is all that is left. Otherwise
    (or if a flush fails, or *code* is a message) the normal way out is taken.
    """
    if code is not None and not isinstance(code, int):
        return
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() != 1:
        return
    handlers = getattr(atexit, "_ncallbacks", None)
    if handlers is None or handlers() != 0:
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(code or 0)


__all__ = ["COMMAND_MODULES", "MODULES", "cli", "main"]
