"""``upgrade-ledger session``: each request runs exactly what the one-shot command runs.

Every answer is compared, byte for byte, with the same command run as its own
process: output, errors and exit codes, bad input and usage errors included, with
arguments that are not UTF-8 and output that holds NUL bytes. A sequence of changes
sent to a session leaves the ledger as the same changes made by one-shot processes.
The framing, the `o` frame sent before any change, the settings and the working
folder each request carries, and the ways a session ends are checked on a real
process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import child_env, walk_to_upgrading
from sessionclient import SessionClient, one_shot

from ledger.api import Ledger


@pytest.fixture
def running(tmp_path: Path) -> Path:
    """A ledger mid-upgrade: phase p current, component a upgrading, b completed."""
    home = tmp_path / "running"
    with Ledger(home) as led:
        walk_to_upgrading(led, "u1")
        led.phase_start("p")
        led.component_start("a", "1.0", "2.0")
        led.component_start("b", "1.0", "2.0")
        led.component_complete("b")
    return home


@pytest.fixture
def session() -> Iterator[SessionClient]:
    client = SessionClient()
    yield client
    client.close()


def same_answer(session: SessionClient, args: list[str | bytes], **kwargs: object) -> None:
    got = session.call(args, **kwargs)  # type: ignore[arg-type]
    expected = one_shot(args, **{k: v for k, v in kwargs.items() if k == "stdin"})  # type: ignore[arg-type]
    assert (got.code, got.out, got.err) == expected, args


# Commands that change nothing: each is asked of the session and of a process, on the
# same ledger, and must answer alike (several of them fail, on purpose).
READS: list[list[str | bytes]] = [
    ["state", "get"],
    ["component", "status", "a"],
    ["component", "status", "nobody"],
    ["component", "is-upgraded", "b"],
    ["component", "is-upgraded", "a", "-v"],
    ["in-progress"],
    ["can-resume", "--verbose"],
    ["progress"],
    ["summary"],
    ["resume", "point", "--format", "plain"],
    ["rollback", "info"],
    ["phase", "next"],
    ["lock", "held"],
    ["lock", "status", "--json"],
    ["export", "-o", "-"],
    ["history", "--format", "json"],
    ["events", "--format", "csv"],
    ["status"],
    ["state", "check", "IDLE", "PLANNING"],
    ["state", "check", "IDLE", "NOPE"],
    ["state", "set", "NOPE"],
    ["component", "start", "../x", "1", "2"],
    ["component", "start", b"bad\xff\xfename", "1", "2"],
    ["phase", "start", "caf\xe9"],
    ["component", "status"],
    ["component", "statu", "a"],
    ["--lock-timeout", "-1", "state", "get"],
    ["--pid", "0", "state", "get"],
    ["nonsense"],
    ["-h"],
    ["component", "start", "--help"],
    ["--version"],
    ["sql", "SELECT 'a' || char(0) || 'b' AS x, char(10) AS y", "--format", "plain"],
    ["sql", "DELETE FROM events"],
    ["show", "nope"],
]


@pytest.mark.slow
@pytest.mark.parametrize("args", READS, ids=[repr(a)[:60] for a in READS])
def test_each_answer_is_the_one_shot_answer(running: Path, session: SessionClient,
                                            args: list[str | bytes]) -> None:
    same_answer(session, ["--home", str(running), *args])


def test_control_characters_in_the_output_arrive_as_a_process_writes_them(
        running: Path, session: SessionClient) -> None:
    args = ["--home", str(running), "sql", "--format", "plain",
            "SELECT char(0) || 'a' || char(0, 0) || 'b\u00e9' || char(0)"]
    got = session.call(args)
    # Plain output escapes control characters and keeps the rest as UTF-8.
    assert (got.code, got.out) == (0, "\\x00a\\x00\\x00b\u00e9\\x00\n".encode())
    same_answer(session, args)


# A script's worth of changes, some refused: the same answers, and the same ledger.
CHANGES: list[list[str]] = [
    ["state", "set", "VALIDATING"],
    ["state", "set", "COMPLETED"],
    ["component", "complete", "a"],
    ["phase", "start", "p2"],
    ["component", "start", "c", "", "3.0"],
    ["component", "fail", "c", "download failed"],
    ["component", "fail", "c", "again"],
    ["component", "start", "c", "1.0", "3.0"],
    ["rollback", "mark", "c", "/backups/c.tgz", "--size", "10"],
    ["component", "complete", "c"],
    ["component", "skip", "nobody"],
    ["resume"],
    ["rollback", "clear"],
    ["lock", "acquire", "--owner", "1"],
    ["lock", "acquire"],
    ["lock", "release"],
    ["legacy", "component-start", "d", "", ""],
    ["phase", "complete", "p2"],
    ["save-history"],
    ["init"],
    ["legacy", "init"],
    ["state", "set", "PLANNING"],
    ["cleanup"],
]


@pytest.mark.slow
def test_changes_leave_the_ledger_as_one_shot_processes_do(running: Path, tmp_path: Path,
                                                           session: SessionClient) -> None:
    served, alone = tmp_path / "served", tmp_path / "alone"
    shutil.copytree(running, served, symlinks=True)
    shutil.copytree(running, alone, symlinks=True)
    for args in CHANGES:
        got = session.call(["--home", str(served), *args])
        code, out, err = one_shot(["--home", str(alone), *args])
        assert got.code == code, (args, got, err)
        assert same_text(got.err, served) == same_text(err, alone), args
        if args[0] != "save-history" and args[-1] != "init":  # a path, a new id
            assert got.out == out, args
    saved = session.call(["--home", str(served), "legacy", "save", "-"],
                         stdin=b'{"ticket": "OPS-1"}\n')
    assert (saved.code, saved.err) == one_shot(["--home", str(alone), "legacy", "save", "-"],
                                               stdin=b'{"ticket": "OPS-1"}\n')[::2]

    def trail(home: Path) -> list[tuple]:
        with Ledger(home) as led:
            return [(e["kind"], e["subject"], e["from"], e["to"], e["pid"])
                    for e in led.events(limit=None)]

    assert trail(served) == trail(alone)
    assert len(trail(served)) > len(CHANGES)

    def view(home: Path) -> object:
        return timeless(json.loads((home / "state.json").read_text()))

    assert view(served) == view(alone)
    assert json.loads((served / "state.json").read_text())["ticket"] == "OPS-1"


def same_text(text: bytes, home: Path) -> bytes:
    """*text* without what two runs on two homes say differently: the home, times."""
    return re.sub(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", b"T", text.replace(bytes(home), b"H"))


def timeless(data: object) -> object:
    """*data* without what differs between two runs: times, durations, ids, lineage."""
    if isinstance(data, dict):
        return {k: timeless(v) for k, v in data.items()
                if not k.endswith(("_at", "_id")) and k not in ("duration_s", "lineage")}
    if isinstance(data, list):
        return [timeless(v) for v in data]
    return data


def test_the_o_frame_comes_before_the_change_and_names_the_newest_event(
        running: Path, session: SessionClient) -> None:
    with Ledger(running) as led:
        newest = led.last_event_id()
    session.send(["--home", str(running), "component", "complete", "a"])
    tag, body = session.frame()
    assert (tag, int(body)) == (b"o", newest)
    rest = session.answer()
    assert (rest.code, rest.out, rest.err) == (0, b"", b"")
    with Ledger(running) as led:
        (done,) = led.events(after_id=newest)
    assert (done["kind"], done["subject"], done["pid"]) == ("component.completed", "a",
                                                           os.getpid())
    # A command that opens no ledger sends no o frame.
    assert session.call(["state", "check", "IDLE", "PLANNING"]).opened is None


@pytest.mark.slow
def test_each_request_carries_its_settings_caller_and_folder(tmp_path: Path,
                                                            session: SessionClient) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    made = session.call(["init", "u-a"], env={"LEDGER_HOME": "led"}, cwd=tmp_path / "a",
                        pid=4242)
    assert (made.code, made.out) == (0, b"u-a\n")
    assert session.call(["state", "get"], env={"LEDGER_HOME": "led"},
                        cwd=tmp_path / "b").out == b"IDLE\n"  # another folder: no upgrade
    with Ledger(tmp_path / "a" / "led") as led:
        assert str(led.document()["metadata"]["pid"]) == "4242"  # the caller's, by default
    strict = session.call(["--home", str(tmp_path / "a" / "led"), "state", "set", "PLANNING"],
                          env={"LEDGER_STRICT": "1"})
    assert strict.code == 4 and b"strict mode" in strict.err
    json_out = session.call(["--home", str(tmp_path / "a" / "led"), "history"],
                            env={"LEDGER_FORMAT": "json"})
    assert json.loads(json_out.out)[0]["id"] == "u-a"
    # Settings are the request's own: the next request has none of the above.
    plain = session.call(["--home", str(tmp_path / "a" / "led"), "state", "set", "PLANNING"])
    assert (plain.code, plain.err) == (0, b"")
    gone = session.call(["state", "get"], cwd=tmp_path / "missing")
    assert gone.code == 1 and b"cannot work in" in gone.err


@pytest.mark.slow
def test_the_ledger_stays_open_while_its_file_is_the_same(tmp_path: Path,
                                                          session: SessionClient) -> None:
    home = tmp_path / "home"
    assert session.call(["--home", str(home), "init", "first"]).code == 0
    shutil.rmtree(home)  # a script that starts again from nothing
    again = session.call(["--home", str(home), "init", "second"])
    assert (again.code, again.out) == (0, b"second\n")
    with Ledger(home) as led:
        assert [u["id"] for u in led.history()] == ["second"]


def test_big_requests_and_answers(running: Path, session: SessionClient) -> None:
    note = "x" * 60000
    got = session.call(["--home", str(running), "component", "fail", "a", note])
    assert (got.code, got.err) == (0, b"")  # or refused: compare with a process
    status = session.call(["--home", str(running), "component", "status", "a"])
    assert json.loads(status.out)["last_error"] == note
    export = session.call(["--home", str(running), "export", "-o", "-"])
    assert json.loads(export.out)["upgrade_id"] == "u1"
    assert session.limit >= 32768


def test_the_session_ends_at_the_end_of_its_input_and_when_idle(tmp_path: Path) -> None:
    client = SessionClient()
    assert client.close() == 0
    idle = SessionClient("--idle", "0.2")
    assert idle.proc.wait(timeout=60) == 0  # ended by itself
    idle.close()
    bad = SessionClient()
    assert bad.proc.stdin is not None and bad.proc.stdout is not None
    bad.proc.stdin.write(b"not a request\0")
    bad.proc.stdin.flush()
    assert bad.proc.wait(timeout=60) == 0  # the stream cannot be trusted: it stops
    assert bad.proc.stdout.read() == b""
    bad.close()


@pytest.mark.slow
def test_the_session_ends_when_its_parent_does(tmp_path: Path) -> None:
    # The parent ends without closing the session's input (the test holds it open):
    # the parent-death signal ends the session all the same.
    pid_file = tmp_path / "pid"
    script = f"{sys.executable} -m ledger session <&0 & echo $! >{pid_file}; exec sleep 0.5"
    parent = subprocess.Popen(["bash", "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, env=child_env())
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert parent.wait(timeout=60) == 0
    while is_session(pid):
        assert time.monotonic() < deadline, "the session outlived its parent"
        time.sleep(0.05)
    assert parent.stdin is not None
    parent.stdin.close()


def is_session(pid: int) -> bool:
    """Whether process *pid* is still a session (and not a zombie, nor another process
    that got its PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"session" in cmdline and stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@pytest.mark.slow
def test_a_term_between_calls_ends_it_and_one_during_a_call_lets_the_call_finish(
        running: Path) -> None:
    client = SessionClient()
    assert client.call(["--home", str(running), "state", "get"]).code == 0
    client.proc.send_signal(signal.SIGTERM)
    assert client.proc.wait(timeout=60) == 0
    client.close()
    # A call that waits (for a lock that a live process, PID 1, holds), TERM meanwhile:
    # the call ends as it would have, its answer is sent, then the session ends.
    with Ledger(running) as led:
        led.acquire_lock(1)
    busy = SessionClient()
    busy.send(["--home", str(running), "lock", "acquire", "--wait", "1.5"])
    assert busy.frame()[0] == b"o"
    busy.proc.send_signal(signal.SIGTERM)
    got = busy.answer()
    assert got.code == 4 and b"held by PID 1" in got.err
    assert busy.proc.wait(timeout=60) == 0
    busy.close()
