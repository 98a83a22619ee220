"""Bounded growth: the WAL under a long-lived reader, indexes for history, events.

Checkpoint policy (docs/operations.md): SQLite's automatic checkpoint every 1000
pages keeps the WAL near 4 MiB; a reader that holds a transaction open stops the
WAL from restarting, so it grows for as long as that reader stays; once it is gone
the next checkpoint restarts the WAL and ``journal_size_limit`` (4 MiB) trims the
file back. History and events grow by one row per upgrade and per change, and the
history filters and the events of an upgrade are answered through indexes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import child_env, walk_to_upgrading

from ledger.api import Ledger
from ledger.store.database import WAL_SIZE_LIMIT

READER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT COUNT(*) FROM events").fetchone()  # the snapshot is now pinned
print("reading", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
conn.close()
print("closed", flush=True)
"""


def wal_size(home: Path) -> int:
    wal = home / "ledger.db-wal"
    return wal.stat().st_size if wal.exists() else 0


@pytest.fixture
def running(home: Path) -> Iterator[Ledger]:
    """A ledger with an upgrade in UPGRADING and phase p current."""
    with Ledger(home) as led:
        walk_to_upgrading(led, "growth")
        led.phase_start("p")
        yield led


def upgrade_components(led: Ledger, names: range, home: Path) -> int:
    """Start and complete components c<n>; return the largest WAL seen meanwhile."""
    peak = 0
    for n in names:
        led.component_start(f"c{n}", "1", "2")
        led.component_complete(f"c{n}")
        peak = max(peak, wal_size(home))
    return peak


def annotate(led: Ledger, count: int, home: Path) -> int:
    """Commit *count* events of ~30 KB each (about ten pages of WAL apiece, with a
    small view); return the largest WAL seen meanwhile."""
    peak = 0
    for n in range(count):
        led.annotate("growth.note", f"n{n}", {"pad": "x" * 30_000})
        peak = max(peak, wal_size(home))
    return peak


@pytest.mark.slow
def test_wal_is_bounded_again_after_a_long_reader(home: Path, running: Ledger) -> None:
    led = running
    quiet_peak = annotate(led, 120, home)
    # Without a reader, automatic checkpoints keep the WAL near 1000 pages.
    assert quiet_peak <= WAL_SIZE_LIMIT + 64 * 1024, quiet_peak

    reader = subprocess.Popen([sys.executable, "-c", READER, str(home / "ledger.db")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=child_env())
    assert reader.stdin is not None and reader.stdout is not None
    try:
        assert reader.stdout.readline().strip() == "reading"
        pinned_peak = annotate(led, 230, home)
        reader.stdin.write("done\n")
        reader.stdin.flush()
        assert reader.stdout.readline().strip() == "closed"
    finally:
        reader.stdin.close()
        reader.stdout.close()
        reader.wait(timeout=60)
    # The reader held the WAL: it grew well past the checkpoint size ...
    assert pinned_peak > 2 * WAL_SIZE_LIMIT, pinned_peak
    annotate(led, 5, home)
    # ... and once it let go, the WAL restarted and its file was trimmed.
    assert wal_size(home) <= WAL_SIZE_LIMIT
    print(f"\n[wal] quiet peak={quiet_peak} with a long reader={pinned_peak} "
          f"after it closed={wal_size(home)} limit={WAL_SIZE_LIMIT}")


@pytest.mark.slow
def test_events_grow_by_one_per_change(home: Path, running: Ledger) -> None:
    """The audit trail grows linearly: exactly one event per change, nothing rewritten."""
    led = running
    before = led.events(limit=None)
    upgrade_components(led, range(40), home)
    led.mark_rollback_point("c1", "/backups/c1.tar")
    led.set_state("VALIDATING")
    after = led.events(limit=None)
    assert len(after) - len(before) == 40 * 2 + 2
    assert after[:len(before)] == before  # the old events are untouched
    ids = [e["id"] for e in after]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.slow
def test_history_grows_by_one_row_per_upgrade(home: Path) -> None:
    with Ledger(home) as led:
        for n in range(30):
            led.init(f"u{n}")
            led.set_state("PLANNING")
            led.plan({"p": [("c1", "1", "2"), ("c2", "1", "2")]})
            led.set_state("FAILED")
        with led.db.read() as tx:
            counts = {t: tx.scalar(f"SELECT COUNT(*) FROM {t}")
                      for t in ("upgrades", "phases", "components", "events")}
        assert counts == {"upgrades": 30, "phases": 30, "components": 60, "events": 120}
        assert len(led.history(limit=None)) == 30


def plans(led: Ledger, call: object) -> list[tuple[str, list[str]]]:
    """(SQL, EXPLAIN QUERY PLAN lines) of every SELECT the API ran during *call*."""
    statements: list[str] = []
    conn = led.db._conn  # type: ignore[attr-defined]  # tracing the SQL the API runs
    conn.set_trace_callback(statements.append)
    try:
        call()  # type: ignore[operator]
    finally:
        conn.set_trace_callback(None)
    out = []
    for sql in statements:
        if sql.lstrip().upper().startswith(("SELECT", "WITH")):
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            out.append((sql, [row[3] for row in rows]))
    return out


def test_history_filters_and_events_by_upgrade_use_indexes(home: Path) -> None:
    with Ledger(home) as led:
        led.init("u1")
        led.set_state("PLANNING")
        led.plan({"p": [("node_exporter", "1", "2")]})
        calls = {
            "history": led.history,
            "history --state": lambda: led.history(state="COMPLETED"),
            "history --since/--until": lambda: led.history(since="2020-01-01",
                                                           until="2100-01-01"),
            "history --host": lambda: led.history(host="web-1"),
            "history --component": lambda: led.history(component="node_exporter"),
            "events of an upgrade": lambda: led.events(upgrade_id="u1"),
            "show": lambda: led.show("u1"),
        }
        for name, call in calls.items():
            checked = 0
            for sql, plan in plans(led, call):
                for line in plan:
                    if line.startswith("SCAN") and ("upgrades" in sql or "events" in sql):
                        assert "USING" in line, f"{name}: full scan in {line!r} for {sql}"
                if "FROM upgrades u" in sql or "FROM events e" in sql:
                    assert any("INDEX" in line for line in plan), f"{name}: {sql} -> {plan}"
                    checked += 1
            assert checked, f"{name}: no query of upgrades or events was traced"
        events_plan = [p for s, p in plans(led, lambda: led.events(upgrade_id="u1"))
                       if "FROM events" in s]
        assert any("ix_events_host_upgrade_id_id" in line for plan in events_plan for line in plan)
