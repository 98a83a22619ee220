"""The stdlib ``sqlite3`` driver: a ledger in a SQLite file, with the real pragmas.

The per-step commands run on this driver and never import SQLAlchemy. Every
connection is WAL, ``synchronous=FULL``, with foreign keys on and a busy timeout;
writes start with ``BEGIN IMMEDIATE``. Reporting connections may only read.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ledger.errors import (
    BadInput,
    Conflict,
    CorruptLedger,
    LedgerError,
    QueryTimeout,
    StorageError,
)
from ledger.store.database import (
    BUSY_TIMEOUT_S,
    REPORT_MAX_CELL,
    REPORT_TIMEOUT_S,
    WAL_SIZE_LIMIT,
    Database,
    Params,
    Row,
    Rows,
    Tx,
    is_missing_table,
)

# Reporting connections may only read. The authorizer refuses anything else when
# the statement is prepared, so a write is refused before it runs.
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 sqlite3.SQLITE_RECURSIVE}
#: Pragmas whose argument names what to read (a table, an index, how many problems).
_PRAGMAS_READING_WITH_ARGUMENT = {
    "table_info", "table_xinfo", "index_list", "index_info", "index_xinfo",
    "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check"}
#: Pragmas that read a setting when given no value, and would change it when given
#: one: allowed without a value only (``PRAGMA page_size``, not ``page_size=1024``).
_PRAGMAS_READING_WITHOUT_VALUE = {
    "application_id", "auto_vacuum", "busy_timeout", "cache_size", "collation_list",
    "compile_options", "data_version", "database_list", "encoding", "foreign_keys",
    "freelist_count", "function_list", "journal_mode", "journal_size_limit",
    "max_page_count", "mmap_size", "module_list", "page_count", "page_size", "pragma_list",
    "query_only", "schema_version", "synchronous", "table_list", "user_version",
    "wal_autocheckpoint"}
#: SQLite calls the progress handler every this many virtual machine steps.
_PROGRESS_STEPS = 1000


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

    def __init__(self, path: Path, *, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 synchronous: str = "FULL") -> None:
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
            # FULL: a call that returned is on disk, even after power loss. (A
            # connection that only writes bookkeeping a power loss may lose, such as a
            # pusher's record of its pushes, may ask for NORMAL: no fsync per commit.)
            level = "NORMAL" if synchronous == "NORMAL" else "FULL"
            self._conn.execute(f"PRAGMA synchronous={level}")
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

    def report(self, sql: str, params: Params | None = None, *,
               timeout_s: float | None = REPORT_TIMEOUT_S) -> Rows:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        try:
            conn.execute("PRAGMA query_only=ON")  # a second guard behind the authorizer
            watch = ReportWatch(timeout_s)
            watch.guard(conn)
            try:
                cursor = conn.execute(sql, params or {})
            except (sqlite3.DatabaseError, sqlite3.Warning) as exc:
                raise watch.translate(exc) from exc
        except BaseException:
            conn.close()
            raise
        columns = [d[0] for d in cursor.description or ()]
        return Rows(columns, watch.stream(cursor), conn.close)

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


def seal(path: Path) -> None:
    """Make the closed ledger file at *path* whole on its own, before it is renamed into
    place: fold its WAL in, switch it to a rollback journal (which removes the -wal and
    -shm files) and fsync it. The first connection to the renamed file puts it back in
    WAL mode. Nothing else may have it open."""
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("PRAGMA journal_mode=DELETE")
        finally:
            conn.close()
        # Not ledger.db yet: no connection of this process has POSIX locks on it that
        # closing this descriptor could drop.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except sqlite3.Error as exc:
        raise _translate(exc, str(path)) from exc
    except OSError as exc:
        raise StorageError(f"cannot write {path} ({exc.strerror}); check free space") from exc


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


def _read_only_authorizer(action: int, arg1: str | None, arg2: str | None,
                          *_: object) -> int:
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if name in _PRAGMAS_READING_WITH_ARGUMENT or (
                name in _PRAGMAS_READING_WITHOUT_VALUE and arg2 is None):
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class ReportWatch:
    """What keeps a reporting query in bounds on a SQLite connection: the read-only
    authorizer, a cap on the size of one cell, and a progress handler that stops the
    query past its deadline. Ctrl-C lands in that handler too (Python runs signal
    handlers when it next runs Python code): SQLite then stops the query at once, and
    ``translate`` turns that into the ``KeyboardInterrupt`` it was."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.expired = False
        self._length = 0

    def guard(self, conn: sqlite3.Connection) -> None:
        """Put the guards on *conn* (``unguard`` takes them off a pooled connection)."""
        conn.set_authorizer(_read_only_authorizer)
        conn.set_progress_handler(self._check, _PROGRESS_STEPS)
        self._length = conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, REPORT_MAX_CELL)

    def unguard(self, conn: sqlite3.Connection) -> None:
        conn.set_authorizer(None)
        conn.set_progress_handler(None, 0)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self._length)

    def _check(self) -> int:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.expired = True
            return 1  # non-zero: SQLite stops the statement ("interrupted")
        return 0

    def translate(self, exc: BaseException) -> BaseException:
        """The ledger's error (or the KeyboardInterrupt) behind a driver error."""
        text = str(exc)
        if "interrupted" in text:
            if self.expired:
                return QueryTimeout(f"sql: the query ran longer than {self.timeout_s:g} s "
                                    "and was stopped (--timeout)")
            return KeyboardInterrupt()  # raised in the progress handler, then swallowed
        if any(word in text for word in ("not authorized", "authorization denied",
                                         "readonly")):
            return BadInput("sql: only read-only queries are allowed (SELECT, WITH, EXPLAIN, "
                            "pragmas that read); the statement was refused before it ran")
        return BadInput(f"sql: {text}")

    def stream(self, cursor: Any, errors: tuple[type[BaseException], ...] = (sqlite3.Error,),
               ) -> Iterator[tuple[Any, ...]]:
        """The rows of *cursor* as they are computed, a batch at a time; the driver's
        *errors* become the ledger's."""
        while True:
            try:
                batch = cursor.fetchmany(256)
            except errors as exc:
                raise self.translate(exc) from exc
            if not batch:
                return
            for row in batch:
                yield tuple(row)


