"""One deadline for a whole delivery, and the stop request that can cut it short.

Kept apart from ``ledger.observe.send`` (which loads urllib and ssl) so that
``ledger.observe.notify`` can name them without paying for those imports.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

#: The longest wait between two looks at the deadline and at a stop request.
SLICE_S = 0.1


class Cancelled(Exception):
    """The delivery was cut short because the run was asked to stop."""


@dataclass(frozen=True)
class Deadline:
    """When a delivery must be over (``time.monotonic``), and what asks it to stop."""

    at: float
    cancel: Callable[[], bool] | None = None

    def remaining(self) -> float:
        """Seconds left; TimeoutError past the deadline, Cancelled on a stop request."""
        if self.cancel is not None and self.cancel():
            raise Cancelled
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("the delivery's time ran out")
        return left

    def slice(self) -> float:
        """The next wait: the time left, at most ``SLICE_S``."""
        return min(self.remaining(), SLICE_S)
