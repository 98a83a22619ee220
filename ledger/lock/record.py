"""The ``lock.info`` record: one line naming the lock's holder, and how it is read.

``PID|TIMESTAMP|HOSTNAME|USER|START_TICKS|BOOT_ID``: the old bash library's four
fields, then the holder's start time (field 22 of ``/proc/PID/stat``) and the
kernel's boot id. A record with only the first four fields (the old library's) is
still understood. Reading never follows a link, never blocks on a FIFO and never
reads more than 4 KiB.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Any

from ledger.core import host
from ledger.core.values import Value
from ledger.errors import BadInput

INFO_NAME = "lock.info"
MAX_INFO_BYTES = 4096  # a lock.info longer than this is not read, it is "unreadable"
PID_LIMIT = 4194304  # the kernel's PID_MAX_LIMIT: no PID is larger
MAX_FIELD_CHARS = 255

_TS_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_DIGITS = frozenset("0123456789")
_BOOT_ID_CHARS = frozenset("0123456789abcdefABCDEF-")
_UNSAFE = {**dict.fromkeys(range(32), "_"), ord("|"): "_", 127: "_"}


def sanitize(value: str) -> str:
    """Make a value safe as one lock.info field: no separator, no control characters."""
    return value.translate(_UNSAFE)[:MAX_FIELD_CHARS]


def local_hostname() -> str:
    """This host's name as a lock.info field."""
    return sanitize(host.hostname()) or "unknown"


def utc_now() -> str:
    return time.strftime(_TS_FORMAT, time.gmtime())


def parse_utc(ts: str) -> float | None:
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



class Holder(Value):
    """Who holds the lock: one parsed lock.info line.

    A record written by the old bash library has only the first four fields; the
    missing ones are None. Empty fields are None too.
    """

    FIELDS = ("pid", "timestamp", "hostname", "user", "start_ticks", "boot_id")
    __slots__ = FIELDS
    pid: int
    timestamp: str | None
    hostname: str | None
    user: str | None
    start_ticks: int | None
    boot_id: str | None

    def __init__(self, pid: int, timestamp: str | None = None, hostname: str | None = None,
                 user: str | None = None, start_ticks: int | None = None,
                 boot_id: str | None = None) -> None:
        self._set(pid=pid, timestamp=timestamp, hostname=hostname, user=user,
                  start_ticks=start_ticks, boot_id=boot_id)

    def stamped(self, timestamp: str) -> Holder:
        """The same holder with another timestamp."""
        return Holder(self.pid, timestamp, self.hostname, self.user, self.start_ticks,
                      self.boot_id)

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
        if ts and parse_utc(ts) is None:
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
            sanitize(self.timestamp or ""),
            sanitize(self.hostname or ""),
            sanitize(self.user or ""),
        ]
        if self.start_ticks is not None or self.boot_id is not None:
            ticks = "" if self.start_ticks is None else str(self.start_ticks)
            fields += [ticks, sanitize(self.boot_id or "")]
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


class Unreadable(Exception):
    """lock.info is there but is not a record we can read; the message says why."""


def read_info(dfd: int) -> tuple[str, bytes | None, str, Holder | None]:
    """(info state, raw bytes, problem, holder) for lock.info in an open lock folder.

    Never follows a link, never blocks on a FIFO, never reads more than 4 KiB.
    """
    raw: bytes | None = None
    try:
        raw = read_info_bytes(dfd)
        if raw is None or not raw:
            return ("missing" if raw is None else "empty"), raw, "", None
        try:
            return "ok", raw, "", Holder.parse(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise Unreadable("lock.info is not a valid record (not UTF-8 text)") from exc
        except BadInput as exc:
            raise Unreadable(f"lock.info is not a valid record ({exc})") from exc
    except Unreadable as exc:
        return "unreadable", raw, str(exc), None


def read_info_bytes(dfd: int) -> bytes | None:
    """The bytes of lock.info, None if there is none; Unreadable if it is not a file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(INFO_NAME, flags, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Unreadable("lock.info is a symbolic link") from exc
        raise Unreadable(f"lock.info cannot be opened ({exc.strerror})") from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise Unreadable("lock.info is a folder")
        if not stat.S_ISREG(mode):
            raise Unreadable("lock.info is not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_INFO_BYTES:
            chunk = os.read(fd, MAX_INFO_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise Unreadable(f"lock.info cannot be read ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if size > MAX_INFO_BYTES:
        raise Unreadable(f"lock.info is longer than {MAX_INFO_BYTES} bytes")
    return b"".join(chunks)



def same_host(recorded: Holder, me: Holder) -> bool:
    """Was the record written on the machine, and in the boot, that ``me`` describes?

    By boot id when both have one: a boot id names one boot of one machine, whatever
    the host has been called since (the name is for display). By host name only for a
    record without one (the old library's four fields).
    """
    if recorded.boot_id is not None and me.boot_id is not None:
        return recorded.boot_id == me.boot_id
    return recorded.hostname == me.hostname


def same_owner(recorded: Holder, me: Holder) -> bool:
    """Is the recorded holder the process ``me`` describes? Unknown fields do not count."""
    return (
        recorded.pid == me.pid
        and same_host(recorded, me)
        and (recorded.start_ticks is None or recorded.start_ticks == me.start_ticks)
    )


def describe(holder: Holder | None) -> str:
    if holder is None:
        return "an unknown holder"
    host = holder.hostname or "an unknown host"
    since = holder.timestamp or "an unknown time"
    return f"PID {holder.pid} on {host} since {since}"

