"""Run jobs side by side, at most N at once, from one process.

A job is a generator: it yields ``Exec`` (run this command) or ``Pause`` (wait this
long, e.g. a retry's backoff) and is sent back the command's ``Result``; it returns
True when it succeeded. The commands run as real processes in parallel, while every
line of job code — and so every ledger transaction — runs in this one process,
one after the other. That keeps each state change a single transaction from a
single writer, with no threads.

A stop (Ctrl-C) or an error inside a job ends every running command before it
propagates, so nothing keeps running behind the caller's back.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from ledger.apply.plan import Component
from ledger.apply.shell import Result, Running, wait_readable

POLL_S = 0.01


@dataclass(frozen=True)
class Exec:
    """Request: run *component*'s *step* command (probe, backup, upgrade…)."""

    component: Component
    step: str
    attempt: int = 1
    capture: bool = False


@dataclass(frozen=True)
class Pause:
    """Request: resume the job after *seconds*."""

    seconds: float


Job = Generator[Exec | Pause, Result | None, bool]


class Interrupted(Exception):
    """A stop signal (SIGINT, SIGTERM, SIGHUP) ended the run at a safe point."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.upgrade_id: str | None = None  # filled in by the run it stopped
        self.state: str | None = None
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class Stop:
    """Set by a signal handler; checked between steps (never mid-transaction)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int, _frame: Any = None) -> None:
        self.signum = self.signum or signum

    def requested(self) -> bool:
        """Whether a stop was asked for (long waits elsewhere end early on it)."""
        return self.signum is not None

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def drive(jobs: Sequence[Callable[[], Job]], limit: int,
          start: Callable[[Exec], Running], stop: Stop,
          ) -> list[bool | None]:
    """Run *jobs* at most *limit* at once; return each one's result (None: not started).

    After the first job that fails, no new job starts; those running finish (an
    upgrade is never cut short because a neighbour failed). *start* launches the
    command a job asked for.
    """
    results: list[bool | None] = [None] * len(jobs)
    queue = deque(range(len(jobs)))
    active: dict[int, tuple[Job, Running | float]] = {}
    halted = False

    def advance(index: int, job: Job, value: Result | None) -> None:
        nonlocal halted
        try:
            request = job.send(value)
        except StopIteration as done:
            active.pop(index, None)
            results[index] = bool(done.value)
            halted = halted or not done.value
            return
        if isinstance(request, Exec):
            active[index] = (job, start(request))
        else:
            active[index] = (job, time.monotonic() + request.seconds)

    try:
        while active or (queue and not halted):
            stop.check()
            while queue and not halted and len(active) < limit:
                index = queue.popleft()
                job = jobs[index]()
                advance(index, job, None)
            moved = False
            for index, (job, waiting) in list(active.items()):
                if isinstance(waiting, Running):
                    result = waiting.poll()
                    if result is None:
                        continue
                    advance(index, job, result)
                elif time.monotonic() >= waiting:
                    advance(index, job, None)
                else:
                    continue
                moved = True
            if not moved:
                wait_readable([w for _, w in active.values() if isinstance(w, Running)],
                              POLL_S)
    except BaseException:
        _stop_all(active.values())
        raise
    return results


def _stop_all(active: Any) -> None:
    """End every running command (SIGTERM, then SIGKILL after a grace) and wait."""
    running = [w for job, w in active if isinstance(w, Running)]
    for command in running:
        command.stop()
    for command in running:
        command.wait()
    for job, _ in active:
        job.close()
