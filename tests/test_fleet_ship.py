"""Shipping a host's ledger to the fleet database: every row, once, in batches that are
transactions; again, only what is new; killed anywhere and run again, the fleet's copy
equals the host's ledger. Rows pruned on the host go from the fleet too; a ledger that
was restored or replaced is shipped anew; a name another machine claimed is refused;
an unreachable fleet is one line, exit 16, recorded for status and doctor."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from conftest import ledger_process, run_ledger, walk_to_upgrading
from fleethelpers import assert_same, fleet_copy, fleet_cursor, local_copy

from ledger.api import Ledger
from ledger.errors import FleetUnavailable, HostClash
from ledger.fleet import pusher, pushstate, ship
from ledger.ops import doctor, restore, snapshots

HOST = "web1"

pytestmark = pytest.mark.postgres


def a_ledger(home: Path, url: str, host: str = HOST, **env: str) -> Ledger:
    """A bare ledger of *host* with the fleet at *url* (bare: no pusher is started)."""
    return Ledger(home, host_name=host, fleet_url=url, wired=False,
                  env={**env} if env else None)


def upgrade(led: Ledger, uid: str, components: int = 3, *, fail: str | None = None) -> None:
    """One upgrade through the API: planned, every component upgraded (one failing and
    retried when *fail* names it), rollback points, then COMPLETED and saved."""
    walk_to_upgrading(led, uid)
    led.plan({"p1": [(f"c{i}", "1.0", "2.0") for i in range(components)],
              "p2": [("tail", "1", "2")]})
    for phase, names in (("p1", [f"c{i}" for i in range(components)]), ("p2", ["tail"])):
        led.phase_start(phase)
        for name in names:
            led.mark_rollback_point(name, f"/backups/{uid}/{name}", size_bytes=10)
            led.component_start(name)
            if name == fail:
                led.component_fail(name, "boom")
                led.component_start(name)
            led.component_complete(name)
        led.phase_complete(phase)
    led.annotate("apply.note", None, {"n": components})
    led.set_state("VALIDATING")
    led.set_state("COMPLETED")
    led.save_to_history()


def test_a_push_ships_every_row_and_again_only_what_is_new(home: Path, pg_url: str) -> None:
    with a_ledger(home, pg_url) as led:
        upgrade(led, "u1", fail="c1")
        upgrade(led, "u2", components=2)
        led.init("u3")
        led.set_state("PLANNING")
        first = pusher.push(led, batch=7)
        assert first.events == led.events(limit=None)[-1]["id"] == first.shipped_event_id
        assert first.batches == first.events // 7 + 1 and first.reset  # a new copy
        assert_same(pg_url, HOST, home / "ledger.db")
        again = pusher.push(led)
        assert (again.events, again.batches, again.upgrades) == (0, 1, 0)
        led.set_state("BACKING_UP")
        led.init("u4", supersede=True)
        later = pusher.push(led)
        assert (later.events, later.upgrades, later.reset) == (3, 2, False)
        assert_same(pg_url, HOST, home / "ledger.db")
        # The host's own record of it, for status and doctor.
        record = pushstate.status(led.db, "fleet")
        assert (record["shipped_event_id"], record["lag_events"], record["failures"]) == \
            (later.shipped_event_id, 0, 0)
    with psycopg.connect(pg_url) as pg:  # every event once, numbered by the fleet
        assert pg.execute("SELECT COUNT(*), COUNT(DISTINCT local_id) FROM events").fetchone() \
            == (later.shipped_event_id, later.shipped_event_id)


def test_two_hosts_share_the_fleet_each_with_its_own_rows(tmp_path: Path, pg_url: str) -> None:
    for host in ("web1", "web2"):
        with a_ledger(tmp_path / host, pg_url, host) as led:
            upgrade(led, "same-id")  # the same upgrade id on both: two upgrades
            pusher.push(led)
    for host in ("web1", "web2"):
        assert_same(pg_url, host, tmp_path / host / "ledger.db")
    with psycopg.connect(pg_url) as pg:
        assert pg.execute("SELECT host, plan_name FROM plan_runs").fetchall() == []
        assert pg.execute("SELECT host, state, progress_percent FROM host_status "
                          "ORDER BY host").fetchall() == [("web1", "COMPLETED", 100),
                                                          ("web2", "COMPLETED", 100)]


def test_rows_pruned_on_the_host_go_from_the_fleet_too(home: Path, pg_url: str) -> None:
    with a_ledger(home, pg_url) as led:
        upgrade(led, "old")
        upgrade(led, "new")
        pusher.push(led)
        led.record_prune("old", {"why": "test"}, delete_rows=True)
        assert pusher.push(led).events == 1  # the ledger.prune event
    with psycopg.connect(pg_url) as pg:
        assert pg.execute("SELECT id FROM upgrades").fetchall() == [("new",)]
        assert pg.execute("SELECT COUNT(*) FROM components WHERE upgrade_id = 'old'"
                          ).fetchone() == (0,)
        assert pg.execute("SELECT upgrade_id FROM events WHERE kind = 'ledger.prune'"
                          ).fetchall() == [("old",)]
    assert_same(pg_url, HOST, home / "ledger.db")


def test_a_restored_or_new_ledger_is_shipped_anew(home: Path, pg_url: str) -> None:
    with a_ledger(home, pg_url) as led:
        upgrade(led, "u1")
        snapshots.take_now(led)
        upgrade(led, "u2")
        pusher.push(led)
    restore.restore(led.home, force=True)
    with a_ledger(home, pg_url) as led:
        led.init("u3")  # reuses event ids the fleet has from u2's run: another history
        done = pusher.push(led)
        assert done.reset
    assert_same(pg_url, HOST, home / "ledger.db")
    with psycopg.connect(pg_url) as pg:
        assert pg.execute("SELECT resets FROM fleet_cursors").fetchone() == (1,)
    # A new ledger for the same host (its home made anew): its copy replaces the old.
    other = home.parent / "again"
    with a_ledger(other, pg_url) as led:
        led.init("fresh")
        assert pusher.push(led).reset
    assert_same(pg_url, HOST, other / "ledger.db")


def test_a_name_another_machine_claimed_is_refused(tmp_path: Path, pg_url: str) -> None:
    with a_ledger(tmp_path / "a", pg_url, LEDGER_MACHINE_ID="a" * 32) as led:
        upgrade(led, "u1")
        pusher.push(led)
    before = fleet_copy(pg_url, HOST, tmp_path / "a" / "ledger.db")
    with a_ledger(tmp_path / "b", pg_url, LEDGER_MACHINE_ID="b" * 32) as led:
        led.init("intruder")
        with pytest.raises(HostClash):
            pusher.push(led)
    assert fleet_copy(pg_url, HOST, tmp_path / "a" / "ledger.db") == before


@pytest.mark.slow
def test_an_unreachable_fleet_is_one_line_exit_16_and_recorded(home: Path,
                                                              pg_url: str) -> None:
    gone = pg_url.replace("/ledger_", "/no_such_", 1)
    with a_ledger(home, gone) as led:
        led.init("u1")
        with pytest.raises(FleetUnavailable):
            pusher.push(led)
    done = run_ledger("--home", home, "--host-name", HOST, "--fleet", gone, "fleet", "push")
    assert done.returncode == 16 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot connect" in done.stderr and "no_such_" in done.stderr
    with a_ledger(home, gone) as led:
        record = pushstate.read(led.db)
        assert record is not None and record["failures"] == 2
        assert record["next_try_at"] > record["attempted_at"]  # backed off
        status = run_ledger("--home", home, "--host-name", HOST, "--fleet", gone, "status",
                            "--json")
        section = json.loads(status.stdout)["fleet"]
        assert section["failures"] == 2 and section["lag_events"] == 1
        assert "no_such_" in section["last_error"]
        (finding,) = doctor.run_checks(led, checks=[c for c in doctor.CHECKS
                                                    if c.name == "fleet"])
        assert finding.status == "warn" and "2 failed push" in finding.detail
    # The fleet back (here: the right URL), one push ships it all.
    with a_ledger(home, pg_url) as led:
        pusher.push(led)
        assert pushstate.read(led.db)["failures"] == 0
    assert_same(pg_url, HOST, home / "ledger.db")


@pytest.mark.slow
def test_what_is_not_a_fleet_is_refused_and_steps_go_on(home: Path, tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'x.db'}"
    step = run_ledger("--home", home, "--fleet", sqlite_url, "init")
    assert step.returncode == 0, step.stderr  # a step never fails for the fleet
    for args, code, text in ((["--fleet", sqlite_url, "fleet", "push"], 6, "PostgreSQL"),
                             (["fleet", "push"], 6, "no fleet database is configured"),
                             (["--fleet", sqlite_url, "fleet", "status"], 6, "PostgreSQL")):
        done = run_ledger("--home", home, *args)
        assert (done.returncode, done.stderr.count("\n")) == (code, 1), done.stderr
        assert text in done.stderr
    status = run_ledger("--home", home, "--fleet", sqlite_url, "status")
    assert "misconfigured" in status.stdout
    assert not (tmp_path / "x.db").exists()


def _grow(led: Ledger, rng: random.Random, round_: int) -> None:
    """Some changes of every kind a push ships: upgrades begun, superseded, planned,
    upgraded, failed, skipped, rolled back, resumed, annotated, noted, saved as a
    legacy document, imported, saved to history, pruned. Each round checks the copy:
    a change that wrote no event (and so was not shipped) would show."""
    if round_ % 4 == 0:
        led.init(f"u{round_}", supersede=True)
        for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
            led.set_state(state)
        led.plan({"a": [(f"c{i}", "1", "2") for i in range(rng.randint(2, 5))],
                  "b": [("z", "1", "2")]})
        led.phase_start("a")
    names = list(led.document()["phases"].get("a", {}).get("components", {}))
    for _ in range(rng.randint(6, 14)):
        name = rng.choice(names)
        state = led.component_status(name, phase="a").get("state")
        if state in ("PENDING", "FAILED", None):
            led.component_start(name, phase="a")
        elif state == "UPGRADING":
            if rng.random() < 0.3:
                led.component_fail(name, f"failed in round {round_}", phase="a")
            else:
                led.mark_rollback_point(name, f"/b/{round_}/{name}", phase="a")
                led.component_complete(name, phase="a")
        else:
            led.annotate("test.note", name, {"round": round_})
    extra = rng.choice(("skip", "save", "resume", "note", "roll back", "phase"))
    if extra == "skip" and led.component_status("z", phase="b").get("state") == "PENDING":
        led.component_skip("z", "already there", phase="b")
    elif extra == "save":
        led.save_document({"ticket": f"OPS-{round_}"})  # the legacy save: kept keys
    elif extra == "resume" and led.can_resume():
        led.resume()
    elif extra == "note":
        led.note("test.aside", None, {"round": round_})
    elif extra == "roll back":
        done = [n for n in names if led.component_status(n, phase="a").get("state")
                == "COMPLETED"]
        if done:
            led.component_rolled_back(done[0], "restored", phase="a")
    elif extra == "phase" and "b" in led.document()["phases"]:
        led.phase_start("b")
        led.phase_fail("b", f"round {round_}")
        led.phase_start("a")
    if round_ % 4 == 3:
        if rng.random() < 0.5:
            led.import_document(led.document())  # the upgrade's rows replaced whole
        led.clear_rollback_points()
        led.set_state("FAILED", error=f"round {round_}")
        led.save_to_history()
        finished = [u["id"] for u in led.history(limit=None)[1:]]
        if len(finished) > 3:
            led.record_prune(finished[-1], {"round": round_}, delete_rows=True)


@pytest.mark.slow
def test_a_push_killed_at_random_points_and_run_again_leaves_the_copy_equal(
        home: Path, pg_url: str) -> None:
    """50 rounds: new changes, a real ``fleet push`` process SIGKILLed at a random
    point (while it starts, between its batches, after its last commit), then a push
    run again: every time the fleet's copy is the ledger, row for row."""
    rng = random.Random(14)
    mid_push = 0
    with a_ledger(home, pg_url) as led:
        led.init("u-first")
        for round_ in range(50):
            _grow(led, rng, round_)
            before = fleet_cursor(pg_url, HOST)
            newest = led.events(limit=1, newest=True)[0]["id"]
            proc = ledger_process("--home", home, "--host-name", HOST, "--fleet", pg_url,
                                  "fleet", "push", "--batch", str(rng.choice((1, 2, 3))),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if rng.random() < 0.3:  # anywhere in its life, start-up included
                time.sleep(rng.uniform(0, 0.6))
            else:  # once its first batch committed, a moment later
                deadline = time.monotonic() + 30
                while fleet_cursor(pg_url, HOST) == before and proc.poll() is None and \
                        time.monotonic() < deadline:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0, 0.03))
            proc.kill()
            proc.wait(timeout=30)
            if before < fleet_cursor(pg_url, HOST) < newest:
                mid_push += 1
            pusher.push(led, batch=rng.choice((1, 5, ship.BATCH)))  # run again
            assert_same(pg_url, HOST, home / "ledger.db")
    # The kills did land between batches, not only before or after the pushes.
    assert mid_push >= 10, mid_push
    assert len(local_copy(home / "ledger.db", HOST)["events"]) > 500
