"""Seeing the fleet: ``fleet status`` (one row per host, silent hosts flagged),
``fleet history``, ``fleet show``, ``fleet sql`` (read-only), in every format, on
hosts shipped to the suite's PostgreSQL server; doctor's ``fleet`` check."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import run_ledger, walk_to_upgrading

from ledger.api import Ledger
from ledger.fleet import pusher
from ledger.ops import doctor

pytestmark = pytest.mark.postgres


@pytest.fixture
def fleet(tmp_path: Path, pg_url: str) -> str:
    """A fleet of two hosts: web1 mid-upgrade (u2, after a completed u1), web2 done."""
    with Ledger(tmp_path / "web1", host_name="web1", fleet_url=pg_url, wired=False) as led:
        walk_to_upgrading(led, "u1")
        led.set_state("VALIDATING")
        led.set_state("COMPLETED")
        walk_to_upgrading(led, "u2")
        led.plan({"p": [("a", "1", "2"), ("b", "1", "2")]})
        led.phase_start("p")
        led.component_start("a")
        led.component_complete("a")
        led.component_start("b")
        pusher.push(led)
    with Ledger(tmp_path / "web2", host_name="web2", fleet_url=pg_url, wired=False) as led:
        walk_to_upgrading(led, "u1")
        led.set_state("VALIDATING")
        led.set_state("COMPLETED")
        pusher.push(led)
    return pg_url


def fleet_cli(url: str, *args: str) -> tuple[int, str, str]:
    done = run_ledger("--fleet", url, "fleet", *args)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
def test_fleet_status_is_one_row_per_host_in_every_format(fleet: str) -> None:
    code, out, err = fleet_cli(fleet, "status", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["host"], r["upgrade_id"], r["state"], r["progress_percent"], r["phase"],
             r["component"], r["silent"]) for r in rows] == [
        ("web1", "u2", "UPGRADING", 50, "p", "b", False),
        ("web2", "u1", "COMPLETED", 100, None, None, False)]
    assert all(r["pushed_at"] and r["updated_at"] and r["slots"] == [] for r in rows)
    # A host in the middle of an upgrade that has not pushed for longer than allowed.
    rows = json.loads(fleet_cli(fleet, "status", "--silent-after", "0", "-f", "json")[1])
    assert [r["silent"] for r in rows] == [True, False]  # a finished host is never silent
    table = fleet_cli(fleet, "status", "--silent-after", "0")[1]
    assert "SILENT" in table.splitlines()[2] and "web2" in table.splitlines()[3]
    parsed = list(csv.DictReader(io.StringIO(fleet_cli(fleet, "status", "-f", "csv")[1])))
    assert [r["host"] for r in parsed] == ["web1", "web2"]
    plain = fleet_cli(fleet, "status", "-f", "plain")[1].splitlines()
    assert plain[0].split("\t")[:3] == ["web1", "u2", "UPGRADING"]


@pytest.mark.slow
def test_fleet_history_and_show_read_every_host(fleet: str) -> None:
    code, out, _ = fleet_cli(fleet, "history", "--json")
    assert code == 0
    rows = json.loads(out)
    assert {(r["host"], r["id"]) for r in rows} == {("web1", "u2"), ("web1", "u1"),
                                                   ("web2", "u1")}
    assert [r["started_at"] for r in rows] == sorted((r["started_at"] for r in rows),
                                                    reverse=True)
    done = json.loads(fleet_cli(fleet, "history", "--host", "web1", "--state", "completed",
                                "--json")[1])
    assert [(r["host"], r["id"]) for r in done] == [("web1", "u1")]
    assert json.loads(fleet_cli(fleet, "history", "--component", "a", "--json")[1])[0]["id"] \
        == "u2"
    shown = json.loads(fleet_cli(fleet, "show", "web1", "--json")[1])  # its current upgrade
    assert shown["id"] == "u2" and [c["name"] for c in shown["components"]] == ["a", "b"]
    assert [e["kind"] for e in shown["events"]][-1] == "component.upgrading"
    code, out, _ = fleet_cli(fleet, "show", "web2", "u1")
    assert code == 0 and "Events:" in out
    for args in (["show", "web3"], ["show", "web1", "u9"]):
        code, _, err = fleet_cli(fleet, *args)
        assert code == 5 and err.count("\n") == 1, err


@pytest.mark.slow
def test_fleet_sql_reads_and_refuses_writes(fleet: str) -> None:
    code, out, err = fleet_cli(fleet, "sql", "SELECT host, state FROM host_status "
                               "WHERE host = :h", "-p", "h=web2", "-f", "csv")
    assert (code, out) == (0, "host,state\nweb2,COMPLETED\n"), err
    code, out, _ = fleet_cli(fleet, "sql", "SELECT host, COUNT(*) AS upgrades FROM "
                             "upgrade_summary GROUP BY host ORDER BY host", "--json")
    assert json.loads(out) == [{"host": "web1", "upgrades": 2}, {"host": "web2", "upgrades": 1}]
    for query in ("DELETE FROM events", "UPDATE hosts SET current_upgrade = NULL",
                  "SELECT 1; DROP TABLE events"):
        code, _, err = fleet_cli(fleet, "sql", query)
        assert code == 6 and err.count("\n") == 1, (query, err)
    # web2: init, PLANNING, BACKING_UP, UPGRADING, VALIDATING, COMPLETED.
    assert fleet_cli(fleet, "sql", "SELECT COUNT(*) FROM events WHERE host = 'web2'",
                     "-f", "plain")[1] == "6\n"


def test_a_fleet_nothing_was_pushed_to_is_said_so(pg_url: str) -> None:
    code, _, err = fleet_cli(pg_url, "status")
    assert code == 5 and "nothing was pushed" in err and err.count("\n") == 1


def test_doctor_reports_the_pushes(tmp_path: Path, fleet: str) -> None:
    def finding(url: str | None) -> doctor.Finding:
        with Ledger(tmp_path / "web1", host_name="web1", fleet_url=url, wired=False) as led:
            (found,) = doctor.run_checks(led, checks=[c for c in doctor.CHECKS
                                                      if c.name == "fleet"])
            return found

    assert finding(fleet).status == "ok" and "everything shipped" in finding(fleet).detail
    with Ledger(tmp_path / "web1", host_name="web1", wired=False) as led:
        led.component_complete("b")
    behind = finding(fleet)
    assert behind.status == "ok" and "1 event(s) not shipped" in behind.detail
    bad = finding("mysql://db/fleet")
    assert bad.status == "fail" and "PostgreSQL" in bad.detail
    with Ledger(tmp_path / "lone", wired=False) as led:
        led.init()
        (local,) = doctor.run_checks(led, checks=[c for c in doctor.CHECKS
                                                    if c.name == "fleet"])
    assert local.status == "ok" and "stays local" in local.detail
