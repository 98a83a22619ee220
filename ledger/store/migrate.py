"""Schema migrations through Alembic, configured from code.

Imported only when a ledger is new or behind (``ledger.store.connect`` checks the
revision with one cheap query first), so the per-step path never pays for Alembic.
Concurrent first opens are serialised: with ``flock`` for a SQLite file, with an
advisory lock on a server, so any number of them succeed.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from ledger.store.alchemy import make_engine

#: The PostgreSQL advisory lock key held while migrating ("LEDGER" and 1).
ADVISORY_LOCK = 0x4C45_4447_4552_0001


def script_location() -> str:
    """Where the Alembic environment is: inside the installed wheel, or the source tree."""
    spec = importlib.util.find_spec("ledger.migrations")
    if spec is not None and spec.submodule_search_locations:
        return next(iter(spec.submodule_search_locations))
    return str(Path(__file__).resolve().parent.parent / "migrations")


def alembic_config(connection: Connection | None = None, host: str | None = None) -> Config:
    """An Alembic ``Config`` built in code; *connection* is handed to ``env.py``, and
    *host* (the host migrating) to revisions that assign existing rows to a host."""
    config = Config()
    config.set_main_option("script_location", script_location())
    if connection is not None:
        config.attributes["connection"] = connection
    if host is not None:
        config.attributes["host"] = host
    return config


def head_revision() -> str:
    """The newest revision the shipped migrations know."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def known_revisions() -> set[str]:
    """Every revision the shipped migrations know."""
    script = ScriptDirectory.from_config(alembic_config())
    return {rev.revision for rev in script.walk_revisions()}


def upgrade(url: str, revision: str = "head", *, sqlite_path: Path | None = None,
            host: str | None = None) -> None:
    """Migrate the ledger at *url* to *revision*; *host* is the host migrating (rows
    that predate hosts and name none go to it).

    For a SQLite file, concurrent first opens are serialised with ``flock`` on the
    folder that holds it; a second process re-checks the revision after waiting,
    finding nothing left to do. Not on the database file itself: closing any
    descriptor of ledger.db drops every POSIX lock this process holds on it, SQLite's
    included, and another process would then take this one's WAL connection for gone
    and delete the WAL under it (later commits would land in an unlinked file). On
    PostgreSQL the migration's transaction takes an advisory lock first (``_run``).
    """
    engine = make_engine(url, foreign_keys=False)
    try:
        if sqlite_path is None:
            _run(engine, "upgrade", revision, host)
            return
        fd = os.open(sqlite_path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _run(engine, "upgrade", revision, host)
        finally:
            os.close(fd)  # closing the descriptor releases the flock
    finally:
        engine.dispose()


def downgrade(url: str, revision: str, *, host: str | None = None) -> None:
    """Migrate the ledger at *url* down to *revision* (``base`` removes everything)."""
    engine = make_engine(url, foreign_keys=False)
    try:
        _run(engine, "downgrade", revision, host)
    finally:
        engine.dispose()


def _run(engine: Engine, verb: str, revision: str, host: str | None) -> None:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Held until this transaction ends; DDL is transactional there, so a
            # process that waited here sees the finished schema and has nothing to do.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})")
        getattr(command, verb)(alembic_config(connection, host), revision)
        if connection.dialect.name == "sqlite":
            # Tables were rebuilt with foreign keys off: prove every reference holds.
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                raise RuntimeError(f"foreign keys broken by the migration: {broken[:3]}")
