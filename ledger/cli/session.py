"""``upgrade-ledger session``: the calls of one shell script, served by one process.

A shell script calls ``upgrade-ledger`` once per step, and nearly all of such a call
is the start of a Python process; the change itself is one SQLite commit. A session
is started once per shell (``scripts/upgrade-state.sh`` does it) and runs each call
it is sent through the very command a one-shot process runs: the same click command,
validation, output and exit code, one transaction committed before the answer. Its
modules are imported once, and the ledger's connection stays open between calls.

The protocol (docs/bash.md, "The session"), made for bash's builtins:

- A request is a sequence of fields, each ended by a NUL byte: ``upgrade-ledger-1``,
  the caller's PID, its working folder, a count and that many ``NAME=VALUE``
  settings (the caller's ``LEDGER_*`` and ``UPGRADE_*`` variables), a count and that
  many arguments (those of the one-shot command), and the command's standard input.
  Bash strings hold no NUL, so every argument arrives exactly, whatever its bytes.
- Every reply is a frame: one tag byte, eight decimal digits giving the length of the
  payload, the payload. ``h`` (hello, once, at the start): ``upgrade-ledger-session 1
  MAX``, MAX being the largest request taken. ``o`` (opened): the command opened its
  ledger, whose newest event then had the id in the payload; sent before any change.
  ``=`` (answer): ``RC N L1 ... LN M K1 ... KM``: the exit code, then the standard
  output as N pieces of those byte lengths and the standard error as M pieces; the
  pieces follow the frame. The output is cut at its NUL bytes, which are not sent
  (``read -N`` cannot hold them): the caller puts one back between two pieces.

A caller that gets no answer (the session died) knows from the ``o`` frame whether
the command got as far as its ledger; if it did, ``upgrade-ledger session retry
--after ID -- ARGS`` runs the call again on a ``Replay``, which makes only the changes
the ledger shows were not made (``ledger.ops.replay``).

The session ends at the end of its input, after ``--idle`` seconds without a request,
and when the process that started it ends (the parent-death signal): it finishes the
call it is running, as a one-shot process would, and stops.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ledger.cli.app import Config, cli

if TYPE_CHECKING:
    from ledger.api import Ledger
    from ledger.store.database import Database

MAGIC = b"upgrade-ledger-1"
HELLO = "upgrade-ledger-session 1"
#: The settings a request carries; the others are the session's own environment.
SETTING_PREFIXES = ("LEDGER_", "UPGRADE_")
#: The request pipe is asked to hold this much (Linux allows an unprivileged 1 MiB).
PIPE_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1


class ProtocolError(Exception):
    """The input is not a request: the stream cannot be trusted any further."""


class Request:
    """One call: who asks, from where, with which settings, arguments and input."""

    __slots__ = ("args", "cwd", "env", "pid", "stdin")

    def __init__(self, pid: int, cwd: bytes, env: dict[str, str], args: list[str],
                 stdin: bytes) -> None:
        self.pid, self.cwd, self.env, self.args, self.stdin = pid, cwd, env, args, stdin


class Fields:
    """NUL-terminated fields read from a file descriptor. The input ends at its end,
    or after *idle_s* seconds without a byte."""

    def __init__(self, fd: int, idle_s: float) -> None:
        self.fd = fd
        self.idle_s = idle_s
        self.buf = bytearray()
        self.pos = 0

    def next(self) -> bytes:
        """The next field; EOFError when the input ends."""
        while True:
            end = self.buf.find(b"\0", self.pos)
            if end >= 0:
                field = bytes(self.buf[self.pos:end])
                self.pos = end + 1
                return field
            ready, _, _ = select.select([self.fd], [], [], self.idle_s)
            chunk = os.read(self.fd, 1 << 16) if ready else b""
            if not chunk:
                raise EOFError
            del self.buf[:self.pos]
            self.pos = 0
            self.buf += chunk

    def count(self) -> int:
        field = self.next()
        if not field.isdigit() or len(field) > 9:
            raise ProtocolError(f"expected a number, got {field[:40]!r}")
        return int(field)

    def request(self) -> Request | None:
        """The next request, or None when the input ends (or stays idle)."""
        try:
            if self.next() != MAGIC:
                raise ProtocolError("not a request")
            pid, cwd = self.count(), self.next()
            env = {}
            for _ in range(self.count()):
                name, sep, value = os.fsdecode(self.next()).partition("=")
                if not sep or not name.startswith(SETTING_PREFIXES):
                    raise ProtocolError(f"not a setting: {name[:40]!r}")
                env[name] = value
            # Decoded as Python decodes a one-shot process's argv.
            args = [os.fsdecode(self.next()) for _ in range(self.count())]
            return Request(pid, cwd, env, args, self.next())
        except EOFError:
            return None


def frame(tag: bytes, payload: bytes) -> bytes:
    """One reply frame: the tag byte, the payload's length in eight digits, the payload."""
    return tag + b"%08d" % len(payload) + payload


def answer(code: int, out: bytes, err: bytes) -> bytes:
    """The ``=`` frame and the output it describes, cut at NUL bytes."""
    outs, errs = out.split(b"\0"), err.split(b"\0")
    header = " ".join(str(n) for n in (code, len(outs), *map(len, outs),
                                       len(errs), *map(len, errs)))
    return frame(b"=", header.encode()) + b"".join(outs) + b"".join(errs)


class _Kept(io.BytesIO):
    """Captured output that outlives a ``close()`` (the CLI closes stderr when its
    reader goes away)."""

    def close(self) -> None:
        pass


def exit_status(code: Any, err: io.TextIOBase) -> int:
    """The exit status a process ending with ``sys.exit(code)`` gets; a message is
    printed on stderr first, as Python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=err)
    return 1


class Session:
    """Serves requests from fd 0 on fd 1. Passed to ``cli.main`` as ``obj``: it names
    each call's caller and opens its ledger (see ``Config``)."""

    def __init__(self, idle_s: float) -> None:
        self.fields = Fields(0, idle_s)
        self.caller_pid: int | None = None
        self.busy = False
        self.stopping = False
        #: Open databases by (URL, file, host identity): (database, the file's device
        #: and inode).
        self._open: dict[tuple[object, ...], tuple[Database, tuple[int, int] | None]] = {}

    # -- the loop ------------------------------------------------------------------

    def serve(self) -> None:
        self._write(frame(b"h", f"{HELLO} {request_limit()}".encode()))
        try:
            while not self.stopping:
                try:
                    request = self.fields.request()
                except ProtocolError:
                    return
                if request is None:
                    return
                self.busy = True
                code, out, err = self.run(request)
                self.busy = False
                self._write(answer(code, out, err))
        except BrokenPipeError:
            return  # nobody reads the answers any more
        finally:
            self.close()

    def stop(self, _signum: int, _frame: object) -> None:
        """The shell is gone: finish the call in progress (as a one-shot process
        would), then end; between calls, end now."""
        self.stopping = True
        if not self.busy:
            raise SystemExit(0)

    def close(self) -> None:
        for db, _ in self._open.values():
            db.close()
        self._open.clear()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]

    # -- one call ------------------------------------------------------------------

    def run(self, request: Request) -> tuple[int, bytes, bytes]:
        """Run one request as a one-shot process would: (exit code, stdout, stderr)."""
        for name in [n for n in os.environ if n.startswith(SETTING_PREFIXES)]:
            if name not in request.env:
                del os.environ[name]
        os.environ.update(request.env)
        try:
            os.chdir(request.cwd)
        except OSError as exc:
            where = os.fsdecode(request.cwd)
            return 1, b"", (f"upgrade-ledger: error: cannot work in {where}: "
                            f"{exc.strerror}\n").encode(errors="replace")
        self.caller_pid = request.pid
        out, err = _Kept(), _Kept()
        streams = (sys.stdin, sys.stdout, sys.stderr, sys.argv)
        sys.stdin = _text(io.BytesIO(request.stdin), sys.__stdin__)
        sys.stdout = _text(out, sys.__stdout__)
        sys.stderr = _text(err, sys.__stderr__)
        sys.argv = ["upgrade-ledger", *request.args]
        try:
            cli.main(request.args, prog_name="upgrade-ledger", obj=self)
            code = 0
        except SystemExit as exc:
            code = exit_status(exc.code, sys.stderr)
        except Exception:  # with --traceback: a one-shot process prints it and exits 1
            import traceback  # noqa: PLC0415

            traceback.print_exc(file=sys.stderr)
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(ValueError):  # closed by the command
                    stream.flush()
            sys.stdin, sys.stdout, sys.stderr, sys.argv = streams
        return code, out.getvalue(), err.getvalue()

    def open_ledger(self, cfg: Config, create: bool = True) -> Ledger:
        """The ledger for *cfg*, as ``Ledger(...)`` opens it, on a connection kept open
        while its database file stays the same one; then the ``o`` frame."""
        from ledger.api import Ledger  # noqa: PLC0415
        from ledger.core import host  # noqa: PLC0415
        from ledger.store.home import Home  # noqa: PLC0415

        path = str(Home.at(cfg.home).db_path)
        # A connection serves one host's rows: the host is part of what it is kept for.
        key = (cfg.db_url, path, host.identity(os.environ, cfg.host_name))
        db, file = self._open.pop(key, (None, None))
        if db is not None and (cfg.db_url is None and _identity(path) != file):
            db.close()  # replaced, moved or deleted since: open what is there now
            db = None
        try:
            ledger = Ledger(cfg.home, db_url=cfg.db_url, pid=cfg.pid, strict=cfg.strict,
                            lock_timeout_s=cfg.lock_timeout_s, host_name=cfg.host_name,
                            create=create, db=db, fleet_url=cfg.fleet_url)
        except BaseException:
            if db is not None:
                db.close()
            raise
        self._open[key] = (ledger.db, _identity(path) if cfg.db_url is None else None)
        self._write(frame(b"o", str(ledger.last_event_id()).encode()))
        return ledger


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _text(raw: io.BytesIO, like: Any) -> io.TextIOWrapper:
    """A text stream over *raw* with the encoding a one-shot process's stream has."""
    return io.TextIOWrapper(raw, encoding=getattr(like, "encoding", None) or "utf-8",
                            errors=getattr(like, "errors", None) or "strict")


def request_limit() -> int:
    """The largest request taken: half of what the request pipe holds, so that a
    caller never blocks writing a request to a session that died (docs/bash.md)."""
    try:
        import fcntl  # noqa: PLC0415

        try:
            size = fcntl.fcntl(0, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # over the user's limit: keep what the pipe has
            size = fcntl.fcntl(0, fcntl.F_GETPIPE_SZ)
    except (ImportError, OSError, AttributeError):  # not a pipe, or not Linux
        size = 65536
    return int(size) // 2


def watch_parent() -> None:
    """Ask the kernel for SIGTERM when the parent (the shell) ends; end now if it has."""
    parent = os.getppid()
    try:
        import ctypes  # noqa: PLC0415

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the end of input still ends the session
    if os.getppid() != parent or parent == 1:
        raise SystemExit(0)


@click.group(invoke_without_command=True)
@click.option("--idle", "idle_s", type=click.FloatRange(0.1, 86400), default=600.0,
              show_default=True, metavar="SECONDS",
              help="End after this long without a request.")
@click.pass_context
def session(ctx: click.Context, idle_s: float) -> None:
    """Serve the calls of one shell script on stdin and stdout (see docs/bash.md).

    scripts/upgrade-state.sh starts one per shell; each call runs the same command a
    one-shot upgrade-ledger process runs, with the same output and exit code.
    """
    if ctx.invoked_subcommand is not None:
        return
    server = Session(idle_s)
    signal.signal(signal.SIGTERM, server.stop)
    watch_parent()
    server.serve()


@session.command("retry", context_settings={"ignore_unknown_options": True,
                                            "allow_interspersed_args": False})
@click.option("--after", "after_id", type=click.IntRange(min=0), required=True,
              metavar="EVENT_ID", help="The newest event when the call began (its o frame).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, required=True)
def session_retry(after_id: int, args: tuple[str, ...]) -> None:
    """Run a call that a session was running when it died: ARGS are the arguments of
    the one-shot command. A change the ledger shows its process made after EVENT_ID
    is not made again; the rest of the call is (ledger.ops.replay)."""
    replayer = Replayer(after_id)
    try:
        cli.main(list(args), prog_name="upgrade-ledger", obj=replayer)
    finally:
        replayer.finish()


class Replayer:
    """Opens the ledger of a retried call as a ``Replay`` (see ``Config``)."""

    caller_pid = None

    def __init__(self, after_id: int) -> None:
        self.after_id = after_id
        self.ledger: Any = None

    def open_ledger(self, cfg: Config, create: bool = True) -> Ledger:
        from ledger.ops.replay import Replay  # noqa: PLC0415

        self.ledger = Replay(cfg.home, db_url=cfg.db_url, pid=cfg.pid, strict=cfg.strict,
                             lock_timeout_s=cfg.lock_timeout_s, host_name=cfg.host_name,
                             after=self.after_id)
        return self.ledger  # type: ignore[no-any-return]

    def finish(self) -> None:
        if self.ledger is not None:
            try:
                self.ledger.finish()
            finally:
                self.ledger.close()


COMMANDS = [session]
