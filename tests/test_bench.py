"""The benchmark runs (as a smoke run: nothing here asserts a time), and the start-up
savings it measures stay in place: a per-step command imports only its own module."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import run_ledger

from ledger.api import Ledger
from ledger.cli import COMMAND_MODULES, MODULES
from tests.conftest import REPO, child_env

BENCH = REPO / "scripts" / "bench.py"
LABELS = ("CLI step", "drop-in call", "CLI resume check", "transition", "lock acquire+release",
          "resume check", "progress", "state.json atomic write", "state.json export",
          "history", "CLI history", "state.json size")


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), "--quick", *args], capture_output=True,
                          text=True, env=child_env(), timeout=600, check=False)


@pytest.mark.slow
def test_a_quick_run_prints_one_table_and_saves_the_results_as_json(tmp_path: Path) -> None:
    # One run for both (a quick run takes a quarter of a minute): the table on stdout,
    # and --save's JSON (the document --json prints).
    saved = tmp_path / "results.json"
    done = run_bench("--save", str(saved))
    assert done.returncode == 0, done.stderr
    check_table(done.stdout)
    check_json(json.loads(saved.read_text()))


def check_table(stdout: str) -> None:
    """The table has every figure, floor and column."""
    lines = stdout.splitlines()
    assert lines[0].startswith("figure (median/p90 ms)")
    for column in ("10", "20", "2,000 upgrades", "floor (same run", "seed claim", "budget",
                   "verdict"):
        assert column in lines[0]
    for label in LABELS:
        assert any(line.startswith(label) for line in lines), label
    assert "floors (median/p90 ms):" in lines
    for floor in ("python -c pass", "import sqlite3, json", "import click, sqlite3, json",
                  "sqlite WAL commit (synchronous=FULL)", "raw fsync"):
        assert any(line.strip().startswith(floor + ":") for line in lines), floor
    assert any(line.startswith("old library call") and "n/a" in line for line in lines)
    assert "ratio to the old library" not in stdout  # only with --legacy-lib
    if not (REPO / "scripts" / "upgrade-state.sh").exists():
        assert any(line.startswith("drop-in call") and "n/a" in line for line in lines)


def check_json(result: dict[str, Any]) -> None:
    """The JSON results are machine-readable: every figure of the quick run's sizes."""
    assert result["settings"]["sizes"] == [10, 20]
    assert set(result["floors"]) >= {"python -c pass", "import sqlite3, json",
                                     "import click, sqlite3, json",
                                     "sqlite WAL commit (synchronous=FULL)", "raw fsync"}
    for key in ("cli_step", "transition", "lock_dirlock", "lock_ledger", "resume",
                "resume_cli", "progress", "export", "history"):
        for size in ("10", "20"):
            cell = result["rows"][key][size]
            assert cell["median"] > 0 and cell["p90"] >= cell["median"] and cell["n"] >= 3
    assert result["rows"]["history_big"]["2,000 upgrades"]["median"] > 0
    assert result["rows"]["state_size"]["20"]["median"] > result["rows"]["state_size"]["10"][
        "median"]
    verdicts = result["verdicts"]
    assert verdicts["cli_step"]["ok"] in (True, False)
    assert verdicts["history_big"]["ok"] is None  # 100,000 upgrades only in a full run
    assert ("dropin_step" in result["rows"]) == (REPO / "scripts" / "upgrade-state.sh").exists()
    assert "dropin_oneshot" in result["rows"] and "legacy_step" not in result["rows"]
    assert verdicts["dropin_step"]["checks"][1]["ok"] is None  # no old library: no ratio
    # The fleet: a step with the fleet database down is measured everywhere; with a
    # server, a step with a fleet, the push throughput and the lag under --follow too.
    assert result["rows"]["fleet_down_cli_step"]["20"]["median"] > 0
    assert verdicts["fleet_down_cli_step"]["ok"] in (True, False)
    if result["settings"]["postgres"]:
        assert result["rows"]["fleet_cli_step"]["20"]["median"] > 0
        assert result["rows"]["fleet_push_rate"]["2,000 upgrades"]["median"] > 0
        assert result["rows"]["fleet_push_rate_steps"]["20"]["median"] > 0
        assert result["rows"]["fleet_lag"]["20"]["n"] == 3
    assert result["seconds"] > 0


@pytest.mark.slow
def test_the_old_library_runs_side_by_side_when_given(tmp_path: Path) -> None:
    # A stand-in with the old library's function names (the real one is not shipped):
    # each call costs a sleep of 50 ms, so the ratios are known to be small.
    fake = tmp_path / "legacy.sh"
    fake.write_text("upgrade_state_init_dirs() { :; }\n"
                    "upgrade_component_start() { sleep 0.05; }\n"
                    "upgrade_component_complete() { sleep 0.05; }\n")
    done = run_bench("--json", "--legacy-lib", str(fake))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["settings"]["legacy_lib"] == str(fake)
    assert result["rows"]["legacy_step"]["20"]["median"] >= 50
    ratio = result["verdicts"]["dropin_step"]["checks"][1]
    assert ratio["what"] == "@20 vs 0.1x the old library"
    assert ratio["limit"] == 0.1 * result["rows"]["legacy_step"]["20"]["median"]
    assert ratio["ok"] == (ratio["measured"] <= ratio["limit"])
    missing = run_bench("--legacy-lib", str(tmp_path / "nope.sh"))
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_command_index_is_right_and_covers_the_per_step_commands() -> None:
    defined = {}
    for module in MODULES:
        for command in importlib.import_module(f"ledger.cli.{module}").COMMANDS:
            defined[command.name] = module
    wrong = {n: m for n, m in COMMAND_MODULES.items() if defined.get(n) != m}
    assert not wrong, f"ledger.cli.COMMAND_MODULES names the wrong module: {wrong}"
    missing = {n for n, m in defined.items()
               if m in ("steps", "lockcmds", "reports") and n not in COMMAND_MODULES}
    assert not missing, f"add {missing} to ledger.cli.COMMAND_MODULES"


@pytest.mark.parametrize(("args", "module"), [
    (["component", "start", "db", "1", "2"], "ledger.cli.steps"),
    (["lock", "acquire", "--owner", "1"], "ledger.cli.lockcmds"),
    (["history"], "ledger.cli.reports"),
])
@pytest.mark.slow
def test_a_command_imports_only_its_own_module(tmp_path: Path, args: list[str],
                                               module: str) -> None:
    home = tmp_path / "home"
    code = (
        "import sys\n"
        "from ledger.api import Ledger\n"
        f"led = Ledger({str(home)!r}); led.init(); led.phase_start('p'); led.close()\n"
        "for name in [m for m in sys.modules if m.startswith('ledger.cli')]:\n"
        "    del sys.modules[name]\n"
        "from ledger.cli import cli\n"
        "try:\n"
        f"    cli.main(['--home', {str(home)!r}, *{args!r}])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('ledger.cli.'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=child_env(), timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.splitlines()[-1].split())
    assert module in loaded
    others = {f"ledger.cli.{m}" for m in MODULES} - {module, "ledger.cli.steps"}
    assert not loaded & others, loaded


def test_help_still_lists_every_command(cli: object) -> None:
    result = cli("--help")  # type: ignore[operator]
    assert result.code == 0
    for name in COMMAND_MODULES:
        assert f"  {name} " in result.out, name


@pytest.mark.slow
def test_the_quick_exit_keeps_output_and_exit_codes(tmp_path: Path) -> None:
    """A command leaves without interpreter shutdown; its whole output still arrives
    (a large JSON history through a pipe) and its exit code is kept."""
    home = tmp_path / "home"
    with Ledger(home) as led:
        for i in range(300):
            led.init(f"up-{i:04d}", supersede=True)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_ledger("--home", home, *args)

    done = run("history", "--limit", "1000", "--format", "json")
    assert done.returncode == 0, done.stderr
    assert [u["id"] for u in json.loads(done.stdout)][:2] == ["up-0299", "up-0298"]
    assert len(json.loads(done.stdout)) == 300
    assert run("in-progress").returncode == 1
    refused = run("state", "set", "NOPE")
    assert refused.returncode == 6
    assert refused.stderr.startswith("upgrade-ledger: error: unknown upgrade state 'NOPE'")
