"""Opening a ledger: the driver its location calls for, and a schema that is current.

A SQLite file goes through the stdlib driver (the per-step path), a PostgreSQL URL
through psycopg 3 (``ledger.store.postgres``), any other URL through SQLAlchemy.
Opening checks the schema revision with one query; Alembic is imported only when
the ledger is new or behind.
"""

from __future__ import annotations

from pathlib import Path

from ledger.core.host import Identity
from ledger.errors import BadInput, SchemaTooNew, StorageError
from ledger.store import urls
from ledger.store.database import SCHEMA_REVISION, Database


def open_database(url: str | None, sqlite_path: Path | None, identity: Identity) -> Database:
    """Open the ledger at *url* (a PostgreSQL or any SQLAlchemy URL) or the SQLite
    file *sqlite_path* for the host *identity*, migrating it first when it is new or
    behind."""
    db = database_at(url, sqlite_path)
    db.identity = identity
    try:
        _ensure_schema(db, sqlite_path if url is None else None)
    except BaseException:
        db.close()
        raise
    return db


def database_at(url: str | None, sqlite_path: Path | None) -> Database:
    """The database at *url* or *sqlite_path* through the driver it calls for, as it
    is (neither created nor migrated)."""
    db: Database
    if url is None:
        assert sqlite_path is not None
        from ledger.store.sqlite import SqliteDatabase  # noqa: PLC0415 (stdlib only)

        db = SqliteDatabase(sqlite_path)
    elif urls.is_postgres(url):
        if urls.scheme(url) not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise BadInput(f"--db: {urls.mask(url)}: PostgreSQL is reached through psycopg 3; "
                           "write postgresql://... or postgresql+psycopg://...")
        try:
            from ledger.store.postgres import PgDatabase  # noqa: PLC0415 (only PostgreSQL URLs)
        except ImportError as exc:
            raise BadInput("--db: a PostgreSQL ledger needs psycopg 3: install "
                           "'upgrade-ledger[postgres]'") from exc
        db = PgDatabase(url)
    else:
        from ledger.store.alchemy import AlchemyDatabase  # noqa: PLC0415 (only --db URLs pay for SQLAlchemy)

        db = AlchemyDatabase(url)
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
    target = f"sqlite:///{sqlite_path}" if sqlite_path is not None else db.connect_url
    try:
        migrate.upgrade(target, sqlite_path=sqlite_path, host=db.identity.name)
    except Exception as exc:
        raise StorageError(f"cannot migrate the ledger at {db.url}: "
                           f"{urls.scrub(str(exc), target)}") from exc
