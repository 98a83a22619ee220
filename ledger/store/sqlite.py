"""The stdlib ``sqlite3`` driver: a ledger in a SQLite file, with the real pragmas.

The per-step commands run on this driver and never import SQLAlchemy. Every
connection is WAL, ``synchronous=FULL``, with foreign keys on and a busy timeout;
writes start with ``BEGIN IMMEDIATE``. Reporting connections may only read.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ledger.errors import BadInput, Conflict, CorruptLedger, LedgerError, StorageError
from ledger.store.database import (
    BUSY_TIMEOUT_S,
    WAL_SIZE_LIMIT,
    Database,
    Params,
    Report,
    Row,
    Tx,
    is_missing_table,
)

# Reporting connections may only read. The authorizer refuses anything else when
# the statement is prepared, so a write is refused before it runs.
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 sqlite3.SQLITE_RECURSIVE}
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list",
                 "database_list", "integrity_check", "quick_check", "user_version",
                 "schema_version", "page_count", "page_size", "freelist_count"}


class _SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__()
        self._conn = conn

    def execute(self, sql: str, params: Params | None = None) -> int:
        return self._conn.execute(sql, self.bind(params)).rowcount

    def all(self, sql: str, params: Params | None = None) -> list[Row]:
        return self._conn.execute(sql, self.bind(params)).fetchall()

    def insert(self, sql: str, params: Params | None = None) -> int:
        return int(self._conn.execute(sql, self.bind(params)).lastrowid or 0)


def _translate(exc: sqlite3.Error, where: str) -> LedgerError:
    """Turn a driver error into the ledger's own, with what to do about it."""
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "encrypted" in text
    ):
        return CorruptLedger(
            f"{where} is corrupt or not a ledger ({text}); "
            "run 'upgrade-ledger doctor', then 'upgrade-ledger restore' (docs/operations.md)"
        )
    if "locked" in text or "busy" in text:
        return StorageError(
            f"{where} stayed busy for {BUSY_TIMEOUT_S:.0f} s ({text}); another process "
            "holds a long write transaction"
        )
    if "readonly" in text or "unable to open" in text or "disk" in text or "full" in text:
        return StorageError(f"cannot write {where} ({text}); check free space and permissions")
    return StorageError(f"{where}: {text}")


class SqliteDatabase(Database):
    """A ledger in a SQLite file, through the stdlib driver."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.url = self.connect_url = f"sqlite:///{path}"
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a write
            # transaction can start with BEGIN IMMEDIATE.
            self._conn = sqlite3.connect(
                path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            # WAL: readers never block the writer and a commit is one append. The mode
            # is persistent: switch a new database (or a ledger restored from a
            # snapshot), never another application's file, which is refused untouched.
            if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                if _foreign(self._conn):
                    self._conn.close()
                    raise CorruptLedger(
                        f"{self.url} is a database but not a ledger (no schema revision); "
                        "point --home or --db at a ledger")
                _switch_to_wal(self._conn, time.monotonic() + busy_timeout_s)
            # FULL: a call that returned is on disk, even after power loss.
            self._conn.execute("PRAGMA synchronous=FULL")
            # Foreign keys are off by default in SQLite; the schema relies on them.
            self._conn.execute("PRAGMA foreign_keys=ON")
            # The WAL is checkpointed every 1000 pages (SQLite's default), ~4 MiB. A
            # long reader stops checkpoints from restarting it, and the file keeps its
            # peak size afterwards unless capped: once the WAL restarts, trim it to this.
            self._conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        except sqlite3.Error as exc:
            raise _translate(exc, str(path)) from exc

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Tx]:
        # BEGIN IMMEDIATE takes the write lock now (waiting up to the busy timeout),
        # so a read-validate-write sequence can never be overtaken by another writer.
        begin = "BEGIN IMMEDIATE" if write else "BEGIN"
        try:
            self._conn.execute(begin)
        except sqlite3.Error as exc:
            raise _translate(exc, str(self.path)) from exc
        try:
            yield _SqliteTx(self._conn)
        except BaseException as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.IntegrityError):
                # A constraint caught what validation should have: refuse, changed nothing.
                raise Conflict(f"the ledger refused the change ({exc}); nothing was "
                               "changed") from exc
            if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not (
                isinstance(exc, sqlite3.ProgrammingError) or is_missing_table(exc)
            ):
                raise _translate(exc, str(self.path)) from exc
            raise
        try:
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise _translate(exc, str(self.path)) from exc

    def report(self, sql: str, params: Params | None = None) -> Report:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("PRAGMA query_only=ON")  # a second guard behind the authorizer
            conn.set_authorizer(_read_only_authorizer)
            try:
                cursor = conn.execute(sql, params or {})
                rows = cursor.fetchall()
            except (sqlite3.DatabaseError, sqlite3.Warning) as exc:
                refused = ("not authorized", "authorization denied", "readonly")
                if any(word in str(exc) for word in refused):
                    raise BadInput(
                        "sql: only read-only queries are allowed (SELECT, WITH, EXPLAIN); "
                        "the statement was refused before it ran"
                    ) from exc
                raise BadInput(f"sql: {exc}") from exc
            columns = [d[0] for d in cursor.description or ()]
            return columns, [tuple(r) for r in rows]
        finally:
            conn.close()

    def table_count(self) -> int:
        with self._transaction(write=False) as tx:
            return int(tx.scalar("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'"))

    def verify(self) -> None:
        with self._transaction(write=False) as tx:  # a malformed page raises here, as CorruptLedger
            problems = [str(r[0]) for r in tx.all("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise CorruptLedger(
                f"{self.path} fails its integrity check ({'; '.join(problems[:3])}); "
                "run 'upgrade-ledger restore' (see docs/operations.md)"
            )

    def close(self) -> None:
        self._conn.close()


def _foreign(conn: sqlite3.Connection) -> bool:
    """Whether the database holds tables but no schema revision: not a ledger."""
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return bool(names) and "alembic_version" not in names


def _switch_to_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """Put a new database in WAL mode, waiting out other processes doing the same.

    Changing the journal mode needs the database to itself, and SQLite reports
    "database is locked" at once instead of calling the busy handler: two processes
    opening a new ledger together would otherwise fail.
    """
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


def _read_only_authorizer(action: int, arg1: str | None, *_: object) -> int:
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1 in _READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


