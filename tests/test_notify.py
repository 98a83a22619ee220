"""Notifications: subscribers in notify.toml, delivery at least once and in order from
per-subscriber cursors in the ledger, retries with backoff, and failures that never
reach an upgrade step. Webhooks are received by a real HTTP server on 127.0.0.1 (a
child process); runs and crashes use real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from ledger.api import Ledger
from ledger.observe import notify, subscribers
from ledger.ops import doctor
from ledger.store import migrate
from ledger.store.schema import metadata
from tests.applyplans import component as plan_component
from tests.applyplans import write_plan
from tests.conftest import REPO, child_env, ledger_process, run_ledger

SERVER = REPO / "tests" / "webhook_server.py"

#: An upgrade run as `apply` drives one: every change is followed by a delivery pass.
RUN = """
import sys
from ledger.observe import notify
from ledger.api import Ledger

def step(ledger, change, *args):
    change(*args)
    report = notify.deliver_pending(ledger, budget_s=30)
    assert report.error is None, report.error

with Ledger(sys.argv[1]) as led:
    step(led, led.init, "run-1")
    for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
        step(led, led.set_state, state)
    step(led, led.plan, {"exporters": [("node_exporter", "1.7.0", "1.9.1"),
                                       ("blackbox_exporter", "0.24.0", "0.25.0")]})
    step(led, led.phase_start, "exporters")
    step(led, led.component_start, "node_exporter")
    step(led, led.component_fail, "node_exporter", "checksum mismatch")
    step(led, led.component_start, "node_exporter")
    step(led, led.component_complete, "node_exporter")
    step(led, led.component_skip, "blackbox_exporter", "already at 0.25.0")
    step(led, led.phase_complete, "exporters")
    step(led, led.set_state, "VALIDATING")
    step(led, led.set_state, "COMPLETED")
"""


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> object:
    """Poll *predicate* until it is truthy (bounded: a loaded machine gets time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Webhook:
    """The receiver child process and what it recorded."""

    def __init__(self, tmp: Path, fail_first: int, mode: str = "") -> None:
        self.log = tmp / f"requests-{fail_first}{mode}.jsonl"
        port_file = tmp / f"port-{fail_first}{mode}"
        self.proc = subprocess.Popen([sys.executable, str(SERVER), str(self.log),
                                      str(port_file), str(fail_first), mode], env=child_env())
        port = wait_for(lambda: port_file.exists() and port_file.read_text(),
                        "the webhook server to listen")
        self.url = f"http://127.0.0.1:{port}/hook"

    def requests(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[Callable[[int], Webhook]]:
    started: list[Webhook] = []

    def start(fail_first: int = 0, mode: str = "") -> Webhook:
        server = Webhook(tmp_path, fail_first, mode)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to 127.0.0.1 must never go through a proxy set in the environment."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def lineage(home: Path) -> str:
    with Ledger(home) as led, led.db.read() as tx:
        return str(tx.scalar("SELECT value FROM ledger_meta WHERE key = 'lineage'"))


def all_events(home: Path) -> list[dict]:
    with Ledger(home) as led:
        return led.events(limit=None)


def cursor(home: Path, name: str) -> dict:
    with sqlite3.connect(home / "ledger.db") as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT * FROM notify_cursors WHERE subscriber = ?",
                           (name,)).fetchone()
    return dict(row) if row else {}


def trail_rows(home: Path) -> list[tuple]:
    """Everything but delivery state: what 'the ledger unchanged' means."""
    with sqlite3.connect(home / "ledger.db") as conn:
        return [tuple(r) for t in ("upgrades", "phases", "components", "events")
                for r in conn.execute(f"SELECT * FROM {t} ORDER BY 1")]


def run_upgrade(home: Path) -> None:
    subprocess.run([sys.executable, "-c", RUN, str(home)], env=child_env(), check=True,
                   timeout=120)


def hook_script(tmp: Path, body: str, name: str = "hook.sh") -> Path:
    path = tmp / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# -- webhooks ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_healthy_webhook_receives_every_event_of_a_run_exactly_once(
        cli, home: Path, webhook) -> None:
    server = webhook(0)
    assert cli("init", "setup").code == 0  # a ledger with history before the subscriber
    assert cli("subscribers", "add", "web", "--url", server.url).code == 0
    first_id = len(all_events(home)) + 1
    run_upgrade(home)

    events = [e for e in all_events(home) if e["id"] >= first_id]
    got = server.requests()
    key = lineage(home)
    assert [r["key"] for r in got] == [f"{key}-{e['id']}" for e in events]
    assert [r["event"] for r in got] == events  # the body is the event as `events` shows it
    assert {r["status"] for r in got} == {200}
    assert {r["content_type"] for r in got} == {"application/json"}
    state = cursor(home, "web")
    assert (state["last_event_id"], state["delivered"], state["failures"]) == \
        (events[-1]["id"], len(events), 0)


@pytest.mark.slow
def test_a_webhook_failing_its_first_requests_still_gets_everything_in_order(
        cli, home: Path, webhook) -> None:
    server = webhook(4)
    assert cli("init", "setup").code == 0
    assert cli("subscribers", "add", "web", "--url", server.url, "--retry-initial", "0",
               "--start", "all").code == 0
    run_upgrade(home)
    for _ in range(20):  # a bounded number of on-demand passes catches it up
        if cli("notify").code == 0:
            break
    events = all_events(home)
    got = server.requests()
    ids = [int(r["key"].rsplit("-", 1)[1]) for r in got]
    assert [r["status"] for r in got[:4]] == [500] * 4
    assert ids[:4] == [events[0]["id"]] * 4  # the failing event is retried, not overtaken
    assert ids == sorted(ids)  # in order: never an event before an earlier one
    accepted = [int(r["key"].rsplit("-", 1)[1]) for r in got if r["status"] == 200]
    assert accepted == [e["id"] for e in events]  # every one, no gaps
    state = cursor(home, "web")
    assert (state["last_event_id"], state["failures"], state["attempts"],
            state["last_error"]) == (events[-1]["id"], 4, 0, None)


def test_a_failing_webhook_backs_off_shows_in_status_and_retries_on_force(
        cli, home: Path, webhook) -> None:
    server = webhook(10_000)  # always 500
    cli("init", "u1")
    cli("subscribers", "add", "web", "--url", server.url, "--start", "all",
        "--retry-initial", "600")
    before = trail_rows(home)
    first = cli("notify")
    assert first.code == 1
    assert first.err.count("\n") == 1 and "HTTP 500" in first.err and "--force" in first.err
    assert trail_rows(home) == before  # delivery bookkeeping only; the trail is untouched
    status = json.loads(cli("status", "--json").out)["notify"]
    assert status["subscribers"] == 1
    [failing] = status["failing"]
    assert (failing["name"], failing["attempts"], failing["failing_event_id"]) == ("web", 1, 1)
    assert "HTTP 500" in failing["last_error"] and failing["next_try_at"]

    waiting = cli("notify", "--json")  # inside the backoff: nothing is sent
    assert waiting.code == 1
    assert json.loads(waiting.out)["subscribers"][0]["state"] == "waiting"
    assert len(server.requests()) == 1
    assert cli("notify", "--force").code == 1
    assert len(server.requests()) == 2
    assert cursor(home, "web")["attempts"] == 2


def test_a_doubling_backoff_capped_at_retry_max() -> None:
    sub = subscribers.check("s", {"hook": "/bin/true", "retry_initial_s": 5,
                                  "retry_max_s": 30})
    assert [sub.retry_delay_s(n) for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 30, 30]


def test_an_unreachable_host_is_recorded_and_never_reaches_the_step(
        home: Path, tmp_path: Path) -> None:
    with Ledger(home) as led:
        led.init("u1")
        closed = _closed_port()
        subscribers.add(led.home, subscribers.check(
            "gone", {"url": f"http://127.0.0.1:{closed}/x", "start": "all"}))
        report = notify.deliver_pending(led)
        [outcome] = report.outcomes
        assert outcome.state == "failing" and "cannot reach" in (outcome.error or "")
        led.set_state("PLANNING")  # the upgrade goes on
        assert led.state() == "PLANNING"
        assert notify.deliver_pending(led).outcomes[0].state == "waiting"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends


# -- hooks ------------------------------------------------------------------------------


def test_a_hook_gets_the_event_on_stdin_and_its_kind_filter_holds(
        cli, home: Path, tmp_path: Path) -> None:
    out = tmp_path / "hook.out"
    hook = hook_script(tmp_path, f'cat >> {out}\necho "$LEDGER_EVENT_KIND '
                                 f'$LEDGER_IDEMPOTENCY_KEY" >> {out}.env\n')
    cli("init", "u1")
    assert cli("subscribers", "add", "fails", "--hook", str(hook), "--kind",
               "component.failed", "--kind", "upgrade.state").code == 0
    for args in (("state", "set", "PLANNING"), ("state", "set", "BACKING_UP"),
                 ("state", "set", "UPGRADING"), ("phase", "start", "p"),
                 ("component", "start", "c"), ("component", "fail", "c", "x")):
        assert cli(*args).code == 0, args
    assert cli("notify").code == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    wanted = [e for e in all_events(home) if e["kind"] in ("component.failed", "upgrade.state")]
    assert got == wanted and len(got) == 4
    key = lineage(home)
    assert (tmp_path / "hook.out.env").read_text().splitlines() == \
        [f"{e['kind']} {key}-{e['id']}" for e in wanted]
    # The cursor passed the filtered-out events too: nothing is pending.
    assert cursor(home, "fails")["last_event_id"] == all_events(home)[-1]["id"]


def test_a_delivery_killed_mid_hook_resumes_from_its_cursor(
        cli, home: Path, tmp_path: Path) -> None:
    log, block = tmp_path / "hook.log", tmp_path / "block"
    hook = hook_script(tmp_path, f"""read -r line
id=$LEDGER_EVENT_ID
echo "start $id" >> {log}
n=0
while [ -e {block} ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done
echo "done $id" >> {log}
""")
    cli("init", "u1")
    cli("state", "set", "PLANNING")
    cli("state", "set", "BACKING_UP")
    assert cli("subscribers", "add", "slow", "--hook", str(hook), "--start", "all",
               "--timeout", "120").code == 0
    block.touch()
    proc = ledger_process("--home", home, "notify", stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    wait_for(lambda: log.exists() and "start 1" in log.read_text(), "the hook to start")
    proc.send_signal(signal.SIGKILL)  # the deliverer dies while the hook holds event 1
    proc.wait(timeout=30)
    assert cursor(home, "slow")["last_event_id"] == 0  # not delivered: not recorded
    block.unlink()
    wait_for(lambda: "done 1" in log.read_text(), "the orphaned hook to finish")

    again = cli("notify")
    assert again.code == 0, again
    done = [int(line.split()[1]) for line in log.read_text().splitlines()
            if line.startswith("done")]
    ids = [e["id"] for e in all_events(home)]
    assert done == [1, *ids]  # event 1 at least once (twice: the crash), then the rest
    state = cursor(home, "slow")
    assert (state["last_event_id"], state["delivered"]) == (ids[-1], len(ids))


def test_a_hook_that_hangs_is_killed_at_its_timeout_and_recorded(
        cli, home: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "hook.pid"
    hook = hook_script(tmp_path, f"echo $$ > {pid_file}\nexec sleep 60\n")
    cli("init", "u1")
    cli("subscribers", "add", "hangs", "--hook", str(hook), "--start", "all",
        "--timeout", "0.5")
    before = trail_rows(home)
    result = cli("notify")
    assert result.code == 1 and result.err.count("\n") == 1
    assert "timed out after 0.5 s" in result.err
    assert trail_rows(home) == before
    state = cursor(home, "hangs")
    assert (state["attempts"], state["failing_event_id"], state["last_event_id"]) == (1, 1, 0)
    with pytest.raises(ProcessLookupError):  # killed, with its process group
        os.kill(int(pid_file.read_text()), 0)


def test_a_subscriber_cut_by_the_budget_is_backed_off_like_a_failure(
        home: Path, tmp_path: Path) -> None:
    hook = hook_script(tmp_path, "exec sleep 60\n")
    with Ledger(home) as led:
        led.init("u1")
        subscribers.add(led.home, subscribers.check(
            "slow", {"hook": str(hook), "timeout_s": 120, "start": "all"}))
        report = notify.deliver_pending(led, budget_s=0.3)
        [outcome] = report.outcomes
        # It took the whole budget without answering: an attempt, and a wait.
        assert (outcome.state, outcome.attempts, outcome.cursor) == ("failing", 1, 0)
        assert "no answer within" in (outcome.error or "")
        state = cursor(home, "slow")
        assert (state["failures"], state["attempts"]) == (1, 1) and state["next_try_at"]
        assert notify.deliver_pending(led, budget_s=0.3).outcomes[0].state == "waiting"


@pytest.mark.slow
def test_a_subscriber_that_never_answers_costs_an_upgrade_one_budget(
        cli, home: Path, tmp_path: Path) -> None:
    """Not one budget per change: after its first deferral it backs off, and status
    and doctor show it."""
    started = tmp_path / "started"
    hook = hook_script(tmp_path, f"echo started >> {started}\nexec sleep 60\n")
    plan = write_plan(tmp_path / "work", [("exporters", 1, [plan_component("a"),
                                                            plan_component("b")])])
    assert cli("init", "setup").code == 0
    cli("subscribers", "add", "mute", "--hook", str(hook), "--timeout", "120",
        "--retry-initial", "600")
    result = cli("apply", str(plan))
    assert result.code == 0, result
    changes = [e for e in all_events(home) if e["upgrade_id"] != "setup"]
    assert len(changes) > 10
    assert started.read_text().splitlines() == ["started"]
    [failing] = json.loads(cli("status", "--json").out)["notify"]["failing"]
    assert failing["name"] == "mute" and "no answer within" in failing["last_error"]
    [finding] = doctor.run_checks(home, checks=[c for c in doctor.CHECKS
                                                if c.name == "notifications"])
    assert finding.status == doctor.WARN and "mute" in finding.detail


def test_a_hook_that_is_not_executable_is_refused_when_added(
        cli, home: Path, tmp_path: Path) -> None:
    script = tmp_path / "plain.sh"
    script.write_text("#!/bin/sh\n")
    cli("init", "u1")
    before = trail_rows(home)
    result = cli("subscribers", "add", "x", "--hook", str(script))
    assert result.code == 6
    assert result.err == (f"upgrade-ledger: error: subscriber x: hook {script} is not "
                          "executable (chmod +x it)\n")
    assert not (home / "notify.toml").exists()
    assert trail_rows(home) == before


def test_a_hook_made_unrunnable_later_fails_its_delivery_only(
        cli, home: Path, tmp_path: Path) -> None:
    hook = hook_script(tmp_path, "cat > /dev/null\n")
    cli("init", "u1")
    cli("subscribers", "add", "h", "--hook", str(hook), "--start", "all")
    hook.chmod(0o644)
    result = cli("notify")
    assert result.code == 1 and "is not executable" in result.err
    assert cursor(home, "h")["attempts"] == 1
    assert cli("state", "set", "PLANNING").code == 0


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (("--url", "ftp://example.com/x"),
     "subscriber w: url 'ftp://example.com/x' is not http(s); a webhook must be "
     "http://HOST/... or https://HOST/..."),
    (("--url", "http:///nohost"),
     "subscriber w: url 'http:///nohost' is not http(s); a webhook must be "
     "http://HOST/... or https://HOST/..."),
    (("--hook", "relative/hook"),
     "subscriber w: hook must be the absolute path of an executable"),
    (("--url", "http://127.0.0.1/", "--hook", "/bin/true"),
     "subscriber w: give exactly one of url (a webhook) or hook (an executable)"),
    (("--url", "http://127.0.0.1/", "--kind", "Upgrade State"),
     "subscriber w: 'Upgrade State' is not an event kind (e.g. 'component.failed', or a "
     "prefix ending in '.' such as 'upgrade.')"),
    (("--url", "http://127.0.0.1/", "--timeout", "0"),
     "subscriber w: timeout_s must be a number of seconds from 0.1 to 300"),
])
def test_bad_subscribers_are_refused_in_one_line_and_change_nothing(
        cli, home: Path, args: tuple[str, ...], message: str) -> None:
    cli("init", "u1")
    before = trail_rows(home)
    result = cli("subscribers", "add", "w", *args)
    assert (result.code, result.err) == (6, f"upgrade-ledger: error: {message}\n")
    assert not (home / "notify.toml").exists()
    assert trail_rows(home) == before


def test_a_broken_notify_toml_is_one_line_for_notify_and_a_field_in_status(
        cli, home: Path) -> None:
    cli("init", "u1")
    (home / "notify.toml").write_text('[subscribers.w]\nurl = "gopher://x"\n')
    result = cli("notify")
    assert result.code == 6 and result.err.count("\n") == 1 and "gopher://x" in result.err
    status = cli("status", "--json")
    assert status.code == 0 and "gopher://x" in json.loads(status.out)["notify"]["error"]
    with Ledger(home) as led:
        assert "gopher://x" in (notify.deliver_pending(led).error or "")


def test_add_and_remove_keep_the_operators_comments(cli, home: Path) -> None:
    cli("init", "u1")
    (home / "notify.toml").write_text(
        "# Who hears about upgrades on this host.\n"
        "[subscribers.ops]  # the on-call channel\n"
        'url = "https://chat.example.com/hook"\n'
        'kinds = ["upgrade.state",\n  "component.failed"]\n'
        "\n# keep: paging\n"
        "[subscribers.pager]\n"
        'hook = "/usr/local/bin/page"\n')
    assert cli("subscribers", "add", "extra", "--url", "http://127.0.0.1:1/x",
               "--header", "Authorization=Bearer t0ken", "--kind", "upgrade.").code == 0
    assert cli("notify", "--subscriber", "extra").code == 0  # nothing new to send it
    assert cursor(home, "extra")
    assert cli("subscribers", "remove", "ops").code == 0
    text = (home / "notify.toml").read_text()
    assert "# Who hears about upgrades on this host." in text and "# keep: paging" in text
    subs = subscribers.parse(text)
    assert [s.name for s in subs] == ["pager", "extra"]
    assert subs[1].headers == {"Authorization": "Bearer t0ken"}
    assert cli("subscribers", "remove", "extra").code == 0
    assert cursor(home, "extra") == {}  # the cursor is forgotten with the subscriber
    missing = cli("subscribers", "remove", "nobody")
    assert missing.code == 6 and "no subscriber 'nobody'" in missing.err
    listed = json.loads(cli("subscribers", "list", "--json").out)
    assert [(s["name"], s["type"], s["target"]) for s in listed] == \
        [("pager", "hook", "/usr/local/bin/page")]


def test_a_new_subscriber_starts_after_the_events_already_recorded(
        cli, home: Path, tmp_path: Path) -> None:
    out = tmp_path / "got"
    hook = hook_script(tmp_path, f"cat >> {out}\n")
    cli("init", "u1")
    cli("state", "set", "PLANNING")
    assert cli("subscribers", "add", "late", "--hook", str(hook)).code == 0
    cli("state", "set", "BACKING_UP")
    assert cli("notify").code == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(e["from"], e["to"]) for e in got] == [("PLANNING", "BACKING_UP")]


@pytest.mark.slow
def test_two_deliverers_at_once_send_each_event_once(cli, home: Path, tmp_path: Path) -> None:
    out = tmp_path / "got"
    hook = hook_script(tmp_path, f'cat > /dev/null\necho "$LEDGER_EVENT_ID" >> {out}\n')
    cli("init", "u1")
    for state in ("PLANNING", "BACKING_UP", "UPGRADING", "VALIDATING", "COMPLETED", "IDLE"):
        cli("state", "set", state)
    cli("subscribers", "add", "h", "--hook", str(hook), "--start", "all")
    procs = [ledger_process("--home", home, "notify", stdout=subprocess.DEVNULL)
             for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    ids = [int(line) for line in out.read_text().split()]
    assert ids == [e["id"] for e in all_events(home)]


def test_doctor_reports_a_failing_subscriber(cli, home: Path, webhook) -> None:
    server = webhook(10_000)
    cli("init", "u1")
    cli("subscribers", "add", "web", "--url", server.url, "--start", "all")
    cli("notify")
    checks = [c for c in doctor.CHECKS if c.name == "notifications"]
    [finding] = doctor.run_checks(home, checks=checks)
    assert finding.status == doctor.WARN
    assert "web (1 attempt(s) at event 1: HTTP 500" in finding.detail


@pytest.mark.slow
def test_apply_notifies_as_it_goes_and_a_dead_subscriber_never_fails_it(
        cli, home: Path, tmp_path: Path, webhook) -> None:
    server = webhook(0)
    hangs = hook_script(tmp_path, "exec sleep 60\n", "hangs.sh")
    plan = write_plan(tmp_path / "work", [("exporters", 2, [plan_component("node_exporter"),
                                                            plan_component("blackbox")])])
    assert cli("init", "setup").code == 0
    cli("state", "set", "PLANNING")
    cli("state", "set", "FAILED")
    assert cli("subscribers", "add", "web", "--url", server.url).code == 0
    assert cli("subscribers", "add", "dead", "--hook", str(hangs), "--timeout", "0.3",
               "--retry-initial", "600").code == 0
    first_id = len(all_events(home)) + 1

    result = cli("apply", str(plan))  # no `notify`: apply delivers after each change
    assert result.code == 0, result
    assert json.loads(cli("status", "--json").out)["outcome"] == "COMPLETED"
    events = [e for e in all_events(home) if e["id"] >= first_id]
    assert [r["event"] for r in server.requests()] == events
    dead = cursor(home, "dead")
    assert dead["attempts"] == 1 and "timed out" in dead["last_error"]


def test_the_cursor_table_migrates_both_ways_and_matches_the_metadata(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    migrate.upgrade(url)
    migrate.downgrade(url, "0001")
    engine = create_engine(url)
    try:
        assert "notify_cursors" not in inspect(engine).get_table_names()
        migrate.upgrade(url)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, metadata) == []
    finally:
        engine.dispose()


# -- slow subscribers: deadlines and signals ---------------------------------------------


@pytest.fixture
def sleepers() -> Iterator[list[int]]:
    """Pids of the processes a test's hooks leave behind: killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_webhook_answering_one_byte_a_second_is_cut_at_its_timeout(
        home: Path, webhook) -> None:
    server = webhook(0, "drip")
    assert run_ledger("--home", home, "init", "u1").returncode == 0
    run_ledger("--home", home, "subscribers", "add", "drip", "--url", server.url,
               "--start", "all", "--timeout", "3")
    done = run_ledger("--home", home, "notify", "--budget", "5", timeout=60)
    assert done.returncode == 1, done.stderr
    assert "timed out" in done.stderr
    assert len(server.requests()) == 1
    assert cursor(home, "drip")["attempts"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["exec sleep 1016", "exit 0"], ids=["hangs", "exits"])
def test_a_hook_whose_child_keeps_its_stderr_never_hangs_the_delivery(
        home: Path, tmp_path: Path, sleepers: list[int], ending: str) -> None:
    pid_file = tmp_path / "child.pid"
    hook = hook_script(tmp_path, f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 1015' &\n"
                                 f"{ending}\n")
    assert run_ledger("--home", home, "init", "u1").returncode == 0
    run_ledger("--home", home, "subscribers", "add", "leaky", "--hook", str(hook),
               "--start", "all", "--timeout", "2")
    try:
        done = run_ledger("--home", home, "notify", "--budget", "5", timeout=60)
    finally:
        wait_for(pid_file.exists, "the hook's child to start")
        sleepers.append(int(pid_file.read_text()))
    if ending == "exit 0":
        assert done.returncode == 0, done.stderr
        assert cursor(home, "leaky")["delivered"] == 1
    else:
        assert done.returncode == 1 and "timed out" in done.stderr


DELIVER = """
import signal, sys
from ledger.api import Ledger
from ledger.observe import notify
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
with Ledger(sys.argv[1]) as led:
    report = notify.deliver(led, 300, cancel=lambda: bool(stopping))
print(report.outcomes[0].state, report.outcomes[0].attempts)
"""


@pytest.mark.slow
def test_a_stop_request_ends_a_delivery_at_once(home: Path, webhook) -> None:
    """A delivery with 300 s to go is cut short by a stop request (what a signal to
    apply makes), and is not held against the subscriber."""
    server = webhook(0, "drip")
    assert run_ledger("--home", home, "init", "u1").returncode == 0
    run_ledger("--home", home, "subscribers", "add", "drip", "--url", server.url,
               "--start", "all", "--timeout", "300")
    proc = subprocess.Popen([sys.executable, "-c", DELIVER, str(home)], env=child_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_for(server.requests, "the request to arrive")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out.split() == ["deferred", "0"]
    assert cursor(home, "drip")["attempts"] == 0


@pytest.mark.slow
def test_apply_stops_on_sigterm_while_a_subscriber_drips(
        home: Path, tmp_path: Path, webhook) -> None:
    server = webhook(0, "drip")
    work = tmp_path / "work"
    plan = write_plan(work, [("one", 1, [plan_component("a", upgrade=(
        "touch {W}/a.blocked; while [ ! -f {W}/go ]; do sleep 0.05; done; "
        "sh {W}/t.sh upgrade"))])])
    assert run_ledger("--home", home, "init", "setup").returncode == 0
    run_ledger("--home", home, "subscribers", "add", "drip", "--url", server.url,
               "--timeout", "300")
    proc = ledger_process("--home", home, "apply", "--plain", plan)
    try:
        wait_for((work / "a.blocked").exists, "the upgrade to start")
        wait_for(server.requests, "a delivery to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
        proc.communicate()
    with Ledger(home) as led:
        assert not led.lock_status().held
        assert led.events(kind="apply.interrupted")
