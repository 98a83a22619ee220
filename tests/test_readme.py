"""The README as a new user follows it: the tour after the quick start, copied into a
shell; the Python snippet, run twice; the API example, which must show the failed
attempt and its retry that the README promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, child_env

from ledger.api import Ledger
from ledger.errors import UpgradeInProgress

README = (REPO / "README.md").read_text()


def block(after: str, lang: str) -> str:
    """The first ```lang block after the text *after* in the README."""
    start = README.index(after)
    match = re.compile(rf"```{lang}\n(.*?)```", re.DOTALL).search(README, start)
    assert match is not None
    return match.group(1)


@pytest.mark.slow
def test_the_tour_runs_as_written_after_the_quick_start(tmp_path: Path) -> None:
    # The quick start's venv, standing in: its upgrade-ledger runs this checkout.
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    command = venv_bin / "upgrade-ledger"
    command.write_text(f'#!/bin/sh\nexec {sys.executable} -m ledger "$@"\n')
    command.chmod(0o755)
    env = child_env()
    env.pop("LEDGER_FORMAT", None)
    env["PATH"] = "/usr/bin:/bin"  # nothing on PATH but the system: a fresh shell
    quick = subprocess.run([str(command), "--home", "demo", "apply",
                            str(REPO / "examples" / "observability-stack.toml")],
                           cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert quick.returncode == 0, quick.stderr
    tour = block("A short tour", "sh")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", tour], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "command not found" not in done.stderr
    assert "COMPLETED" in done.stdout


@pytest.mark.slow
def test_the_python_snippet_runs_again_and_again(tmp_path: Path) -> None:
    snippet = block("## Python", "python")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("0 Upgrade:")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_an_upgrade_in_progress_is_refused_in_pythons_words(ledger: Ledger) -> None:
    ledger.init("u1")
    ledger.set_state("PLANNING")
    with pytest.raises(UpgradeInProgress) as caught:
        ledger.init("u2")
    assert str(caught.value) == ("upgrade u1 is still in progress (PLANNING); finish it, or "
                                 "pass supersede=True to end it as FAILED")
    assert "--" not in str(caught.value)


@pytest.mark.slow
def test_the_api_example_shows_the_failed_attempt_and_its_retry(tmp_path: Path) -> None:
    for _ in range(2):  # a second run supersedes nothing and works as well
        done = subprocess.run([sys.executable, str(REPO / "examples" / "simulated_upgrade.py"),
                               "demo-api"], cwd=tmp_path, env=child_env(),
                              capture_output=True, text=True, timeout=120, check=False)
        assert (done.returncode, done.stderr) == (0, "")
    out = done.stdout
    assert "prometheus: attempt 1 failed (config check failed), retrying" in out
    assert ("prometheus: UPGRADING -> FAILED (config check failed) -> UPGRADING -> "
            "COMPLETED") in out
    assert "State:     COMPLETED" in out and "Recent upgrades:" in out


def test_the_readme_runs_the_suite_as_ci_does_and_names_the_fast_subset() -> None:
    full = block("run the test suite", "sh").strip()
    assert full == ("python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && "
                    ".venv/bin/python -m pytest")
    assert (REPO / ".ci" / "run").read_text().splitlines()[-1] == full
    assert block("fast subset", "sh").strip() == '.venv/bin/python -m pytest -m "not slow"'
