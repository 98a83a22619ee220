"""The built wheel, installed (not editable) into a fresh venv, creates and migrates a
ledger: the Alembic migrations and the state schema ship inside the package.

One wheel and one venv per test session; dependencies come from the package index.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: What a build does not need from the checkout (and what must not leak into it).
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
    ".hypothesis", ".benchmarks", "tests", "demo")


#: Every test here builds and installs the wheel into a new venv (once per session).
pytestmark = pytest.mark.slow


def clean_env() -> dict[str, str]:
    """No trace of the checkout: the installed package must stand on its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "LEDGER_HOME", "UPGRADE_STATE_DIR", "LEDGER_DB_URL",
                        "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=clean_env(), text=True,
                          capture_output=True, timeout=600, check=False)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout installed in it."""
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy, so that concurrent builds never share the checkout's build/.
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", root / "dist",
        source, cwd=root)
    (wheel,) = (root / "dist").glob("upgrade_ledger-*.whl")
    env_dir = root / "venv"
    # The venv's own pip would cost a bootstrap; the outer pip installs into it.
    run(sys.executable, "-m", "venv", "--without-pip", env_dir, cwd=root)
    run(sys.executable, "-m", "pip", "--python", env_dir / "bin" / "python", "install",
        "--quiet", wheel, cwd=root)
    return env_dir


def test_the_wheel_carries_the_migrations_and_the_schema(venv: Path) -> None:
    (site,) = (venv / "lib").glob("python3*/site-packages")
    package = site / "ledger"
    assert (package / "migrations" / "env.py").is_file()
    assert sorted(p.name for p in (package / "migrations" / "versions").glob("0*.py"))
    assert (package / "state.schema.json").is_file()
    assert not (site / "migrations").exists()  # shipped inside the package, not beside it
    assert not list(site.glob("__editable__*")) and not list(site.glob("*.pth"))


def test_the_installed_command_creates_a_ledger_outside_the_repo(venv: Path,
                                                                 tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = run(venv / "bin" / "upgrade-ledger", "--home", home, "init", cwd=tmp_path)
    uid = done.stdout.strip()
    assert uid.startswith("upgrade-")
    assert json.loads((home / "state.json").read_text())["upgrade_id"] == uid
    run(venv / "bin" / "upgrade-ledger", "--home", home, "state", "set", "PLANNING",
        cwd=tmp_path)
    shown = run(venv / "bin" / "upgrade-ledger", "--home", home, "state", "get", cwd=tmp_path)
    assert shown.stdout.strip() == "PLANNING"


SNIPPET = textwrap.dedent("""
    import json, sys
    import ledger
    from ledger.store import migrate
    from ledger.api import Ledger
    with Ledger(sys.argv[1]) as led:
        led.init("from-the-wheel")
        for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
            led.set_state(state)
        led.phase_start("p")
        led.component_start("a", "1", "2")
        led.component_complete("a")
        revision = led.query("SELECT version_num FROM alembic_version")[1][0][0]
        print(json.dumps({"package": ledger.__file__, "migrations": migrate.script_location(),
                          "head": migrate.head_revision(), "revision": revision,
                          "installed": led.installed_version("a"),
                          "views": [r[0] for r in led.query(
                              "SELECT name FROM sqlite_master WHERE type = 'view' "
                              "ORDER BY name")[1]]}))
""")


def test_the_installed_package_creates_and_migrates_a_ledger_from_python(
        venv: Path, tmp_path: Path) -> None:
    done = run(venv / "bin" / "python", "-c", SNIPPET, tmp_path / "home", cwd=tmp_path)
    facts = json.loads(done.stdout)
    assert Path(facts["package"]).is_relative_to(venv)
    assert Path(facts["migrations"]).is_relative_to(venv)
    assert not Path(facts["package"]).is_relative_to(REPO)
    assert facts["revision"] == facts["head"]
    assert facts["installed"] == "2"
    assert facts["views"] == ["component_runs", "failures", "host_status", "phase_runs",
                             "plan_runs", "upgrade_summary"]
