"""Many hosts, one ledger: every row is a host's, every current upgrade is per host,
reads widen to another host or to every host on request, a host name is one
machine's, and a ledger made before hosts existed moves over with nothing lost."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Result, run_ledger, walk_to_upgrading
from sqlalchemy import create_engine, text

from ledger.api import Ledger
from ledger.core import host
from ledger.errors import BadInput, Conflict, HostClash, NotFound
from ledger.store import migrate

MACHINE_A = "a" * 32
MACHINE_B = "b" * 32


@pytest.fixture(params=["sqlite", "postgres"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One ledger database reached by several hosts: a SQLite file or a PostgreSQL one."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite+pysqlite:///{tmp_path / 'shared.db'}"


@pytest.fixture
def hosts(tmp_path: Path, shared_url: str) -> Iterator[Callable[..., Ledger]]:
    """Open the shared ledger as host NAME (each host has its own home)."""
    opened: list[Ledger] = []

    def open_as(name: str, machine: str = MACHINE_A) -> Ledger:
        env = {**os.environ, "LEDGER_MACHINE_ID": machine}
        led = Ledger(tmp_path / f"home-{name}", db_url=shared_url, host_name=name, env=env)
        opened.append(led)
        return led

    yield open_as
    for led in opened:
        led.close()


def test_two_hosts_run_the_same_upgrade_id_side_by_side(hosts: Callable[..., Ledger]) -> None:
    web1, web2 = hosts("web1"), hosts("web2", MACHINE_B)
    walk_to_upgrading(web1, "up-1")
    web1.plan({"p": [("node", "1", "2")]})
    # Host 2's init is not refused because of host 1's run, and may use the same id.
    assert web2.init("up-1") == "up-1"
    web2.set_state("PLANNING")
    web2.phase_start("p")
    web2.component_start("node", "1", "3")
    web2.component_fail("node", "boom")
    # Nothing host 2 did touched host 1's upgrade.
    assert web1.state() == "UPGRADING" and web2.state() == "PLANNING"
    assert web1.component_status("node")["state"] == "PENDING"
    assert web1.component_status("node")["to_version"] == "2"
    assert web2.component_status("node")["attempts"] == 2  # started once, failed once
    assert web1.progress_percent() == 0
    # Each host's view is its own upgrade.
    view1 = json.loads(web1.home.state_file.read_text())
    view2 = json.loads(web2.home.state_file.read_text())
    assert view1["current_state"] == "UPGRADING" and view2["current_state"] == "PLANNING"
    assert view1["metadata"]["hostname"] == "web1" and view2["metadata"]["hostname"] == "web2"
    # Every event is attributed to the host whose change it records.
    for led, name in ((web1, "web1"), (web2, "web2")):
        trail = led.events(limit=None)
        assert trail and {e["host"] for e in trail} == {name}
        assert {e["hostname"] for e in trail} == {name}


def test_reads_stay_on_this_host_unless_widened(hosts: Callable[..., Ledger]) -> None:
    web1, web2 = hosts("web1"), hosts("web2", MACHINE_B)
    web1.init("up-1")
    web2.init("up-1")
    web2.set_state("PLANNING")
    web2.init("up-2", supersede=True)
    assert [(u["host"], u["id"]) for u in web1.history()] == [("web1", "up-1")]
    assert [u["id"] for u in web1.history(host="web2")] == ["up-2", "up-1"]
    assert sorted((u["host"], u["id"]) for u in web1.history(all_hosts=True)) == \
        [("web1", "up-1"), ("web2", "up-1"), ("web2", "up-2")]
    assert web1.show()["host"] == "web1"
    assert web1.show("up-1", host="web2")["superseded_by"] == "up-2"
    assert web1.show(host="web2")["id"] == "up-2"  # that host's current upgrade
    assert web1.show("up-2", all_hosts=True)["host"] == "web2"
    with pytest.raises(Conflict, match="exists on 2 hosts"):
        web1.show("up-1", all_hosts=True)
    with pytest.raises(NotFound):
        web1.show("up-2")  # not this host's
    assert {e["host"] for e in web1.events(all_hosts=True)} == {"web1", "web2"}
    assert {e["host"] for e in web1.events(host="web2")} == {"web2"}
    assert web1.status(host="web2")["upgrade_id"] == "up-2"
    assert web1.status(host="web2")["lock"] is None  # another home's lock is not seen
    assert web1.status()["upgrade_id"] == "up-1" and web1.status()["host"] == "web1"
    assert [(h["host"], h["upgrade_id"]) for h in web1.hosts()] == \
        [("web1", "up-1"), ("web2", "up-2")]
    with pytest.raises(BadInput, match="not both"):
        web1.history(host="web2", all_hosts=True)
    # The reporting views carry the host.
    columns, rows = web1.query("SELECT host, upgrade_id FROM upgrade_summary "
                               "ORDER BY host, upgrade_id")
    assert columns == ["host", "upgrade_id"]
    assert rows == [("web1", "up-1"), ("web2", "up-1"), ("web2", "up-2")]


def test_a_host_name_is_one_machines_on_a_shared_server(tmp_path: Path, pg_url: str) -> None:
    with Ledger(tmp_path / "a", db_url=pg_url, host_name="web1",
                env={"LEDGER_MACHINE_ID": MACHINE_A}) as first:
        first.init("u1")
        before = first.events(limit=None)
    other = {**os.environ, "LEDGER_MACHINE_ID": MACHINE_B}
    with Ledger(tmp_path / "b", db_url=pg_url, host_name="web1", env=other) as second:
        with pytest.raises(HostClash, match="belongs to another machine"):
            second.init("u2")
        with pytest.raises(HostClash):
            second.state()
    # The command line says so in one line (exit 9) and changes nothing.
    done = run_ledger("--home", tmp_path / "c", "--db", pg_url, "--host-name", "web1",
                      "init", env={**os.environ, "LEDGER_MACHINE_ID": MACHINE_B})
    assert done.returncode == 9, done.stderr
    assert done.stderr.count("\n") == 1 and "--host-name or LEDGER_HOST" in done.stderr
    with Ledger(tmp_path / "a", db_url=pg_url, host_name="web1",
                env={"LEDGER_MACHINE_ID": MACHINE_A}) as first:
        assert first.events(limit=None) == before


def test_a_local_ledger_moved_to_another_machine_follows_it(tmp_path: Path) -> None:
    with Ledger(tmp_path / "home", host_name="web1", env={"LEDGER_MACHINE_ID": MACHINE_A}) as led:
        led.init("u1")
    with Ledger(tmp_path / "home", host_name="web1", env={"LEDGER_MACHINE_ID": MACHINE_B}) as led:
        led.set_state("PLANNING")  # a restored home on a new machine: not refused
        assert led.query("SELECT machine_id FROM hosts")[1] == [(MACHINE_B,)]


def test_the_host_name_defaults_to_the_node_name_and_can_be_overridden(tmp_path: Path) -> None:
    with Ledger(tmp_path / "a", env={}) as led:
        led.init()
        assert led.history()[0]["host"] == os.uname().nodename
    with Ledger(tmp_path / "b", env={"LEDGER_HOST": "box-7"}) as led:
        led.init()
        assert led.history()[0]["host"] == "box-7"
    with Ledger(tmp_path / "b", env={"LEDGER_HOST": "box-7"}, host_name="box-8") as led:
        assert led.current_id() is None  # box-8 has no upgrade yet


def test_machine_id_is_read_from_the_system() -> None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        if Path(path).is_file() and Path(path).read_text().strip():
            assert host.machine_id() == Path(path).read_text().strip().lower()
            return
    assert host.machine_id() is None


@pytest.mark.parametrize("name", ["-x", "a b", "web/1", "x" * 256, "wéb"])
def test_a_bad_host_name_is_refused_in_one_line(tmp_path: Path, cli: Callable[..., Result],
                                                 name: str) -> None:
    assert cli("init").code == 0
    before = cli("events", "--json").out
    got = cli("--host-name", name, "state", "set", "PLANNING")
    assert got.code == 6 and got.err.count("\n") == 1 and "host name" in got.err
    assert cli("events", "--json").out == before


@pytest.mark.slow
def test_the_cli_reads_across_hosts(tmp_path: Path) -> None:
    url = f"sqlite+pysqlite:///{tmp_path / 'shared.db'}"

    def run(name: str, *args: str) -> Any:
        done = run_ledger("--home", tmp_path / name, "--db", url, "--host-name", name, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("web1", "init", "up-1")
    run("web2", "init", "up-1")
    run("web2", "state", "set", "PLANNING")
    assert [u["host"] for u in json.loads(run("web1", "history", "--json"))] == ["web1"]
    assert sorted(u["host"] for u in json.loads(run("web1", "history", "--all-hosts",
                                                    "--json"))) == ["web1", "web2"]
    assert json.loads(run("web1", "show", "--host", "web2", "--json"))["state"] == "PLANNING"
    assert json.loads(run("web1", "status", "--host", "web2", "--json"))["state"] == "PLANNING"
    table = run("web1", "status", "--all-hosts")
    assert "web1" in table and "web2" in table and "PLANNING" in table
    kinds = {(e["host"], e["kind"]) for e in json.loads(run("web1", "events", "--all-hosts",
                                                           "--json"))}
    assert ("web2", "upgrade.state") in kinds and ("web1", "upgrade.init") in kinds
    assert "web2" in run("web1", "events", "--all-hosts")


# -- moving a ledger made before hosts existed ---------------------------------------

def _old_ledger(url: str) -> None:
    """A ledger at revision 0002 as the code of that time left it: one current upgrade
    for everyone, upgrades of two hosts (as a shared server had them), one of no host."""
    migrate.upgrade(url, "0002")
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    stamp = "2026-01-01T10:00:00.000Z"
    with engine.begin() as conn:
        def put(sql: str, **params: Any) -> None:
            conn.execute(text(sql), params)

        for uid, name, state in (("u1", "web1", "COMPLETED"), ("u2", "web1", "UPGRADING"),
                                 ("u3", "web2", "PLANNING"), ("u4", None, "FAILED")):
            put("INSERT INTO upgrades (id, state, outcome, started_at, updated_at, hostname, "
                "username, pid) VALUES (:id, :s, :o, :t, :t, :h, 'ops', 1)", id=uid, s=state,
                o=state if state in ("COMPLETED", "FAILED") else None,
                t=stamp.replace("10:", f"1{uid[1]}:"), h=name)
            put("INSERT INTO phases (upgrade_id, name, position, state) VALUES "
                "(:id, 'p', 1, 'IN_PROGRESS')", id=uid)
            put("INSERT INTO components (upgrade_id, phase, name, position, state, "
                "from_version, to_version, attempts) VALUES (:id, 'p', 'node', 1, "
                "'COMPLETED', '1', '2', 1)", id=uid)
            put("INSERT INTO rollback_points (upgrade_id, phase, component, backup_path, "
                "created_at) VALUES (:id, 'p', 'node', '/b', :t)", id=uid, t=stamp)
            put("INSERT INTO events (at, upgrade_id, kind, username, hostname, pid) VALUES "
                "(:t, :id, 'upgrade.init', 'ops', :h, 1)", t=stamp, id=uid, h=name or "x")
        put("INSERT INTO events (at, upgrade_id, kind, username, hostname, pid) VALUES "
            "(:t, NULL, 'lock.break', 'ops', 'web2', 1)", t=stamp)
        put("INSERT INTO ledger_meta (key, value) VALUES ('current_upgrade', 'u2')")
        put("INSERT INTO notify_cursors (subscriber, last_event_id, created_at) VALUES "
            "('ops', 3, :t)", t=stamp)
    engine.dispose()


COUNTS = ("SELECT (SELECT COUNT(*) FROM upgrades), (SELECT COUNT(*) FROM phases), "
          "(SELECT COUNT(*) FROM components), (SELECT COUNT(*) FROM rollback_points), "
          "(SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM notify_cursors)")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_ledger_of_the_previous_revision_moves_over_with_nothing_lost(
        request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> None:
    home = tmp_path / "home"
    if backend == "postgres":
        url: str | None = str(request.getfixturevalue("pg_url"))
        old_url = str(url)
    else:
        url = None
        home.mkdir(mode=0o700)
        old_url = f"sqlite:///{home / 'ledger.db'}"
    _old_ledger(old_url)
    with Ledger(home, db_url=url, host_name="web1") as led:  # migrates on opening
        assert led.query(COUNTS)[1] == [(4, 4, 4, 4, 5, 1)]
        everyone = {(u["host"], u["id"]) for u in led.history(all_hosts=True)}
        # Each upgrade went to the host that ran it; one that named none, to this host.
        assert everyone == {("web1", "u1"), ("web1", "u2"), ("web2", "u3"), ("web1", "u4")}
        assert led.current_id() == "u2"  # the old current upgrade stays current
        assert led.show(host="web2")["id"] == "u3"  # the other host's is its latest
        # One failure at revision 0002 is attempt 2 from 0003 on (docs/state-json.md).
        assert led.show("u3", host="web2")["components"][0]["attempts"] == 2
        assert led.rollback_info()["components"][0]["backup_path"] == "/b"
        trail = led.events(all_hosts=True, limit=None)
        assert {(e["upgrade_id"], e["host"]) for e in trail} == {
            ("u1", "web1"), ("u2", "web1"), ("u3", "web2"), ("u4", "web1"), (None, "web2")}
        assert led.query("SELECT host, subscriber FROM notify_cursors")[1] == [("web1", "ops")]
        # And the ledger goes on: this host's next upgrade, the same id on another host.
        led.component_complete("node")
    with Ledger(tmp_path / "other", db_url=url or f"sqlite+pysqlite:///{home / 'ledger.db'}",
                host_name="web2") as led:
        led.init("u1", supersede=True)
        assert led.show("u3")["superseded_by"] == "u1"


def test_going_below_the_hosts_revision_is_refused_when_ids_are_shared(tmp_path: Path) -> None:
    url = f"sqlite+pysqlite:///{tmp_path / 'shared.db'}"
    for name in ("web1", "web2"):
        with Ledger(tmp_path / name, db_url=url, host_name=name) as led:
            led.init("same")
    with pytest.raises(RuntimeError, match="several hosts"):
        migrate.downgrade(url, "0002")


def test_following_every_host_misses_no_event_committed_out_of_order(
        tmp_path: Path, pg_url: str) -> None:
    from ledger.observe.follow import follow  # noqa: PLC0415
    from ledger.store.database import ALL_HOSTS  # noqa: PLC0415

    web1 = Ledger(tmp_path / "web1", db_url=pg_url, host_name="web1")
    web2 = Ledger(tmp_path / "web2", db_url=pg_url, host_name="web2")
    watcher = Ledger(tmp_path / "watch", db_url=pg_url, host_name="watch")
    try:
        web1.init("a")
        web2.init("b")
        stream = follow(watcher, stop=lambda: False, interval_s=0.05, host=ALL_HOSTS)
        assert {e["host"] for e in next(stream)} == {"web1", "web2"}
        with web1.db.write() as tx:  # web1's event takes an id, and commits late
            web1._event(tx, "test.late", "a")
            web2.set_state("PLANNING")  # a higher id, committed first
            seen = next(stream)
            assert [e["kind"] for e in seen] == ["upgrade.state"]
        late = next(stream)
        assert [(e["host"], e["kind"]) for e in late] == [("web1", "test.late")]
        assert late[0]["id"] < seen[0]["id"]
        stream.close()
    finally:
        for led in (web1, web2, watcher):
            led.close()
