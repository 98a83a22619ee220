"""Rolling upgrades through the fleet database, with real ``apply`` processes, each a
host of its own (its home, its LEDGER_HOST), on the suite's PostgreSQL server: never
more hosts at once than the plan's ``max_hosts`` (measured from the ledgers' own
slot events), a host SIGKILLed in its slot frees it, the failure brake stops a bad
release, and an unreachable fleet stops a plan with limits unless it is optional."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import ledger_process, run_ledger, walk_to_upgrading
from fleethelpers import fleet_cursor, fleet_plan, stop_pusher, wait_for

from ledger.api import Ledger, RunContext
from ledger.core import clock
from ledger.core.host import Identity
from ledger.core.rollout import Rollout
from ledger.fleet import connect, rollout
from ledger.fleet.reports import Fleet
from ledger.fleet.slots import Slots

pytestmark = pytest.mark.postgres


def apply_host(home: Path, host: str, url: str, plan: Path, *args: str,
               **env: str) -> Any:
    """``apply`` of *plan* as host *host* (a process of its own, not waited for)."""
    from conftest import child_env  # noqa: PLC0415

    return ledger_process("--home", home, "--host-name", host, "--fleet", url, "apply",
                          "--plain", *args, plan, env=child_env(**env))


def events(home: Path, host: str, kind: str | None = None) -> list[dict[str, Any]]:
    with Ledger(home, host_name=host, wired=False, create=False) as led:
        return led.events(kind=kind, limit=None)


def _in_fleet(url: str, host: str) -> bool:
    """Whether *host* reached the fleet database (as it first tries for a slot)."""
    with psycopg.connect(url) as pg:
        return bool(pg.execute("SELECT 1 FROM hosts WHERE name = %s", (host,)).fetchall())


def _has(home: Path, host: str, kind: str) -> bool:
    return (home / "ledger.db").exists() and bool(events(home, host, kind))


def finished(proc: Any, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.slow
def test_six_hosts_apply_one_plan_never_more_than_two_at_once(tmp_path: Path,
                                                               pg_url: str) -> None:
    plan = fleet_plan(tmp_path / "plan", "max_hosts = 2")
    hosts = [f"web{i}" for i in range(1, 7)]
    procs = {h: apply_host(tmp_path / h, h, pg_url, plan, SIM_DELAY="0.3") for h in hosts}
    try:
        results = {h: finished(p) for h, p in procs.items()}
    finally:
        for h in hosts:
            stop_pusher(tmp_path / h)
    for h, (code, out, err) in results.items():
        assert code == 0 and "COMPLETED: upgrade" in out, (h, code, out[-600:], err[-600:])
    # Who held a slot when, from each host's own ledger: taken ... freed.
    spans = []
    for h in hosts:
        trail = events(tmp_path / h, h)
        (taken,) = [e for e in trail if e["kind"] == "slot.taken"]
        (freed,) = [e for e in trail if e["kind"] == "slot.freed"]
        run = [e for e in trail if e["upgrade_id"] is not None]
        # The slot is held for the whole run: taken before its first change, freed
        # after its last.
        assert taken["at"] <= run[0]["at"] and run[-1]["at"] <= freed["at"], h
        assert taken["id"] < run[0]["id"] and run[-1]["id"] < freed["id"]
        spans.append((taken["at"], freed["at"]))
    moments = sorted([(t, 1) for t, _ in spans] + [(f, -1) for _, f in spans],
                     key=lambda m: (m[0], m[1]))  # a slot freed at t is free at t
    running = peak = 0
    for _, step in moments:
        running += step
        peak = max(peak, running)
    assert peak == 2, spans  # the limit held, and was used
    with Fleet(pg_url, Identity("reader", None)) as fleet:
        rows = fleet.status()
    assert [(r["host"], r["state"], r["progress_percent"]) for r in rows] == \
        [(h, "COMPLETED", 100) for h in hosts]
    assert all(r["slots"] == [] for r in rows)  # every slot freed


@pytest.mark.slow
def test_a_host_killed_in_its_slot_frees_it_and_resumes_later(tmp_path: Path,
                                                              pg_url: str) -> None:
    plan = fleet_plan(tmp_path / "plan", "max_hosts = 1")
    first = apply_host(tmp_path / "a", "a", pg_url, plan, SIM_DELAY="0.5")
    try:
        wait_for(lambda: _has(tmp_path / "a", "a", "component.upgrading"), what="a upgrading")
        second = apply_host(tmp_path / "b", "b", pg_url, plan)
        wait_for(lambda: _in_fleet(pg_url, "b"), what="b to try for a slot")
        first.kill()  # SIGKILL, in its slot, mid-upgrade
        finished(first, timeout=30)  # (its pipes closed)
        killed_at = clock.now()
        code, out, err = finished(second)
        assert code == 0 and "waiting for a slot" in out and "held by a (slot 1" in out, \
            (out[-800:], err[-500:])
        (taken,) = events(tmp_path / "b", "b", "slot.taken")
        assert taken["at"] >= killed_at  # b took the slot once the server freed it
        # a comes back: it resumes its upgrade (once it has the slot again).
        code, out, err = finished(apply_host(tmp_path / "a", "a", pg_url, plan))
        assert code == 0 and "resuming upgrade" in out and "COMPLETED" in out, (out, err)
    finally:
        for h in ("a", "b"):
            stop_pusher(tmp_path / h)
    slot_events = [e["kind"] for e in events(tmp_path / "a", "a", "slot.")]
    assert slot_events == ["slot.taken", "slot.taken", "slot.freed"]  # no freed when killed
    with Fleet(pg_url, Identity("reader", None)) as fleet:
        assert [(r["host"], r["state"]) for r in fleet.status()] == \
            [("a", "COMPLETED"), ("b", "COMPLETED")]


@pytest.mark.slow
def test_the_brake_stops_a_bad_release_after_two_failed_hosts(tmp_path: Path,
                                                              pg_url: str) -> None:
    plan = fleet_plan(tmp_path / "plan", "max_hosts = 1\nhalt_after_failures = 2")
    try:
        code, out, _ = finished(apply_host(tmp_path / "f1", "f1", pg_url, plan, SIM_FAIL="loki"))
        assert code == 11, out
        failing = apply_host(tmp_path / "f2", "f2", pg_url, plan, SIM_FAIL="loki",
                             SIM_DELAY="0.2")
        wait_for(lambda: (tmp_path / "f2" / "ledger.db").exists() and
                 events(tmp_path / "f2", "f2", "slot.taken"), what="f2 in its slot")
        # f3 and f4 wait behind f2: when it frees the slot, its failure is in the fleet.
        waiting = {h: apply_host(tmp_path / h, h, pg_url, plan) for h in ("f3", "f4")}
        assert finished(failing)[0] == 11
        for h, proc in waiting.items():
            code, out, err = finished(proc)
            assert code == 15 and err.count("\n") == 1, (h, code, out, err)
            assert "f1 (ROLLED_BACK), f2 (ROLLED_BACK)" in err and "halt_after_failures" in err
            assert not [e for e in events(tmp_path / h, h) if e["upgrade_id"]]  # nothing ran
        # An operator lets one host through.
        code, out, err = finished(apply_host(tmp_path / "f3", "f3", pg_url, plan,
                                             "--ignore-brake"))
        assert code == 0 and "brake ignored" in out, (out, err)
        (ignored,) = events(tmp_path / "f3", "f3", "brake.ignored")
        assert ignored["detail"]["hosts"] == ["f1", "f2"]
        # A failed host may run the plan again: its own failure does not brake it.
        code, out, err = finished(apply_host(tmp_path / "f1", "f1", pg_url, plan, "--again"))
        assert code == 0 and "brake ignored" not in out, (code, out, err)
    finally:
        for h in ("f1", "f2", "f3", "f4"):
            stop_pusher(tmp_path / h)


@pytest.mark.slow
def test_no_free_slot_is_exit_14_naming_the_holders(tmp_path: Path, pg_url: str) -> None:
    plan = fleet_plan(tmp_path / "plan", "max_hosts = 1")
    holder = Slots(connect.open_fleet(pg_url, Identity("db7", None)), "observability-stack",
                   "0" * 64, 4242)
    try:
        assert holder.take(1) == 1
        with Fleet(pg_url, Identity("reader", None)) as fleet:  # the holder, as ops see it
            (row,) = [r for r in fleet.status() if r["host"] == "db7"]
        assert [(s["plan"], s["slot"]) for s in row["slots"]] == [("observability-stack", 1)]
        code, out, _ = finished(ledger_process("--fleet", pg_url, "fleet", "status"))
        assert code == 0 and "observability-stack#1 since" in out
        for args, said in ((["--no-wait"], "no free slot"),
                           (["--wait-timeout", "0.3"], "after waiting 0.3 s")):
            code, out, err = finished(apply_host(tmp_path / "h", "h", pg_url, plan, *args))
            assert code == 14 and err.count("\n") == 1, (code, out, err)
            assert said in err and "held by db7 (slot 1, since " in err
        # Waiting, and stopped by Ctrl-C: nothing was started.
        waiting = apply_host(tmp_path / "w", "w", pg_url, plan)
        wait_for(lambda: _in_fleet(pg_url, "w"), what="w to try for a slot")
        waiting.send_signal(signal.SIGINT)
        code, out, err = finished(waiting)
        assert code == 130 and "waiting for a slot" in out and "interrupted" in err, (out, err)
        assert not events(tmp_path / "w", "w")
        # --max-hosts 2 makes room: a second slot.
        code, out, err = finished(apply_host(tmp_path / "h", "h", pg_url, plan,
                                             "--max-hosts", "2", "--no-wait"))
        assert code == 0, (out, err)
        assert events(tmp_path / "h", "h", "slot.taken")[0]["detail"]["slot"] == 2
    finally:
        holder.release()
        holder.close()
        stop_pusher(tmp_path / "h")


@pytest.mark.slow
@pytest.mark.parametrize("optional", [False, True])
def test_a_fleet_lost_while_waiting_for_a_slot_is_exit_16_unless_optional(
        tmp_path: Path, pg_url: str, optional: bool) -> None:
    plan = fleet_plan(tmp_path / "plan", "max_hosts = 1")
    holder = Slots(connect.open_fleet(pg_url, Identity("db7", None)), "observability-stack",
                   "0" * 64, 4242)
    try:
        assert holder.take(1) == 1
        waiting = apply_host(tmp_path / "w", "w", pg_url, plan,
                             *(["--fleet-optional"] if optional else []))
        wait_for(lambda: _in_fleet(pg_url, "w"), what="w to try for a slot")
        # The server ends every session but the holder's (a restart, a fail-over).
        with psycopg.connect(pg_url, autocommit=True) as pg:
            pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                       "AND pid NOT IN (SELECT backend_pid FROM fleet_slots "
                       "WHERE host = 'db7')")
        code, out, err = finished(waiting)
        if optional:
            assert code == 0 and "running without the rolling-upgrade limits" in out, (out, err)
        else:
            assert code == 16 and err.count("\n") == 1, (code, out, err)
            assert "cannot be reached" in err and "--fleet-optional" in err
            assert not [e for e in events(tmp_path / "w", "w") if e["upgrade_id"]]
    finally:
        holder.release()
        holder.close()
        stop_pusher(tmp_path / "w")


@pytest.mark.slow
def test_an_unreachable_fleet_stops_a_plan_with_limits_unless_optional(
        tmp_path: Path) -> None:
    plan = fleet_plan(tmp_path / "plan", "max_hosts = 1")
    nowhere = "postgresql://ledger@127.0.0.1:1/fleet"
    code, out, err = finished(apply_host(tmp_path / "h", "h", nowhere, plan))
    assert code == 16 and err.count("\n") == 1, (code, out, err)
    assert "cannot be reached" in err and "--fleet-optional" in err
    assert not events(tmp_path / "h", "h")  # nothing was started
    done = run_ledger("--home", tmp_path / "n", "--host-name", "n", "apply", plan)
    assert done.returncode == 16 and "no fleet database is configured" in done.stderr
    try:
        code, out, err = finished(apply_host(tmp_path / "h", "h", nowhere, plan,
                                             "--fleet-optional"))
        assert code == 0 and "running without the rolling-upgrade limits" in out, (out, err)
    finally:
        stop_pusher(tmp_path / "h")
    status = run_ledger("--home", tmp_path / "h", "--host-name", "h", "--fleet", nowhere,
                        "status", "--json")
    assert '"failures": ' in status.stdout and '"failures": 0' not in status.stdout


def test_the_slot_is_freed_only_once_the_fleet_has_the_end_of_the_run(
        home: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next host's brake must see how this run ended: the run's last changes are
    in the fleet database before its slot is let go."""
    shipped_when_freed = []
    release = Slots.release

    def watched(slots: Slots) -> bool:
        with Ledger(home, host_name="h", wired=False, create=False) as led:
            newest = led.events(limit=1, newest=True)[0]["id"]
        shipped_when_freed.append(fleet_cursor(pg_url, "h") == newest)
        return release(slots)

    monkeypatch.setattr(Slots, "release", watched)
    run = RunContext(plan_name="p", plan_sha256="0" * 64, plan_path="p.toml",
                     rollout=Rollout(max_hosts=1), resuming=False, idle=False,
                     stopping=lambda: False, say=lambda _: None)
    with Ledger(home, host_name="h", fleet_url=pg_url, wired=False) as led, \
            rollout.during_run(led, run):
        walk_to_upgrading(led, "u1")
        led.set_state("FAILED", error="the end")
    assert shipped_when_freed == [True]
    kinds = [e["kind"] for e in events(home, "h")]
    assert kinds[0] == "slot.taken" and kinds[-1] == "slot.freed"
