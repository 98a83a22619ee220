"""The exclusive upgrade lock: a folder made with ``mkdir``, and a record of its holder.

``mkdir`` is the atomic primitive, as in the bash library this replaces: whoever
creates the lock folder holds the lock. Inside it, ``lock.info`` holds one line
``PID|TIMESTAMP|HOSTNAME|USER|START_TICKS|BOOT_ID``. A lock is taken over only on
proof that its holder is gone; a live holder on this host is never evicted for age.

Changes to the lock folder itself (create, take over, release) are serialised by a
short ``flock`` on a guard file beside it (``<lock folder>.guard``), held for the
length of one such change. That is what makes a takeover race-free: the judgement
"this lock is stale" and the rename that removes it happen under the same guard, so
no other process can swap a fresh lock in between. See ``docs/lock.md``.

Stdlib only, and only cheap modules: this runs on every per-step CLI call.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import pwd
import stat
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledger.errors import BadInput, LockError, LockHeld, LockTimeout, NotLockOwner, StorageError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "DEFAULT_GRACE_S",
    "DEFAULT_TIMEOUT_S",
    "INFO_NAME",
    "DirLock",
    "Holder",
    "LockStatus",
]

INFO_NAME = "lock.info"
DEFAULT_TIMEOUT_S = 4 * 3600.0
DEFAULT_GRACE_S = 5.0

MAX_INFO_BYTES = 4096  # a lock.info longer than this is not read, it is "unreadable"
MAX_TIMEOUT_S = 30 * 86400.0
MAX_GRACE_S = 86400.0
MAX_WAIT_S = 86400.0
MAX_POLL_S = 60.0
MIN_POLL_S = 0.001
GUARD_WAIT_S = 10.0  # the guard is held for microseconds; longer means a stopped process
PID_LIMIT = 4194304  # the kernel's PID_MAX_LIMIT: no PID is larger
MAX_FIELD_CHARS = 255
MAX_REASON_CHARS = 1024

_TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_DIGITS = frozenset("0123456789")
_BOOT_ID_CHARS = frozenset("0123456789abcdefABCDEF-")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# --- facts about this host and its processes --------------------------------------


_UNSAFE = {**dict.fromkeys(range(32), "_"), ord("|"): "_", 127: "_"}


def _sanitize(value: str) -> str:
    """Make a value safe as one lock.info field: no separator, no control characters."""
    return value.translate(_UNSAFE)[:MAX_FIELD_CHARS]


def local_hostname() -> str:
    """This host's name, as ``socket.gethostname()`` gives it (``uname`` is what it reads)."""
    # os.uname() avoids importing socket (a few ms) on the per-step path; on Linux
    # gethostname(2) is the uname nodename, so the two always agree.
    return _sanitize(os.uname().nodename) or "unknown"


_boot_id_cache: list[str | None] = []


def local_boot_id() -> str | None:
    """The kernel's boot id (new at every boot), or None where /proc does not offer it."""
    if not _boot_id_cache:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as fh:
                value = fh.read(100).strip().decode("ascii")
        except (OSError, UnicodeDecodeError):
            value = ""
        ok = 0 < len(value) <= 64 and set(value) <= _BOOT_ID_CHARS
        _boot_id_cache.append(value if ok else None)
    return _boot_id_cache[0]


_user_names: dict[int, str] = {}


def _user_name(uid: int) -> str:
    """The login name of uid from the password database (so an unset USER is fine)."""
    if uid not in _user_names:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = os.environ.get("USER", "") if uid == os.geteuid() else ""
        _user_names[uid] = _sanitize(name) or "unknown"
    return _user_names[uid]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) from /proc/PID/stat, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read(4096)
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or
    # parentheses, so split after the last ')'. Field 3 is then index 0, field 22 index 19.
    _, sep, rest = data.rpartition(b")")
    fields = rest.split()
    if not sep or len(fields) < 20 or not fields[19].isdigit():
        return None
    return fields[0].decode("ascii", "replace"), int(fields[19])


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    st = _proc_stat(pid)
    return None if st is None else st[1]


def _pid_state(pid: int) -> str:
    """"gone", "alive" (we may signal it) or "foreign" (it exists; kill gives EPERM)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        state = "foreign"
    except OverflowError:
        return "gone"
    else:
        state = "alive"
    st = _proc_stat(pid)
    if st is not None and st[0] in ("Z", "X"):
        return "gone"  # it has exited; only its parent has not collected it yet
    return state


def _utc_now() -> str:
    return time.strftime(_TS_FORMAT, time.gmtime())


def _parse_utc(ts: str) -> float | None:
    """Seconds since the epoch for ``YYYY-MM-DDTHH:MM:SSZ``, or None if not that form."""
    if len(ts) != 20 or ts[4] != "-" or ts[7] != "-" or ts[10] != "T":
        return None
    if ts[13] != ":" or ts[16] != ":" or ts[19] != "Z":
        return None
    parts = (ts[0:4], ts[5:7], ts[8:10], ts[11:13], ts[14:16], ts[17:19])
    if not all(set(p) <= _DIGITS for p in parts):
        return None
    y, mo, d, h, mi, s = (int(p) for p in parts)
    leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
    month_days = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    if y < 1970 or not 1 <= mo <= 12 or not 1 <= d <= month_days[mo - 1]:
        return None
    if h > 23 or mi > 59 or s > 60:
        return None
    # Days from 1970-01-01 to the civil date (the usual era-based formula).
    yy = y - (mo <= 2)
    era = yy // 400
    yoe = yy - era * 400
    doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + d - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return float(days * 86400 + h * 3600 + mi * 60 + min(s, 59))


# --- input checks ------------------------------------------------------------------


def _check_seconds(name: str, value: object, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"{name} must be a number of seconds, not {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or seconds > maximum:
        raise BadInput(f"{name} must be between 0 and {maximum:g} seconds, not {value!r}")
    return seconds


def _check_pid(owner_pid: object) -> int:
    """The owner PID to use: the caller's by default, else an existing process's."""
    if owner_pid is None:
        return os.getpid()
    if isinstance(owner_pid, bool) or not isinstance(owner_pid, int):
        raise BadInput(f"owner PID must be a positive integer, not {owner_pid!r}")
    if not 0 < owner_pid < PID_LIMIT:
        raise BadInput(f"owner PID must be between 1 and {PID_LIMIT - 1}, not {owner_pid}")
    if _pid_state(owner_pid) == "gone":
        raise BadInput(f"owner PID {owner_pid} names no running process")
    return owner_pid


def _check_reason(reason: object) -> str:
    if not isinstance(reason, str) or not reason.strip():
        raise BadInput("breaking a lock needs a reason (a non-empty text)")
    text = reason.strip()
    if len(text) > MAX_REASON_CHARS:
        raise BadInput(f"reason is longer than {MAX_REASON_CHARS} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        raise BadInput("reason must be one line without control characters")
    return text


# --- the record ----------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """Who holds the lock: one parsed lock.info line.

    A record written by the old bash library has only the first four fields; the
    missing ones are None. Empty fields are None too.
    """

    pid: int
    timestamp: str | None = None
    hostname: str | None = None
    user: str | None = None
    start_ticks: int | None = None
    boot_id: str | None = None

    @classmethod
    def parse(cls, line: str) -> Holder:
        """Parse ``PID|TIMESTAMP|HOSTNAME|USER[|START_TICKS[|BOOT_ID]]`` (one line).

        Raises BadInput on anything else: another field count, a PID that is not a
        positive decimal, a malformed timestamp or start tick count, control characters.
        """
        if not isinstance(line, str):
            raise BadInput(f"lock.info must be text, not {type(line).__name__}")
        text = line[:-1] if line.endswith("\n") else line
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            raise BadInput("lock.info must be exactly one line of printable text")
        fields = text.split("|")
        if not 4 <= len(fields) <= 6:
            raise BadInput(f"lock.info has {len(fields)} fields, expected 4 or 6")
        fields += [""] * (6 - len(fields))
        pid_s, ts, host, user, ticks_s, boot = fields
        if not 0 < len(pid_s) <= 10 or not set(pid_s) <= _DIGITS or not 0 < int(pid_s) < PID_LIMIT:
            raise BadInput(f"lock.info PID {pid_s[:20]!r} is not a valid PID")
        if ts and _parse_utc(ts) is None:
            raise BadInput(f"lock.info timestamp {ts[:40]!r} is not YYYY-MM-DDTHH:MM:SSZ")
        if ticks_s and (not set(ticks_s) <= _DIGITS or len(ticks_s) > 20):
            raise BadInput(f"lock.info start ticks {ticks_s[:40]!r} is not a number")
        if boot and (not set(boot) <= _BOOT_ID_CHARS or len(boot) > 64):
            raise BadInput(f"lock.info boot id {boot[:40]!r} is malformed")
        if len(host) > MAX_FIELD_CHARS or len(user) > MAX_FIELD_CHARS:
            raise BadInput("lock.info host or user name is too long")
        return cls(
            pid=int(pid_s),
            timestamp=ts or None,
            hostname=host or None,
            user=user or None,
            start_ticks=int(ticks_s) if ticks_s else None,
            boot_id=boot or None,
        )

    def format(self) -> str:
        """The lock.info line, without the newline; four fields when the last two are None."""
        fields = [
            str(self.pid),
            _sanitize(self.timestamp or ""),
            _sanitize(self.hostname or ""),
            _sanitize(self.user or ""),
        ]
        if self.start_ticks is not None or self.boot_id is not None:
            ticks = "" if self.start_ticks is None else str(self.start_ticks)
            fields += [ticks, _sanitize(self.boot_id or "")]
        return "|".join(fields)

    def as_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict (field names as in this class)."""
        return {
            "pid": self.pid,
            "timestamp": self.timestamp,
            "hostname": self.hostname,
            "user": self.user,
            "start_ticks": self.start_ticks,
            "boot_id": self.boot_id,
        }


@dataclass(frozen=True)
class LockStatus:
    """What a look at the lock found.

    ``held``: a lock folder is there. ``stale``: it may be taken over (its holder is
    proven gone, or cannot be judged and the lock is older than the timeout).
    ``suspect``: its holder is a live process on this host but the lock is older than
    the timeout; reported, never removed automatically. ``reason`` says why, in words.
    A lock is held by a live holder exactly when ``held and not stale``.
    """

    path: str
    held: bool
    holder: Holder | None
    age_s: float | None
    stale: bool
    suspect: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Stable JSON shape for the CLI: path, held, stale, suspect, reason, age_s, holder."""
        return {
            "path": self.path,
            "held": self.held,
            "stale": self.stale,
            "suspect": self.suspect,
            "reason": self.reason,
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "holder": None if self.holder is None else self.holder.as_dict(),
        }


class _Snapshot:
    """The lock path as read once: which inode it is and what its lock.info says.

    (A plain class: it is internal, and a dataclass costs start-up time on every call.)
    """

    __slots__ = ("exists", "holder", "ident", "info", "mtime", "problem", "raw")

    def __init__(self, exists: bool, *, ident: tuple[int, int] | None = None,
                 mtime: float = 0.0, info: str = "missing", raw: bytes | None = None,
                 problem: str = "", holder: Holder | None = None) -> None:
        self.exists = exists
        self.ident = ident  # (st_dev, st_ino) of the lock folder
        self.mtime = mtime
        self.info = info  # "ok" | "missing" | "empty" | "unreadable"
        self.raw = raw
        self.problem = problem
        self.holder = holder

    def same_lock(self, other: _Snapshot) -> bool:
        return (
            self.exists == other.exists
            and self.ident == other.ident
            and self.info == other.info
            and self.raw == other.raw
        )


class _LockMoved(Exception):
    """The lock changed or vanished between being judged and being moved aside."""


class _Unreadable(Exception):
    """lock.info is there but is not a record we can read; the message says why."""


def _read_info(dfd: int) -> tuple[str, bytes | None, str, Holder | None]:
    """(info state, raw bytes, problem, holder) for lock.info in an open lock folder.

    Never follows a link, never blocks on a FIFO, never reads more than 4 KiB.
    """
    raw: bytes | None = None
    try:
        raw = _read_info_bytes(dfd)
        if raw is None or not raw:
            return ("missing" if raw is None else "empty"), raw, "", None
        try:
            return "ok", raw, "", Holder.parse(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _Unreadable("lock.info is not a valid record (not UTF-8 text)") from exc
        except BadInput as exc:
            raise _Unreadable(f"lock.info is not a valid record ({exc})") from exc
    except _Unreadable as exc:
        return "unreadable", raw, str(exc), None


def _read_info_bytes(dfd: int) -> bytes | None:
    """The bytes of lock.info, None if there is none; _Unreadable if it is not a file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(INFO_NAME, flags, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Unreadable("lock.info is a symbolic link") from exc
        raise _Unreadable(f"lock.info cannot be opened ({exc.strerror})") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _Unreadable("lock.info is a folder")
        if not stat.S_ISREG(mode):
            raise _Unreadable("lock.info is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_INFO_BYTES:
            chunk = os.read(fd, MAX_INFO_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _Unreadable(f"lock.info cannot be read ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if size > MAX_INFO_BYTES:
        raise _Unreadable(f"lock.info is longer than {MAX_INFO_BYTES} bytes")
    return b"".join(chunks)


def _snapshot(path: str) -> _Snapshot:
    """Read the lock at path once: its inode and its lock.info, never following a link."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return _Snapshot(exists=False)
    except OSError as exc:
        raise StorageError(f"cannot inspect the lock {path}: {exc.strerror}") from exc
    ident = (lst.st_dev, lst.st_ino)
    if not stat.S_ISDIR(lst.st_mode):
        return _Snapshot(True, ident=ident, mtime=lst.st_mtime, info="unreadable",
                         problem="the lock path is not a folder")
    try:
        dfd = os.open(path, _DIR_FLAGS)
    except FileNotFoundError:
        return _Snapshot(exists=False)
    except OSError as exc:
        return _Snapshot(True, ident=ident, mtime=lst.st_mtime, info="unreadable",
                         problem=f"the lock folder cannot be opened ({exc.strerror})")
    try:
        st = os.fstat(dfd)  # the folder actually opened is the one described
        info, raw, problem, holder = _read_info(dfd)
    finally:
        os.close(dfd)
    return _Snapshot(True, ident=(st.st_dev, st.st_ino), mtime=st.st_mtime, info=info, raw=raw,
                     problem=problem, holder=holder)


def _same_owner(recorded: Holder, me: Holder) -> bool:
    """Is the recorded holder the process ``me`` describes? Unknown fields do not count."""
    return (
        recorded.pid == me.pid
        and recorded.hostname == me.hostname
        and (recorded.start_ticks is None or recorded.start_ticks == me.start_ticks)
        and (recorded.boot_id is None or me.boot_id is None or recorded.boot_id == me.boot_id)
    )


def _describe(holder: Holder | None) -> str:
    if holder is None:
        return "an unknown holder"
    host = holder.hostname or "an unknown host"
    since = holder.timestamp or "an unknown time"
    return f"PID {holder.pid} on {host} since {since}"


class _Guard:
    """An exclusive flock on ``<lock>.guard`` for the length of one change to the lock."""

    def __init__(self, path: str, deadline: float) -> None:
        self._path = path
        self._deadline = deadline
        self._fd = -1

    def __enter__(self) -> _Guard:
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # flock needs no write
        try:
            self._fd = os.open(self._path, flags, 0o600)
            st = os.fstat(self._fd)
            if stat.S_IMODE(st.st_mode) != 0o600 and st.st_uid == os.geteuid():
                os.fchmod(self._fd, 0o600)  # files are 0600 whatever the umask
        except OSError as exc:
            if self._fd >= 0:
                os.close(self._fd)
            raise StorageError(
                f"cannot open the lock guard {self._path}: {exc.strerror}; "
                "check that its folder exists and is writable (or choose another --home)"
            ) from exc
        pause = 0.0002
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    return self  # no flock here: fall back to the bare mkdir protocol
                os.close(self._fd)
                raise StorageError(f"cannot lock {self._path}: {exc.strerror}") from exc
            else:
                return self
            if time.monotonic() >= self._deadline:
                os.close(self._fd)
                raise LockTimeout(
                    f"gave up waiting for the lock guard {self._path}: "
                    "a process changing the lock seems stopped"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # closing the descriptor drops the flock


# --- the lock ------------------------------------------------------------------------


class DirLock:
    """The exclusive inter-process lock at ``path`` (a folder; ``upgrade.lock.d`` in a home).

    ``timeout_s``: age after which a lock whose holder cannot be judged (another host,
    an unreadable lock.info) may be taken over, and after which a live local holder is
    reported as suspect. ``grace_s``: how long a lock folder without lock.info counts
    as being created. ``on_break(event)`` is called after every break, automatic or
    forced, with ``previous, age_s, reason, forced, by_pid, stale, path``.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        grace_s: float = DEFAULT_GRACE_S,
        on_break: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        if not isinstance(path, str | Path) or not str(path) or Path(path).name in ("", ".", ".."):
            raise BadInput(f"lock path must name a folder, not {path!r}")
        if on_break is not None and not callable(on_break):
            raise BadInput("on_break must be callable")
        self.path = Path(path)
        self.timeout_s = _check_seconds("timeout_s", timeout_s, MAX_TIMEOUT_S)
        self.grace_s = _check_seconds("grace_s", grace_s, MAX_GRACE_S)
        self.on_break = on_break
        self._path = os.fspath(self.path)
        self._guard_path = self._path + ".guard"

    def __repr__(self) -> str:
        return f"DirLock({self._path!r}, timeout_s={self.timeout_s:g}, grace_s={self.grace_s:g})"

    # public operations

    def acquire(self, owner_pid: int | None = None, *, wait_s: float = 0.0,
                poll_s: float = 0.05) -> Holder:
        """Take the lock for ``owner_pid`` (default: this process) and return its record.

        Re-entrant: if that very process (PID, start ticks, boot) holds it, succeed.
        A stale lock is taken over on the way. Held by a live process: LockHeld at once
        when ``wait_s`` is 0, otherwise retry every ``poll_s`` and raise LockTimeout.
        """
        pid = _check_pid(owner_pid)
        wait = _check_seconds("wait_s", wait_s, MAX_WAIT_S)
        poll = max(_check_seconds("poll_s", poll_s, MAX_POLL_S), MIN_POLL_S)
        me = self._identity(pid)
        deadline = time.monotonic() + wait
        while True:
            outcome = self._attempt(me, max(deadline, time.monotonic() + GUARD_WAIT_S))
            if isinstance(outcome, Holder):
                return outcome
            now = time.monotonic()
            if now >= deadline:
                message = self._held_message(outcome)
                if wait > 0:
                    raise LockTimeout(f"timed out after {wait:g}s: {message}", outcome.holder)
                raise LockHeld(message, outcome.holder)
            time.sleep(min(poll, deadline - now))

    def release(self, owner_pid: int | None = None) -> bool:
        """Remove the lock if ``owner_pid`` (default: this process) holds it.

        Returns False when nothing holds it; raises NotLockOwner, leaving the lock in
        place, when someone else does.
        """
        return self._release(self._identity(_check_pid(owner_pid)))

    def _release(self, me: Holder) -> bool:
        """release() for an owner identity already checked."""
        with _Guard(self._guard_path, time.monotonic() + GUARD_WAIT_S):
            snap = _snapshot(self._path)
            if not snap.exists:
                return False
            if snap.holder is None or not _same_owner(snap.holder, me):
                raise NotLockOwner(
                    f"PID {me.pid} does not hold the lock {self._path}; "
                    f"it is held by {_describe(snap.holder)}"
                )
            try:
                self._remove(snap, "released")
            except _LockMoved:
                return False  # only a process outside this protocol can get here
        return True

    def is_held(self) -> bool:
        """True when a live (not stale) holder has the lock."""
        st = self.status()
        return st.held and not st.stale

    def status(self) -> LockStatus:
        """Look at the lock without changing anything (and without the guard)."""
        return self._judge(_snapshot(self._path), time.time())

    def check_stale(self) -> bool:
        """Remove the lock if it is stale; True if this call removed one."""
        if not self.status().stale:
            return False
        with _Guard(self._guard_path, time.monotonic() + GUARD_WAIT_S):
            snap = _snapshot(self._path)
            judged = self._judge(snap, time.time())
            if not judged.stale:
                return False  # someone else took it over first
            try:
                self._remove(snap, "stale")
            except _LockMoved:
                return False
        self._notify(judged, judged.reason, forced=False, by_pid=os.getpid())
        return True

    def break_lock(self, reason: str) -> Holder | None:
        """Remove the lock whatever its state, even from a live holder.

        ``reason`` is required and goes to ``on_break`` (which also gets the age and the
        judgement). Returns the record of the holder it removed; None when there was no
        lock, or when its lock.info could not be read.
        """
        text = _check_reason(reason)
        with _Guard(self._guard_path, time.monotonic() + GUARD_WAIT_S):
            for _ in range(3):
                snap = _snapshot(self._path)
                if not snap.exists:
                    return None
                judged = self._judge(snap, time.time())
                try:
                    self._remove(snap, "stale")
                except _LockMoved:
                    continue
                break
            else:
                raise LockError(f"the lock {self._path} kept changing while breaking it; "
                                "try again")
        self._notify(judged, text, forced=True, by_pid=os.getpid())
        return judged.holder

    # internals

    def _identity(self, pid: int) -> Holder:
        """The record this process would write for ``pid`` (timestamp left empty)."""
        uid = os.geteuid()
        if pid != os.getpid():
            with contextlib.suppress(OSError):
                uid = Path(f"/proc/{pid}").stat().st_uid  # the owner's own user
        return Holder(pid, None, local_hostname(), _user_name(uid),
                      process_start_ticks(pid), local_boot_id())

    def _attempt(self, me: Holder, guard_deadline: float) -> Holder | LockStatus:
        """One try under the guard: our record on success, else the blocking lock's status."""
        broken: LockStatus | None = None
        outcome: Holder | LockStatus
        with _Guard(self._guard_path, guard_deadline):
            outcome = self._judge(_Snapshot(exists=False), time.time())
            for _ in range(3):
                try:
                    self.path.mkdir(mode=0o700)
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise StorageError(
                        f"cannot create the lock folder {self._path}: {exc.strerror}; "
                        "check that its parent exists and is writable (or choose another --home)"
                    ) from exc
                else:
                    outcome = self._write_info(me)
                    break
                snap = _snapshot(self._path)
                if not snap.exists:
                    continue
                if snap.holder is not None and _same_owner(snap.holder, me):
                    return snap.holder  # re-entrant
                outcome = self._judge(snap, time.time())
                if not outcome.stale:
                    break
                try:
                    self._remove(snap, "stale")
                except _LockMoved:
                    continue
                broken = outcome
        if broken is not None:
            # The break happened whether or not we got the lock after it: report it.
            try:
                self._notify(broken, broken.reason, forced=False, by_pid=me.pid)
            except BaseException:
                # Give the lock back, so that a caller who sees the exception does not
                # hold a lock it was never handed; the stale lock stays broken.
                if isinstance(outcome, Holder):
                    self._release(me)
                raise
        return outcome

    def _write_info(self, me: Holder) -> Holder:
        """Fill the folder just made: mode 0700, then lock.info (0600) by rename."""
        try:
            try:
                dfd = os.open(self._path, _DIR_FLAGS)
            except PermissionError:
                self.path.chmod(0o700)  # an umask that took the owner's own bits
                dfd = os.open(self._path, _DIR_FLAGS)
        except OSError as exc:
            raise StorageError(f"cannot open the lock folder {self._path}: {exc.strerror}") from exc
        holder = replace(me, timestamp=_utc_now())
        tmp = f".{INFO_NAME}.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            os.fchmod(dfd, 0o700)  # whatever the umask
            data = (holder.format() + "\n").encode("utf-8")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=dfd)
            try:
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, INFO_NAME, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            os.close(dfd)
            self._discard(self._path)  # under the guard, the folder is still ours
            raise StorageError(f"cannot write {self._path}/{INFO_NAME}: {exc.strerror}") from exc
        os.close(dfd)
        return holder

    def _remove(self, snap: _Snapshot, label: str) -> None:
        """Take the judged lock out of the way: rename it aside, re-check, delete.

        Under the guard nothing in this protocol can change the lock between the
        judgement and the rename; the re-check catches a process outside it (the old
        bash library) and puts what it moved back.
        """
        aside = f"{self._path}.{label}.{os.getpid()}.{os.urandom(6).hex()}"
        try:
            self.path.rename(aside)
        except FileNotFoundError as exc:
            raise _LockMoved from exc
        except OSError as exc:
            raise StorageError(f"cannot move the lock {self._path} aside: {exc.strerror}") from exc
        if not _snapshot(aside).same_lock(snap):
            if os.path.lexists(self._path):
                raise LockError(
                    f"the lock {self._path} changed while it was being removed and was "
                    f"taken again; the moved folder is kept at {aside} for inspection"
                )
            try:
                Path(aside).rename(self.path)
            except OSError as exc:
                raise LockError(f"cannot put the lock {self._path} back from {aside}: "
                                f"{exc.strerror}") from exc
            raise _LockMoved
        self._discard(aside)

    @staticmethod
    def _discard(path: str) -> None:
        """Delete a lock that is no longer at the lock path, never following a link."""
        where = Path(path)
        try:
            if not stat.S_ISDIR(where.lstat().st_mode):
                where.unlink()
                return
            with contextlib.suppress(OSError):
                (where / INFO_NAME).unlink()  # a link here is removed, not followed
            where.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            # Only odd leftovers get here (a folder named lock.info, a temp file), so
            # shutil is imported on this rare path and not on every start-up.
            import shutil  # noqa: PLC0415

            shutil.rmtree(path, ignore_errors=True)  # never follows links inside

    def _judge(self, snap: _Snapshot, now: float) -> LockStatus:
        if not snap.exists:
            return LockStatus(self._path, False, None, None, False, False, "not held")
        holder = snap.holder
        born = _parse_utc(holder.timestamp) if holder and holder.timestamp else None
        age = max(0.0, now - (snap.mtime if born is None else born))
        stale = suspect = False
        if holder is None and snap.info in ("missing", "empty"):
            if age > self.grace_s:
                stale = True
                reason = (f"lock.info has been {snap.info} for {age:.1f}s "
                          f"(grace {self.grace_s:g}s): its creator died between mkdir "
                          "and writing it")
            else:
                reason = f"being created: lock.info is {snap.info} (grace {self.grace_s:g}s)"
        else:
            if holder is None:
                verdict, why = "unknown", f"{snap.problem}, so its holder cannot be judged"
            else:
                verdict, why = self._liveness(holder)
            if verdict == "stale":
                stale, reason = True, why
            elif verdict == "live":
                suspect = age > self.timeout_s
                reason = why
                if suspect:
                    reason += (f"; suspect: held for {age:.0f}s, longer than the timeout "
                               f"({self.timeout_s:g}s); only a forced break removes it")
            elif age > self.timeout_s:
                stale = True
                reason = f"{why}; older than the timeout ({age:.0f}s > {self.timeout_s:g}s)"
            else:
                reason = f"{why}; counts as held until it is {self.timeout_s:g}s old"
        return LockStatus(self._path, True, holder, age, stale, suspect, reason)

    @staticmethod
    def _liveness(h: Holder) -> tuple[str, str]:
        """("live" | "stale" | "unknown", why) for a parsed record; see docs/lock.md."""
        if h.hostname is None or h.hostname != local_hostname():
            return "unknown", f"held by PID {h.pid} on another host ({h.hostname or 'unnamed'})"
        boot = local_boot_id()
        if h.boot_id is not None and boot is not None and h.boot_id != boot:
            return "stale", f"PID {h.pid} took it before this host last rebooted (boot id differs)"
        state = _pid_state(h.pid)
        ticks = None if state == "gone" else process_start_ticks(h.pid)
        if state == "gone":
            verdict, why = "stale", f"PID {h.pid} no longer exists"
        elif h.start_ticks is not None and ticks is not None and ticks != h.start_ticks:
            verdict, why = "stale", (f"PID {h.pid} now belongs to another process (started "
                                     f"at tick {ticks}, the lock records {h.start_ticks}): "
                                     "PID reuse")
        elif h.start_ticks is not None and ticks is not None:
            verdict, why = "live", f"held by live PID {h.pid} on this host"
        elif state == "foreign":
            verdict, why = "unknown", (f"PID {h.pid} exists but belongs to another user and "
                                       "cannot be told apart from a reused PID")
        elif h.start_ticks is None:
            verdict, why = "live", f"held by live PID {h.pid} on this host (old 4-field record)"
        else:
            verdict, why = "live", f"held by live PID {h.pid} on this host (start not checkable)"
        return verdict, why

    def _held_message(self, st: LockStatus) -> str:
        if st.holder is None:
            return f"lock {self._path} held by an unknown holder: {st.reason}"
        message = f"lock held by {_describe(st.holder)}"
        return f"{message} ({st.reason})" if st.suspect else message

    def _notify(self, judged: LockStatus, reason: str, *, forced: bool, by_pid: int) -> None:
        if self.on_break is None:
            return
        self.on_break({
            "previous": None if judged.holder is None else judged.holder.as_dict(),
            "age_s": None if judged.age_s is None else round(judged.age_s, 3),
            "reason": reason,
            "forced": forced,
            "by_pid": by_pid,
            "stale": judged.stale,
            "path": self._path,
        })
