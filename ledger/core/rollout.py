"""How an ``apply`` run takes part in a rolling upgrade of a fleet.

A plan's ``[fleet]`` table sets the limits (``max_hosts``, ``halt_after_failures``);
``apply``'s options override or relax them. The plan engine reads them and the fleet
part enforces them, neither knowing the other: this value is what they share.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rollout:
    """The limits of a rolling upgrade and how a run meets them.

    *max_hosts*: at most this many hosts run the plan at once (None: no limit).
    *halt_after_failures*: refuse to start once this many hosts ended the plan
    FAILED or ROLLED_BACK (None: no brake). *wait_timeout_s*: how long to wait for a
    slot (None: as long as it takes); *wait* False: not at all. *ignore_brake*: start
    even when the brake is on. *optional*: run without the limits when the fleet
    database cannot be reached.
    """

    max_hosts: int | None = None
    halt_after_failures: int | None = None
    wait: bool = True
    wait_timeout_s: float | None = None
    ignore_brake: bool = False
    optional: bool = False

    @property
    def limited(self) -> bool:
        """Whether the run must coordinate with the fleet before it starts."""
        return self.max_hosts is not None or self.halt_after_failures is not None
