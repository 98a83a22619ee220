"""Files the ledger writes: private folders, and atomic replacement of a file.

Every file the ledger writes outside the database goes through ``write_file_atomic``
(views, the metrics textfile, ``lock.info``): readers see the old file or the new
one, whole, never half a line, and never through a planted symbolic link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ledger.errors import StorageError

DIR_MODE = 0o700
FILE_MODE = 0o600


def write_all(fd: int, data: bytes | Sequence[bytes | memoryview]) -> None:
    """Write every byte of *data* (one buffer or a sequence of pieces) to *fd*,
    looping where ``os.write`` writes less than it was given."""
    for piece in (data,) if isinstance(data, bytes) else data:
        view = memoryview(piece)
        while view:
            view = view[os.write(fd, view):]


def write_file_atomic(target: Path, data: bytes | Sequence[bytes | memoryview], *,
                      temp_dir: Path | None = None, mode: int = FILE_MODE,
                      dir_fd: int | None = None) -> None:
    """Replace *target* with *data* so that readers see the old or the new file, whole.

    A new temp file in *temp_dir* (exclusive create, no link following, *mode*),
    fsync, rename over the target (a symlink planted there is replaced, never
    followed), fsync the folder so the rename itself is durable. *data* may be a
    sequence of pieces, written one after the other (a patched state.json is,
    without a copy of it). *temp_dir* (default: the target's folder) must be on the
    target's filesystem. With *dir_fd*, *target* is a name in that open folder and
    the temp file is made beside it: a folder swapped under the path is never written.
    """
    # os.urandom is what secrets.token_hex reads; importing secrets (hashlib,
    # OpenSSL) would cost every per-step CLI call several milliseconds.
    name = f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    temp = Path(name) if dir_fd is not None else (temp_dir or target.parent) / name
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        raise _storage_error(target, exc) from exc
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if dir_fd is not None:
            os.fsync(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise _storage_error(target, exc) from exc
    if dir_fd is None:
        fsync_dir(target.parent)


def make_private_dir(folder: Path, *, follow: bool = False) -> None:
    """mkdir -p with mode 0700 for what it creates, whatever the umask. A symbolic
    link is refused unless *follow* (then it must lead to a folder)."""
    try:
        _mkdirs(folder)
        if (folder.is_symlink() and not follow) or not folder.is_dir():
            what = "a symbolic link, not a folder" if folder.is_symlink() else "not a folder"
            raise StorageError(f"ledger folder {folder} is {what}; choose another home with "
                               "--home DIR (or LEDGER_HOME)")
        st = folder.stat()
        if st.st_uid == os.geteuid() and st.st_mode & 0o777 != DIR_MODE:
            folder.chmod(DIR_MODE)
    except StorageError:
        raise  # already says what is wrong (StorageError is an OSError too)
    except OSError as exc:
        raise StorageError(
            f"cannot create ledger folder {folder} ({exc.strerror or exc}); "
            "choose another home with --home DIR (or LEDGER_HOME)"
        ) from exc


def private_subdir(base: Path, folder: Path, *, create: bool = True) -> Path:
    """*folder* (below *base*), each folder from *base* down to it looked at with
    ``lstat`` and never followed: a symbolic link, or anything but a folder, at any of
    them is refused (StorageError, one line). With *create*, missing ones are made 0700
    (only those: an existing folder keeps its mode); without, the walk stops at the
    first missing one. *base* itself is the caller's to trust (a home root may be a
    link its operator made). Returns *folder*."""
    current = base
    for part in folder.relative_to(base).parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if not create:
                return folder
            _mkdir_private(current)
            st = os.lstat(current)
        except OSError as exc:
            raise StorageError(f"cannot use ledger folder {current} ({exc.strerror or exc})") \
                from exc
        if stat.S_ISLNK(st.st_mode):
            raise StorageError(f"ledger folder {current} is a symbolic link, not a folder: the "
                               "ledger never writes through one; remove it (and find out who "
                               "put it there)")
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"ledger folder {current} is not a folder; move it aside")
    return folder


def _mkdir_private(folder: Path) -> None:
    try:
        folder.mkdir(mode=DIR_MODE)
    except FileExistsError:
        return  # made meanwhile (or planted): the caller looks at what is there
    except OSError as exc:
        raise StorageError(f"cannot create ledger folder {folder} ({exc.strerror or exc}); "
                           "check free space and permissions") from exc
    # The umask may have removed bits; the folder is reopened without following a
    # link, so a link swapped in meanwhile is never chmod-ed through.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, DIR_MODE)
        finally:
            os.close(fd)


def open_private_file(path: Path, flags: int) -> int:
    """``os.open`` of a file the ledger writes in place (a log, a record), 0600 when
    made, never through a symbolic link: one planted there is refused (StorageError)."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(f"ledger file {path} is a symbolic link: the ledger never "
                               "writes through one; remove it (and find out who put it "
                               "there)") from None
        raise _storage_error(path, exc) from exc


def _mkdirs(folder: Path) -> None:
    """mkdir -p where every folder created, parents included, is 0700.

    ``Path.mkdir(parents=True)`` gives parents the umask's default mode, so under
    umask 000 the folders above a new home would be world-writable (anyone could
    move the home aside and plant another).
    """
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # a concurrent creator won; the caller checks what is there
        path.chmod(DIR_MODE)  # the umask may have removed bits; never adds any


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in *folder* durable."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _storage_error(folder, exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        raise _storage_error(folder, exc) from exc
    finally:
        os.close(fd)


def _storage_error(path: Path, exc: OSError) -> StorageError:
    return StorageError(f"cannot write {path} ({exc.strerror or exc}); "
                        "check free space and permissions")


def same_device(a: Path, b: Path) -> bool:
    """Whether two existing paths are on one filesystem (a rename between them works)."""
    try:
        return a.stat().st_dev == b.stat().st_dev
    except OSError:
        return False


def temp_writer_pid(name: str) -> int | None:
    """The PID embedded in a temp file name ``.<target>.<pid>.<random>.tmp``."""
    parts = name.split(".")
    if len(parts) >= 4 and parts[-1] == "tmp" and parts[-3].isdigit():
        return int(parts[-3])
    return None
