"""The database interface: transactions, reporting, and opening a ledger.

Two drivers implement it: ``ledger.store.sqlite`` (stdlib ``sqlite3``, the per-step
path, which never imports SQLAlchemy) and ``ledger.store.alchemy`` (any SQLAlchemy
URL). Statements are portable text with ``:name`` parameters, which both
``sqlite3`` and ``sqlalchemy.text()`` accept, so the SQL is written once.

``ledger.store.connect`` opens a ledger with the right driver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ledger.errors import (
    CorruptLedger,
)

#: The Alembic revision this code expects; a test checks it equals the migrations' head.
SCHEMA_REVISION = "0002"
#: How long a writer waits for another writer's transaction before giving up.
BUSY_TIMEOUT_S = 60.0
#: Bytes of WAL kept once it restarts after a checkpoint (docs/operations.md).
WAL_SIZE_LIMIT = 4 * 1024 * 1024
#: How long a reporting query may run (``upgrade-ledger sql --timeout``) by default.
REPORT_TIMEOUT_S = 30.0
#: The largest text or blob a reporting query may produce in one cell: a row is held
#: in memory whole, so this bounds what one row can cost.
REPORT_MAX_CELL = 16 * 1024 * 1024

Params = Mapping[str, Any]
Row = Any  # sqlite3.Row or SQLAlchemy RowMapping: both support row["column"]


class Rows:
    """The result of a reporting query, read as it streams: ``columns``, then the rows
    (tuples) by iterating. Nothing is collected: the query runs as rows are read.
    Close it, or use it in a ``with`` block, to end the query and free its connection.
    """

    def __init__(self, columns: list[str], rows: Iterator[tuple[Any, ...]],
                 close: Callable[[], None]) -> None:
        self.columns = columns
        self._rows = rows
        self._close = close

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self._rows

    def close(self) -> None:
        """End the query (idempotent)."""
        close, self._close = self._close, lambda: None
        close()

    def __enter__(self) -> Rows:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

class Tx(ABC):
    """A transaction in progress: run statements, fetch rows."""

    @abstractmethod
    def execute(self, sql: str, params: Params | None = None) -> int:
        """Run a statement; return the number of rows it changed."""

    @abstractmethod
    def all(self, sql: str, params: Params | None = None) -> list[Row]:
        """Every row of a query."""

    def one(self, sql: str, params: Params | None = None) -> Row | None:
        """The first row of a query, or None."""
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Params | None = None) -> Any:
        """The first column of the first row, or None."""
        row = self.one(sql, params)
        return None if row is None else row[0]


class Database(ABC):
    """A ledger database: write and read transactions, and read-only reporting."""

    url: str
    dialect: str

    @abstractmethod
    def write(self) -> Any:
        """Context manager: a transaction that holds the write lock from its start."""

    @abstractmethod
    def read(self) -> Any:
        """Context manager: a consistent read-only snapshot."""

    @abstractmethod
    def report(self, sql: str, params: Params | None = None, *,
               timeout_s: float | None = REPORT_TIMEOUT_S) -> Rows:
        """Start one read-only statement and stream its rows. Writes and settings are
        refused before it runs; past *timeout_s* (None: no limit) it is stopped with
        ``QueryTimeout``; Ctrl-C stops it with ``KeyboardInterrupt``."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""

    def revision(self) -> str | None:
        """The Alembic revision of the ledger, or None for an empty database."""
        with self.read() as tx:
            try:
                return tx.scalar("SELECT version_num FROM alembic_version")  # type: ignore[no-any-return]
            except Exception as exc:
                if not is_missing_table(exc):
                    raise
        # No alembic_version: a new database, or a database that is not a ledger.
        if self.table_count():
            raise CorruptLedger(
                f"{self.url} is a database but not a ledger (no schema revision); "
                "point --home or --db at a ledger"
            )
        return None

    @abstractmethod
    def table_count(self) -> int:
        """How many tables the database holds (0 for a new one)."""

    def verify(self) -> None:  # noqa: B027 (an optional hook: a no-op by default)
        """Raise ``CorruptLedger`` when the database fails a quick integrity check.

        Too slow for every step (it reads the whole file), so it runs where building
        on a damaged ledger would do harm: before a resume. A server database (the
        SQLAlchemy path) checks itself; nothing to do here.
        """


def is_missing_table(exc: BaseException) -> bool:
    text = str(exc)
    return "no such table" in text or "does not exist" in text or "UndefinedTable" in text
