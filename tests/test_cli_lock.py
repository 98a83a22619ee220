"""Lock commands: a shell holds the lock across many short calls (the owner is the
calling process, or --owner/--pid), others are refused with exit 4 naming the holder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCK_KEYS = ["path", "held", "stale", "suspect", "reason", "age_s", "holder"]
HOLDER_KEYS = ["pid", "timestamp", "hostname", "user", "start_ticks", "boot_id"]


@pytest.fixture
def shells() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two live processes standing for two shells that run upgrade scripts."""
    procs = [subprocess.Popen(["sleep", "120"]) for _ in range(2)]
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEDGER_HOME", "UPGRADE_STATE_DIR", "LEDGER_PID")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_shell_holds_the_lock_across_calls_with_owner(cli, shells) -> None:
    mine, other = (str(p.pid) for p in shells)
    assert cli("init", "u1").code == 0
    assert cli("lock", "acquire", "--owner", mine).code == 0
    assert cli("lock", "acquire", "--owner", mine).code == 0  # re-entrant for its owner
    assert cli("lock", "held").code == 0
    status = json.loads(cli("lock", "status", "--json").out)
    assert list(status) == LOCK_KEYS and list(status["holder"]) == HOLDER_KEYS
    assert status["held"] is True and status["holder"]["pid"] == int(mine)

    refused = cli("lock", "acquire", "--owner", other)
    assert refused.code == 4
    assert refused.out == ""
    assert refused.err.startswith(f"upgrade-ledger: error: lock held by PID {mine} on ")
    assert refused.err.count("\n") == 1

    not_owner = cli("lock", "release", "--owner", other)
    assert not_owner.code == 4
    assert f"PID {other} does not hold the lock" in not_owner.err
    assert cli("lock", "held").code == 0  # still held by its owner

    assert cli("lock", "release", "--owner", mine).code == 0
    assert cli("lock", "held").code == 1
    assert cli("lock", "acquire", "--owner", other).code == 0


def test_pid_names_the_owner_and_strict_refuses_others(cli, shells, home) -> None:
    mine, other = (str(p.pid) for p in shells)
    assert cli("--pid", mine, "init", "u1").code == 0
    assert cli("--pid", mine, "lock", "acquire").code == 0
    assert cli("--strict", "--pid", mine, "state", "set", "PLANNING").code == 0
    refused = cli("--strict", "--pid", other, "state", "set", "BACKING_UP")
    assert refused.code == 4
    assert refused.err == (f"upgrade-ledger: error: strict mode: process {other} must hold "
                           "the lock before changing the ledger; take it with "
                           "'upgrade-ledger lock acquire'\n")
    assert json.loads((home / "state.json").read_text())["current_state"] == "PLANNING"
    pids = [e["pid"] for e in json.loads(cli("events", "--json").out)]
    assert set(pids) == {int(mine)}
    assert cli("--pid", mine, "lock", "release").code == 0


@pytest.mark.slow
def test_a_real_shell_holds_the_lock_over_several_calls(home, tmp_path) -> None:
    """No --owner at all: each call's owner is its parent, the shell running the script."""
    cmd = f"{sys.executable} -m ledger --home {home}"
    script = tmp_path / "upgrade.sh"
    script.write_text(f"""
set -eu
{cmd} init u1 >/dev/null
{cmd} lock acquire
{cmd} state set PLANNING
{cmd} lock held && echo "held by $$"
{cmd} lock status --json > {tmp_path}/status.json
{cmd} lock release
{cmd} lock held || echo "released"
""")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False,
                          env=child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    shell_pid = int(done.stdout.split()[2])
    assert done.stdout == f"held by {shell_pid}\nreleased\n"
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["holder"]["pid"] == shell_pid


@pytest.mark.parametrize("fmt", ["table", "plain", "csv"])
def test_lock_status_flattens_the_holder_for_text_formats(cli, shells, fmt) -> None:
    mine = str(shells[0].pid)
    assert cli("lock", "acquire", "--owner", mine).code == 0
    out = cli("lock", "status", "-f", fmt).out
    lines = out.splitlines()
    if fmt == "csv":
        assert lines[0] == "key,value"
        assert f"holder_pid,{mine}" in lines
    elif fmt == "plain":
        assert f"holder_pid: {mine}" in lines
        assert "held: yes" in lines
    else:
        assert any(line.split() == ["holder_pid", mine] for line in lines)


def test_check_stale_and_break_are_events(cli, home, shells) -> None:
    assert cli("init", "u1").code == 0
    gone = dead_pid()
    assert cli("lock", "acquire", "--owner", str(shells[0].pid)).code == 0
    # Make the recorded holder a process that has exited.
    info = home / "upgrade.lock.d" / "lock.info"
    fields = info.read_text().split("|")
    info.write_text("|".join([str(gone), *fields[1:]]))
    status = json.loads(cli("lock", "status", "--json").out)
    assert status["stale"] is True and f"PID {gone} no longer exists" in status["reason"]
    assert cli("lock", "held").code == 1  # a stale lock is not held
    removed = cli("lock", "check-stale")
    assert (removed.code, removed.err) == (0, "removed a stale lock\n")

    assert cli("lock", "acquire", "--owner", str(shells[0].pid)).code == 0
    broken = cli("lock", "break", "--reason", "operator: holder hung")
    assert (broken.code, broken.err) == (0, f"lock broken (was held by PID "
                                            f"{shells[0].pid})\n")
    breaks = json.loads(cli("events", "--kind", "lock.break", "--json").out)
    assert [(b["from"], b["detail"]["forced"]) for b in breaks] == \
        [(str(gone), False), (str(shells[0].pid), True)]
    assert breaks[1]["detail"]["reason"] == "operator: holder hung"


def test_acquire_waits_for_the_holder_then_times_out(cli, shells) -> None:
    assert cli("lock", "acquire", "--owner", str(shells[0].pid)).code == 0
    result = cli("lock", "acquire", "--owner", str(shells[1].pid), "--wait", "0.2",
                 "--poll", "0.05")
    assert result.code == 4
    assert result.err.startswith("upgrade-ledger: error: timed out after 0.2s: lock held by "
                                 f"PID {shells[0].pid}")


def test_cleanup_releases_the_owners_lock(cli, shells, home) -> None:
    mine = str(shells[0].pid)
    assert cli("init", "u1").code == 0
    assert cli("lock", "acquire", "--owner", mine).code == 0
    assert cli("cleanup", "--owner", mine).code == 0
    assert cli("lock", "held").code == 1
    assert Path(home / "history" / "u1.json").is_file()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="renaming the host in a namespace of its own needs root and "
                           "unshare(1)")
@pytest.mark.slow
def test_a_host_renamed_while_a_shell_holds_the_lock_keeps_it(tmp_path: Path) -> None:
    """After `hostname hostB`, the shell that took the lock as hostA still owns it:
    another process cannot take it over (not even past --lock-timeout), and the
    owner's release works. The rename happens in a UTS namespace of the test's own."""
    home = tmp_path / "home"
    other = subprocess.Popen(["sleep", "120"])
    script = f"""
        set -u
        ul() {{ {sys.executable} -m ledger --home {home} "$@"; }}
        hostname hostA
        ul lock acquire || exit 10
        hostname hostB
        sleep 2.1   # the lock is now older than the --lock-timeout below
        ul --lock-timeout 1 lock acquire --owner {other.pid}; echo "takeover=$?"
        ul lock acquire; echo "again=$?"
        ul lock status --json > {tmp_path}/status.json
        ul lock release; echo "release=$?"
        ul lock held; echo "held=$?"
    """
    try:
        done = subprocess.run(["unshare", "--uts", "bash", "-c", script], env=child_env(),
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        other.kill()
        other.wait()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["takeover=4", "again=0", "release=0", "held=1"], \
        (done.stdout, done.stderr)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["held"] and not status["stale"]
    assert status["holder"]["hostname"] == "hostA"


def test_a_dead_holders_lock_gets_one_verdict_in_every_command(cli, home, shells) -> None:
    """``lock status``, ``lock held -v`` and ``status`` say the same thing, in the same
    words, about a lock whose holder has exited: not held, stale."""
    assert cli("init", "u1").code == 0
    gone = dead_pid()
    assert cli("lock", "acquire", "--owner", str(shells[0].pid)).code == 0
    info = home / "upgrade.lock.d" / "lock.info"
    info.write_text("|".join([str(gone), *info.read_text().split("|")[1:]]))

    held = cli("lock", "held", "-v")
    assert (held.code, held.out) == (1, "no\n")
    plain = cli("lock", "status", "-f", "plain").out.splitlines()
    assert "held: no" in plain and "stale: yes" in plain
    status = json.loads(cli("lock", "status", "--json").out)
    assert (status["held"], status["stale"]) == (False, True)
    assert status["holder"]["pid"] == gone  # who left it is still shown
    overview = json.loads(cli("status", "--json").out)["lock"]
    assert overview == {**status, "age_s": overview["age_s"]}
    line = [x for x in cli("status").out.splitlines() if x.startswith("lock ")]
    assert line == [f"lock              not held (stale lock of PID {gone})"]

    live = cli("lock", "acquire", "--owner", str(shells[1].pid))  # takes the stale lock over
    assert live.code == 0
    assert cli("lock", "held", "-v").out == "yes\n"
    plain = cli("lock", "status", "-f", "plain").out.splitlines()
    assert "held: yes" in plain and "stale: no" in plain
