"""The state machine: states, allowed transitions and predicates. Pure, no I/O.

Upgrade transitions are the legacy library's table plus the few extensions a real
run needs (automatic rollback after a failed validation, a failed rollback, an
abort before anything changed). Setting the current state again is a no-op.
"""

from __future__ import annotations

from typing import Final

from ledger.errors import InvalidTransition, UnknownState

IDLE: Final = "IDLE"
PLANNING: Final = "PLANNING"
BACKING_UP: Final = "BACKING_UP"
UPGRADING: Final = "UPGRADING"
VALIDATING: Final = "VALIDATING"
COMPLETED: Final = "COMPLETED"
ROLLING_BACK: Final = "ROLLING_BACK"
ROLLED_BACK: Final = "ROLLED_BACK"
FAILED: Final = "FAILED"

UPGRADE_STATES: Final = (
    IDLE, PLANNING, BACKING_UP, UPGRADING, VALIDATING,
    COMPLETED, ROLLING_BACK, ROLLED_BACK, FAILED,
)

UPGRADE_TRANSITIONS: Final[dict[str, tuple[str, ...]]] = {
    IDLE: (PLANNING,),
    PLANNING: (BACKING_UP, FAILED),
    BACKING_UP: (UPGRADING, FAILED),
    UPGRADING: (VALIDATING, ROLLING_BACK, FAILED),
    VALIDATING: (COMPLETED, ROLLING_BACK, FAILED),
    ROLLING_BACK: (ROLLED_BACK, FAILED),
    COMPLETED: (IDLE,),
    ROLLED_BACK: (IDLE,),
    FAILED: (IDLE,),
}

#: States in which an upgrade is running (the legacy ``upgrade_is_in_progress``).
IN_PROGRESS_STATES: Final = frozenset({PLANNING, BACKING_UP, UPGRADING, VALIDATING, ROLLING_BACK})
#: States that end a run; the first one reached is kept as the upgrade's outcome.
TERMINAL_STATES: Final = frozenset({COMPLETED, ROLLED_BACK, FAILED})

PENDING: Final = "PENDING"
IN_PROGRESS: Final = "IN_PROGRESS"
SKIPPED: Final = "SKIPPED"

PHASE_STATES: Final = (PENDING, IN_PROGRESS, COMPLETED, FAILED, SKIPPED)
#: A phase may be started again: after a failure (a retry) or when a resumed script
#: walks its phases from the top again. Completing needs a start first.
PHASE_TRANSITIONS: Final[dict[str, tuple[str, ...]]] = {
    PENDING: (IN_PROGRESS, SKIPPED),
    IN_PROGRESS: (COMPLETED, FAILED, SKIPPED),
    FAILED: (IN_PROGRESS, SKIPPED),
    COMPLETED: (IN_PROGRESS,),
    SKIPPED: (IN_PROGRESS,),
}

COMPONENT_STATES: Final = (PENDING, UPGRADING, COMPLETED, FAILED, SKIPPED, ROLLED_BACK)
#: A failed component may be started again (a retry counts one more attempt).
#: COMPLETED may go back to UPGRADING only when explicitly re-run (a new target).
#: A component whose upgrade began (COMPLETED, FAILED, or cut short in UPGRADING) is
#: ROLLED_BACK once its backup was restored; it may be upgraded again from there.
COMPONENT_TRANSITIONS: Final[dict[str, tuple[str, ...]]] = {
    PENDING: (UPGRADING, SKIPPED),
    UPGRADING: (COMPLETED, FAILED, SKIPPED, ROLLED_BACK),
    FAILED: (UPGRADING, SKIPPED, ROLLED_BACK),
    COMPLETED: (UPGRADING, ROLLED_BACK),
    SKIPPED: (UPGRADING,),
    ROLLED_BACK: (UPGRADING,),
}

_TABLES: Final = {
    "upgrade": (UPGRADE_STATES, UPGRADE_TRANSITIONS),
    "phase": (PHASE_STATES, PHASE_TRANSITIONS),
    "component": (COMPONENT_STATES, COMPONENT_TRANSITIONS),
}


def check_state(kind: str, name: object) -> str:
    """Return *name* if it is a known state of *kind*, else raise ``UnknownState``."""
    states, _ = _TABLES[kind]
    if not isinstance(name, str) or name not in states:
        raise UnknownState(kind, str(name), states)
    return name


def allowed_targets(kind: str, current: str) -> tuple[str, ...]:
    """The states that *current* may move to (excluding itself)."""
    _, table = _TABLES[kind]
    return table[check_state(kind, current)]


def is_valid_transition(kind: str, current: str, target: str) -> bool:
    """True when *current* → *target* is allowed; the same state again counts as allowed."""
    check_state(kind, target)
    return current == target or target in allowed_targets(kind, current)


def check_transition(kind: str, current: str, target: str) -> bool:
    """Validate *current* → *target*; return False for a no-op, True for a real change.

    Raises ``UnknownState`` for an unknown name and ``InvalidTransition`` (carrying
    the allowed targets) for a forbidden move.
    """
    if not is_valid_transition(kind, current, target):
        raise InvalidTransition(kind, current, target, allowed_targets(kind, current))
    return current != target


def is_in_progress(state: str) -> bool:
    """The legacy ``upgrade_is_in_progress`` predicate."""
    return state in IN_PROGRESS_STATES


def is_resumable(state: str) -> bool:
    """An upgrade that stopped mid-run (crash, Ctrl-C) can be resumed from its checkpoint."""
    return state in IN_PROGRESS_STATES
