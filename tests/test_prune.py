"""Retention: ``prune`` removes the backups, logs, history files and snapshots of
upgrades past the policy, never those of the current upgrade, one in progress or
the rollback points of upgrades that stay; records what went as events; reports the
bytes; and runs by itself after each completed upgrade when HOME/ledger.toml asks."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from applyplans import component, tree, write_plan

from ledger.api import Ledger
from ledger.apply import plan as plans
from ledger.apply import runner
from ledger.core import clock
from ledger.ops import doctor, prune
from ledger.ops.prune import Policy


def files_of(home: Path, uid: str) -> list[Path]:
    """What an apply run leaves of one upgrade (its snapshot has the id in its name)."""
    found = [home / "backups" / uid, home / "logs" / uid, home / "history" / f"{uid}.json"]
    found += sorted((home / "snapshots").glob(f"*-{uid}.db"))
    return found


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four upgrades applied one after the other, all COMPLETED; the first two
    finished 200 and 100 days ago."""
    root = tmp_path_factory.mktemp("prune")
    plan = plans.load(write_plan(root / "w", [("p", 1, [component("a"), component("b")])]))
    home = root / "home"
    with Ledger(home) as led:
        for _ in range(4):
            outcome = runner.apply(led, plan, runner.Options(again=True))
            assert outcome.state == "COMPLETED"
    conn = sqlite3.connect(home / "ledger.db")
    with conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM upgrades ORDER BY started_at")]
        now = datetime.now(UTC)
        ages = (now - timedelta(days=200), now - timedelta(days=100))
        for uid, stamp in zip(ids, map(clock.stamp, ages), strict=False):
            conn.execute("UPDATE upgrades SET started_at = :s, finished_at = :s WHERE id = :u",
                         {"s": stamp, "u": uid})
    conn.close()
    return home


@pytest.fixture
def upgrades(home: Path, template: Path) -> list[str]:
    """A copy of the template at *home*; the upgrade ids, oldest first."""
    shutil.copytree(template, home, symlinks=True)
    with Ledger(home) as led:
        return [r["id"] for r in reversed(led.history(None))]


def prune_events(home: Path) -> list[dict]:
    with Ledger(home) as led:
        return led.events(kind="ledger.prune", limit=None)


def test_dry_run_lists_what_would_go_and_changes_nothing(cli, home, upgrades) -> None:
    before = tree(home)
    result = cli("prune", "--keep-upgrades", "2", "--dry-run", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["dry_run"] is True
    assert report["policy"] == {"keep_upgrades": 2, "older_than": None, "rows": False}
    assert [u["upgrade_id"] for u in report["upgrades"]] == upgrades[:2]
    first = report["upgrades"][0]
    assert sorted(first["removed"]) == sorted(str(p.relative_to(home))
                                              for p in files_of(home, upgrades[0]))
    assert first["bytes"] > 0 and report["bytes_freed"] == sum(
        u["bytes"] for u in report["upgrades"])
    assert tree(home) == before  # nothing removed, nothing written
    assert prune_events(home) == []
    table = cli("prune", "--keep-upgrades", "2", "--dry-run")
    assert table.out.splitlines()[0].split() == ["upgrade_id", "outcome", "finished_at",
                                                  "files", "bytes", "rows"]
    assert table.err.startswith("would free ") and table.err.endswith(
        f"({report['bytes_freed']} bytes) from 2 upgrade(s)\n")


def test_prune_removes_the_files_of_upgrades_past_the_policy(cli, home, upgrades) -> None:
    kept = {p: p.exists() for uid in upgrades[2:] for p in files_of(home, uid)}
    assert all(kept.values())
    result = cli("prune", "--keep-upgrades", "2")
    assert result.code == 0, result.err
    assert result.err.startswith("freed ")
    for uid in upgrades[:2]:
        assert [p for p in files_of(home, uid) if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert sorted(p.name for p in (home / "backups").iterdir()) == sorted(upgrades[2:])
    # Recorded: one event per pruned upgrade, with what went and the bytes.
    events = prune_events(home)
    assert [(e["upgrade_id"], e["subject"]) for e in events] == \
        [(uid, "files") for uid in upgrades[:2]]
    assert events[0]["detail"]["bytes"] > 0
    assert "backups/" + upgrades[0] in events[0]["detail"]["removed"]
    # The rows stay, the ledger is healthy, and export does not bring the files back.
    assert [r["id"] for r in json.loads(cli("history", "--all", "--json").out)] == \
        upgrades[::-1]
    assert [f.check for f in doctor.run_checks(home) if f.status != "ok"] == []
    assert cli("export").code == 0
    assert not (home / "history" / f"{upgrades[0]}.json").exists()
    # Nothing is past the policy any more.
    again = cli("prune", "--keep-upgrades", "2")
    assert (again.code, again.err) == (0, "no upgrade is past the policy\n")
    assert len(prune_events(home)) == 2


def test_older_than_keeps_recent_upgrades_and_both_rules_must_let_go(cli, home,
                                                                     upgrades) -> None:
    report = json.loads(cli("prune", "--older-than", "90d", "--dry-run", "--json").out)
    assert [u["upgrade_id"] for u in report["upgrades"]] == upgrades[:2]
    report = json.loads(cli("prune", "--older-than", "150d", "--dry-run", "--json").out)
    assert [u["upgrade_id"] for u in report["upgrades"]] == upgrades[:1]
    both = json.loads(cli("prune", "--older-than", "90d", "--keep-upgrades", "3",
                          "--dry-run", "--json").out)
    assert [u["upgrade_id"] for u in both["upgrades"]] == upgrades[:1]


def test_never_the_current_upgrade_one_in_progress_or_its_rollback_points(
        cli, home, upgrades) -> None:
    old_backup = home / "backups" / upgrades[0]
    shared = old_backup / "p" / "a"
    with Ledger(home) as led:
        led.init("running")
        led.set_state("PLANNING")
        led.plan({"p": [("a", "1", "2")]})
        # The run in progress points at a backup inside an old upgrade's folder.
        led.mark_rollback_point("a", shared)
    (home / "backups" / "running").mkdir()
    (home / "backups" / "running" / "x").write_text("x")
    report = json.loads(cli("prune", "--keep-upgrades", "0", "--json").out)
    pruned = {u["upgrade_id"]: u["removed"] for u in report["upgrades"]}
    assert set(pruned) == set(upgrades)  # every finished one, never "running"
    assert shared.exists()  # the running upgrade's rollback point stays...
    assert f"backups/{upgrades[0]}" not in pruned[upgrades[0]]  # ...and so does its folder
    assert (home / "backups" / "running" / "x").exists()
    assert not (home / "backups" / upgrades[1]).exists()
    assert [f.check for f in doctor.run_checks(home) if f.status == "fail"] == []


def test_the_newest_snapshot_is_never_removed(cli, home, upgrades) -> None:
    newest = sorted((home / "snapshots").iterdir())[-1]
    assert newest.name.endswith(f"-{upgrades[-1]}.db")
    with Ledger(home) as led:
        led.init("next")  # the current upgrade now; the last finished one is not
    assert cli("prune", "--keep-upgrades", "0").code == 0
    assert [p.name for p in (home / "snapshots").iterdir()] == [newest.name]
    assert not (home / "backups" / upgrades[-1]).exists()


def test_rows_go_on_request_and_the_trail_stays(cli, home, upgrades) -> None:
    with Ledger(home) as led:
        trail = led.events(upgrade_id=upgrades[0], limit=None)
    result = cli("prune", "--keep-upgrades", "2", "--rows", "--json")
    assert result.code == 0, result.err
    assert [u["rows"] for u in json.loads(result.out)["upgrades"]] == [True, True]
    assert [r["id"] for r in json.loads(cli("history", "--all", "--json").out)] == \
        upgrades[:1:-1]
    assert cli("show", upgrades[0]).code == 5
    with Ledger(home) as led:
        after = led.events(upgrade_id=upgrades[0], limit=None)
        assert after[:-1] == trail  # the upgrade's events stay, append-only
        assert (after[-1]["kind"], after[-1]["subject"]) == ("ledger.prune", "rows")
        assert after[-1]["detail"]["rows"] == {"components": 2, "phases": 1,
                                               "rollback_points": 2, "upgrades": 1}
        for table in ("phases", "components", "rollback_points"):
            assert led.query(f"SELECT COUNT(*) FROM {table} WHERE upgrade_id = :u",
                             {"u": upgrades[0]})[1] == [(0,)]
    conn = sqlite3.connect(home / "ledger.db")
    assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
    assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()
    assert [f.check for f in doctor.run_checks(home) if f.status != "ok"] == []


def test_links_and_paths_outside_the_home_are_never_followed(cli, home, upgrades,
                                                             tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.tgz").write_text("precious")
    (home / "backups" / "link").symlink_to(outside)
    with Ledger(home) as led:
        led.init("u-links")
        led.set_state("PLANNING")
        led.plan({"p": [("a", "1", "2"), ("b", "1", "2")]})
        led.mark_rollback_point("a", home / "backups" / "link" / "keep.tgz")
        led.mark_rollback_point("b", outside / "keep.tgz")
        led.set_state("FAILED")
        led.init("after")
    (home / "backups" / "u-links").symlink_to(outside)  # its own folder, planted as a link
    report = json.loads(cli("prune", "--keep-upgrades", "0", "--json").out)
    [linked] = [u for u in report["upgrades"] if u["upgrade_id"] == "u-links"]
    # Neither point may be removed (one through a link, one outside the home); the
    # planted folder is removed as the link it is, not what it points at.
    assert linked["removed"] == ["backups/u-links"]
    assert (outside / "keep.tgz").read_text() == "precious"
    assert (home / "backups" / "link").is_symlink()
    assert not (home / "backups" / "u-links").exists()


@pytest.mark.parametrize(("args", "code", "message"), [
    ([], 6, "say what to keep: --keep-upgrades N and/or --older-than AGE (or a [retention] "
            "section in "),
    (["--older-than", "a while"], 6, "cannot read the time 'a while'"),
    (["--keep-upgrades", "-1"], 2, "Invalid value for '--keep-upgrades'"),
])
def test_a_bad_policy_is_one_line_and_changes_nothing(cli, home, upgrades, args, code,
                                                      message) -> None:
    before = tree(home)
    result = cli("prune", *args)
    assert result.code == code
    assert result.err.startswith(f"upgrade-ledger: error: {message}")
    assert result.err.count("\n") == 1 and result.out == ""
    assert tree(home) == before


def test_the_home_config_applies_after_each_completed_upgrade(cli, home, upgrades,
                                                              tmp_path: Path) -> None:
    (home / "ledger.toml").write_text('[retention]\nkeep_upgrades = 2\n')
    preview = json.loads(cli("prune", "--dry-run", "--json").out)  # the config's policy
    assert preview["policy"]["keep_upgrades"] == 2
    assert [u["upgrade_id"] for u in preview["upgrades"]] == upgrades[:2]
    plan = write_plan(tmp_path / "w2", [("p", 1, [component("a")])])
    done = cli("apply", str(plan))
    assert done.code == 0, done.err
    with Ledger(home) as led:
        newest = led.current_id()
    # Now the two newest are the last template upgrade and the new one.
    survivors = sorted(p.name for p in (home / "backups").iterdir())
    assert survivors == sorted([upgrades[-1], newest])
    assert {e["upgrade_id"] for e in prune_events(home)} == set(upgrades[:3])


def test_a_broken_config_never_fails_the_upgrade(cli, home, upgrades,
                                                 tmp_path: Path) -> None:
    (home / "ledger.toml").write_text('[retention]\nkeep = 2\n')
    bad = cli("prune", "--dry-run")
    assert bad.code == 6 and "[retention] does not know keep" in bad.err
    plan = write_plan(tmp_path / "w2", [("p", 1, [component("a")])])
    done = cli("apply", str(plan))
    assert done.code == 0, done.err
    [event] = prune_events(home)
    assert event["subject"] == "retention" and "does not know keep" in event["detail"]["error"]
    assert all((home / "backups" / uid).exists() for uid in upgrades)


def test_from_python(home, upgrades) -> None:
    with Ledger(home) as led:
        report = prune.prune(led, Policy(keep_upgrades=3))
    assert [p.upgrade_id for p in report.upgrades] == upgrades[:1]
    assert report.bytes_freed == report.upgrades[0].bytes > 0
    with pytest.raises(Exception, match="needs keep_upgrades"):
        Policy()
