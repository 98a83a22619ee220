#!/usr/bin/env python3
"""Benchmark upgrade-ledger: one table of every figure DESIGN.md asks for.

Each figure is the median and p90 of repeated runs at 10, 20, 100, 1,000 and 10,000
components (20 is the reference of the "flat as components grow" budgets), plus a
history query over a ledger of 100,000 upgrades. Beside each figure: the floors
measured in the same run (interpreter start, interpreter with sqlite3/json and with
click/sqlite3/json imported, a bare SQLite WAL commit with synchronous=FULL, a raw
fsync), the seed document's own claims, and the budgets, each marked ok or MISSED.
With ``--legacy-lib PATH`` the old bash+jq library is run side by side, in the same
rounds, and the drop-in is judged by its ratio to it (same run, medians).

    python scripts/bench.py            # the full table (about two minutes)
    python scripts/bench.py --quick    # a smoke run (small sizes, few repetitions)
    python scripts/bench.py --json     # machine-readable results on stdout
    python scripts/bench.py --wheel    # measure the CLI from a wheel installed in a temp venv
    python scripts/bench.py --legacy-lib PATH   # beside the old library (its upgrade-state.sh)
    python scripts/bench.py --pg-url postgresql://...   # the PostgreSQL figures on that server

The PostgreSQL figures (a step at 20 components against a server, next to the SQLite
step of the same run, and what it is made of) use ``--pg-url`` or
``LEDGER_BENCH_PG_URL`` (a role that may create a database); without either, a
throwaway server is started as the test suite does (tests/pgserver.py) when
``initdb`` is installed, else they are skipped (``--no-pg`` skips them always).
The same server is the fleet database of the fleet figures: the CLI step at 20
components with a fleet URL configured (a pusher running in the background) and with
the fleet database down (the drop-in's call too), beside the local step of the same
rounds; how many events a
push sends per second (batches of 1,000); and the lag from a step to its row in the
fleet database while ``fleet push --follow`` runs.

Everything happens in a temporary folder that is removed at the end. Child
processes get a private bytecode cache (``PYTHONPYCACHEPREFIX``) so that they
measure what an installed command costs, not the compilation of our sources
(``--no-bytecode-cache`` measures that case). docs/performance.md explains the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parent.parent
DROP_IN = REPO / "scripts" / "upgrade-state.sh"

FULL_SIZES = (10, 20, 100, 1_000, 10_000)
QUICK_SIZES = (10, 20)
REFERENCE_SIZE = 20  # the "flat as components grow" budgets compare against this size
FULL_HISTORY = 100_000
QUICK_HISTORY = 2_000

# Environment variables that would point a child at another ledger or change its output.
_FOREIGN_ENV = ("LEDGER_HOME", "LEDGER_DB_URL", "LEDGER_FORMAT", "LEDGER_PID", "LEDGER_STRICT",
                "LEDGER_TRACEBACK", "LEDGER_LOCK_TIMEOUT", "UPGRADE_STATE_DIR",
                "UPGRADE_STATE_FILE", "UPGRADE_LOCK_FILE", "UPGRADE_TEMP_DIR",
                "UPGRADE_BACKUPS_DIR", "UPGRADE_HISTORY_DIR", "UPGRADE_LEDGER_BIN")

try:  # the ledger under test: the installed one, else this checkout's
    import ledger
except ImportError:  # pragma: no cover - running from a bare checkout
    sys.path.insert(0, str(REPO))
    import ledger

from ledger.api import Ledger  # noqa: E402
from ledger.fleet import pusher, spawn  # noqa: E402
from ledger.lock import DirLock  # noqa: E402
from ledger.store import urls  # noqa: E402

# -- statistics ---------------------------------------------------------------------

def summarize(samples: Sequence[float], cpu: Sequence[float] = ()) -> dict[str, Any]:
    """Median and p90 (nearest rank) of *samples*, in the samples' unit; with *cpu*
    (a process's user+system time per sample), its median too."""
    ordered = sorted(samples)
    p90 = ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]
    out = {"median": round(statistics.median(ordered), 3), "p90": round(p90, 3),
           "n": len(ordered)}
    if cpu:
        out["cpu_median"] = round(statistics.median(cpu), 3)
    return out


def timed(action: Callable[[int], Any], repeat: int, warmup: int = 1) -> dict[str, Any]:
    """Run ``action(i)`` *repeat* times after *warmup* untimed runs; milliseconds."""
    for i in range(warmup):
        action(-1 - i)
    samples = []
    for i in range(repeat):
        start = time.perf_counter()
        action(i)
        samples.append((time.perf_counter() - start) * 1000)
    return summarize(samples)


# -- the bench ----------------------------------------------------------------------

class Bench:
    """Sets up ledgers in a private folder and measures every figure."""

    def __init__(self, work: Path, *, sizes: Sequence[int], repeat: int, proc_repeat: int,
                 history_upgrades: int, cli: list[str], python: str, env: dict[str, str],
                 log: Callable[[str], None], pg_url: str | None = None) -> None:
        self.work = work
        self.pg_url = pg_url
        self.sizes = list(sizes)
        self.repeat = repeat
        self.proc_repeat = proc_repeat
        self.history_upgrades = history_upgrades
        self.cli = cli
        self.python = python
        self.env = env
        self.log = log
        self.skip_drop_in = False
        self.legacy_lib: Path | None = None
        self.legacy_homes: dict[int, Path] = {}
        self.floors: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, dict[str, Any]] = {}

    # processes ------------------------------------------------------------------------

    def _run(self, argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
        """Run one process to its end: (wall ms, its user+system CPU ms)."""
        with tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            child = subprocess.Popen(argv, env=env or self.env, stdout=subprocess.DEVNULL,
                                     stderr=err)
            _, status, usage = os.wait4(child.pid, 0)  # wait4: the child's own CPU time too
            wall = (time.perf_counter() - start) * 1000
            child.returncode = os.waitstatus_to_exitcode(status)
            if child.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"{' '.join(argv)} exited {child.returncode}: "
                                   f"{err.read().decode(errors='replace')}")
        return wall, (usage.ru_utime + usage.ru_stime) * 1000

    def _process(self, argv_of: Callable[[int], list[str]], repeat: int) -> dict[str, Any]:
        """Wall and CPU time of a process, *repeat* times after one warm-up run."""
        self._run(argv_of(-1))
        runs = [self._run(argv_of(i)) for i in range(repeat)]
        return summarize([w for w, _ in runs], [c for _, c in runs])

    # floors ---------------------------------------------------------------------------

    def measure_floors(self) -> None:
        """What the machine costs before any of our code runs."""
        self.log("floors")
        folder = self.work / "floors"
        folder.mkdir()
        conn = sqlite3.connect(folder / "floor.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")

        def commit(i: int) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (v) VALUES (?)", (str(i),))
            conn.execute("COMMIT")

        self.floors["sqlite WAL commit (synchronous=FULL)"] = timed(commit, self.repeat * 4)
        conn.close()
        fd = os.open(folder / "fsync", os.O_WRONLY | os.O_CREAT, 0o600)

        def raw_fsync(i: int) -> None:
            os.pwrite(fd, b"%08d" % i, 0)
            os.fsync(fd)

        self.floors["raw fsync"] = timed(raw_fsync, self.repeat * 4)
        os.close(fd)

        def mkdir_rmdir(_: int) -> None:
            (folder / "lock.d").mkdir()
            (folder / "lock.d").rmdir()

        self.floors["mkdir + rmdir"] = timed(mkdir_rmdir, self.repeat * 4)

    # ledgers --------------------------------------------------------------------------

    def make_ledger(self, n: int, url: str | None = None, name: str | None = None) -> Path:
        """A ledger mid-upgrade: phase p1 current, n components of which half done
        (in the home's SQLite file, or at *url*)."""
        home = self.work / (name or (f"ledger-{n}" if url is None else f"pg-ledger-{n}"))
        with Ledger(home, db_url=url, host_name=PG_HOST if url else None) as led:
            led.init("bench-upgrade")
            for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
                led.set_state(state)
            led.plan({"p1": [(_component(i), "1.4.2", "1.5.0") for i in range(n)]})
            led.phase_start("p1")
            # Half the components finished (a setup shortcut, one SQL statement; the
            # view is rewritten from the ledger right after).
            with led.db.write() as tx:
                tx.execute(
                    "UPDATE components SET state = 'COMPLETED', attempts = 1, "
                    "started_at = '2026-01-01T10:00:00.000Z', "
                    "completed_at = '2026-01-01T10:00:07.000Z' "
                    "WHERE host = :host AND upgrade_id = 'bench-upgrade' AND "
                    "position <= :half",
                    {"half": n // 2})
            led.write_views()
        return home

    def step_component(self, n: int, i: int) -> str:
        """The component a step works on: the not-yet-done half, round robin."""
        return _component(n // 2 + (i % (n - n // 2)))

    # processes, in rounds ----------------------------------------------------------------

    def measure_processes(self, homes: dict[int, Path]) -> None:
        """Every process figure, in rounds: each round runs the floors and one step of
        each size (and of the old library, when given), so a load that comes and goes
        (a shared machine) hits every column alike, and the ratios (flat as components
        grow, and to the old library) compare like with like."""
        self.log(f"processes: {self.proc_repeat} rounds over {len(homes)} ledgers")
        floors = {"python -c pass": [self.python, "-c", "pass"],
                  "import sqlite3, json": [self.python, "-c", "import sqlite3, json"],
                  "import click, sqlite3, json": [self.python, "-c",
                                                  "import click, sqlite3, json"]}
        pg_home = None
        if self.pg_url is not None:
            floors[PG_IMPORT] = [self.python, "-c", "import click, sqlite3, json, psycopg"]
            pg_home = self.make_ledger(REFERENCE_SIZE, self.pg_url)
        fleet_homes = self.fleet_copies(homes)
        samples: dict[tuple[str, int | str], list[tuple[float, float]]] = {}

        def put(key: str, at: int | str, sample: tuple[float, float], keep: bool) -> None:
            if keep:
                samples.setdefault((key, at), []).append(sample)

        for i in range(-1, self.proc_repeat):  # round -1 warms every cache up
            keep = i >= 0
            for name, argv in floors.items():
                put(name, "floor", self._run(argv), keep)
            for n, home in homes.items():
                base = [*self.cli, "--home", str(home)]
                comp = self.step_component(n, i)
                put("cli_step", n, self._run([*base, "component", "start", comp, "1.4.2",
                                              "1.5.0"]), keep)
                put("cli_step", n, self._run([*base, "component", "complete", comp]), keep)
                # can-resume answers by exit code (0: yes); the ledger is UPGRADING: yes.
                put("resume_cli", n, self._run([*base, "can-resume"]), keep)
                names = [self.step_component(n, i + k) for k in (7, 11)]
                for sample in self.dropin_cycle(home, names, session=True):
                    put("dropin_step", n, sample, keep)
                for sample in self.dropin_cycle(home, names[:1], session=False):
                    put("dropin_oneshot", n, sample, keep)
                if n in self.legacy_homes:
                    for sample in self.legacy_cycle(self.legacy_homes[n],
                                                    self.step_component(n, i + 3)):
                        put("legacy_step", n, sample, keep)
                if n == REFERENCE_SIZE:
                    for key, sample in self.reference_round(i, names, fleet_homes, pg_home):
                        put(key, n, sample, keep)
        for fleet_home, _ in fleet_homes.values():
            stop_pusher(fleet_home)
        for (key, at), runs in samples.items():
            figure = summarize([w for w, _ in runs], [c for _, c in runs if c >= 0])
            if at == "floor":
                self.floors[key] = figure
            else:
                self._put(key, at, figure)

    def fleet_copies(self, homes: dict[int, Path]) -> dict[str, tuple[Path, str]]:
        """Copies of the reference ledger for the step with a fleet configured (its
        pusher running in the background) and with the fleet database down:
        {row key: (home, fleet URL)}."""
        if REFERENCE_SIZE not in homes:
            return {}
        fleets = {"fleet_down_cli_step": FLEET_DOWN}
        if self.pg_url is not None:
            fleets["fleet_cli_step"] = self.pg_url
        for key in fleets:
            shutil.copytree(homes[REFERENCE_SIZE], self.work / key, symlinks=True)
        return {key: (self.work / key, url) for key, url in fleets.items()}

    def reference_round(self, i: int, names: Sequence[str],
                        fleet_homes: dict[str, tuple[Path, str]], pg_home: Path | None,
                        ) -> list[tuple[str, tuple[float, float]]]:
        """Round *i*'s figures taken at the reference size only: the step with a fleet
        URL (and the fleet database up or down), the drop-in with the fleet database
        down, the step against the PostgreSQL server; [(row key, sample), ...]."""
        taken: list[tuple[str, tuple[float, float]]] = []
        comp = self.step_component(REFERENCE_SIZE, i)
        for key, (fleet_home, url) in fleet_homes.items():
            env = dict(self.env, LEDGER_FLEET_URL=url)
            fbase = [*self.cli, "--home", str(fleet_home)]
            taken.append((key, self._run([*fbase, "component", "start", comp, "1.4.2",
                                          "1.5.0"], env)))
            taken.append((key, self._run([*fbase, "component", "complete", comp], env)))
        if "fleet_down_cli_step" in fleet_homes:
            # The drop-in too (its session), with the fleet database down.
            taken += [("fleet_down_dropin_step", sample) for sample in self.dropin_cycle(
                fleet_homes["fleet_down_cli_step"][0], names, session=True,
                fleet_url=FLEET_DOWN)]
        if pg_home is not None:
            # The same step, same round, against the server.
            pg = [*self.cli, "--home", str(pg_home), "--db", str(self.pg_url),
                  "--host-name", PG_HOST]
            taken.append(("pg_cli_step", self._run([*pg, "component", "start", comp,
                                                    "1.4.2", "1.5.0"])))
            taken.append(("pg_cli_step", self._run([*pg, "component", "complete", comp])))
        return taken

    def dropin_cycle(self, home: Path, names: Sequence[str], *,
                     session: bool, fleet_url: str | None = None,
                     ) -> list[tuple[float, float]]:
        """A start and a complete of each of *names* through the drop-in, timed inside one
        bash (which sources the library first, as scripts do): [(ms, -1), ...] (no CPU
        figure: the calls share their shell). With *session*, one untimed call first
        starts the shell's session, as a script's first call does; without, every call
        is its own process (UPGRADE_LEDGER_SESSION=0). *fleet_url* is the fleet
        database the calls are configured with. Nothing when the drop-in is not
        there."""
        if not DROP_IN.exists() or self.skip_drop_in:
            return []
        lines = ["set -euo pipefail", f"source {_sh(str(DROP_IN))}"]
        if session:
            lines.append("upgrade_state_get_current >/dev/null")
        lines.append("t=($EPOCHREALTIME)")
        for name in names:
            lines += [f"upgrade_component_start {_sh(name)} 1.4.2 1.5.0; t+=($EPOCHREALTIME)",
                      f"upgrade_component_complete {_sh(name)}; t+=($EPOCHREALTIME)"]
        lines.append('echo "${t[*]}"')
        env = dict(self.env, UPGRADE_STATE_DIR=str(home),
                   UPGRADE_LEDGER_SESSION="1" if session else "0")
        if fleet_url is not None:
            env["LEDGER_FLEET_URL"] = fleet_url
        if len(self.cli) == 1:
            env["UPGRADE_LEDGER_BIN"] = self.cli[0]  # else it is found on PATH
        return _timed_bash("\n".join(lines), env)

    def legacy_cycle(self, home: Path, name: str) -> list[tuple[float, float]]:
        """The same start and complete through the old bash+jq library (--legacy-lib),
        on its own state.json of the same size."""
        assert self.legacy_lib is not None
        script = "\n".join([
            f"source {_sh(str(self.legacy_lib))}",
            "upgrade_state_init_dirs",
            f"t=($EPOCHREALTIME); upgrade_component_start {_sh(name)} 1.4.2 1.5.0",
            f"t+=($EPOCHREALTIME); upgrade_component_complete {_sh(name)}",
            't+=($EPOCHREALTIME); echo "${t[*]}"',
        ])
        return _timed_bash(script, dict(self.env, UPGRADE_STATE_DIR=str(home)))

    def make_legacy(self, n: int, home: Path) -> Path:
        """The old library's folder for *n* components: the state.json of our ledger of
        that size (the same legacy format), nothing else."""
        folder = self.work / f"legacy-{n}"
        folder.mkdir()
        shutil.copyfile(home / "state.json", folder / "state.json")
        return folder

    def _put(self, key: str, n: int | str, figure: dict[str, Any]) -> None:
        self.rows.setdefault(key, {})[str(n)] = figure

    def in_process(self, home: Path, n: int) -> None:
        r = self.repeat
        with Ledger(home) as led:
            def transition(i: int) -> None:
                name = self.step_component(n, i)
                led.component_start(name, "1.4.2", "1.5.0")
                led.component_complete(name)

            samples: list[float] = []
            transition(-1)
            for i in range(r):
                name = self.step_component(n, i)
                for call in (lambda: led.component_start(name, "1.4.2", "1.5.0"),  # noqa: B023
                             lambda: led.component_complete(name)):  # noqa: B023
                    start = time.perf_counter()
                    call()
                    samples.append((time.perf_counter() - start) * 1000)
            self._put("transition", n, summarize(samples))
            pid = os.getpid()
            self._put("lock_ledger", n, timed(
                lambda _: (led.acquire_lock(pid), led.release_lock(pid)), r * 2))
            self._put("resume", n, timed(lambda _: (led.can_resume(), led.resume_point()), r))
            self._put("progress", n, timed(lambda _: led.progress_percent(), r))
            self._put("export", n, timed(lambda _: led.write_views(), r))
            # The floor of any view write: the same bytes, written atomically (temp file,
            # fsync, rename, fsync of the folder), nothing built.
            data = led.home.state_file.read_bytes()
            self._put("view_write", n, timed(
                lambda _: led.home.write_atomic(led.home.state_file, data), r))
            led.write_views()  # back to a view the ledger wrote (and can patch)
            self._put("history", n, timed(lambda _: led.history(limit=10), r))
            # The size of the view once every component is done (as big as it gets).
            with led.db.write() as tx:
                tx.execute("UPDATE components SET state = 'COMPLETED', attempts = 1, "
                           "started_at = '2026-01-01T10:00:00.000Z', "
                           "completed_at = '2026-01-01T10:00:07.000Z' WHERE state <> "
                           "'COMPLETED' OR started_at IS NULL")
            led.set_state("VALIDATING")
            led.set_state("COMPLETED")
            led.write_views()
            size = led.home.state_file.stat().st_size
            self._put("state_size", n, {"median": round(size / 1024, 1), "p90": None, "n": 1})
        lock = DirLock(self.work / f"dirlock-{n}" / "upgrade.lock.d")
        (self.work / f"dirlock-{n}").mkdir()
        self._put("lock_dirlock", n, timed(
            lambda _: (lock.acquire(os.getpid()), lock.release(os.getpid())), r * 2))

    # a long history -------------------------------------------------------------------

    def measure_history(self) -> None:
        count = self.history_upgrades
        self.log(f"history: building a ledger of {count:,} upgrades")
        home = self.work / "history"
        with Ledger(home) as led:  # creates and migrates the ledger
            here = led.identity.name
        build_history(home / "ledger.db", count, here)
        key = f"{count:,} upgrades"
        r = self.repeat
        self.log("history: querying")
        with Ledger(home) as led:
            self._put("history_big", key, timed(lambda _: led.history(limit=10), r))
            self._put("history_big_state", key,
                      timed(lambda _: led.history(limit=10, state="ROLLED_BACK"), r))
            self._put("history_big_component", key,
                      timed(lambda _: led.history(limit=10, component="blackbox_exporter"), r))
            # The slow case: a name no upgrade has, so every upgrade is looked at.
            self._put("history_big_absent", key,
                      timed(lambda _: led.history(limit=10, component="never_installed"), r))
            self._put("history_big_host", key,
                      timed(lambda _: led.history(limit=10, host=here, since="3650d"), r))
        self._put("history_big_cli", key, self._process(
            lambda _: [*self.cli, "--home", str(home), "history", "--limit", "10"],
            max(3, self.proc_repeat // 2)))

    def measure_postgres(self) -> None:
        """In-process figures against the server: a transition, the round trips it
        makes, and the floors of its cost (a connection, one round trip)."""
        import psycopg  # noqa: PLC0415 (only with a server)

        url, n, r = str(self.pg_url), REFERENCE_SIZE, self.repeat
        self.log("postgres: in-process")
        conn = psycopg.connect(url, autocommit=True)
        self.floors[PG_ROUND_TRIP] = timed(lambda _: conn.execute("SELECT 1").fetchall(),
                                          r * 4)
        conn.close()
        self.floors[PG_CONNECT] = timed(lambda _: psycopg.connect(url).close(), r)
        home = self.work / f"pg-ledger-{n}"
        with Ledger(home, db_url=url, host_name=PG_HOST) as led:
            samples: list[float] = []
            for i in range(-1, r):  # -1: a warm-up step
                name = self.step_component(n, i + 3)
                for call in (lambda: led.component_start(name, "1.4.2", "1.5.0"),  # noqa: B023
                             lambda: led.component_complete(name)):  # noqa: B023
                    start = time.perf_counter()
                    call()
                    if i >= 0:
                        samples.append((time.perf_counter() - start) * 1000)
            self._put("pg_transition", n, summarize(samples))
            trips = count_round_trips(lambda: led.component_start(
                self.step_component(n, 1), "1.4.2", "1.5.0"))
            trips_done = count_round_trips(lambda: led.component_complete(
                self.step_component(n, 1)))
            self._put("pg_round_trips", n, {"median": max(trips, trips_done), "p90": None,
                                            "n": 2})

    def measure_fleet(self) -> None:
        """Push throughput (a ledger of finished upgrades, batches of 1,000 events) and
        the lag from a step to its row in the fleet database under ``push --follow``."""
        import psycopg  # noqa: PLC0415 (only with a server)

        url = str(self.pg_url)
        count = min(self.history_upgrades, FLEET_HISTORY)
        self.log(f"fleet: pushing {count:,} upgrades ({2 * count:,} events)")
        home = self.work / "fleet-push"
        with Ledger(home, host_name="bench-push") as led:
            pass
        build_history(home / "ledger.db", count, "bench-push")
        self._put("fleet_push_rate", f"{self.history_upgrades:,} upgrades",
                  _push_rate(home, "bench-push", url))
        # The other shape: one upgrade's step events (what a host sends as it upgrades).
        home = self.make_ledger(REFERENCE_SIZE, name="fleet-steps")
        add_step_events(home / "ledger.db", 2 * count)
        self._put("fleet_push_rate_steps", REFERENCE_SIZE, _push_rate(home, None, url))
        self.log("fleet: lag under push --follow")
        home = self.make_ledger(REFERENCE_SIZE, name="fleet-follow")
        follower = subprocess.Popen([*self.cli, "--home", str(home), "fleet", "push",
                                     "--follow"], env=dict(self.env, LEDGER_FLEET_URL=url),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples: list[float] = []
        try:
            with Ledger(home, wired=False) as led, psycopg.connect(url) as pg:
                host = led.identity.name
                for i in range(-1, self.repeat):  # -1: the follower's first push
                    name = self.step_component(REFERENCE_SIZE, i)
                    led.component_start(name, "1.4.2", "1.5.0")
                    stepped = time.perf_counter()
                    event = led.events(limit=1, newest=True)[0]["id"]
                    while not pg.execute("SELECT 1 FROM events WHERE host = %s AND "
                                         "local_id = %s", (host, event)).fetchall():
                        time.sleep(0.002)
                    if i >= 0:
                        samples.append((time.perf_counter() - stepped) * 1000)
                    led.component_complete(name)
                    time.sleep(0.25)  # steps of a script come apart, not back to back
        finally:
            follower.terminate()
            follower.wait(timeout=60)
        self._put("fleet_lag", REFERENCE_SIZE, summarize(samples))

    def run(self) -> None:
        self.measure_floors()
        homes = {}
        for n in self.sizes:
            self.log(f"{n} components: setting up")
            homes[n] = self.make_ledger(n)
            if self.legacy_lib is not None:
                self.legacy_homes[n] = self.make_legacy(n, homes[n])
        self.measure_processes(homes)
        for n, home in homes.items():
            self.log(f"{n} components: in-process")
            self.in_process(home, n)
        if self.pg_url is not None:
            self.measure_postgres()
            self.measure_fleet()
        self.measure_history()


PG_HOST = "bench-host"
#: A fleet database nobody answers for: connections are refused at once.
FLEET_DOWN = "postgresql://ledger@127.0.0.1:1/fleet"
#: The most upgrades the push throughput ledger holds (two events each).
FLEET_HISTORY = 20_000


def _push_rate(home: Path, host: str | None, url: str) -> dict[str, Any]:
    """Events per second of one push of the ledger at *home* to *url* (batches of 1,000)."""
    with Ledger(home, host_name=host, fleet_url=url, wired=False) as led:
        start = time.perf_counter()
        done = pusher.push(led, batch=1000)
        seconds = time.perf_counter() - start
    return {"median": round(done.events / seconds), "p90": None, "n": 1}


def add_step_events(db_path: Path, count: int) -> None:
    """Append *count* component events to the bench ledger's upgrade (bulk SQL)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    host = conn.execute("SELECT name FROM hosts").fetchone()[0]
    conn.executemany(
        "INSERT INTO events (host, at, upgrade_id, kind, subject, from_value, to_value, "
        "username, hostname, pid, detail) VALUES (?, '2026-01-01T10:00:00.000Z', "
        "'bench-upgrade', 'component.completed', ?, 'UPGRADING', 'COMPLETED', 'ops', ?, "
        "4242, '{\"phase\": \"p1\"}')",
        [(host, _component(i % REFERENCE_SIZE), host) for i in range(count)])
    conn.execute("COMMIT")
    conn.close()


def stop_pusher(home: Path) -> None:
    """Stop the pusher a step started for *home* (it would outlive the bench)."""
    deadline = time.monotonic() + 30
    while (pid := spawn.pusher_pid(home)) is not None and time.monotonic() < deadline:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        time.sleep(0.05)
PG_IMPORT = "import click, sqlite3, json, psycopg"
PG_CONNECT = "psycopg connect + close"
PG_ROUND_TRIP = "PostgreSQL round trip (SELECT 1)"


def count_round_trips(action: Callable[[], Any]) -> int:
    """How many messages *action* sends to the server and waits for (one each)."""
    import psycopg  # noqa: PLC0415

    count = [0]
    patched = [(cls, name, getattr(cls, name)) for cls, name in (
        (psycopg.Cursor, "execute"), (psycopg.ClientCursor, "execute"),
        (psycopg.Connection, "execute"))]
    for cls, name, original in patched:
        def counting(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            count[0] += 1
            return _original(*args, **kwargs)
        setattr(cls, name, counting)
    try:
        action()
    finally:
        for cls, name, original in patched:
            setattr(cls, name, original)
    return count[0]


def start_server(log: Callable[[str], None]) -> tuple[str | None, Any]:
    """A throwaway server as the test suite makes one: (URL of a new database, server)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import pgserver  # noqa: PLC0415
    except ImportError:
        return None, None
    try:
        server = pgserver.start()
    except pgserver.Unavailable as exc:
        log(f"postgres: skipped ({exc})")
        return None, None
    return server.new_database("bench"), server


def _component(i: int) -> str:
    return f"exporter-{i:05d}"


def _timed_bash(script: str, env: dict[str, str]) -> list[tuple[float, float]]:
    """Run *script* in bash; it prints $EPOCHREALTIME stamps on its last line: the
    durations between them in ms, as samples without a CPU figure."""
    bash = shutil.which("bash") or "/bin/bash"
    done = subprocess.run([bash, "-c", script], env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bash run failed ({done.returncode}): {done.stderr[-2000:]}")
    stamps = [float(x.replace(",", ".")) for x in done.stdout.splitlines()[-1].split()]
    return [((b - a) * 1000, -1.0) for a, b in itertools.pairwise(stamps)]


def _sh(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


_HOSTS = [f"host-{i:02d}" for i in range(20)]
_NAMES = ["node_exporter", "prometheus", "alertmanager", "grafana", "loki", "promtail",
          "tempo", "mimir", "pushgateway", "process_exporter", "snmp_exporter",
          "blackbox_exporter"]


def build_history(db_path: Path, count: int, owner: str) -> None:
    """Fill a migrated ledger with *count* finished upgrades of host *owner* (one phase,
    four components and two events each; run by processes that recorded 20 node names)
    by bulk SQL in one transaction: seconds, not minutes."""
    outcomes = ["COMPLETED"] * 17 + ["FAILED", "FAILED", "ROLLED_BACK"]
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO hosts (name, created_at) VALUES (?, '2020-01-01T00:00:00.000Z') "
                  "ON CONFLICT (name) DO NOTHING", (owner,))
    upgrades, phases, components, events = [], [], [], []
    t0 = 1_600_000_000
    for i in range(count):
        start = t0 + i * 3600
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start))
        started, finished = stamp + ".000Z", time.strftime(
            "%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(start + 600))
        uid = f"upgrade-{stamp[:10].replace('-', '')}-{stamp[11:].replace(':', '')}-{i}"
        outcome = outcomes[i % len(outcomes)]
        host = _HOSTS[i % len(_HOSTS)]
        upgrades.append((owner, uid, "IDLE", outcome, started, finished, finished, host, "ops",
                         4242))
        phases.append((owner, uid, "exporters", 1, "COMPLETED", started, finished))
        for k in range(4):
            name = _NAMES[(i * 4 + k) % len(_NAMES)]
            state = "FAILED" if outcome == "FAILED" and k == 3 else "COMPLETED"
            components.append((owner, uid, "exporters", name, k + 1, state, "1.0.0", "1.1.0",
                               1, started, finished))
        events.append((owner, started, uid, "upgrade.init", None, None, "IDLE", "ops", host,
                       4242))
        events.append((owner, finished, uid, "upgrade.state", None, "VALIDATING", outcome,
                       "ops", host, 4242))
    conn.executemany(
        "INSERT INTO upgrades (host, id, state, outcome, started_at, updated_at, finished_at, "
        "hostname, username, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", upgrades)
    conn.executemany(
        "INSERT INTO phases (host, upgrade_id, name, position, state, started_at, "
        "completed_at) VALUES (?, ?, ?, ?, ?, ?, ?)", phases)
    conn.executemany(
        "INSERT INTO components (host, upgrade_id, phase, name, position, state, "
        "from_version, to_version, attempts, started_at, completed_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", components)
    conn.executemany(
        "INSERT INTO events (host, at, upgrade_id, kind, subject, from_value, to_value, "
        "username, hostname, pid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", events)
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


# -- what each row means, and its budgets -------------------------------------------

ROWS: list[tuple[str, str, str, str]] = [
    # key, label, floors shown beside it, the seed's claim
    ("legacy_step", "old library call (bash+jq, same run)", "", "save<50"),
    ("cli_step", "CLI step (component start|complete)", "cli", "save<50"),
    ("dropin_oneshot", "drop-in call, a process each", "cli", "save<50"),
    ("dropin_step", "drop-in call, with the session", "commit", "save<50"),
    ("resume_cli", "CLI resume check (can-resume)", "cli", "resume<100"),
    ("transition", "transition (Ledger.component_*)", "commit", "save<50"),
    ("lock_dirlock", "lock acquire+release (DirLock)", "lock", "lock<10"),
    ("lock_ledger", "lock acquire+release (Ledger)", "lock", "lock<10"),
    ("resume", "resume check (can_resume+point)", "", "resume<100"),
    ("progress", "progress (progress_percent)", "", ""),
    ("view_write", "state.json atomic write alone", "commit", ""),
    ("export", "state.json export (write_views)", "commit", ""),
    ("history", "history (latest 10)", "", ""),
    ("history_big", "history (latest 10)", "", ""),
    ("history_big_state", "history (state=ROLLED_BACK)", "", ""),
    ("history_big_component", "history (component=X)", "", ""),
    ("history_big_absent", "history (component never seen)", "", ""),
    ("history_big_host", "history (--host X, since=10y)", "", ""),
    ("history_big_cli", "CLI history (latest 10)", "cli", ""),
    ("state_size", "state.json size, all done (KB)", "", "<100 KB for 100+"),
    ("pg_cli_step", "CLI step on PostgreSQL (start|complete)", "pg", ""),
    ("pg_transition", "transition on PostgreSQL (in-process)", "pgnet", ""),
    ("pg_round_trips", "PostgreSQL round trips per step", "", ""),
    ("fleet_cli_step", "CLI step, fleet URL set (start|complete)", "cli", ""),
    ("fleet_down_cli_step", "CLI step, fleet database down", "cli", ""),
    ("fleet_down_dropin_step", "drop-in call, fleet database down", "cli", ""),
    ("fleet_push_rate", "fleet push, history (events/s, 1,000/batch)", "", ""),
    ("fleet_push_rate_steps", "fleet push, one upgrade's steps (events/s)", "", ""),
    ("fleet_lag", "lag step -> fleet row (push --follow)", "", ""),
]
#: Rows shown as a ratio to the old library's call of the same size (same run).
COMPARED = ("cli_step", "dropin_oneshot", "dropin_step")

FLOOR_SETS = {
    "cli": ("python -c pass", "import sqlite3, json", "import click, sqlite3, json"),
    "commit": ("sqlite WAL commit (synchronous=FULL)", "raw fsync"),
    "lock": ("mkdir + rmdir", "raw fsync"),
    "pg": ("import click, sqlite3, json", PG_IMPORT),
    "pgnet": (PG_CONNECT, PG_ROUND_TRIP),
}
FLOOR_SHORT = {"python -c pass": "pass", "import sqlite3, json": "+sqlite3,json",
               "import click, sqlite3, json": "+click",
               "sqlite WAL commit (synchronous=FULL)": "WAL commit", "raw fsync": "fsync",
               "mkdir + rmdir": "mkdir+rmdir", PG_IMPORT: "+psycopg",
               PG_CONNECT: "connect", PG_ROUND_TRIP: "round trip"}


def judge(rows: dict[str, dict[str, Any]], sizes: Sequence[int]) -> dict[str, dict[str, Any]]:
    """The issue budgets: {row key: {text, ok, checks: [...]}}; ok is None when the
    figure was not measured (a smaller run, or the drop-in is not there yet)."""
    verdicts: dict[str, dict[str, Any]] = {}

    def median(key: str, at: int | str) -> float | None:
        cell = rows.get(key, {}).get(str(at))
        return None if cell is None else cell["median"]

    def check(key: str, text: str, checks: list[tuple[str, float | None, float]]) -> None:
        results = [{"what": what, "measured": value, "limit": limit,
                    "ok": None if value is None else value <= limit}
                   for what, value, limit in checks]
        known = [c["ok"] for c in results if c["ok"] is not None]
        verdicts[key] = {"text": text, "ok": (all(known) if known else None),
                         "checks": results}

    biggest = max(sizes)
    legacy = median("legacy_step", REFERENCE_SIZE)

    def flat(key: str) -> tuple[str, float | None, float]:
        ref = median(key, REFERENCE_SIZE)
        return (f"@{biggest} vs 1.2x @{REFERENCE_SIZE}", median(key, biggest),
                1.2 * ref if ref is not None else math.inf)

    def to_legacy(key: str, factor: float) -> tuple[str, float | None, float]:
        # Unknown (n/a) without --legacy-lib: a ratio is only taken within one run.
        return (f"@{REFERENCE_SIZE} vs {factor:g}x the old library",
                None if legacy is None else median(key, REFERENCE_SIZE),
                math.inf if legacy is None else factor * legacy)

    for key in ("cli_step", "dropin_oneshot"):
        check(key, f"<=90; <=0.35x old; @{biggest:,}<=1.2x@{REFERENCE_SIZE}",
              [*((f"median @{n}", median(key, n), 90.0) for n in sizes), flat(key),
               to_legacy(key, 0.35)])
    check("dropin_step", f"@{REFERENCE_SIZE}<=3 & <=0.1x old; @{biggest:,}<=1.2x@{REFERENCE_SIZE}",
          [(f"median @{REFERENCE_SIZE}", median("dropin_step", REFERENCE_SIZE), 3.0),
           to_legacy("dropin_step", 0.1), flat("dropin_step")])
    check("transition", "<=1.5", [(f"median @{n}", median("transition", n), 1.5)
                                       for n in sizes])
    for key in ("lock_dirlock", "lock_ledger"):
        check(key, "<=1", [(f"median @{n}", median(key, n), 1.0) for n in sizes])
    check("export", "@1,000<=30; @10,000<=300",
          [("@1000", median("export", 1000), 30.0), ("@10000", median("export", 10000), 300.0)])
    big = f"{FULL_HISTORY:,} upgrades"  # judged only when the ledger is that big
    for key in ("history_big", "history_big_state", "history_big_component", "history_big_absent",
                "history_big_host"):
        check(key, f"<=100 @{FULL_HISTORY:,} upg.", [(big, median(key, big), 100.0)])
    check("state_size", "@100<=31 KB", [("@100", median("state_size", 100), 31.0)])
    for key, local_key in (("fleet_cli_step", "cli_step"), ("fleet_down_cli_step", "cli_step"),
                           ("fleet_down_dropin_step", "dropin_step")):
        local = median(local_key, REFERENCE_SIZE)
        check(key, f"<=1.1x local @{REFERENCE_SIZE}",
              [(f"median @{REFERENCE_SIZE}", median(key, REFERENCE_SIZE),
                1.1 * local if local is not None else math.inf)])
    return verdicts


# -- output ---------------------------------------------------------------------------

def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return ""
    if cell["p90"] is None:
        return f"{cell['median']:g}"
    return f"{_num(cell['median'])}/{_num(cell['p90'])}"


def _num(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def table(result: dict[str, Any]) -> str:
    """The one table, as aligned plain text."""
    sizes = result["settings"]["sizes"]
    rows, floors, verdicts = result["rows"], result["floors"], result["verdicts"]
    history_key = f"{result['settings']['history_upgrades']:,} upgrades"
    header = ["figure (median/p90 ms)", *(f"{n:,}" for n in sizes), history_key,
              "floor (same run)", "seed claim", "budget", "verdict"]
    lines = [header]
    for key, label, floor_set, seed in ROWS:
        cells = rows.get(key, {})
        if key in ("dropin_step", "dropin_oneshot", "legacy_step") and not cells:
            values = ["n/a"] * len(sizes) + [""]
        else:
            values = [_cell(cells.get(str(n))) for n in sizes] + [_cell(cells.get(history_key))]
        floor = " · ".join(f"{FLOOR_SHORT[f]} {_num(floors[f]['median'])}"
                           for f in FLOOR_SETS.get(floor_set, ()) if f in floors)
        verdict = verdicts.get(key)
        if verdict is None:
            budget, mark = "", ""
        else:
            budget = verdict["text"]
            mark = {True: "ok", False: "MISSED", None: "n/a"}[verdict["ok"]]
        lines.append([label, *values, floor, seed, budget, mark])
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(text.ljust(w) if c == 0 or c >= len(sizes) + 2 else text.rjust(w)
                             for c, (text, w) in enumerate(zip(line, widths, strict=True)))
                   .rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    missed = [f"  MISSED {key}: {c['what']} = {c['measured']} > {c['limit']:.3g}"
              for key, v in verdicts.items() for c in v["checks"] if c["ok"] is False]
    floor_lines = [f"  {name}: {_cell(value)} ms"
                   + (f" (CPU {_num(value['cpu_median'])} ms)" if "cpu_median" in value else "")
                   for name, value in floors.items()]
    return "\n".join([*out, "", "floors (median/p90 ms):", *floor_lines, *ratios(rows, sizes),
                      *(["", "budgets missed:", *missed] if missed else [])]) + "\n"


def ratios(rows: dict[str, dict[str, Any]], sizes: Sequence[int]) -> list[str]:
    """Lines giving each compared row as a fraction of the old library's call of the
    same size, medians of this run; none without --legacy-lib."""
    legacy = rows.get("legacy_step", {})
    if not legacy:
        return []
    labels = {key: label for key, label, _, _ in ROWS}
    out = ["", "ratio to the old library, same run (median / median):"]
    for key in COMPARED:
        cells = [f"@{n:,} {rows[key][str(n)]['median'] / legacy[str(n)]['median']:.3f}"
                 for n in sizes if str(n) in rows.get(key, {}) and str(n) in legacy]
        if cells:
            out.append(f"  {labels[key]}: " + ", ".join(cells))
    return out


# -- set-up of the command under test -------------------------------------------------

def default_cli(python: str) -> list[str]:
    """The ``upgrade-ledger`` script beside *python*, else ``python -m ledger``."""
    script = Path(python).parent / "upgrade-ledger"
    return [str(script)] if script.exists() else [python, "-m", "ledger"]


def child_env(work: Path, bytecode_cache: bool, python: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    env["PATH"] = str(Path(python).parent) + os.pathsep + env.get("PATH", "")
    return env


def install_wheel(work: Path, log: Callable[[str], None]) -> str:
    """Build this checkout's wheel and install it (no editable hook) into a new venv
    that borrows its dependencies from the running interpreter's environment; return
    the new venv's python."""
    log("building and installing the wheel")
    dist = work / "dist"
    # pip's build isolation fetches the build backend (setuptools) from the index.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "-w", str(dist), str(REPO)], check=True)
    wheel = next(dist.glob("upgrade_ledger-*.whl"))
    venv = work / "wheel-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True)
    # Dependencies (click, tabulate, ...) come from the running environment's
    # site-packages, added as a plain path: its .pth files (the editable hook) are not run.
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "bench-deps.pth").write_text(str(Path(click.__file__).parent.parent) + "\n")
    return python


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0915 (options, then one run)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10 and 20 components, 2,000 upgrades, few repetitions")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--sizes", help="comma-separated component counts (default: "
                        + ",".join(map(str, FULL_SIZES)) + ")")
    parser.add_argument("--repeat", type=int, help="in-process repetitions (default 30)")
    parser.add_argument("--proc-repeat", type=int,
                        help="repetitions of each process figure (default 20)")
    parser.add_argument("--history", type=int, help=f"upgrades in the big ledger "
                        f"(default {FULL_HISTORY:,})")
    parser.add_argument("--wheel", action="store_true",
                        help="measure the CLI installed from a wheel into a temp venv")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="leave PYTHONDONTWRITEBYTECODE as inherited (measures compiling)")
    parser.add_argument("--no-drop-in", action="store_true",
                        help="skip the drop-in figure (to measure an older ledger)")
    parser.add_argument("--legacy-lib", metavar="PATH",
                        help="the old bash+jq library (upgrade-state.sh), run side by side "
                             "in the same rounds; the ratios to it are judged")
    parser.add_argument("--pg-url", default=os.environ.get("LEDGER_BENCH_PG_URL"),
                        help="PostgreSQL URL for the server figures (a new database's; "
                             "default: LEDGER_BENCH_PG_URL, else a throwaway server)")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL figures")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    parser.add_argument("--save", metavar="FILE", help="also write the JSON results to FILE")
    parser.add_argument("--show", metavar="FILE", help="print the table of saved results "
                        "(from --save) and exit")
    args = parser.parse_args(argv)
    if args.show:
        print(table(json.loads(Path(args.show).read_text())), end="")
        return 0

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        list(QUICK_SIZES if args.quick else FULL_SIZES)
    if any(n < 2 for n in sizes):
        parser.error("sizes must be at least 2")
    if args.legacy_lib and not Path(args.legacy_lib).is_file():
        parser.error(f"--legacy-lib {args.legacy_lib}: no such file")
    repeat = args.repeat or (3 if args.quick else 30)
    proc_repeat = args.proc_repeat or (3 if args.quick else 20)
    history = args.history or (QUICK_HISTORY if args.quick else FULL_HISTORY)

    def log(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    server = None
    pg_url = None if args.no_pg else args.pg_url
    try:
        if pg_url is None and not args.no_pg:
            pg_url, server = start_server(log)
        python = install_wheel(work, log) if args.wheel else sys.executable
        cli = default_cli(python)
        bench = Bench(work, sizes=sizes, repeat=repeat, proc_repeat=proc_repeat,
                      history_upgrades=history, cli=cli, python=python,
                      env=child_env(work, not args.no_bytecode_cache, python), log=log,
                      pg_url=pg_url)
        bench.skip_drop_in = args.no_drop_in
        if args.legacy_lib:
            bench.legacy_lib = Path(args.legacy_lib).resolve()
        started = time.perf_counter()
        bench.run()
        result = {
            "settings": {"sizes": sizes, "repeat": repeat, "proc_repeat": proc_repeat,
                         "history_upgrades": history, "quick": args.quick,
                         "install": "wheel" if args.wheel else "running environment",
                         "cli": cli, "bytecode_cache": not args.no_bytecode_cache,
                         "drop_in": str(DROP_IN) if DROP_IN.exists() and not args.no_drop_in
                         else None,
                         "legacy_lib": str(bench.legacy_lib) if bench.legacy_lib else None,
                         "postgres": None if pg_url is None else urls.mask(pg_url),
                         "ledger": str(Path(ledger.__file__).parent)},
            "machine": {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                        "platform": platform.platform(), "cpus": os.cpu_count()},
            "floors": bench.floors,
            "rows": bench.rows,
            "verdicts": judge(bench.rows, sizes),
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        if server is not None:
            server.close()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
