"""Pushing as changes happen, with real processes: steps start one pusher in the
background and the fleet has their changes within seconds; ``fleet push --follow``
follows a ledger until SIGTERM; a pusher a step started leaves once the host is
idle, not while a script holds its lock; with the fleet database stopped, a bash
drop-in upgrade runs to its end, and once the server is back one push catches up."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from conftest import child_env, ledger_process, run_ledger
from fleethelpers import assert_same, fleet_cursor, stop_pusher, wait_for
from pgserver import Server, Unavailable, start_own
from test_bash_functions import bash_env
from test_shared_database import DROP_IN_RUN

from ledger.api import Ledger
from ledger.fleet import pusher, pushstate, spawn
from ledger.lock import DirLock
from ledger.ops import restore, snapshots
from ledger.store.home import Home

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
HOST = "web1"


def newest(home: Path) -> int:
    with Ledger(home, host_name=HOST, wired=False, create=False) as led:
        return int(led.events(limit=1, newest=True)[0]["id"])


def test_steps_reach_the_fleet_within_seconds_through_one_pusher(home: Path,
                                                                 pg_url: str) -> None:
    env = child_env(LEDGER_FLEET_URL=pg_url, LEDGER_HOST=HOST)
    steps = [["init"], ["state", "set", "PLANNING"], ["state", "set", "BACKING_UP"],
             ["state", "set", "UPGRADING"], ["phase", "start", "p"],
             ["component", "start", "a", "1", "2"], ["component", "complete", "a"]]
    pids = set()
    try:
        for step in steps:
            done = run_ledger("--home", home, *step, env=env)
            assert (done.returncode, done.stderr) == (0, ""), (step, done.stderr)
            # The step returned (its output pipes closed: the pusher does not hold
            # them); its change reaches the fleet without it.
            wait_for(lambda: fleet_cursor(pg_url, HOST) == newest(home), what="the push")
            pids.add(spawn.pusher_pid(home))
        assert len(pids) == 1 and None not in pids  # one pusher followed every step
        assert_same(pg_url, HOST, home / "ledger.db")
        status = run_ledger("--home", home, "status", "--json", env=env)
        section = json.loads(status.stdout)["fleet"]
        assert (section["lag_events"], section["failures"]) == (0, 0)
        assert section["pusher_pid"] in pids
    finally:
        stop_pusher(home)


LONG_LIVED = textwrap.dedent("""
    import os, signal, sys, time
    from ledger.api import Ledger
    from ledger.fleet import spawn

    def zombies():
        found = []
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat") as fh:
                    fields = fh.read().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                found.append(int(name))
        return found

    home, url = sys.argv[1], sys.argv[2]
    with Ledger(home, host_name="web1", fleet_url=url) as led:
        led.init("u1")  # starts a pusher, this process's child
        while (pid := spawn.pusher_pid(led.home.root)) is None:
            time.sleep(0.02)
        os.kill(pid, signal.SIGTERM)
        while zombies() != [pid]:  # it ended: a zombie until reaped
            time.sleep(0.02)
        led.set_state("PLANNING")  # the next change reaps it (and starts another)
        print(zombies())
        while (again := spawn.pusher_pid(led.home.root)) is None:
            time.sleep(0.02)
        os.kill(again, signal.SIGTERM)
""")


def test_a_pusher_keeps_none_of_the_step_s_descriptors(home: Path, tmp_path: Path) -> None:
    """A script run under `flock -n LOCK script` passes the held lock to its steps: the
    pusher a step starts must not keep it (the next cron run would find it held)."""
    lock = tmp_path / "cron.lock"
    script = f"""
set -e
exec 9>{lock}
flock -n 9
"$UL" --home {home} init >/dev/null
echo "$(cat {home}/fleet-push.lock)"
"""
    env = child_env(LEDGER_FLEET_URL="postgresql://ledger@127.0.0.1:1/fleet",
                    LEDGER_HOST=HOST, UL=str(Path(sys.executable).parent / "upgrade-ledger"))
    try:
        done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        pusher_pid = wait_for(lambda: spawn.pusher_pid(home), what="a pusher")
        held = {str(fd.readlink()) for fd in Path(f"/proc/{pusher_pid}/fd").iterdir()}
        assert str(lock) not in held, held
        again = subprocess.run(["flock", "-n", str(lock), "true"], check=False)
        assert again.returncode == 0  # the script's lock went with the script
    finally:
        stop_pusher(home)


def test_a_long_lived_process_leaves_no_zombie_pusher(home: Path, pg_url: str) -> None:
    done = subprocess.run([sys.executable, "-c", LONG_LIVED, str(home), pg_url],
                          capture_output=True, text=True, timeout=120, check=False,
                          env=child_env())
    assert (done.returncode, done.stdout, done.stderr) == (0, "[]\n", "")
    stop_pusher(home)


def test_follow_pushes_as_the_ledger_changes_until_sigterm(home: Path, pg_url: str) -> None:
    with Ledger(home, host_name=HOST, wired=False) as led:
        led.init("u1")
        proc = ledger_process("--home", home, "--host-name", HOST, "--fleet", pg_url,
                              "fleet", "push", "--follow")
        try:
            for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
                led.set_state(state)
                wait_for(lambda: fleet_cursor(pg_url, HOST) == newest(home), what="the push")
            assert spawn.pusher_pid(home) == proc.pid
            # A second follower leaves the work to the first.
            second = run_ledger("--home", home, "--host-name", HOST, "--fleet", pg_url,
                                "fleet", "push", "--follow")
            assert second.returncode == 0 and f"PID {proc.pid}" in second.stderr
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert spawn.pusher_pid(home) is None
    assert_same(pg_url, HOST, home / "ledger.db")


def test_a_pusher_leaves_when_idle_but_not_while_a_script_holds_the_lock(
        home: Path, pg_url: str) -> None:
    with Ledger(home, host_name=HOST, wired=False) as led:
        led.init("u1")
    script = subprocess.Popen(["sleep", "60"])  # a script between its steps
    lock = DirLock(Home.at(home).lock_dir)
    lock.acquire(script.pid)
    proc = ledger_process("--home", home, "--host-name", HOST, "--fleet", pg_url, "fleet",
                          "push", "--follow", "--exit-when-idle", "0.2")
    try:
        wait_for(lambda: fleet_cursor(pg_url, HOST) == newest(home), what="the push")
        # Idle far longer than 0.2 s, everything shipped: it stays for the lock holder.
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=2)
        lock.release(script.pid)
        assert proc.wait(timeout=30) == 0
    finally:
        script.kill()
        script.wait()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()




@pytest.fixture
def own_server() -> Iterator[Server]:
    """A PostgreSQL server of this test's own: it is stopped and started again."""
    try:
        server = start_own()
    except Unavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    try:
        yield server
    finally:
        server.close()


def test_with_the_fleet_stopped_a_drop_in_upgrade_runs_and_one_push_catches_up(
        home: Path, own_server: Server) -> None:
    url = own_server.new_database("down")
    with Ledger(home, host_name=HOST, fleet_url=url, wired=False) as led:
        led.init("before")
        pusher.push(led)  # the fleet knew this host before it went away
    own_server.pause()
    try:
        env = bash_env(home, LEDGER_FLEET_URL=url, LEDGER_HOST=HOST)
        done = subprocess.run(["bash", "-c", DROP_IN_RUN], capture_output=True, text=True,
                              check=False, timeout=300, env=env)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        with Ledger(home, host_name=HOST, wired=False) as led:
            assert led.history(limit=1)[0]["outcome"] == "COMPLETED"
            wait_for(lambda: (pushstate.read(led.db) or {}).get("failures"),
                     what="the pusher to fail")
        stop_pusher(home)
    finally:
        own_server.resume()
    done = run_ledger("--home", home, "--host-name", HOST, "--fleet", url, "fleet", "push")
    assert done.returncode == 0, done.stderr
    assert_same(url, HOST, home / "ledger.db")
    with Ledger(home, host_name=HOST, wired=False) as led:
        assert pushstate.status(led.db, None)["failures"] == 0


def test_a_follower_follows_a_restored_ledger(home: Path, pg_url: str) -> None:
    """``restore`` puts another file in place of ledger.db: a running follower ships
    what is in the new file (the restored ledger anew), not the file set aside."""
    with Ledger(home, host_name=HOST, wired=False) as led:
        led.init("u1")
        snapshots.take_now(led)
        led.set_state("PLANNING")
    proc = ledger_process("--home", home, "--host-name", HOST, "--fleet", pg_url,
                          "fleet", "push", "--follow")
    try:
        wait_for(lambda: fleet_cursor(pg_url, HOST) == newest(home), what="the push")
        restore.restore(Home.at(home), force=True)
        with Ledger(home, host_name=HOST, wired=False) as led:
            led.set_state("PLANNING")
            led.set_state("BACKING_UP")
        wait_for(lambda: fleet_state(pg_url) == "BACKING_UP", what="the restored ledger")
        assert_same(pg_url, HOST, home / "ledger.db")
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def fleet_state(url: str) -> str | None:
    with psycopg.connect(url) as pg:
        row = pg.execute("SELECT state FROM host_status WHERE host = %s", (HOST,)).fetchone()
    return None if row is None else row[0]
