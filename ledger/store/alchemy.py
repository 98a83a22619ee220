"""The SQLAlchemy driver: any SQLAlchemy URL, running the ledger's own SQL text.

Used for ``--db URL`` other than PostgreSQL (``ledger.store.postgres`` serves
those), e.g. an ``sqlite+pysqlite://`` URL, and by the migrations. Importing this
module costs SQLAlchemy's start-up, so the default SQLite path never does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from ledger.errors import BadInput, CorruptLedger, StorageError
from ledger.store import urls
from ledger.store.database import BUSY_TIMEOUT_S, Database, Params, Report, Row, Tx

_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*|/\*.*?\*/)*", re.DOTALL)


def make_engine(url: str, *, foreign_keys: bool = True) -> Engine:
    """An engine with the ledger's connection settings for *url*'s dialect.

    Migrations turn SQLite's *foreign_keys* off: rebuilding a table drops it, and
    with them on, dropping a table deletes (cascades to) the rows that refer to it.
    """
    try:
        engine = create_engine(urls.alchemy(url))
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise BadInput(f"--db: cannot use {urls.mask(url)} "
                       f"({urls.scrub(str(exc), url)})") from exc
    if engine.dialect.name == "sqlite":
        _sqlite_settings(engine, foreign_keys)
    return engine


def _sqlite_settings(engine: Engine, foreign_keys: bool) -> None:
    """Give pysqlite the same settings as the stdlib path (see ledger.db)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # Every transaction takes the write lock up front, as BEGIN IMMEDIATE does on
        # the stdlib path, so read-validate-write is never overtaken.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class _AlchemyTx(Tx):
    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self._connection = connection

    def execute(self, sql: str, params: Params | None = None) -> int:
        return self._connection.execute(text(sql), self.bind(params)).rowcount

    def insert(self, sql: str, params: Params | None = None) -> int:
        if self._connection.dialect.name == "sqlite":
            return int(self._connection.execute(text(sql), self.bind(params)).lastrowid)
        return int(self._connection.execute(text(sql + " RETURNING id"),
                                            self.bind(params)).scalar_one())

    def all(self, sql: str, params: Params | None = None) -> list[Row]:
        result = self._connection.execute(text(sql), self.bind(params))
        return [_Row(row) for row in result]


class _Row:
    """A result row readable by column name and by position, as ``sqlite3.Row`` is:
    the shared SQL code does both (``row["state"]``, ``tx.scalar`` reads ``row[0]``)."""

    __slots__ = ("_row",)

    def __init__(self, row: Any) -> None:
        self._row = row

    def __getitem__(self, key: int | str) -> Any:
        return self._row[key] if isinstance(key, int) else self._row._mapping[key]

    def keys(self) -> list[str]:
        return list(self._row._mapping.keys())

    def __len__(self) -> int:
        return len(self._row)


class AlchemyDatabase(Database):
    """A ledger behind any SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.connect_url = url
        self.url = urls.mask(url)
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self.shared = self.dialect != "sqlite"
        try:
            self.engine.connect().close()
        except SQLAlchemyError as exc:
            raise StorageError(f"--db: cannot connect to {self.url} "
                               f"({urls.scrub(str(exc.__cause__ or exc), url)})") from exc

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Tx]:
        del write  # every transaction takes the write lock (see _sqlite_settings)
        try:
            with self.engine.begin() as connection:
                yield _AlchemyTx(connection)
        except OperationalError as exc:
            if "not a database" in str(exc) or "malformed" in str(exc):
                raise CorruptLedger(f"{self.url} is corrupt or not a ledger ({exc.orig})") from exc
            raise StorageError(f"{self.url}: {exc.orig}") from exc

    def report(self, sql: str, params: Params | None = None) -> Report:
        body = sql[_LEADING_COMMENTS.match(sql).end():]  # type: ignore[union-attr]
        if (body.split(None, 1) or [""])[0].upper() not in {"SELECT", "WITH", "EXPLAIN",
                                                             "VALUES"}:
            raise BadInput(
                "sql: only read-only queries are allowed (SELECT, WITH, EXPLAIN); "
                "the statement was refused before it ran"
            )
        with self.engine.connect() as connection:
            try:
                result = connection.execute(text(sql), dict(params or {}))
                columns = list(result.keys())
                rows = [tuple(r) for r in result]
            except DBAPIError as exc:
                raise BadInput(f"sql: {exc.orig}") from exc
            connection.rollback()
        return columns, rows

    def table_count(self) -> int:
        from sqlalchemy import inspect  # noqa: PLC0415 (rarely used)

        return len(inspect(self.engine).get_table_names())

    def close(self) -> None:
        self.engine.dispose()
