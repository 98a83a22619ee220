"""Parameter types that several commands share.

A parameter type is where click parses a word and completes it in the shell; what
the word means is still the library's to check (an unknown state exits 6 with the
list of states, as every bad input does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from ledger.core.states import UPGRADE_STATES

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem


class UpgradeState(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2
    """An upgrade state name in any case (``rolled_back``, ``Rolled_Back``), passed on
    as the state machine spells it; completed from the state machine's names."""

    name = "state"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.isascii() and value.upper() in UPGRADE_STATES:
            return value.upper()
        return value  # not a state: the library refuses it and names the states

    def shell_complete(self, ctx: click.Context, param: click.Parameter,
                       incomplete: str) -> list[CompletionItem]:
        # Imported here: every per-step command loads this module, few complete.
        from click.shell_completion import CompletionItem  # noqa: PLC0415

        prefix = incomplete.upper()
        return [CompletionItem(name) for name in UPGRADE_STATES if name.startswith(prefix)]


UPGRADE_STATE = UpgradeState()
