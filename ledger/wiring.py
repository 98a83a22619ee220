"""The default wiring: the listeners every ``Ledger`` gets unless made ``wired=False``.

The ledger calls listeners without knowing what they do (``ledger.api``); this is the
one place that decides which effects follow a change by default:

- ``LEDGER_METRICS_TEXTFILE`` set: the Prometheus textfile is rewritten after every
  change and lock move (``ledger.observe.metrics``);
- at each save to history, an online snapshot of a SQLite ledger
  (``ledger.ops.snapshots``; ``LEDGER_SNAPSHOT_KEEP=0`` turns it off);
- during an ``apply`` run, pending notifications are delivered after each change
  (``ledger.observe.notify``);
- ``status()`` carries a ``notify`` section;
- after an upgrade that COMPLETED is saved to history, the retention policy in the
  ``[retention]`` section of ``HOME/ledger.toml``, if there is one, removes the
  files of upgrades past it (``ledger.ops.prune``).

Each effect's module is imported when the effect first happens, not here: the
per-step commands register these listeners on every call and must stay light.
Importing ``ledger`` installs this wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from ledger.api import Ledger

TEXTFILE_ENV = "LEDGER_METRICS_TEXTFILE"


def install(ledger: Ledger) -> None:
    """Register the default listeners on *ledger*."""
    textfile = ledger.env.get(TEXTFILE_ENV)
    if textfile:
        # Off by default: it costs each change a metrics read and a file write.
        ledger.after_change.append(lambda: _refresh_metrics(ledger, textfile))
    ledger.after_save.append(lambda upgrade_id: _snapshot(ledger, upgrade_id))
    # After the snapshot: that snapshot is the newest, which retention never removes.
    ledger.after_save.append(lambda upgrade_id: _retention(ledger, upgrade_id))
    ledger.during_run.append(_deliver_notifications)
    ledger.status_sections["notify"] = lambda: _notify_status(ledger)


def _refresh_metrics(ledger: Ledger, textfile: str) -> None:
    from ledger.observe import metrics  # noqa: PLC0415 (prometheus-client: only when asked)

    metrics.refresh_textfile(ledger, textfile)


def _snapshot(ledger: Ledger, upgrade_id: str) -> None:
    from ledger.ops import snapshots  # noqa: PLC0415 (only at a save to history)

    snapshots.take(ledger.home, ledger.db, upgrade_id)


def _retention(ledger: Ledger, upgrade_id: str) -> None:
    from ledger.ops import prune  # noqa: PLC0415 (only at a save to history)

    prune.after_upgrade(ledger, upgrade_id)


def _deliver_notifications(ledger: Ledger, stopping: Callable[[], bool],
                           ) -> AbstractContextManager[None]:
    from ledger.observe import notify  # noqa: PLC0415 (only during an apply run)

    return notify.delivering(ledger, cancel=stopping)


def _notify_status(ledger: Ledger) -> dict[str, object]:
    from ledger.observe import notify  # noqa: PLC0415 (only for status)

    return notify.status(ledger)


if install not in Ledger.default_wiring:
    Ledger.default_wiring.append(install)
