"""``events --follow``: one process streams the audit trail while other processes
change the ledger; it stops cleanly on SIGINT/SIGTERM and when its reader goes away."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ledger_process, run_ledger

from ledger.api import Ledger


class Follower:
    """``upgrade-ledger events --follow ...`` as a real process, read line by line."""

    def __init__(self, home: Path, *args: str) -> None:
        self.proc = ledger_process("--home", home, "events", "--follow", "--interval", "0.05",
                                   *args, text=False)
        self._buffer = b""

    def lines(self, count: int, timeout: float = 60.0) -> list[str]:
        """The next *count* lines (bounded wait: fails rather than hangs)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while self._buffer.count(b"\n") < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise AssertionError(f"{count} lines did not come: {self._buffer!r}")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"the follower exited ({self.proc.wait()}): "
                                     f"{self.proc.stderr.read() if self.proc.stderr else ''}")
            self._buffer += chunk
        *got, self._buffer = self._buffer.split(b"\n", count)
        return [line.decode() for line in got]

    def stop(self, signum: int) -> tuple[int, str]:
        self.proc.send_signal(signum)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err.decode()


@pytest.fixture
def follow(home: Path) -> Iterator[type[Follower]]:
    started: list[Follower] = []

    def start(*args: str) -> Follower:
        follower = Follower(home, *args)
        started.append(follower)
        return follower

    yield start  # type: ignore[misc]
    for follower in started:
        if follower.proc.poll() is None:
            follower.proc.kill()
        follower.proc.wait(timeout=60)
        for pipe in (follower.proc.stdout, follower.proc.stderr):
            if pipe is not None:
                pipe.close()


def change(home: Path, *args: str) -> None:
    """A change made by another process: the CLI, as a shell script would."""
    run_ledger("--home", home, *args).check_returncode()


@pytest.mark.slow
def test_a_follower_sees_what_another_process_records(home: Path, follow) -> None:
    change(home, "init", "u1")
    follower = follow("--format", "json")
    [first] = follower.lines(1)  # the backlog first
    assert json.loads(first)["kind"] == "upgrade.init"
    change(home, "state", "set", "PLANNING")
    change(home, "state", "set", "BACKING_UP")
    got = [json.loads(line) for line in follower.lines(2)]
    with Ledger(home) as led:
        assert got == led.events()[1:]  # one JSON object per line, as `events` shows it
    code, err = follower.stop(signal.SIGTERM)
    assert (code, err) == (0, "")


@pytest.mark.slow
def test_filters_hold_while_following(home: Path, follow) -> None:
    change(home, "init", "u1")
    for state in ("PLANNING", "BACKING_UP", "UPGRADING"):
        change(home, "state", "set", state)
    follower = follow("--format", "json", "--kind", "component.", "--component", "api")
    change(home, "phase", "start", "p")
    change(home, "component", "start", "db")
    change(home, "component", "start", "api")
    change(home, "component", "complete", "db")
    change(home, "component", "fail", "api", "boom")
    got = [json.loads(line) for line in follower.lines(2)]
    assert [(e["kind"], e["subject"]) for e in got] == \
        [("component.upgrading", "api"), ("component.failed", "api")]
    assert follower.stop(signal.SIGINT) == (0, "")


@pytest.mark.slow
def test_since_an_age_is_anchored_when_the_follower_starts(home: Path, follow) -> None:
    """``--since 0s`` (the systemd unit in docs/observability.md): no backlog, then every
    new event. The age is taken once, when following starts, not again at each poll."""
    change(home, "init", "u1")
    follower = follow("--format", "csv", "--since", "0s")
    assert follower.lines(1)[0].startswith("id,at,")  # started: the anchor is taken
    change(home, "state", "set", "PLANNING")
    change(home, "state", "set", "BACKING_UP")
    got = [line.split(",") for line in follower.lines(2, timeout=20)]
    assert [(row[3], row[6]) for row in got] == [("upgrade.state", "PLANNING"),
                                                 ("upgrade.state", "BACKING_UP")]
    assert follower.stop(signal.SIGTERM) == (0, "")


@pytest.mark.slow
def test_the_table_format_streams_one_line_per_event(home: Path, follow) -> None:
    change(home, "init", "u1")
    follower = follow()
    change(home, "state", "set", "PLANNING")
    lines = follower.lines(2)
    assert "upgrade.init" in lines[0] and "u1" in lines[0]
    assert "upgrade.state" in lines[1] and "IDLE -> PLANNING" in lines[1]
    change(home, "state", "set", "FAILED", "--error", "disk full")
    assert follower.lines(1)[0].endswith("  error=disk full")  # the detail, in brief
    assert follower.stop(signal.SIGTERM)[0] == 0


@pytest.mark.slow
def test_the_follower_stops_when_its_reader_goes_away(home: Path, follow) -> None:
    change(home, "init", "u1")
    follower = follow("--format", "json")
    follower.lines(1)
    assert follower.proc.stdout is not None
    follower.proc.stdout.close()  # like `| head -1` exiting
    code = follower.proc.wait(timeout=60)  # no new event is needed to notice
    assert code == 0
    assert follower.proc.stderr is not None and follower.proc.stderr.read() == b""


def test_a_bad_filter_is_one_line(cli) -> None:
    assert cli("init", "u1").code == 0
    result = cli("events", "--follow", "--since", "yesterday-ish")
    assert result.code == 6
    assert result.err.startswith("upgrade-ledger: error: cannot read the time 'yesterday-ish'")
    assert result.err.count("\n") == 1
