"""Prometheus metrics of a ledger: what a scrape (or node_exporter's textfile
collector) sees of the current upgrade, the lock, the audit trail and notifications.

``collect`` reads the ledger into plain ``Family`` records in one read transaction;
``exposition`` turns them into the text format with prometheus-client (its writer
escapes label values, so ids and component names are safe there). prometheus-client
is imported only there: with no textfile configured, the per-step path never loads it.

Every metric is prefixed ``upgrade_ledger_``, in base units (seconds, ratios),
counters end in ``_total``, Unix times in ``_timestamp_seconds``; docs/observability.md
lists them all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledger.core import clock, states
from ledger.core.version import __version__
from ledger.errors import BadInput, LedgerError
from ledger.store import meta
from ledger.store.files import write_file_atomic

if TYPE_CHECKING:
    from ledger.api import Ledger
    from ledger.store.database import Tx

PREFIX = "upgrade_ledger_"
#: The environment variable that turns on the textfile refresh after every change.
TEXTFILE_ENV = "LEDGER_METRICS_TEXTFILE"
#: node_exporter runs as its own user: the textfile is world-readable (it holds
#: nothing secret: states, counts, ids and component names).
TEXTFILE_MODE = 0o644

log = logging.getLogger(__name__)


@dataclass
class Family:
    """One metric family: its samples as (label values, value) pairs.

    Counters are named without ``_total``; the writer adds it.
    """

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...] = ()
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def add(self, value: float, *labels: str) -> None:
        """Append a sample."""
        self.samples.append((tuple(labels), float(value)))


def _unix(stamp: str | None) -> float | None:
    """A ledger timestamp (or a lock.info one) as Unix seconds."""
    return None if not stamp else clock.parse(stamp).timestamp()


def collect(ledger: Ledger) -> list[Family]:
    """Every metric of the ledger, read in one consistent snapshot."""
    lock = ledger.lock.status()
    with ledger.db.read() as tx:
        families = [_info(tx), *_current_upgrade(tx), *_history(tx), *_trail(tx),
                    *_notifications(tx)]
    families += _lock(lock.present, lock.stale, lock.age_s,
                      lock.holder.timestamp if lock.holder else None)
    return families


def _info(tx: Tx) -> Family:
    fam = Family(PREFIX + "info", "gauge", "Always 1: the ledger's lineage (its id) and the "
                 "upgrade-ledger version that wrote these metrics.", ("lineage", "version"))
    lineage = meta.lineage(tx)
    fam.add(1, str(lineage or ""), __version__)
    return fam


def _current_upgrade(tx: Tx) -> list[Family]:
    state = Family(PREFIX + "upgrade_state", "gauge", "The current upgrade's state: one "
                   "series per state, 1 for the state it is in.", ("upgrade_id", "state"))
    uid = meta.current_upgrade(tx)
    row = None if uid is None else tx.one("SELECT * FROM upgrades WHERE host = :host AND "
                                          "id = :u", {"u": uid})
    current = row["state"] if row is not None else states.IDLE
    for name in states.UPGRADE_STATES:
        state.add(1 if name == current else 0, str(uid or ""), name)
    if row is None:
        return [state]
    uid = str(row["id"])
    progress = Family(PREFIX + "upgrade_progress_ratio", "gauge", "Done (COMPLETED or "
                      "SKIPPED) components of the current upgrade over all of them, 0 to 1.",
                      ("upgrade_id",))
    started = Family(PREFIX + "upgrade_started_timestamp_seconds", "gauge",
                     "When the current upgrade started (Unix time).", ("upgrade_id",))
    updated = Family(PREFIX + "upgrade_updated_timestamp_seconds", "gauge",
                     "When the current upgrade last changed (Unix time).", ("upgrade_id",))
    by_state = Family(PREFIX + "components", "gauge", "Components of the current upgrade "
                      "by state.", ("upgrade_id", "state"))
    attempts = Family(PREFIX + "component_attempts", "counter", "Each component's attempts "
                      "in the current upgrade: 1 at its first start, + 1 at each failure.",
                      ("upgrade_id", "phase", "component"))
    failures = Family(PREFIX + "component_failures", "counter", "Times each component of "
                      "the current upgrade failed.", ("upgrade_id", "phase", "component"))
    comps = tx.all("SELECT phase, name, state, attempts FROM components WHERE host = :host "
                   "AND upgrade_id = :u ORDER BY position", {"u": uid})
    counts = dict.fromkeys(states.COMPONENT_STATES, 0)
    for c in comps:
        counts[c["state"]] = counts.get(c["state"], 0) + 1
    for name, n in counts.items():
        by_state.add(n, uid, name)
    done = counts[states.COMPLETED] + counts[states.SKIPPED]
    finished = (row["outcome"] or row["state"]) == states.COMPLETED
    progress.add(done / len(comps) if comps else 1.0 if finished else 0.0, uid)
    started.add(_unix(row["started_at"]) or 0, uid)
    updated.add(_unix(row["updated_at"]) or 0, uid)
    for c in comps:
        # The ledger's attempts (docs/state-json.md): every attempt but the one in
        # progress or next has failed.
        attempts.add(c["attempts"], uid, c["phase"], c["name"])
        failures.add(max(c["attempts"] - 1, 0), uid, c["phase"], c["name"])
    return [state, progress, started, updated, by_state, attempts, failures,
            _last_durations(tx, uid)]


def _last_durations(tx: Tx, uid: str) -> Family:
    """For each component of the current upgrade, how long its latest finished
    (COMPLETED or FAILED) run took, in this upgrade or an earlier one."""
    fam = Family(PREFIX + "component_last_duration_seconds", "gauge", "How long the latest "
                 "finished (COMPLETED or FAILED) upgrade of each component took.",
                 ("component",))
    names = [r[0] for r in tx.all("SELECT DISTINCT name FROM components WHERE host = :host "
                                  "AND upgrade_id = :u ORDER BY name", {"u": uid})]
    for name in names:
        # Two indexed look-ups (name, state, end) rather than a scan of all history.
        runs = [tx.one(f"SELECT started_at, {end} AS ended FROM components WHERE host = :host "
                       f"AND name = :n AND state = :s AND started_at IS NOT NULL "
                       f"AND {end} IS NOT NULL "
                       f"ORDER BY {end} DESC LIMIT 1", {"n": name, "s": s})
                for s, end in ((states.COMPLETED, "completed_at"), (states.FAILED, "failed_at"))]
        latest = max((r for r in runs if r is not None), key=lambda r: r["ended"], default=None)
        if latest is not None:
            fam.add(clock.seconds_between(latest["started_at"], latest["ended"]) or 0.0, name)
    return fam


def _history(tx: Tx) -> list[Family]:
    fam = Family(PREFIX + "last_finished_timestamp_seconds", "gauge", "When the latest "
                 "upgrade with each outcome finished (Unix time; 0: never).", ("outcome",))
    for outcome in (states.COMPLETED, states.FAILED, states.ROLLED_BACK):
        at = tx.scalar("SELECT MAX(finished_at) FROM upgrades WHERE host = :host AND "
                       "outcome = :o",
                       {"o": outcome})
        fam.add(_unix(at) or 0, outcome)
    return [fam]


def _trail(tx: Tx) -> list[Family]:
    total = Family(PREFIX + "events", "counter", "Events in the audit trail (one per change).")
    last = Family(PREFIX + "last_event_timestamp_seconds", "gauge",
                  "When the newest event was recorded (Unix time; 0: none yet).")
    # This host's events: append-only, so their count never goes down.
    row = tx.one("SELECT COUNT(*) AS n, MAX(id) AS newest FROM events WHERE host = :host")
    at = None if row is None or row["newest"] is None else tx.scalar(
        "SELECT at FROM events WHERE id = :id", {"id": row["newest"]})
    total.add(row["n"] if row is not None else 0)
    last.add(_unix(at) or 0)
    return [total, last]


def _notifications(tx: Tx) -> list[Family]:
    delivered = Family(PREFIX + "notify_delivered", "counter", "Events delivered to each "
                       "notification subscriber.", ("subscriber",))
    failures = Family(PREFIX + "notify_failures", "counter", "Failed delivery attempts to "
                      "each notification subscriber.", ("subscriber",))
    failing = Family(PREFIX + "notify_consecutive_failures", "gauge", "Failed attempts in a "
                     "row at the subscriber's next event (0: healthy).", ("subscriber",))
    behind = Family(PREFIX + "notify_behind_events", "gauge", "Events recorded after the "
                    "subscriber's cursor (still to deliver, or to pass by its kind filter).",
                    ("subscriber",))
    newest = int(tx.scalar("SELECT COALESCE(MAX(id), 0) FROM events WHERE host = :host"))
    for r in tx.all("SELECT * FROM notify_cursors WHERE host = :host ORDER BY subscriber"):
        delivered.add(r["delivered"], r["subscriber"])
        failures.add(r["failures"], r["subscriber"])
        failing.add(r["attempts"], r["subscriber"])
        behind.add(max(newest - r["last_event_id"], 0), r["subscriber"])
    return [delivered, failures, failing, behind]


def _lock(held: bool, stale: bool, age_s: float | None, since: str | None) -> list[Family]:
    fams = [Family(PREFIX + "lock_held", "gauge", "1 while the upgrade lock is held "
                   "(stale or not)."),
            Family(PREFIX + "lock_stale", "gauge", "1 when the lock's holder is gone (or "
                   "cannot be checked and the lock is older than its timeout).")]
    fams[0].add(1 if held else 0)
    fams[1].add(1 if held and stale else 0)
    if held and age_s is not None:
        age = Family(PREFIX + "lock_age_seconds", "gauge", "How long the lock has been held, "
                     "when these metrics were written.")
        age.add(max(age_s, 0.0))
        fams.append(age)
    acquired = _unix(since) if held and since else None
    if acquired is not None:
        fam = Family(PREFIX + "lock_acquired_timestamp_seconds", "gauge",
                     "When the lock was taken (Unix time); time() minus this is its age.")
        fam.add(acquired)
        fams.append(fam)
    return fams


# -- the text format -----------------------------------------------------------------


def exposition(ledger: Ledger) -> bytes:
    """The ledger's metrics in the Prometheus text format (version 0.0.4)."""
    # Imported here: only a scrape or a configured textfile pays for prometheus-client.
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415
    from prometheus_client.core import (  # noqa: PLC0415
        CounterMetricFamily,
        GaugeMetricFamily,
    )

    families = collect(ledger)

    class LedgerCollector:
        """Hands the snapshot to a private registry (never the global default one)."""

        def collect(self) -> Any:
            for fam in families:
                cls = CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily
                metric = cls(fam.name, fam.help, labels=fam.labels)
                for labels, value in fam.samples:
                    metric.add_metric(labels, value)
                yield metric

    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector())
    return generate_latest(registry)


def write_textfile(ledger: Ledger, path: str | os.PathLike[str]) -> Path:
    """Write the metrics to *path* atomically, for node_exporter's textfile collector.

    A temp file in the same folder (node_exporter reads only ``*.prom``; the temp name
    ends in ``.tmp``), fsync, rename over *path*: a scrape sees the old file or the new
    one, whole. The folder must exist (BadInput otherwise).
    """
    folder, name = check_textfile(path)
    target = folder / name
    data = exposition(ledger)
    # The same atomic write as the views, but readable by node_exporter (0644).
    write_file_atomic(target, data, temp_dir=folder, mode=TEXTFILE_MODE)
    return target


def check_textfile(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """(absolute folder, file name) of a textfile path; BadInput when the folder is
    missing or the path names a folder. Checked before anything is read or written."""
    target = Path(os.fspath(path))
    if not os.fspath(path) or not target.name or target.name in (".", ".."):
        raise BadInput(f"metrics textfile {os.fspath(path)!r} is not a file name")
    folder = target.parent.absolute()
    if not folder.is_dir():
        raise BadInput(f"metrics textfile folder {folder} does not exist; create it (it is "
                       "node_exporter's --collector.textfile.directory) or choose another path")
    if target.is_dir():
        raise BadInput(f"metrics textfile {target} is a folder; give a file name ending in "
                       ".prom")
    return folder, target.name


def refresh_textfile(ledger: Ledger, path: str) -> bool:
    """Rewrite *path* after a change; never raises (the change is committed already
    and must not look failed). A failure is logged as one warning line."""
    try:
        write_textfile(ledger, path)
    except (LedgerError, OSError, ValueError) as exc:
        log.warning("upgrade-ledger: warning: metrics textfile not refreshed: %s", exc)
        return False
    return True
