"""Opening a ledger: the driver its location calls for, and a schema that is current.

A SQLite file goes through the stdlib driver (the per-step path), any other URL
through SQLAlchemy. Opening checks the schema revision with one query; Alembic is
imported only when the ledger is new or behind. A new SQLite ledger is built aside
and renamed into place whole (``migrate.create``): no one ever sees an empty or
half-migrated ledger.db, even when its creator is interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path

from ledger.errors import NoLedger, SchemaTooNew, StorageError
from ledger.store.database import SCHEMA_REVISION, Database


def open_database(url: str | None, sqlite_path: Path | None, *,
                  create: bool = True) -> Database:
    """Open the ledger at *url* (any SQLAlchemy URL) or the SQLite file *sqlite_path*,
    migrating it first when it is behind. A ledger that does not exist yet is created
    (the schema of a new database, a new SQLite file); with *create* False it is
    ``NoLedger`` instead, and nothing is made."""
    db: Database
    if url is None:
        assert sqlite_path is not None
        from ledger.store.sqlite import SqliteDatabase  # noqa: PLC0415 (stdlib only)

        if not _has_file(sqlite_path):
            if not create:
                raise _no_ledger(str(sqlite_path))
            _create_sqlite(sqlite_path)
        db = SqliteDatabase(sqlite_path)
    else:
        from ledger.store.alchemy import AlchemyDatabase  # noqa: PLC0415 (only --db URLs pay for SQLAlchemy)

        db = AlchemyDatabase(url)
    try:
        _ensure_schema(db, sqlite_path if url is None else None, create=create)
    except BaseException:
        db.close()
        raise
    return db


def _has_file(path: Path) -> bool:
    """Whether *path* is there and not empty (an empty file holds no ledger: an older
    version's interrupted first start could leave one)."""
    try:
        return os.lstat(path).st_size > 0
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StorageError(f"cannot open {path} ({exc.strerror}); choose another home with "
                           "--home DIR (or LEDGER_HOME)") from exc


def _create_sqlite(path: Path) -> None:
    from ledger.store import migrate  # noqa: PLC0415 (Alembic only for a new ledger)

    try:
        migrate.create(path)
    except OSError as exc:  # StorageError included: it says what is wrong already
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"cannot create the ledger {path} ({exc.strerror or exc}); "
                           "check free space and permissions") from exc


def _no_ledger(where: str) -> NoLedger:
    return NoLedger(f"there is no ledger at {where}; check --home or --db (LEDGER_HOME, "
                    "LEDGER_DB_URL); a command that records something (init, apply) "
                    "creates it")


def _ensure_schema(db: Database, sqlite_path: Path | None, *, create: bool) -> None:
    current = db.revision()
    if current == SCHEMA_REVISION:
        return
    if current is None and not create:
        raise _no_ledger(db.url)
    from ledger.store import migrate  # noqa: PLC0415 (Alembic only for a new or old ledger)

    if current is not None and current not in migrate.known_revisions():
        raise SchemaTooNew(
            f"ledger schema {current} is newer than this upgrade-ledger knows "
            f"({SCHEMA_REVISION}); upgrade upgrade-ledger"
        )
    try:
        migrate.upgrade(db.url if sqlite_path is None else f"sqlite:///{sqlite_path}",
                        sqlite_path=sqlite_path)
    except Exception as exc:
        raise StorageError(f"cannot migrate the ledger at {db.url}: {exc}") from exc
