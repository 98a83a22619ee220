"""Shared fixtures: a fresh ledger home per test, the CLI in-process and as a real
process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from pgserver import Server, Unavailable, start

from ledger.api import Ledger

REPO = Path(__file__).resolve().parent.parent


# Two separate knobs (README, "Tests"): the ``slow`` marker says which tests take a
# second or more, so that ``-m "not slow"`` leaves them out of the fast subset; the
# ``--exhaustive`` option makes the fault-injection sweeps bigger than in the default
# run (CI's, which runs every test, slow ones included).


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--exhaustive", action="store_true", default=False,
                     help="scale the fault-injection sweeps up, ten-fold (same as "
                          "LEDGER_EXHAUSTIVE_TESTS=1); unrelated to the 'slow' marker")


@pytest.fixture(scope="session")
def exhaustive(request: pytest.FixtureRequest) -> bool:
    """True with ``pytest --exhaustive`` or ``LEDGER_EXHAUSTIVE_TESTS=1``: tests scale up
    their sweeps."""
    return bool(request.config.getoption("--exhaustive")) or \
        os.environ.get("LEDGER_EXHAUSTIVE_TESTS", "") not in ("", "0")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    """A PostgreSQL server for the session (see tests/pgserver.py). Where none can be
    had the PostgreSQL tests are skipped, except under CI (CI=true), where they fail."""
    try:
        server = start()
    except Unavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL is required under CI: {exc}", pytrace=False)
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server: Server) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database of this test's own."""
    url = pg_server.new_database()
    yield url
    pg_server.drop_database(url)


@pytest.fixture(autouse=True)
def _no_terminal_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see output as a pipe would: no ``COLUMNS``/``LINES`` from the shell that
    runs them (pytest-xdist's workers set 80x24), which would fit tables to a width."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


def walk_to_upgrading(led: Ledger, upgrade_id: str | None = None) -> str:
    """Start an upgrade and move it IDLE -> PLANNING -> BACKING_UP -> UPGRADING."""
    uid = led.init(upgrade_id)
    for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
        led.set_state(state)
    return uid


def run_ledger(*args: str | os.PathLike[str], input: str | None = None,
               env: dict[str, str] | None = None, timeout: float = 120,
               cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``upgrade-ledger ARGS...`` as a real process (``python -m ledger``) with the
    environment of ``child_env`` unless *env* is given; never raises on failure."""
    return subprocess.run([sys.executable, "-m", "ledger", *map(str, args)], input=input,
                          capture_output=True, text=True, check=False, env=env or child_env(),
                          timeout=timeout, cwd=cwd)


def ledger_process(*args: str | os.PathLike[str], env: dict[str, str] | None = None,
                   **popen: object) -> subprocess.Popen[str]:
    """Start ``upgrade-ledger ARGS...`` as a real process without waiting for it."""
    options: dict[str, object] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                                  "text": True, **popen}
    return subprocess.Popen([sys.executable, "-m", "ledger", *map(str, args)],
                            env=env or child_env(), **options)  # type: ignore[call-overload]


@pytest.fixture(params=["session", "process"])
def dropin_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test of the bash drop-in runs twice: with the session (the default), and
    with UPGRADE_LEDGER_SESSION=0 (one upgrade-ledger process per call)."""
    if request.param == "session":
        monkeypatch.delenv("UPGRADE_LEDGER_SESSION", raising=False)
    else:
        monkeypatch.setenv("UPGRADE_LEDGER_SESSION", "0")
    return str(request.param)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A ledger home that does not exist yet."""
    return tmp_path / "home"


@pytest.fixture
def ledger(home: Path) -> Iterator[Ledger]:
    """A new ledger on the stdlib SQLite path."""
    with Ledger(home) as led:
        yield led


@dataclass
class Result:
    """What a CLI call did."""

    code: int
    out: str
    err: str


@pytest.fixture
def cli(home: Path) -> Callable[..., Result]:
    """Run ``upgrade-ledger --home HOME ARGS...`` in-process (click's runner)."""
    from ledger.cli import cli as root  # noqa: PLC0415

    def invoke(*args: str, input: str | bytes | None = None,
               env: dict[str, str] | None = None) -> Result:
        runner = CliRunner()
        result = runner.invoke(root, ["--home", str(home), *args], input=input,
                               env=env, catch_exceptions=False)
        return Result(result.exit_code, result.stdout, result.stderr)

    return invoke


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process that imports ``ledger`` from this checkout."""
    env = dict(os.environ)
    # No empty entry: it would mean the working folder (and a child started from a
    # folder that was deleted could not even start).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("LEDGER_HOME", None)
    env.pop("UPGRADE_STATE_DIR", None)
    env.update(extra)
    return env


@pytest.fixture
def run_cli(home: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``upgrade-ledger --home HOME ARGS...`` as a real process."""

    def run(*args: str, input: str | None = None, check: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = run_ledger("--home", home, *args, input=input, env=env)
        if check:
            done.check_returncode()
        return done

    return run
