"""The database interface: transactions, reporting, and opening a ledger.

Two drivers implement it: ``ledger.store.sqlite`` (stdlib ``sqlite3``, the per-step
path, which never imports SQLAlchemy) and ``ledger.store.alchemy`` (any SQLAlchemy
URL). Statements are portable text with ``:name`` parameters, which both
``sqlite3`` and ``sqlalchemy.text()`` accept, so the SQL is written once.

``ledger.store.connect`` opens a ledger with the right driver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from ledger.core import clock
from ledger.core.host import Identity
from ledger.errors import CorruptLedger, HostClash

#: The Alembic revision this code expects; a test checks it equals the migrations' head.
SCHEMA_REVISION = "0006"
#: ``read(host=ALL_HOSTS)``: a transaction that sees every host's rows.
ALL_HOSTS = "*"
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
    """A transaction in progress: run statements, fetch rows.

    A transaction is scoped to one host: ``:host`` in any statement is bound to
    ``host`` (None when it reads every host's rows), so each statement says
    ``host = :host`` and no caller passes the host around. ``memo`` holds what the
    transaction learnt once and may reuse (the host's current upgrade).
    """

    host: str | None = None

    def __init__(self) -> None:
        self.memo: dict[Any, Any] = {}

    def bind(self, params: Params | None) -> dict[str, Any]:
        """*params* with ``host`` bound to the transaction's host (unless given)."""
        return {"host": self.host, **(params or {})}

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

    @abstractmethod
    def insert(self, sql: str, params: Params | None = None) -> int:
        """Run an INSERT into a table with an ``id`` key; return the new row's id."""

    def execute_many(self, sql: str, rows: Iterable[Params]) -> None:
        """Run one statement once per row of parameters (a driver may send them all
        at once)."""
        for params in rows:
            self.execute(sql, params)

    def insert_rows(self, table: str, columns: Sequence[str],
                    rows: Iterable[Sequence[Any]]) -> None:
        """Insert many rows of *columns* into *table* (a driver may stream them in
        bulk). Values are given whole: ``host`` is not bound for them."""
        names = ", ".join(columns)
        marks = ", ".join(f":c{i}" for i in range(len(columns)))
        self.execute_many(f"INSERT INTO {table} ({names}) VALUES ({marks})",
                          [{f"c{i}": v for i, v in enumerate(row)} for row in rows])


class Database(ABC):
    """A ledger database: write and read transactions, and read-only reporting.

    Transactions are in the scope of ``identity`` (this host's name and machine id):
    they see this host's rows, and a write registers the host on first use. On a
    ``shared`` database (a server many machines reach), a host name that another
    machine claimed is refused (``HostClash``); a local file belongs to whichever
    machine has it, so a moved or restored home takes the new machine's id.
    """

    #: Where the ledger is, fit to show (a password in a URL is masked).
    url: str
    #: Where the ledger is, to connect to (never shown).
    connect_url: str = ""
    dialect: str
    identity: Identity = Identity("localhost", None)
    shared: bool = False

    @abstractmethod
    def _transaction(self, *, write: bool) -> Any:
        """Context manager: a driver transaction (a ``Tx``); with *write*, holding the
        write lock from its start, else a consistent read-only snapshot."""

    @contextmanager
    def write(self) -> Iterator[Tx]:
        """A write transaction in this host's scope."""
        with self._transaction(write=True) as tx:
            tx.host = self.identity.name
            self._enter(tx, write=True)
            yield tx

    @contextmanager
    def read(self, host: str | None = None) -> Iterator[Tx]:
        """A read-only snapshot of this host's rows, of *host*'s, or of every host's
        (``ALL_HOSTS``)."""
        with self._transaction(write=False) as tx:
            tx.host = None if host == ALL_HOSTS else host or self.identity.name
            if tx.host == self.identity.name:
                self._enter(tx, write=False)
            yield tx

    def _enter(self, tx: Tx, *, write: bool) -> None:
        """Read this host's row (its current upgrade); a write also locks it, which
        serialises the host's writers on a server, and registers the host first.

        The same statement reads what most steps need next, so that a step on a
        server costs few round trips: the current upgrade's serial (its last event
        id) and the ledger's lineage, kept in ``tx.memo``.
        """
        lock = " FOR UPDATE OF h" if write and self.dialect == "postgresql" else ""
        sql = ("SELECT h.machine_id, h.current_upgrade, (SELECT MAX(e.id) FROM events e "
               "WHERE e.host = h.name AND e.upgrade_id = h.current_upgrade) AS serial, "
               "(SELECT value FROM ledger_meta WHERE key = 'lineage') AS lineage "
               "FROM hosts h WHERE h.name = :host" + lock)
        row = tx.one(sql)
        mine = self.identity.machine_id
        if row is None and write:
            # Two first writes of a new host may race: the loser's insert does nothing.
            tx.execute("INSERT INTO hosts (name, machine_id, created_at) VALUES "
                       "(:host, :machine, :at) ON CONFLICT (name) DO NOTHING",
                       {"machine": mine, "at": clock.now()})
            row = tx.one(sql)
        if row is None:
            tx.memo["current_upgrade"] = None
            return
        tx.memo["lineage"] = row["lineage"]
        if row["current_upgrade"] is not None:
            tx.memo["serial", row["current_upgrade"]] = int(row["serial"] or 0)
        claimed = row["machine_id"]
        if mine is not None and claimed != mine:
            if claimed is not None and self.shared:
                raise HostClash(
                    f"host name {tx.host!r} belongs to another machine in {self.url} "
                    f"(machine id {claimed}, this one is {mine}); give this machine its own "
                    "name with --host-name or LEDGER_HOST")
            if write:
                tx.execute("UPDATE hosts SET machine_id = :machine WHERE name = :host",
                           {"machine": mine})
        tx.memo["current_upgrade"] = row["current_upgrade"]

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
        with self._transaction(write=False) as tx:
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
