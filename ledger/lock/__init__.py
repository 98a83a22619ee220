"""The exclusive upgrade lock (``mkdir`` of ``upgrade.lock.d``) and its record.

``record``: the ``lock.info`` line and how it is read; ``guard``: the short flock
that serialises changes to the lock folder; ``dirlock``: the lock itself, its
judgement of a holder, takeover and release.
"""

from ledger.lock.dirlock import DEFAULT_GRACE_S, DEFAULT_TIMEOUT_S, DirLock, LockStatus
from ledger.lock.record import INFO_NAME, Holder

__all__ = ["DEFAULT_GRACE_S", "DEFAULT_TIMEOUT_S", "INFO_NAME", "DirLock", "Holder", "LockStatus"]
