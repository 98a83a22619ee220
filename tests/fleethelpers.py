"""What the fleet tests share: a host's ledger and its copy in the fleet database, read
side by side; pushers found and stopped; a plan with [fleet] limits."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
from conftest import REPO

from ledger.fleet import spawn

#: The tables a push ships.
SHIPPED = ("upgrades", "phases", "components", "rollback_points", "events")


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")
            if row[1] != "local_id"]


def local_copy(db_path: Path, host: str) -> dict[str, Any]:
    """Every shipped table's rows of *host* in a host's ledger (sorted), and its
    current upgrade."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        out: dict[str, Any] = {}
        for table in SHIPPED:
            cols = _columns(conn, table)
            out[table] = sorted(conn.execute(
                f"SELECT {', '.join(cols)} FROM {table} WHERE host = ?", (host,)).fetchall(),
                key=repr)
        out["current"] = conn.execute("SELECT current_upgrade FROM hosts WHERE name = ?",
                                      (host,)).fetchone()[0]
        return out
    finally:
        conn.close()


def fleet_copy(url: str, host: str, db_path: Path) -> dict[str, Any]:
    """The same, read from the fleet database (the host's ids are ``local_id`` there)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        columns = {table: _columns(conn, table) for table in SHIPPED}
    finally:
        conn.close()
    out: dict[str, Any] = {}
    with psycopg.connect(url) as pg:
        for table, cols in columns.items():
            shown = ["local_id" if c == "id" and table in ("events", "rollback_points")
                     else c for c in cols]
            rows = pg.execute(f"SELECT {', '.join(shown)} FROM {table} WHERE host = %s",
                              (host,)).fetchall()
            out[table] = sorted((tuple(r) for r in rows), key=repr)
        row = pg.execute("SELECT current_upgrade FROM hosts WHERE name = %s", (host,)).fetchone()
        out["current"] = None if row is None else row[0]
    return out


def assert_same(url: str, host: str, db_path: Path) -> None:
    """The fleet's copy of *host* is its ledger: the same rows, counted and compared."""
    here, there = local_copy(db_path, host), fleet_copy(url, host, db_path)
    for table in SHIPPED:
        assert len(there[table]) == len(here[table]), (table, len(there[table]),
                                                       len(here[table]))
        assert there[table] == here[table], table
    assert there["current"] == here["current"]


def fleet_cursor(url: str, host: str) -> int:
    """How far the fleet has this host's ledger (0 before its first push, or before
    the first push made the schema)."""
    with psycopg.connect(url) as pg:
        try:
            row = pg.execute("SELECT shipped_event_id FROM fleet_cursors WHERE host = %s",
                             (host,)).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return 0 if row is None else int(row[0])


def stop_pusher(home: Path, timeout: float = 30.0) -> None:
    """Stop the pusher running for *home* (a step may have started one), and wait until
    it is gone."""
    deadline = time.monotonic() + timeout
    while (pid := spawn.pusher_pid(home)) is not None and time.monotonic() < deadline:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.05)
    assert spawn.pusher_pid(home) is None


def wait_for(check: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll *check* until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fleet_plan(folder: Path, fleet: str, name: str = "plan.toml") -> Path:
    """The example plan (commands simulated by examples/sim) with a ``[fleet]`` table
    of *fleet* (TOML lines), in *folder*."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "sim").exists():
        shutil.copytree(REPO / "examples" / "sim", folder / "sim")
    text = (REPO / "examples" / "observability-stack.toml").read_text()
    head, sep, phases = text.partition("[[phase]]")
    plan = folder / name
    plan.write_text(f"{head}[fleet]\n{fleet}\n\n{sep}{phases}")
    return plan
