"""A client of ``upgrade-ledger session`` for the tests: the protocol of
ledger/cli/session.py spoken from Python, over a real process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import child_env


@dataclass
class Answer:
    """A call's answer: exit code, stdout and stderr bytes, and the event id the `o`
    frame gave (None when the command opened no ledger)."""

    code: int
    out: bytes
    err: bytes
    opened: int | None


class SessionClient:
    """One session process; ``call`` sends a request and reads its answer."""

    def __init__(self, *options: str, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        argv = command or [sys.executable, "-m", "ledger"]
        self.proc = subprocess.Popen([*argv, "session", *options], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env or child_env())
        tag, body = self.frame()
        assert tag == b"h" and body.startswith(b"upgrade-ledger-session 1 "), (tag, body)
        self.limit = int(body.split()[-1])

    def frame(self) -> tuple[bytes, bytes]:
        assert self.proc.stdout is not None
        head = self.proc.stdout.read(9)
        if len(head) < 9:
            raise EOFError(head)
        return head[:1], self.proc.stdout.read(int(head[1:]))

    def send(self, args: list[str | bytes], *, env: dict[str, str | bytes] | None = None,
             stdin: bytes = b"", pid: int | None = None, cwd: str | bytes | None = None,
             ) -> None:
        settings = [f"{k}=".encode() + (v if isinstance(v, bytes) else v.encode())
                    for k, v in (env or {}).items()]
        fields = [b"upgrade-ledger-1", str(pid or os.getpid()).encode(),
                  os.fsencode(cwd or os.getcwd()), str(len(settings)).encode(), *settings,
                  str(len(args)).encode(), *(os.fsencode(a) for a in args), stdin]
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"".join(f + b"\0" for f in fields))
        self.proc.stdin.flush()

    def answer(self) -> Answer:
        assert self.proc.stdout is not None
        opened = None
        while True:
            tag, body = self.frame()
            if tag == b"o":
                opened = int(body)
                continue
            assert tag == b"=", (tag, body)
            words = [int(w) for w in body.split()]
            code, n = words[0], words[1]
            outs, m = words[2:2 + n], words[2 + n]
            errs = words[3 + n:3 + n + m]
            out = b"\0".join(self.proc.stdout.read(size) for size in outs)
            err = b"\0".join(self.proc.stdout.read(size) for size in errs)
            return Answer(code, out, err, opened)

    def call(self, args: list[str | bytes], **kwargs: object) -> Answer:
        self.send(args, **kwargs)  # type: ignore[arg-type]
        return self.answer()

    def close(self) -> int:
        """End the input, wait for the session to end; its exit code."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        code = self.proc.wait(timeout=60)
        self.proc.stdout.close()
        assert self.proc.stderr is not None
        self.errors = self.proc.stderr.read()
        self.proc.stderr.close()
        return code


def one_shot(args: list[str | bytes], *, env: dict[str, str] | None = None,
             stdin: bytes = b"", cwd: str | Path | None = None,
             ) -> tuple[int, bytes, bytes]:
    """The same call as its own ``upgrade-ledger`` process: (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, "-m", "ledger", *args], input=stdin,
                          capture_output=True, env=env or child_env(), cwd=cwd, timeout=120,
                          check=False)
    return done.returncode, done.stdout, done.stderr
