"""Prometheus metrics: the text format parses with prometheus-client's own parser and
says what the ledger says; the textfile is written atomically for node_exporter and,
when asked, refreshed after every change; prometheus-client stays off the per-step
path otherwise."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_ledger, walk_to_upgrading
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from ledger.api import Ledger
from ledger.core import clock
from ledger.observe import metrics
from tests.conftest import child_env

ODD_NAME = 'exporter "quoted" {a="b"} \u00fc'


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted label pairs: value}}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


def unix(stamp: str) -> float:
    return clock.parse(stamp).timestamp()


@pytest.fixture
def busy(home: Path) -> Iterator[Ledger]:
    """A ledger with one finished upgrade in history and one upgrading now."""
    with Ledger(home) as led:
        walk_to_upgrading(led, "old-1")
        led.phase_start("exporters")
        led.component_start("node_exporter", "1.6.0", "1.7.0")
        led.component_complete("node_exporter")
        led.set_state("FAILED", error="validation failed")
        led.set_state("IDLE")
        walk_to_upgrading(led, "new-2")
        led.plan({"exporters": [("node_exporter", "1.7.0", "1.9.1"), (ODD_NAME, None, "2"),
                                ("blackbox_exporter", None, "0.25.0")]})
        led.phase_start("exporters")
        led.component_start("node_exporter")
        led.component_fail("node_exporter", "checksum mismatch")
        led.component_start("node_exporter")
        led.component_complete("node_exporter")
        led.component_skip("blackbox_exporter", "already there")
        led.component_start(ODD_NAME)
    with Ledger(home) as led:
        yield led


def test_the_textfile_parses_and_matches_the_ledger(cli, busy: Ledger, tmp_path: Path) -> None:
    target = tmp_path / "textfile" / "upgrade_ledger.prom"
    target.parent.mkdir()
    assert cli("lock", "acquire", "--owner", str(os.getpid())).code == 0
    result = cli("metrics", "--textfile", str(target))
    assert (result.code, result.out, result.err) == (0, "", "")
    m = parse(target.read_text())

    with busy.db.read() as tx:
        lineage = tx.scalar("SELECT value FROM ledger_meta WHERE key = 'lineage'")
        durations = {r["component"]: r["duration_s"] for r in tx.all(
            "SELECT component, duration_s FROM component_runs WHERE upgrade_id = 'new-2'")}
        old = tx.one("SELECT finished_at FROM upgrades WHERE id = 'old-1'")
        newest = tx.one("SELECT id, at FROM events ORDER BY id DESC LIMIT 1")
        upgrade = tx.one("SELECT started_at, updated_at FROM upgrades WHERE id = 'new-2'")
    status = busy.status()

    assert value(m, "upgrade_ledger_info", lineage=lineage, version="0.1.0") == 1
    states = {dict(labels)["state"]: v for labels, v in m["upgrade_ledger_upgrade_state"].items()
              if dict(labels)["upgrade_id"] == "new-2"}
    assert states["UPGRADING"] == 1 and sum(states.values()) == 1 and len(states) == 9
    assert value(m, "upgrade_ledger_upgrade_progress_ratio", upgrade_id="new-2") == \
        pytest.approx(2 / 3)
    for state, n in {"PENDING": 0, "UPGRADING": 1, "COMPLETED": 1, "FAILED": 0,
                     "SKIPPED": 1}.items():
        assert value(m, "upgrade_ledger_components", upgrade_id="new-2", state=state) == n
        assert status["components"].get(state, 0) == n
    ids = {"upgrade_id": "new-2", "phase": "exporters"}
    assert value(m, "upgrade_ledger_component_attempts_total", component="node_exporter",
                 **ids) == 2
    assert value(m, "upgrade_ledger_component_failures_total", component="node_exporter",
                 **ids) == 1
    assert value(m, "upgrade_ledger_component_attempts_total", component=ODD_NAME, **ids) == 1
    assert value(m, "upgrade_ledger_component_attempts_total",
                 component="blackbox_exporter", **ids) == 0
    assert value(m, "upgrade_ledger_component_last_duration_seconds",
                 component="node_exporter") == pytest.approx(durations["node_exporter"],
                                                             abs=0.002)
    # Never finished (upgrading now, or skipped without a start): no duration.
    assert ("component", ODD_NAME) not in {
        pair for labels in m["upgrade_ledger_component_last_duration_seconds"]
        for pair in labels}
    assert value(m, "upgrade_ledger_upgrade_started_timestamp_seconds", upgrade_id="new-2") == \
        pytest.approx(unix(upgrade["started_at"]))
    assert value(m, "upgrade_ledger_upgrade_updated_timestamp_seconds", upgrade_id="new-2") == \
        pytest.approx(unix(upgrade["updated_at"]))
    assert value(m, "upgrade_ledger_last_finished_timestamp_seconds", outcome="FAILED") == \
        pytest.approx(unix(old["finished_at"]))
    assert value(m, "upgrade_ledger_last_finished_timestamp_seconds", outcome="COMPLETED") == 0
    assert value(m, "upgrade_ledger_events_total") == newest["id"]
    assert value(m, "upgrade_ledger_last_event_timestamp_seconds") == \
        pytest.approx(unix(newest["at"]))
    assert value(m, "upgrade_ledger_lock_held") == 1
    assert value(m, "upgrade_ledger_lock_stale") == 0
    assert value(m, "upgrade_ledger_lock_age_seconds") >= 0
    holder = status["lock"]["holder"]
    assert value(m, "upgrade_ledger_lock_acquired_timestamp_seconds") == \
        unix(holder["timestamp"])


def test_the_textfile_is_replaced_whole_and_readable_by_node_exporter(
        cli, busy: Ledger, tmp_path: Path) -> None:
    folder = tmp_path / "collector"
    folder.mkdir()
    target = folder / "upgrade_ledger.prom"
    target.write_text("old content\n")
    old_umask = os.umask(0o077)
    try:
        assert cli("metrics", "--textfile", str(target)).code == 0
    finally:
        os.umask(old_umask)
    assert os.listdir(folder) == ["upgrade_ledger.prom"]  # no temp file left beside it
    assert target.stat().st_mode & 0o777 == 0o644
    assert "upgrade_ledger_events_total" in target.read_text()


def test_stdout_is_the_same_text_format(cli, busy: Ledger) -> None:
    result = cli("metrics")
    assert result.code == 0
    m = parse(result.out)
    assert value(m, "upgrade_ledger_lock_held") == 0
    assert "upgrade_ledger_lock_age_seconds" not in m
    assert value(m, "upgrade_ledger_upgrade_state", upgrade_id="new-2", state="UPGRADING") == 1


def test_attempts_are_the_ledgers_attempts(ledger: Ledger) -> None:
    # One meaning everywhere: the attempt in progress or the next one (1 at the first
    # start, + 1 at each failure); failures are the attempts that did not succeed.
    walk_to_upgrading(ledger, "u1")
    ledger.phase_start("p")
    for name, fails, restart in (("once", 0, False), ("failed", 1, False),
                                 ("retried", 2, True)):
        ledger.component_start(name)
        for n in range(fails):
            ledger.component_fail(name, "no")
            if restart or n < fails - 1:
                ledger.component_start(name)
    m = parse(metrics.exposition(ledger).decode())
    ids = {"upgrade_id": "u1", "phase": "p"}
    for name, attempts, failures in (("once", 1, 0), ("failed", 2, 1), ("retried", 3, 2)):
        assert ledger.component_status(name)["attempts"] == attempts, name
        assert value(m, "upgrade_ledger_component_attempts_total", component=name,
                     **ids) == attempts, name
        assert value(m, "upgrade_ledger_component_failures_total", component=name,
                     **ids) == failures, name


def test_label_values_are_escaped(cli, busy: Ledger) -> None:
    text = cli("metrics").out
    assert 'component="exporter \\"quoted\\" {a=\\"b\\"} \u00fc"' in text
    assert ODD_NAME in {s.labels.get("component") for f in text_string_to_metric_families(text)
                        for s in f.samples}


def test_a_missing_folder_is_one_line_and_changes_nothing(
        cli, busy: Ledger, home: Path, tmp_path: Path) -> None:
    before = sorted(os.listdir(home)), _events(home)
    result = cli("metrics", "--textfile", str(tmp_path / "nope" / "x.prom"))
    assert result.code == 6
    assert result.err == (f"upgrade-ledger: error: metrics textfile folder {tmp_path / 'nope'} "
                          "does not exist; create it (it is node_exporter's "
                          "--collector.textfile.directory) or choose another path\n")
    assert (sorted(os.listdir(home)), _events(home)) == before
    assert not (tmp_path / "nope").exists()
    folder = cli("metrics", "--textfile", str(tmp_path))
    assert folder.code == 6 and "is a folder" in folder.err


def _events(home: Path) -> list[tuple]:
    with sqlite3.connect(home / "ledger.db") as conn:
        return conn.execute("SELECT * FROM events ORDER BY id").fetchall()


def test_the_private_registry_leaves_the_global_one_alone(busy: Ledger) -> None:
    metrics.exposition(busy)
    names = {m.name for m in REGISTRY.collect()}
    assert not any(n.startswith("upgrade_ledger") for n in names)


@pytest.mark.slow
def test_the_textfile_follows_every_change_when_asked(run_cli, home: Path,
                                                      tmp_path: Path) -> None:
    target = tmp_path / "ledger.prom"
    env = child_env(LEDGER_METRICS_TEXTFILE=str(target))
    assert run_cli("init", "u1", env=env).returncode == 0
    assert value(parse(target.read_text()), "upgrade_ledger_upgrade_state",
                 upgrade_id="u1", state="IDLE") == 1
    assert run_cli("state", "set", "PLANNING", env=env).returncode == 0
    m = parse(target.read_text())
    assert value(m, "upgrade_ledger_upgrade_state", upgrade_id="u1", state="PLANNING") == 1
    assert value(m, "upgrade_ledger_lock_held") == 0
    assert run_cli("lock", "acquire", "--owner", str(os.getpid()), env=env).returncode == 0
    assert value(parse(target.read_text()), "upgrade_ledger_lock_held") == 1
    assert run_cli("lock", "release", "--owner", str(os.getpid()), env=env).returncode == 0
    assert value(parse(target.read_text()), "upgrade_ledger_lock_held") == 0


@pytest.mark.slow
def test_a_textfile_that_cannot_be_written_never_fails_the_step(
        run_cli, home: Path, tmp_path: Path) -> None:
    env = child_env(LEDGER_METRICS_TEXTFILE=str(tmp_path / "gone" / "x.prom"))
    assert run_cli("init", "u1").returncode == 0
    result = run_cli("state", "set", "PLANNING", env=env)
    assert result.returncode == 0
    assert result.stderr.count("\n") == 1
    assert "metrics textfile not refreshed" in result.stderr and "does not exist" in \
        result.stderr
    assert run_cli("state", "get").stdout.strip() == "PLANNING"


PROBE = """
import sys
from ledger.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="upgrade-ledger")
except SystemExit as exc:
    assert not exc.code, exc.code
print(json.dumps("prometheus_client" in sys.modules))
"""


@pytest.mark.slow
@pytest.mark.parametrize("textfile", [False, True])
def test_prometheus_client_is_imported_only_when_a_textfile_is_asked_for(
        home: Path, tmp_path: Path, textfile: bool) -> None:
    env = child_env()
    env.pop("LEDGER_METRICS_TEXTFILE", None)
    if textfile:
        env["LEDGER_METRICS_TEXTFILE"] = str(tmp_path / "m.prom")
    run_ledger("--home", home, "init", "u1", env=env).check_returncode()
    probe = subprocess.run([sys.executable, "-c", "import json\n" + PROBE, "--home", str(home),
                            "state", "set", "PLANNING"], env=env, capture_output=True,
                           text=True, timeout=120, check=False)
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout.splitlines()[-1]) is textfile
