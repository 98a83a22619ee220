"""A symlink planted at any path the ledger writes is refused in one line, or replaced
(never followed); not a byte is written through it.

The paths come from the code, not from a list kept by hand. A reference scenario
(the first ``apply`` of a plan, killed mid-way in BACKING_UP; then, resuming it,
``subscribers add``, ``apply``, ``snapshot``, ``export``, ``notify``, with the metrics
textfile on) runs under ``tests/writetrace.py``, an audit hook that records every
path the ledger's own code writes: files opened for writing, folders made, rename
targets, files removed, SQLite databases (with their ``-wal``, ``-shm`` and
``-journal``), and every folder above them in the home. The resume part runs twice:
a path written in both runs is a fixed name, and a symlink to a victim is planted
there (in a copy of the stopped home), then the scenario runs again. A name that
differs between the runs (temp files, command records, snapshot stamps) cannot be
planted in advance: each such file must have been opened without following a
symlink, in a folder that is itself planted at.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, child_env, run_ledger

from tests.applyplans import component, process_gone, wait_for, write_plan

TRACER = REPO / "tests" / "writetrace.py"
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


@dataclass
class Stage:
    """A home stopped mid-run, saved aside, and the reference traces."""

    base: Path
    home: Path  # where every run happens (absolute paths recorded in the ledger hold)
    work: Path
    textfile: Path
    saved: Path
    saved_work: Path
    stage_trace: list[dict]
    runs: list[list[dict]]
    #: Per run, per scenario command: what it wrote.
    steps: list[list[list[dict]]]


def scenario(base: Path) -> list[list[str]]:
    hook = base / "hook.sh"
    return [["subscribers", "add", "second", "--hook", str(hook), "--start", "all"],
            ["apply", "--plain", str(base / "work" / "plan.toml")],
            ["snapshot"], ["export"], ["notify"]]


def env_for(stage_base: Path) -> dict[str, str]:
    return child_env(LEDGER_METRICS_TEXTFILE=str(stage_base / "metrics" / "ledger.prom"))


def traced(base: Path, trace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TRACER), str(trace), "--home",
                           str(base / "home"), *args], capture_output=True, text=True,
                          env=env_for(base), timeout=300, check=False)


def read_trace(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def restore(stage: Stage) -> None:
    """Put the stopped home (and the plan's work folder) back as they were."""
    for live, saved in ((stage.home, stage.saved), (stage.work, stage.saved_work)):
        if live.exists() or live.is_symlink():
            shutil.rmtree(live)
        shutil.copytree(saved, live, symlinks=True)
    shutil.rmtree(stage.textfile.parent, ignore_errors=True)  # the operator's folder
    stage.textfile.parent.mkdir(mode=0o700)


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Stage:
    base = tmp_path_factory.mktemp("planted")
    work = base / "work"
    write_plan(work, [("one", 1, [component("a"), component(
        "b", backup="touch {W}/b.blocked; while [ -f {W}/hang ]; do sleep 0.05; done; "
                    "sh {W}/t.sh backup")]), ("two", 1, [component("c")])])
    (work / "hang").touch()
    hook = base / "hook.sh"
    hook.write_text("#!/bin/sh\ncat > /dev/null\n")
    hook.chmod(0o755)
    textfile = base / "metrics" / "ledger.prom"
    textfile.parent.mkdir(mode=0o700)
    stage_trace = base / "stage.trace"
    assert traced(base, stage_trace, "init", "setup").returncode == 0
    assert traced(base, stage_trace, "subscribers", "add", "first", "--hook", str(hook),
                  "--start", "all").returncode == 0
    proc = subprocess.Popen([sys.executable, str(TRACER), str(stage_trace), "--home",
                             str(base / "home"), "apply", "--plain", str(work / "plan.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env_for(base))
    try:
        wait_for(work / "b.blocked")
    finally:
        proc.kill()
        proc.wait(timeout=60)
    (work / "hang").unlink()  # b's backup, left running, now ends by itself
    saved, saved_work = base / "saved-home", base / "saved-work"
    wait_for_quiet(work)
    shutil.copytree(base / "home", saved, symlinks=True)
    shutil.copytree(work, saved_work, symlinks=True)
    steps: list[list[list[dict]]] = []
    for n in (1, 2):
        st = Stage(base, base / "home", work, textfile, saved, saved_work, [], [], [])
        restore(st)
        steps.append([])
        for i, args in enumerate(scenario(base)):
            trace = base / f"run{n}.{i}.trace"
            done = traced(base, trace, *args)
            assert done.returncode == 0, (args, done.stderr)
            steps[-1].append(read_trace(trace))
    return Stage(base, base / "home", work, textfile, saved, saved_work,
                 read_trace(stage_trace),
                 [[e for step in run for e in step] for run in steps], steps)


def wait_for_quiet(work: Path) -> None:
    """Wait until the commands the killed run left behind have ended."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LEDGER_PLAN_DIR={work}".encode() in env:
            assert process_gone(int(entry.name)), f"a command of the killed run: {entry}"


def ours(stage: Stage, path: str) -> str | None:
    """*path* relative to the home (or ``@textfile``) when the ledger owns it, else None."""
    p = Path(path)
    if p == stage.textfile:
        return "@textfile"
    try:
        rel = p.relative_to(stage.home)
    except ValueError:
        return None
    return None if rel == Path() else str(rel)


def written(stage: Stage, trace: Sequence[dict]) -> dict[str, set[str]]:
    """Relative path -> the operations the ledger made on it (and on what is below)."""
    out: dict[str, set[str]] = {}
    for entry in trace:
        if entry["op"].endswith("-from"):
            continue  # the temp side of a rename or link: recorded where it was made
        rel = ours(stage, entry["path"])
        if rel is None:
            continue
        out.setdefault(rel, set()).add(entry["op"])
        if entry["op"] == "sqlite":
            for suffix in SQLITE_COMPANIONS:
                out.setdefault(rel + suffix, set()).add("sqlite-companion")
        if rel != "@textfile":
            for parent in Path(rel).parents:
                if parent != Path():
                    out.setdefault(str(parent), set()).add("inside")
    return out


def fingerprint(path: Path) -> list[tuple[str, int, str]]:
    """Every entry under *path* (or *path* itself): name, mode, content hash."""
    items = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    out = []
    for item in items:
        st = item.lstat()
        digest = hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else ""
        out.append((str(item.relative_to(path.parent)), st.st_mode, digest))
    return out


def plant(stage: Stage, rel: str, victims: Path) -> Path:
    """Replace *rel* with a symlink to a victim that looks like what was there."""
    target = stage.textfile if rel == "@textfile" else stage.home / rel
    victim = victims / rel.replace("/", "__")
    if target.is_dir() and not target.is_symlink():
        shutil.copytree(target, victim, symlinks=True)
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        shutil.copy2(target, victim, follow_symlinks=False)
        target.unlink()
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        victim.mkdir() if rel_is_folder(stage, rel) else victim.write_bytes(b"precious\n")
    target.symlink_to(victim)
    return victim


def rel_is_folder(stage: Stage, rel: str) -> bool:
    ops = set().union(*(written(stage, run).get(rel, set()) for run in stage.runs))
    return bool(ops & {"mkdir", "inside", "rmtree"})


@pytest.mark.slow
def test_the_scenario_writes_what_the_docs_list(stage: Stage) -> None:
    """The traces are what they claim: the paths docs/apply.md and README.md name."""
    fixed = fixed_paths(stage)
    for expected in ("ledger.db", "ledger.db-wal", "state.json", "views.sig", "tmp",
                     "history", "snapshots", "notify.toml", "notify.lock", "logs",
                     "logs/.running", "upgrade.lock.d", "upgrade.lock.d/lock.info",
                     "upgrade.lock.d.guard", "backups", "@textfile"):
        assert expected in fixed, expected
    assert any(p.startswith("backups/t-") and p.endswith("/one/b") for p in fixed)
    assert any(p.startswith("logs/t-") and p.endswith("/c.log") for p in fixed)
    assert any(p.startswith("history/t-") for p in fixed)


def fixed_paths(stage: Stage) -> list[str]:
    first, second = (written(stage, run) for run in stage.runs)
    fixed = set(first) & set(second)
    # What the stopped run wrote and left in place is planted at as well.
    fixed |= {rel for rel in written(stage, stage.stage_trace)
              if rel == "@textfile" or (stage.saved / rel).exists()}
    return sorted(fixed)


def test_names_that_change_from_run_to_run_are_opened_without_following_links(
        stage: Stage) -> None:
    fixed = set(fixed_paths(stage))
    loose = []
    for run in stage.runs:
        for entry in run:
            rel = ours(stage, entry["path"])
            if rel is None or rel in fixed or entry["op"] != "open":
                continue
            if not entry["flags"] & os.O_NOFOLLOW:
                loose.append(rel)
            parent = str(Path(rel).parent)
            assert parent in fixed or parent == "." or rel.startswith("@"), rel
    assert loose == []


def run_scenario(stage: Stage, rel: str,
                 ) -> Iterator[tuple[list[str], subprocess.CompletedProcess[str]]]:
    """Run the scenario as far as the last command that wrote *rel* (or below it) in
    the reference runs; all of it for what only the stopped run wrote."""
    commands = scenario(stage.base)
    last = max((i for run in stage.steps for i, step in enumerate(run)
                if rel in written(stage, step)), default=len(commands) - 1)
    for args in commands[:last + 1]:
        yield args, run_ledger("--home", stage.home, *args, env=env_for(stage.base))


@pytest.mark.slow
def test_a_symlink_at_each_path_is_refused_or_replaced_never_followed(
        stage: Stage, tmp_path: Path) -> None:
    problems = []
    for rel in fixed_paths(stage):
        restore(stage)
        victim = plant(stage, rel, tmp_path)
        before = fingerprint(victim)
        for args, done in run_scenario(stage, rel):
            if done.returncode == 0:
                continue
            lines = done.stderr.splitlines()
            target = stage.textfile if rel == "@textfile" else stage.home / rel
            refused = len(lines) == 1 and (str(target) in lines[0] or
                                           str(target.parent) in lines[0]) and \
                ("symbolic link" in lines[0] or "not a folder" in lines[0])
            # 8: a storage refusal; 4: the lock cannot judge a holder it cannot read
            # (docs/lock.md), and counts as held.
            if done.returncode not in (4, 8) or not refused:
                problems.append(f"{rel}: {' '.join(args[:1])} exit {done.returncode}: "
                                f"{done.stderr.strip()[-300:]}")
            break  # a refusal ends the scenario: what follows builds on it
        if fingerprint(victim) != before:
            problems.append(f"{rel}: written through the symlink")
    assert problems == [], "\n".join(problems)
