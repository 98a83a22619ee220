"""Adopting the old bash library's files: a host switching over keeps its past.

When a home holds a ``state.json`` or ``history/*.json`` written by the old library
but no ledger yet, the first change would overwrite ``state.json``. Adopting loads
every history file, then ``state.json`` (which becomes the current upgrade), into
the new ledger first, so that nothing the old library recorded is lost. The bash
drop-in runs this once; it is also reachable as ``upgrade-ledger legacy adopt``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ledger.api import Ledger
from ledger.errors import LedgerError


@dataclass
class Adoption:
    """What ``adopt_legacy_files`` did: the upgrades loaded (ids, each once) and one
    warning per file that could not be loaded."""

    home: Path
    loaded: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def adopt_legacy_files(ledger: Ledger) -> Adoption:
    """Load the old library's history files, then its state.json, into *ledger*.

    A ledger that already holds upgrades is left alone (nothing to adopt). A file
    that cannot be read is named in a warning and left where it is; an unreadable
    state.json is renamed ``state.json.legacy``, since the next change rewrites
    state.json.
    """
    home = ledger.home
    result = Adoption(home.root)
    if ledger.history(1):
        return result
    adopted = []
    for path in sorted(home.history_dir.glob("*.json")):
        try:
            adopted.append(ledger.import_document(path.read_bytes(), make_current=False))
        except (LedgerError, OSError) as exc:
            result.warnings.append(f"{path} was not loaded into the ledger: {exc}")
    for upgrade_id in adopted:
        ledger.save_to_history(upgrade_id)  # rewritten as this ledger's own files
    if home.state_file.is_file():
        try:
            adopted.append(ledger.import_document(home.state_file.read_bytes()))
        except (LedgerError, OSError) as exc:
            aside = home.state_file.with_name(home.state_file.name + ".legacy")
            home.state_file.replace(aside)
            result.warnings.append(f"{home.state_file} was not loaded into the ledger "
                                   f"({exc}); it is kept as {aside}")
    result.loaded = list(dict.fromkeys(adopted))
    return result
