"""The PostgreSQL driver: psycopg 3 directly, running the ledger's own SQL text.

A ledger shared by many hosts lives on a PostgreSQL server. This driver is imported
only for a PostgreSQL URL (psycopg is the optional ``postgres`` extra), and a step
through it pays for neither SQLAlchemy nor Alembic: those load only when the schema
must be created or migrated.

The portable ``:name`` parameters become psycopg's ``%(name)s`` once per statement
text. ``numeric`` values load as ``float``, so numbers compare, print and serialise
as they do on SQLite. Writes are ``READ COMMITTED`` transactions that start by
locking their host's row (``Database._enter``), so one host's writers take turns as
``BEGIN IMMEDIATE`` makes them do on SQLite while other hosts write on; reads are
``REPEATABLE READ READ ONLY`` snapshots; ``report`` runs in a read-only transaction
with a statement timeout.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.types.numeric import FloatLoader

from ledger.errors import BadInput, Conflict, LedgerError, QueryTimeout, StorageError
from ledger.store import urls
from ledger.store.database import (
    REPORT_TIMEOUT_S,
    Database,
    Params,
    Row,
    Rows,
    Tx,
    is_missing_table,
)

#: How long opening a connection may take unless the URL says (``connect_timeout``).
CONNECT_TIMEOUT_S = 10
#: The first keyword of a statement ``report`` accepts (the read-only transaction is
#: the guard; this gives a refused write the same message as on SQLite).
_READ_KEYWORDS = {"SELECT", "WITH", "EXPLAIN", "VALUES", "TABLE", "SHOW", "PRAGMA"}
_REFUSED = ("sql: only read-only queries are allowed (SELECT, WITH, EXPLAIN); "
            "the statement was refused before it ran")
# What a statement's text holds, in the order the scanner tries them: quoted text and
# comments (kept as they are), a cast (::), a :name parameter, a literal percent sign.
_TOKENS = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|--[^\n]*|/\*.*?\*/|::|"""
                     r""":(?P<name>[A-Za-z_][A-Za-z0-9_]*)|%""", re.DOTALL)
_LEADING_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*|/\*.*?\*/)*", re.DOTALL)
_PRAGMA = re.compile(r"PRAGMA\s+(?P<name>\w+)\s*(?:\(\s*['\"]?(?P<arg>\w+)['\"]?\s*\))?"
                     r"\s*;?\s*\Z", re.IGNORECASE)
_converted: dict[str, str] = {}


def convert(sql: str) -> str:
    """*sql* with ``:name`` parameters as psycopg's ``%(name)s`` and every ``%`` doubled
    (psycopg reads them even inside quotes), leaving the rest of quoted text, comments
    and ``::`` casts alone."""
    done = _converted.get(sql)
    if done is None:
        def token(m: re.Match[str]) -> str:
            if m["name"]:
                return f"%({m['name']})s"
            return m[0].replace("%", "%%")

        done = _converted[sql] = _TOKENS.sub(token, sql)
    return done


class PgRow:
    """A result row readable by column name and by position, as ``sqlite3.Row`` is."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key if isinstance(key, int) else self._index[key]]

    def keys(self) -> list[str]:
        return list(self._index)

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)


def _row_factory(cursor: Any) -> Any:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: PgRow(values, index)


class _PgTx(Tx):
    """A transaction whose BEGIN travels with its first statement: one round trip."""

    def __init__(self, conn: psycopg.Connection[Any], begin: str) -> None:
        super().__init__()
        self._conn = conn
        #: The BEGIN not sent yet (None once it was).
        self.begin: str | None = begin

    def _run(self, sql: str, params: Params | None) -> Any:
        if self.begin is None:
            cursor = self._conn.cursor(row_factory=_row_factory)
            cursor.execute(convert(sql), self.bind(params))
            return cursor
        # The first statement: bound here and sent with the BEGIN in one message.
        cursor = psycopg.ClientCursor(self._conn, row_factory=_row_factory)
        begin, self.begin = self.begin, None
        cursor.execute(f"{begin}; {convert(sql)}", self.bind(params))
        cursor.nextset()  # past the BEGIN, to the statement's own result
        return cursor

    def execute(self, sql: str, params: Params | None = None) -> int:
        with self._run(sql, params) as cursor:
            return int(cursor.rowcount)

    def all(self, sql: str, params: Params | None = None) -> list[Row]:
        with self._run(sql, params) as cursor:
            return cursor.fetchall()  # type: ignore[no-any-return]

    def insert(self, sql: str, params: Params | None = None) -> int:
        with self._run(sql + " RETURNING id", params) as cursor:
            return int(cursor.fetchone()[0])

    def execute_many(self, sql: str, rows: Iterable[Params]) -> None:
        bound = [self.bind(params) for params in rows]
        if not bound:
            return
        if self.begin is not None:
            begin, self.begin = self.begin, None
            self._conn.execute(begin)
        with self._conn.cursor() as cursor:
            # psycopg sends the rows in one pipeline: one round trip for them all.
            cursor.executemany(convert(sql), bound)

    def insert_rows(self, table: str, columns: Sequence[str],
                    rows: Iterable[Sequence[Any]]) -> None:
        if self.begin is not None:
            begin, self.begin = self.begin, None
            self._conn.execute(begin)
        # COPY: the rows stream to the server in one statement, many times faster than
        # one INSERT each, pipelined or not.
        with self._conn.cursor() as cursor, cursor.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


class PgDatabase(Database):
    """A ledger in a PostgreSQL database, shared by the hosts that reach it.

    *what* names the URL's option in messages (``--db``, ``--fleet``); *settings*
    are session settings (``statement_timeout`` ...) set when it connects, unless the
    URL's ``options`` say otherwise.
    """

    dialect = "postgresql"
    shared = True

    def __init__(self, url: str, *, what: str = "--db",
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 settings: Mapping[str, str] | None = None) -> None:
        self._secret_url = self.connect_url = url
        self.url = urls.mask(url)
        self.what = what
        options: dict[str, Any] = {}  # defaults; what the URL says wins
        if "application_name=" not in url:
            options["application_name"] = "upgrade-ledger"
        if "connect_timeout=" not in url:
            options["connect_timeout"] = max(1, round(connect_timeout_s))
        if settings and "options=" not in url:
            options["options"] = " ".join(f"-c {k}={v}" for k, v in settings.items())
        try:
            self._conn = psycopg.connect(urls.libpq(url), autocommit=True, **options)
        except psycopg.Error as exc:
            raise StorageError(f"{what}: cannot connect to {self.url} "
                               f"({self._message(exc)})") from exc
        except psycopg.ProgrammingError as exc:
            raise BadInput(f"{what}: cannot use {self.url} ({self._message(exc)})") from exc
        self._conn.adapters.register_loader("numeric", FloatLoader)

    def _message(self, exc: BaseException) -> str:
        return urls.scrub(str(exc).strip().replace("\n", " "), self._secret_url)

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Tx]:
        tx = _PgTx(self._conn, "BEGIN" if write else
                   "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield tx
        except BaseException as exc:
            self._rollback()
            if isinstance(exc, pg_errors.IntegrityError):
                raise Conflict(f"the ledger refused the change ({self._message(exc)}); "
                               "nothing was changed") from exc
            if isinstance(exc, psycopg.Error) and not is_missing_table(exc):
                raise self._translate(exc) from exc
            raise
        if tx.begin is not None:
            return  # no statement ran: there is no transaction to end
        try:
            self._conn.execute("COMMIT")
        except psycopg.Error as exc:
            self._rollback()
            raise self._translate(exc) from exc

    def _rollback(self) -> None:
        if not self._conn.closed and \
                self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with contextlib.suppress(psycopg.Error):  # a lost connection lost it too
                self._conn.execute("ROLLBACK")

    def _translate(self, exc: psycopg.Error) -> LedgerError:
        return StorageError(f"{self.url}: {self._message(exc)}")

    def report(self, sql: str, params: Params | None = None, *,
               timeout_s: float | None = REPORT_TIMEOUT_S) -> Rows:
        body = sql[_LEADING_COMMENTS.match(sql).end():]  # type: ignore[union-attr]
        keyword = body.split(None, 1)[0].upper() if body.strip() else ""
        keyword = keyword.split("(", 1)[0]
        if keyword not in _READ_KEYWORDS:
            raise BadInput(_REFUSED)
        if keyword == "PRAGMA":
            sql, params = _pragma(body)
        try:
            self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            # 0 is no limit; the server cancels the statement past it, rows streaming
            # to us included.
            limit = 0 if timeout_s is None else max(1, int(timeout_s * 1000))
            self._conn.execute(f"SET LOCAL statement_timeout = {limit}")
            cursor = self._conn.cursor()
            # stream(): single-row mode, so rows arrive as the server makes them; it
            # uses the extended protocol, which runs exactly one statement: "SELECT 1;
            # COMMIT; DROP ..." is refused whole.
            rows: Any = cursor.stream(convert(sql), dict(params or {}))  # a generator
            first = next(rows, None)
        except BaseException as exc:
            self._rollback()
            raise self._report_error(exc, timeout_s) from exc
        columns = [d.name for d in cursor.description or ()]

        def stream() -> Iterator[tuple[Any, ...]]:
            try:
                if first is not None:
                    yield tuple(first)
                for row in rows:
                    yield tuple(row)
            except BaseException as exc:
                raise self._report_error(exc, timeout_s) from exc

        def close() -> None:
            with contextlib.suppress(psycopg.Error):
                rows.close()  # a stream left early: psycopg ends its query
                cursor.close()
            self._rollback()

        return Rows(columns, stream(), close)

    def _report_error(self, exc: BaseException, timeout_s: float | None) -> BaseException:
        """The ledger's error for a failed reporting statement."""
        if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
            return BadInput(_REFUSED)
        if isinstance(exc, pg_errors.QueryCanceled):
            return QueryTimeout(f"sql: the query ran longer than {timeout_s:g} s and was "
                                "stopped (--timeout)")
        if isinstance(exc, psycopg.OperationalError):  # the server or the connection failed
            return self._translate(exc)
        if isinstance(exc, psycopg.Error | KeyError):  # the statement was refused
            return BadInput(f"sql: {self._message(exc)}")
        return exc

    def table_count(self) -> int:
        with self._transaction(write=False) as tx:
            return int(tx.scalar(
                "SELECT COUNT(*) FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"))

    def close(self) -> None:
        self._conn.close()


def _pragma(statement: str) -> tuple[str, dict[str, Any]]:
    """The PostgreSQL query for a SQLite ``PRAGMA`` the ledger documents:
    ``table_info(TABLE)`` (and ``table_xinfo``), with SQLite's columns."""
    m = _PRAGMA.match(statement)
    if m is None or m["name"].lower() not in ("table_info", "table_xinfo") or not m["arg"]:
        raise BadInput("sql: on PostgreSQL only PRAGMA table_info(TABLE) is understood; "
                       "query information_schema or pg_catalog for the rest")
    return ("SELECT c.ordinal_position - 1 AS cid, c.column_name AS name, "
            "UPPER(c.data_type) || COALESCE('(' || c.character_maximum_length || ')', '') "
            "AS type, CASE WHEN c.is_nullable = 'NO' THEN 1 ELSE 0 END AS notnull, "
            "c.column_default AS dflt_value, COALESCE((SELECT k.ordinal_position "
            "FROM information_schema.table_constraints t "
            "JOIN information_schema.key_column_usage k "
            "ON k.constraint_name = t.constraint_name AND k.table_schema = t.table_schema "
            "AND k.table_name = t.table_name WHERE t.constraint_type = 'PRIMARY KEY' "
            "AND t.table_schema = c.table_schema AND t.table_name = c.table_name "
            "AND k.column_name = c.column_name), 0) AS pk "
            "FROM information_schema.columns c "
            "WHERE c.table_schema = current_schema() AND c.table_name = :table "
            "ORDER BY c.ordinal_position", {"table": m["arg"].lower()})
