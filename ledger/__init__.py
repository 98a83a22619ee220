"""upgrade-ledger: a durable, crash-safe ledger of software upgrades on a host.

``Ledger`` is the Python API; ``upgrade-ledger`` the command line over it. Importing
the package installs the default wiring (``ledger.wiring``): metrics textfile,
snapshots and notifications as listeners on every ``Ledger``. It stays cheap (no
SQLAlchemy, no Alembic): the per-step commands depend on it.
"""

from __future__ import annotations

from ledger import wiring as _wiring  # noqa: F401 (registers the default listeners)
from ledger.api import Ledger
from ledger.core.version import __version__

__all__ = ["Ledger", "__version__"]
