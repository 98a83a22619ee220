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
  files of upgrades past it (``ledger.ops.prune``);
- with a fleet database (``LEDGER_FLEET_URL``, ``--fleet``): after each change of a
  SQLite ledger, a pusher is started in the background when none runs
  (``ledger.fleet.spawn``: standard library only, the step never waits); ``status()``
  carries a ``fleet`` section; around an ``apply`` run, the plan's rolling-upgrade
  limits are honoured and every change is pushed (``ledger.fleet.rollout``).

Each effect's module is imported when the effect first happens, not here: the
per-step commands register these listeners on every call and must stay light.
Importing ``ledger`` installs this wiring.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from ledger.api import Ledger, RunContext
from ledger.store import urls

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
    ledger.during_run.append(_fleet_run)
    if ledger.fleet_url:
        if urls.is_postgres(ledger.fleet_url) and ledger.db.dialect == "sqlite":
            ledger.after_change.append(lambda: _start_pusher(ledger))
        ledger.status_sections["fleet"] = lambda: _fleet_status(ledger)


def _refresh_metrics(ledger: Ledger, textfile: str) -> None:
    from ledger.observe import metrics  # noqa: PLC0415 (prometheus-client: only when asked)

    metrics.refresh_textfile(ledger, textfile)


def _snapshot(ledger: Ledger, upgrade_id: str) -> None:
    from ledger.ops import snapshots  # noqa: PLC0415 (only at a save to history)

    snapshots.take(ledger.home, ledger.db, upgrade_id)


def _retention(ledger: Ledger, upgrade_id: str) -> None:
    from ledger.ops import prune  # noqa: PLC0415 (only at a save to history)

    prune.after_upgrade(ledger, upgrade_id)


def _deliver_notifications(ledger: Ledger, run: RunContext) -> AbstractContextManager[None]:
    from ledger.observe import notify  # noqa: PLC0415 (only during an apply run)

    return notify.delivering(ledger, cancel=run.stopping)


def _start_pusher(ledger: Ledger) -> None:
    from ledger.fleet import spawn  # noqa: PLC0415 (stdlib only: this is the per-step path)

    spawn.after_change(ledger)


def _fleet_run(ledger: Ledger, run: RunContext) -> AbstractContextManager[None]:
    if ledger.fleet_url is None and not run.rollout.limited:
        return contextlib.nullcontext()
    from ledger.fleet import rollout  # noqa: PLC0415 (only during an apply run)

    return rollout.during_run(ledger, run)


def _fleet_status(ledger: Ledger) -> dict[str, object]:
    from ledger.fleet import status  # noqa: PLC0415 (only for status)

    return status.local(ledger)


def _notify_status(ledger: Ledger) -> dict[str, object]:
    from ledger.observe import notify  # noqa: PLC0415 (only for status)

    return notify.status(ledger)


if install not in Ledger.default_wiring:
    Ledger.default_wiring.append(install)
