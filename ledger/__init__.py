"""upgrade-ledger: a durable, crash-safe ledger of software upgrades on a host.

``Ledger`` is the Python API; ``upgrade-ledger`` the command line over it.
Importing this package stays cheap (no SQLAlchemy, no Alembic): the per-step
commands depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Ledger", "__version__"]

if TYPE_CHECKING:
    from ledger.api import Ledger


def __getattr__(name: str) -> Any:
    # Lazy, so that `import ledger.errors` (and the CLI's start-up) pays only for what it uses.
    if name == "Ledger":
        from ledger.api import Ledger  # noqa: PLC0415 (lazy: importing ledger stays cheap)

        return Ledger
    raise AttributeError(f"module 'ledger' has no attribute {name!r}")
