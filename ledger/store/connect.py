"""Opening a ledger: the driver its location calls for, and a schema that is current.

A SQLite file goes through the stdlib driver (the per-step path), a PostgreSQL URL
through psycopg 3 (``ledger.store.postgres``), any other URL through SQLAlchemy.
Opening checks the schema revision with one query; Alembic is imported only when
the ledger is new or behind. A new SQLite ledger is built aside and renamed into place
whole (``migrate.create``): no one ever sees an empty or half-migrated ledger.db,
even when its creator is interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path

from ledger.core.host import Identity
from ledger.errors import BadInput, NoLedger, SchemaTooNew, StorageError
from ledger.store import urls
from ledger.store.database import SCHEMA_REVISION, Database


def open_database(url: str | None, sqlite_path: Path | None, identity: Identity, *,
                  create: bool = True) -> Database:
    """Open the ledger at *url* (a PostgreSQL or any SQLAlchemy URL) or the SQLite
    file *sqlite_path* for the host *identity*, migrating it first when it is behind.
    A ledger that does not exist yet is created (the schema of a new database, a new
    SQLite file, built aside); with *create* False it is ``NoLedger`` instead, and
    nothing is made."""
    if url is None:
        assert sqlite_path is not None
        if not _has_file(sqlite_path):
            if not create:
                raise _no_ledger(str(sqlite_path))
            _create_sqlite(sqlite_path, identity)
    db = database_at(url, sqlite_path)
    db.identity = identity
    try:
        _ensure_schema(db, sqlite_path if url is None else None, create=create)
    except BaseException:
        db.close()
        raise
    return db


def prepare(db: Database, *, create: bool = True) -> Database:
    """*db* (a server database opened by its driver) with a current schema: created
    when new (unless *create* is False: ``NoLedger``), migrated when behind. It is
    closed when that fails."""
    try:
        _ensure_schema(db, None, create=create)
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


def _create_sqlite(path: Path, identity: Identity) -> None:
    from ledger.store import migrate  # noqa: PLC0415 (Alembic only for a new ledger)

    try:
        migrate.create(path, host=identity.name)
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
    target = f"sqlite:///{sqlite_path}" if sqlite_path is not None else db.connect_url
    try:
        migrate.upgrade(target, sqlite_path=sqlite_path, host=db.identity.name)
    except Exception as exc:
        raise StorageError(f"cannot migrate the ledger at {db.url}: "
                           f"{urls.scrub(str(exc), target)}") from exc
