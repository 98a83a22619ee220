"""The guard: a short ``flock`` on ``<lock folder>.guard`` around each change to the lock.

Creating, taking over and releasing the lock folder each happen under it, for the
length of that one change. That is what makes a takeover race-free: the judgement
"this lock is stale" and the rename that removes it happen under the same guard, so
no other process can swap a fresh lock in between. Where the filesystem offers no
``flock``, the bare mkdir protocol is used.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from ledger.errors import LockTimeout, StorageError

#: The guard is held for microseconds; longer means a stopped process.
GUARD_WAIT_S = 10.0



class Guard:
    """An exclusive flock on ``<lock>.guard`` for the length of one change to the lock."""

    def __init__(self, path: str, deadline: float) -> None:
        self._path = path
        self._deadline = deadline
        self._fd = -1

    def __enter__(self) -> Guard:
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

