"""The exclusive upgrade lock: a folder made with ``mkdir``, and a record of its holder.

``mkdir`` is the atomic primitive, as in the bash library this replaces: whoever
creates the lock folder holds the lock; ``lock.info`` inside names the holder
(``ledger.lock.record``). A lock is taken over only on proof that its holder is
gone; a live holder on this host is never evicted for age. Changes to the lock
folder run under the guard (``ledger.lock.guard``). See ``docs/lock.md``.

Stdlib only, and only cheap modules: this runs on every per-step CLI call.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledger.core import host
from ledger.core.values import Value
from ledger.errors import (
    BadInput,
    LockError,
    LockHeld,
    LockTimeout,
    NotLockOwner,
    StorageError,
)
from ledger.lock.guard import GUARD_WAIT_S, Guard
from ledger.lock.record import (
    INFO_NAME,
    PID_LIMIT,
    Holder,
    describe,
    local_hostname,
    parse_utc,
    read_info,
    same_owner,
    sanitize,
    utc_now,
)
from ledger.store.files import write_file_atomic

if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_TIMEOUT_S = 4 * 3600.0
DEFAULT_GRACE_S = 5.0

MAX_TIMEOUT_S = 30 * 86400.0
MAX_GRACE_S = 86400.0
MAX_WAIT_S = 86400.0
MAX_POLL_S = 60.0
MIN_POLL_S = 0.001
MAX_REASON_CHARS = 1024

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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
    if host.pid_state(owner_pid) == "gone":
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


class LockStatus(Value):
    """What a look at the lock found.

    ``present``: a lock folder is there. ``stale``: it may be taken over (its holder
    is proven gone, or cannot be judged and the lock is older than the timeout).
    ``held``: the one verdict every command gives, a lock there and not stale (what
    ``is_held`` answers). ``suspect``: its holder is a live process on this host but
    the lock is older than the timeout; reported, never removed automatically.
    ``reason`` says why, in words.
    """

    FIELDS = ("path", "present", "holder", "age_s", "stale", "suspect", "reason")
    __slots__ = FIELDS
    path: str
    present: bool
    holder: Holder | None
    age_s: float | None
    stale: bool
    suspect: bool
    reason: str

    def __init__(self, path: str, present: bool, holder: Holder | None,
                 age_s: float | None, stale: bool, suspect: bool, reason: str) -> None:
        self._set(path=path, present=present, holder=holder, age_s=age_s, stale=stale,
                  suspect=suspect, reason=reason)

    @property
    def held(self) -> bool:
        """A lock is there and its holder is not proven gone: the lock is held."""
        return self.present and not self.stale

    def as_dict(self) -> dict[str, Any]:
        """Stable JSON shape for the CLI: path, held, stale, suspect, reason, age_s, holder.

        ``held`` is the verdict (not stale); a stale lock says ``held: false, stale:
        true`` and still names the holder that left it.
        """
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
        info, raw, problem, holder = read_info(dfd)
    finally:
        os.close(dfd)
    return _Snapshot(True, ident=(st.st_dev, st.st_ino), mtime=st.st_mtime, info=info, raw=raw,
                     problem=problem, holder=holder)




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
        with Guard(self._guard_path, time.monotonic() + GUARD_WAIT_S):
            snap = _snapshot(self._path)
            if not snap.exists:
                return False
            if snap.holder is None or not same_owner(snap.holder, me):
                raise NotLockOwner(
                    f"PID {me.pid} does not hold the lock {self._path}; "
                    f"it is held by {describe(snap.holder)}"
                )
            try:
                self._remove(snap, "released")
            except _LockMoved:
                return False  # only a process outside this protocol can get here
        return True

    def is_held(self) -> bool:
        """True when a live (not stale) holder has the lock."""
        return self.status().held

    def status(self) -> LockStatus:
        """Look at the lock without changing anything (and without the guard)."""
        return self._judge(_snapshot(self._path), time.time())

    def check_stale(self) -> bool:
        """Remove the lock if it is stale; True if this call removed one."""
        if not self.status().stale:
            return False
        with Guard(self._guard_path, time.monotonic() + GUARD_WAIT_S):
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
        with Guard(self._guard_path, time.monotonic() + GUARD_WAIT_S):
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
        return Holder(pid, None, local_hostname(), sanitize(host.user_name(uid)) or "unknown",
                      host.start_ticks(pid), host.boot_id())

    def _attempt(self, me: Holder, guard_deadline: float) -> Holder | LockStatus:
        """One try under the guard: our record on success, else the blocking lock's status."""
        broken: LockStatus | None = None
        outcome: Holder | LockStatus
        with Guard(self._guard_path, guard_deadline):
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
                if snap.holder is not None and same_owner(snap.holder, me):
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
        holder = me.stamped(utc_now())
        try:
            os.fchmod(dfd, 0o700)  # whatever the umask
            write_file_atomic(Path(INFO_NAME), (holder.format() + "\n").encode("utf-8"),
                              dir_fd=dfd)
        except OSError as exc:  # StorageError included
            os.close(dfd)
            self._discard(self._path)  # under the guard, the folder is still ours
            cause = exc.__cause__ if isinstance(exc, StorageError) else exc
            raise StorageError(f"cannot write {self._path}/{INFO_NAME}: "
                               f"{getattr(cause, 'strerror', None) or cause}") from exc
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
        born = parse_utc(holder.timestamp) if holder and holder.timestamp else None
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
        """("live" | "stale" | "unknown", why) for a parsed record; see docs/lock.md.

        Which machine wrote the record is judged by its boot id when both sides have
        one (``same_host``): a renamed host keeps its locks. A different boot id is a
        reboot of this host when the name is the same, else another host.
        """
        name = local_hostname()
        boot = host.boot_id()
        renamed = ""
        if h.boot_id is not None and boot is not None:
            if h.boot_id != boot:
                if h.hostname != name:
                    return "unknown", (f"held by PID {h.pid} on another host "
                                       f"({h.hostname or 'unnamed'}; another boot id)")
                return "stale", (f"PID {h.pid} took it before this host last rebooted "
                                 "(boot id differs)")
            if h.hostname != name:
                renamed = f" (recorded as {h.hostname or 'unnamed'}: the same boot, renamed since)"
        elif h.hostname is None or h.hostname != name:
            return "unknown", f"held by PID {h.pid} on another host ({h.hostname or 'unnamed'})"
        verdict, why = DirLock._pid_liveness(h)
        return verdict, why + renamed

    @staticmethod
    def _pid_liveness(h: Holder) -> tuple[str, str]:
        """_liveness for a record of this host and boot: is its PID its process?"""
        state = host.pid_state(h.pid)
        ticks = None if state == "gone" else host.start_ticks(h.pid)
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
        message = f"lock held by {describe(st.holder)}"
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

