"""The one exception hierarchy of upgrade-ledger.

Every failure the library reports is a ``LedgerError``. Subclasses carry the data a
caller needs to react (the allowed targets of a transition, the holder of a lock)
and mix in the stdlib base that fits, so ``except ValueError`` still works.
The CLI turns each class into a documented exit code in one place
(``EXIT_CODES`` in ``ledger.cli.app``); library code never raises click errors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class LedgerError(Exception):
    """Root of every error raised by upgrade-ledger."""


class BadInput(LedgerError, ValueError):
    """An argument or document was refused before anything changed."""


class UnknownState(BadInput):
    """A state name that the state machine does not know."""

    def __init__(self, kind: str, name: str, allowed: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.allowed = tuple(allowed)
        super().__init__(
            f"unknown {kind} state {name!r}; expected one of: {', '.join(self.allowed)}"
        )


class InvalidDocument(BadInput):
    """A state document (state.json or a history file) that fails validation."""


class QueryTimeout(BadInput, TimeoutError):
    """A reporting query ran longer than its time limit and was stopped."""


class InvalidTransition(LedgerError):
    """A state change that the state machine forbids; nothing was changed."""

    def __init__(self, kind: str, current: str, target: str, allowed: Iterable[str]) -> None:
        self.kind = kind
        self.current = current
        self.target = target
        self.allowed = tuple(allowed)
        targets = ", ".join(self.allowed) or "none"
        super().__init__(
            f"invalid {kind} transition {current} -> {target}; "
            f"allowed from {current}: {targets}"
        )


class NotFound(LedgerError, LookupError):
    """The upgrade, phase or component named does not exist."""


class NoLedger(NotFound):
    """A home without a ledger, opened by something that only reads: nothing is made."""


class Conflict(LedgerError):
    """The request is well formed but the ledger's current state refuses it."""


class HostClash(Conflict):
    """Another machine already claimed this host name in a shared ledger."""


class UpgradeInProgress(Conflict):
    """A new upgrade was asked for while another is still in progress.

    The message says what to do in the caller's terms: the API's parameter by
    default; the command line passes *remedy* with its own flag.
    """

    def __init__(self, upgrade_id: str, state: str, *,
                 remedy: str = "pass supersede=True to end it as FAILED") -> None:
        self.upgrade_id = upgrade_id
        self.state = state
        super().__init__(
            f"upgrade {upgrade_id} is still in progress ({state}); finish it, or {remedy}"
        )


class NoCurrentPhase(Conflict):
    """A component call was made while no phase is current."""


class LockError(LedgerError):
    """Base of the errors about the exclusive upgrade lock."""


class LockHeld(LockError):
    """Another live process holds the lock."""

    def __init__(self, message: str, holder: Any = None) -> None:
        self.holder = holder
        super().__init__(message)


class LockTimeout(LockHeld, TimeoutError):
    """Waiting for the lock took longer than the caller allowed."""


class NotLockOwner(LockError):
    """A release (or a strict-mode change) by a process that does not hold the lock."""


class StorageError(LedgerError, OSError):
    """The home or a file in it cannot be created, written or read."""


class NotAHome(StorageError):
    """An existing folder given as the home holds other things and no ledger."""


class CorruptLedger(LedgerError):
    """The ledger database is damaged, truncated or not a ledger at all."""


class SchemaTooNew(LedgerError):
    """The ledger was migrated by a newer upgrade-ledger than this one."""



class FleetUnavailable(StorageError):
    """The fleet database cannot be reached, or cannot be used as one."""


class NoSlot(LedgerError):
    """Every rolling-upgrade slot of the plan is held by other hosts, and waiting was
    not allowed (``--no-wait``) or took longer than allowed (``--wait-timeout``)."""

    def __init__(self, message: str, holders: Iterable[Any] = ()) -> None:
        self.holders = tuple(holders)
        super().__init__(message)


class BrakeEngaged(LedgerError):
    """Enough hosts ended this plan FAILED or ROLLED_BACK that ``apply`` refuses to
    start it on another (the plan's ``halt_after_failures``)."""

    def __init__(self, message: str, hosts: Iterable[str] = ()) -> None:
        self.hosts = tuple(hosts)
        super().__init__(message)
