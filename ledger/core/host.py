"""Facts about this host and its processes: names, the machine, the boot, whether a
PID lives.

The lock judges its holder with these, the home cleans up after dead writers with
them, and the ledger records who made each change and which host it belongs to.
Stdlib only, and only cheap modules: every per-step CLI call reads some of them.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Mapping
from typing import NamedTuple

from ledger.errors import BadInput

_BOOT_ID_CHARS = frozenset("0123456789abcdefABCDEF-")
_boot_id_cache: list[str | None] = []
_user_names: dict[int, str] = {}
_machine_id_cache: list[str | None] = []
_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_MACHINE_ID = re.compile(r"[0-9a-fA-F-]{16,64}")
#: A host name as the ledger accepts it: a DNS-like name, up to 255 characters.
_HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


class Identity(NamedTuple):
    """Who owns the rows a ledger writes: a host name, and the machine that claimed it
    (None where the machine has no id)."""

    name: str
    machine_id: str | None


def identity(env: Mapping[str, str], name: str | None = None) -> Identity:
    """This host's identity: *name*, else ``LEDGER_HOST``, else the kernel's node name;
    the machine id is ``LEDGER_MACHINE_ID`` when set (a container without its own
    /etc/machine-id), else ``machine_id()``."""
    chosen = name or env.get("LEDGER_HOST") or hostname()
    machine = env.get("LEDGER_MACHINE_ID") or machine_id()
    if machine is not None and not _MACHINE_ID.fullmatch(machine):
        raise BadInput(f"LEDGER_MACHINE_ID {machine!r} is not a machine id (16-64 hex "
                       "digits or '-')")
    return Identity(check_host(chosen), machine)


def check_host(name: object) -> str:
    """A host name: letters, digits, '.', '_' and '-', starting with a letter or digit,
    at most 255 characters."""
    if not isinstance(name, str) or not _HOST_NAME.fullmatch(name):
        raise BadInput(f"host name {name!r} is not allowed; use letters, digits, '.', '_' "
                       "and '-' (starting with a letter or digit, at most 255 characters)")
    return name


def machine_id() -> str | None:
    """This machine's id, stable across reboots: /etc/machine-id, else
    /var/lib/dbus/machine-id; None where neither holds one (an empty or missing file,
    as in many containers)."""
    if not _machine_id_cache:
        value = None
        for path in _MACHINE_ID_FILES:
            try:
                with open(path, "rb") as fh:
                    text = fh.read(100).strip().decode("ascii")
            except (OSError, UnicodeDecodeError):
                continue
            if _MACHINE_ID.fullmatch(text):
                value = text.lower()
                break
        _machine_id_cache.append(value)
    return _machine_id_cache[0]


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
