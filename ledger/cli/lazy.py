"""Lazy loading of command groups: a command's module is imported when it runs.

A per-step call (``upgrade-ledger component start ...``, once per step of a shell
script) imports only the module that defines its command, never the reporting,
doctor, recovery or apply modules. This is click's documented lazy group: a
``click.Group`` that overrides ``get_command`` and ``list_commands``. Help,
completion and unknown names import every module.
"""

from __future__ import annotations

from importlib import import_module

import click

#: Every module that holds commands (each lists them in ``COMMANDS``), in order.
MODULES = ("steps", "lockcmds", "reports", "doctor", "recovery", "retention", "apply",
           "observe", "fleet", "legacy", "session")

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
    "prune": "retention",
    "apply": "apply",
    **dict.fromkeys(("metrics", "notify", "subscribers"), "observe"),
    "fleet": "fleet",
    "legacy": "legacy",
    "session": "session",
}


class LazyGroup(click.Group):
    """A group whose commands are imported from their modules on first use."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._loaded: set[str] = set()

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            module = COMMAND_MODULES.get(cmd_name)
            if module is not None:
                self._load(module)
            if cmd_name not in self.commands:
                self.load_all()
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_all()
        return sorted(self.commands)

    def load_all(self) -> None:
        """Import every command module."""
        for module in MODULES:
            self._load(module)

    def _load(self, module: str) -> None:
        if module in self._loaded:
            return
        self._loaded.add(module)
        for command in import_module(f"ledger.cli.{module}").COMMANDS:
            self.add_command(command)
