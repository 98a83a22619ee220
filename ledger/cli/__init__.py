"""The ``upgrade-ledger`` command line: a thin layer over ``ledger.api``.

``app`` holds the root group, the shared configuration and the exit codes; each
other module holds one group of commands and lists them in ``COMMANDS``.

Command modules are imported on demand: running a command imports only the module
that defines it, so a per-step call (``upgrade-ledger component start ...``, once per
step of a shell script) never pays for the reporting, doctor, recovery or apply
modules. Help, completion and unknown names import them all.
"""

from __future__ import annotations

import atexit
import os
import sys
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ledger.cli.app import cli

if TYPE_CHECKING:
    from collections.abc import ItemsView, Iterator, KeysView, Mapping, ValuesView

    import click

#: Every module that holds commands, in registration order.
MODULES = ("steps", "lockcmds", "reports", "doctor", "recovery", "apply", "observe",
           "legacy")

#: Which module defines each command. A name missing here still works (every module
#: is imported to find it, which is only slower); tests/test_bench.py checks the index
#: and that it covers every per-step command.
COMMAND_MODULES = {
    **dict.fromkeys(("init", "state", "phase", "component", "rollback", "resume",
                     "can-resume", "in-progress", "progress", "summary"), "steps"),
    "lock": "lockcmds",
    **dict.fromkeys(("status", "history", "show", "events", "sql", "export", "import",
                     "save-history", "cleanup"), "reports"),
    "doctor": "doctor",
    **dict.fromkeys(("snapshot", "snapshots", "restore"), "recovery"),
    "apply": "apply",
    **dict.fromkeys(("metrics", "notify", "subscribers"), "observe"),
    "legacy": "legacy",
}


class LazyCommands(dict[str, "click.Command"]):
    """The root group's command table, filled from the command modules on first use.

    A lookup by name imports the module the index names; anything that sees the
    whole table (iteration, ``len``, ``keys``...) imports every module first, so code
    that reads ``cli.commands`` directly always sees every command.
    """

    def __init__(self, initial: Mapping[str, click.Command]) -> None:
        super().__init__(initial)
        self._loaded: set[str] = set()

    def _load(self, module: str) -> None:
        if module in self._loaded:
            return
        self._loaded.add(module)
        for command in import_module(f"ledger.cli.{module}").COMMANDS:
            dict.__setitem__(self, command.name, command)

    def load_all(self) -> None:
        """Import every command module."""
        for module in MODULES:
            self._load(module)

    def _find(self, name: object) -> None:
        if dict.__contains__(self, name):
            return
        module = COMMAND_MODULES.get(name) if isinstance(name, str) else None
        if module is not None:
            self._load(module)
        if not dict.__contains__(self, name):
            self.load_all()

    def __getitem__(self, name: str) -> click.Command:
        self._find(name)
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        self._find(name)
        return super().__contains__(name)

    def get(self, name: str, default: Any = None) -> Any:
        self._find(name)
        return super().get(name, default)

    def __iter__(self) -> Iterator[str]:
        self.load_all()
        return super().__iter__()

    def __len__(self) -> int:
        self.load_all()
        return super().__len__()

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        self.load_all()
        return super().keys()

    def values(self) -> ValuesView[click.Command]:  # type: ignore[override]
        self.load_all()
        return super().values()

    def items(self) -> ItemsView[str, click.Command]:  # type: ignore[override]
        self.load_all()
        return super().items()


cli.commands = LazyCommands(cli.commands)


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


__all__ = ["COMMAND_MODULES", "MODULES", "LazyCommands", "cli", "main"]
