"""Opening a ledger: the driver its location calls for, and a schema that is current.

A SQLite file goes through the stdlib driver (the per-step path), any other URL
through SQLAlchemy. Opening checks the schema revision with one query; Alembic is
imported only when the ledger is new or behind.
"""

from __future__ import annotations

from pathlib import Path

from ledger.errors import SchemaTooNew, StorageError
from ledger.store.database import SCHEMA_REVISION, Database


def open_database(url: str | None, sqlite_path: Path | None) -> Database:
    """Open the ledger at *url* (any SQLAlchemy URL) or the SQLite file *sqlite_path*,
    migrating it first when it is new or behind."""
    db: Database
    if url is None:
        assert sqlite_path is not None
        from ledger.store.sqlite import SqliteDatabase  # noqa: PLC0415 (stdlib only)

        db = SqliteDatabase(sqlite_path)
    else:
        from ledger.store.alchemy import AlchemyDatabase  # noqa: PLC0415 (only --db URLs pay for SQLAlchemy)

        db = AlchemyDatabase(url)
    try:
        _ensure_schema(db, sqlite_path if url is None else None)
    except BaseException:
        db.close()
        raise
    return db


def _ensure_schema(db: Database, sqlite_path: Path | None) -> None:
    current = db.revision()
    if current == SCHEMA_REVISION:
        return
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
