"""Facts about this host and its processes: names, the machine, the boot, whether a
PID lives.

A machine is identified by its machine id (and a boot of it by its boot id), never by
its name: a host can be renamed, and two machines can claim one name. The name is for
display. The lock judges its holder with these, the home cleans up after dead writers
with them, and the ledger records who made each change. Stdlib only, and only cheap
modules: every per-step CLI call reads some of them.
"""

from __future__ import annotations

import os
import pwd

_BOOT_ID_CHARS = frozenset("0123456789abcdefABCDEF-")
_boot_id_cache: list[str | None] = []
_machine_id_cache: list[str | None] = []
_HEX = frozenset("0123456789abcdef")
#: Where the machine id is kept: systemd's file, then D-Bus's (older systems).
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_user_names: dict[int, str] = {}


def hostname() -> str:
    """This host's name, as ``socket.gethostname()`` gives it (``uname`` is what it reads).

    os.uname() avoids importing socket (a few ms) on the per-step path; on Linux
    gethostname(2) is the uname nodename, so the two always agree.
    """
    return os.uname().nodename


def boot_id() -> str | None:
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


def machine_id() -> str | None:
    """This machine's id: 32 lower-case hex digits, set once when the system was
    installed and kept across reboots and renames (``/etc/machine-id``, else
    ``/var/lib/dbus/machine-id``); None where neither holds one."""
    if not _machine_id_cache:
        value = None
        for path in MACHINE_ID_FILES:
            try:
                with open(path, "rb") as fh:
                    text = fh.read(100).strip().decode("ascii").lower()
            except (OSError, UnicodeDecodeError):
                continue
            if len(text) == 32 and set(text) <= _HEX:  # "uninitialized" and the like: not one
                value = text
                break
        _machine_id_cache.append(value)
    return _machine_id_cache[0]


def user_name(uid: int | None = None) -> str:
    """The login name of *uid* (default: the effective user) from the password
    database, so that an unset ``USER`` is fine; "" when it has none."""
    uid = os.geteuid() if uid is None else uid
    if uid not in _user_names:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = os.environ.get("USER", "") if uid == os.geteuid() else ""
        _user_names[uid] = name
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


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.

    With the PID it names one process for the life of the boot: a reused PID has
    another start time.
    """
    st = _proc_stat(pid)
    return None if st is None else st[1]


def pid_state(pid: int) -> str:
    """"gone", "alive" (we may signal it) or "foreign" (it exists; kill gives EPERM).

    A zombie is gone: it has exited, only its parent has not collected it yet.
    """
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
        return "gone"
    return state


def pid_alive(pid: int) -> bool:
    """Whether process *pid* exists and has not exited (zombies count as exited)."""
    return pid_state(pid) != "gone"
