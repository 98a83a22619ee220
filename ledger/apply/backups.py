"""Backup artifacts: what a backup command leaves in ``$LEDGER_BACKUP_DIR``, measured
and hashed, so that a rollback can prove it restores exactly what was saved.

The artifact is the folder's regular files. Its checksum is the sha256 of a
manifest that lists, sorted by path (byte order), one line per file in
``sha256sum`` format: ``<sha256 of the file>  <path relative to the folder>``.
For file names without newlines or backslashes an operator can reproduce it with::

    cd "$DIR" && find . -type f -printf '%P\\0' | LC_ALL=C sort -z \\
        | xargs -0 sha256sum | sha256sum

Its size is the sum of the files' sizes. Symlinks and special files are refused:
a backup that points elsewhere cannot be verified. An empty folder is refused too:
the backup command made nothing to restore from.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from ledger.errors import StorageError

CHUNK = 1024 * 1024


def digest(folder: Path) -> tuple[int, str, int]:
    """``(size in bytes, sha256, number of files)`` of the backup in *folder*."""
    files: list[tuple[bytes, Path]] = []
    try:
        for root, dirs, names in os.walk(folder, onerror=_raise):
            for name in [*dirs, *names]:
                path = Path(root) / name
                mode = path.lstat().st_mode
                if stat.S_ISDIR(mode):
                    continue
                if not stat.S_ISREG(mode):
                    what = "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
                    raise StorageError(f"backup {folder}: {path.relative_to(folder)} is "
                                       f"{what}; a backup must be plain files")
                files.append((os.fsencode(path.relative_to(folder).as_posix()), path))
    except OSError as exc:
        raise StorageError(f"cannot read backup {folder} ({exc.strerror or exc})") from None
    if not files:
        raise StorageError(f"backup {folder} is empty: the backup command saved nothing "
                           "into $LEDGER_BACKUP_DIR")
    manifest = hashlib.sha256()
    size = 0
    for rel, path in sorted(files):
        file_hash, file_size = _hash_file(path)
        size += file_size
        manifest.update(file_hash.encode() + b"  " + rel + b"\n")
    return size, manifest.hexdigest(), len(files)


def _hash_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StorageError(f"cannot read backup file {path} ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _raise(exc: OSError) -> None:
    raise exc
