"""Many hosts on one PostgreSQL database, proven with real processes at the same moment:
whole ``apply`` runs, the bash drop-in step by step, and one host's processes racing
on one upgrade without the lock. Nothing is lost, nothing lands on the wrong host,
and no database error reaches the user."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, child_env, ledger_process
from pgserver import Server
from test_bash_functions import BIN_DIR, LIB, bash_env

from ledger.api import Ledger

PLAN = REPO / "examples" / "observability-stack.toml"
ROUNDS = 20
CONCURRENT_HOSTS_BASH = 4
#: Rounds of the four-host drop-in run: 3 in the default suite, 20 with --exhaustive.
BASH_ROUNDS = 3
BASH_ROUNDS_EXHAUSTIVE = 20
WRITERS = 8
COMPONENTS_PER_WRITER = 6


def check_hosts(url: str, names: list[str], *, components: int, home: Path) -> None:
    """Each host has exactly one upgrade, COMPLETED, with its *components* all
    COMPLETED, and every event is its own (host, writer and upgrade)."""
    with Ledger(home, db_url=url, host_name=names[0], wired=False) as led:
        for name in names:
            (upgrade,) = led.history(host=name, limit=None)
            assert upgrade["outcome"] == "COMPLETED", (name, upgrade)
            shown = led.show(upgrade["id"], host=name)
            assert len(shown["components"]) == components
            assert {c["state"] for c in shown["components"]} == {"COMPLETED"}
            trail = led.events(host=name, limit=None)
            assert trail and {e["host"] for e in trail} == {name}
            assert {e["hostname"] for e in trail} == {name}
            assert {e["upgrade_id"] for e in trail} <= {upgrade["id"], None}
        # Seen from the whole ledger: no event of one host carries another's name.
        everything = led.events(all_hosts=True, limit=None)
        assert all(e["host"] == e["hostname"] for e in everything)


@pytest.mark.slow
def test_two_hosts_apply_the_same_plan_at_the_same_moment(tmp_path: Path,
                                                          pg_server: Server) -> None:
    url = pg_server.new_database("apply")
    failures: list[Any] = []
    for round_ in range(ROUNDS):
        names = [f"r{round_}-web1", f"r{round_}-web2"]
        procs = [ledger_process("--home", tmp_path / name, "--db", url, "--host-name", name,
                                "apply", "--plain", PLAN) for name in names]
        for name, proc in zip(names, procs, strict=True):
            out, err = proc.communicate(timeout=300)
            if proc.returncode != 0 or "COMPLETED: upgrade" not in out:
                failures.append((name, proc.returncode, out[-500:], err[-500:]))
            assert "database is locked" not in err and "serializ" not in err.lower()
        assert not failures, failures
        check_hosts(url, names, components=9, home=tmp_path / "reader")
    # Both hosts of a round started in the same second: they share upgrade ids.
    with Ledger(tmp_path / "reader", db_url=url, host_name="r0-web1", wired=False) as led:
        ids = [u["id"] for u in led.history(all_hosts=True, limit=None)]
    assert len(ids) == 2 * ROUNDS and len(set(ids)) < len(ids)


DROP_IN_RUN = textwrap.dedent("""
    set -euo pipefail
    source "$LIB"
    upgrade_state_init >/dev/null
    upgrade_lock_acquire
    upgrade_state_set PLANNING
    upgrade_state_set BACKING_UP
    upgrade_mark_rollback_point node_exporter "$UPGRADE_BACKUPS_DIR/node_exporter.tgz"
    upgrade_state_set UPGRADING
    upgrade_phase_start exporters
    for c in node_exporter blackbox_exporter snmp_exporter; do
        upgrade_component_start "$c" 1.0.0 2.0.0
        upgrade_component_complete "$c"
    done
    upgrade_component_is_upgraded snmp_exporter
    upgrade_phase_complete exporters
    upgrade_state_set VALIDATING
    upgrade_state_set COMPLETED
    upgrade_cleanup
""")


@pytest.mark.slow
def test_four_hosts_drive_the_bash_drop_in_at_the_same_moment(tmp_path: Path,
                                                              pg_server: Server,
                                                              exhaustive: bool) -> None:
    url = pg_server.new_database("dropin")
    for round_ in range(BASH_ROUNDS_EXHAUSTIVE if exhaustive else BASH_ROUNDS):
        names = [f"r{round_}-db{i}" for i in range(CONCURRENT_HOSTS_BASH)]
        procs = [subprocess.Popen(["bash", "-c", DROP_IN_RUN], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=bash_env(tmp_path / name, LEDGER_DB_URL=url,
                                               LEDGER_HOST=name))
                 for name in names]
        for name, proc in zip(names, procs, strict=True):
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and not err, (name, out, err)
        check_hosts(url, names, components=3, home=tmp_path / "reader")
    assert BIN_DIR.is_dir() and LIB.is_file()


WRITER = textwrap.dedent("""
    import sys
    from ledger.api import Ledger
    home, url, index, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with Ledger(home, db_url=url, host_name="solo") as led:
        for k in range(count):
            name = f"w{index}-c{k}"
            led.component_start(name, "1", "2")
            led.component_fail(name, "first try")
            led.component_start(name)
            led.component_complete(name)
            led.annotate("test.progress", name, {"writer": index, "k": k})
""")


@pytest.mark.slow
def test_one_hosts_processes_write_one_upgrade_without_the_lock(tmp_path: Path,
                                                                pg_url: str) -> None:
    home = tmp_path / "home"
    with Ledger(home, db_url=pg_url, host_name="solo") as led:
        uid = led.init()
        for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
            led.set_state(state)
        led.phase_start("p")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(home), pg_url, str(i),
                               str(COMPONENTS_PER_WRITER)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env())
             for i in range(WRITERS)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and not err, err
    with Ledger(home, db_url=pg_url, host_name="solo") as led:
        shown = led.show(uid)
        comps = {c["name"]: c for c in shown["components"]}
        assert len(comps) == WRITERS * COMPONENTS_PER_WRITER
        assert {c["state"] for c in comps.values()} == {"COMPLETED"}
        assert {c["attempts"] for c in comps.values()} == {2}  # one failure each: none lost
        kinds = [e["kind"] for e in led.events(upgrade_id=uid, limit=None)]
        per = WRITERS * COMPONENTS_PER_WRITER
        assert kinds.count("component.upgrading") == 2 * per
        assert kinds.count("component.failed") == per
        assert kinds.count("component.completed") == per
        assert kinds.count("test.progress") == per
        # The view every writer patched in turn ends equal to the ledger.
        view = led.home.state_file.read_bytes()
        assert view == led.export_document(), "state.json lost an update"
        assert led.progress_percent() == 100
