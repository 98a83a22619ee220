"""Opening the fleet database: PostgreSQL only, with the ledger's own schema.

The fleet database has the same schema as a host's ledger (the same migrations), so
the first push to a new database creates it. Every failure to reach or use it is
``FleetUnavailable``: the host goes on locally and pushes later.
"""

from __future__ import annotations

from collections.abc import Mapping

from ledger.core.host import Identity
from ledger.errors import BadInput, FleetUnavailable, NoLedger, StorageError
from ledger.store import urls
from ledger.store.connect import prepare
from ledger.store.database import Database

#: How long connecting to the fleet database may take (unless the URL says).
CONNECT_TIMEOUT_S = 5.0
#: The longest one statement of a push may run: a push never hangs on a stuck server.
STATEMENT_TIMEOUT = "30s"


def check_url(url: str) -> str:
    """*url* if it can name a fleet database (PostgreSQL), else ``BadInput``."""
    if not urls.is_postgres(url) or urls.scheme(url) not in (
            "postgresql", "postgres", "postgresql+psycopg"):
        raise BadInput(f"--fleet: {urls.mask(url)}: the fleet database is PostgreSQL; "
                       "write postgresql://... (docs/fleet.md)")
    return url


def open_fleet(url: str, identity: Identity, *, create: bool = True,
               settings: Mapping[str, str] | None = None) -> Database:
    """The fleet database at *url* for host *identity*, its schema made or migrated
    when new or behind (with *create* False, a database nothing was pushed to yet is
    ``NoLedger``)."""
    check_url(url)
    try:
        from ledger.store.postgres import PgDatabase  # noqa: PLC0415 (psycopg: only here)
    except ImportError as exc:
        raise BadInput("--fleet: the fleet database needs psycopg 3: install "
                       "'upgrade-ledger[postgres]'") from exc
    try:
        db = PgDatabase(url, what="--fleet", connect_timeout_s=CONNECT_TIMEOUT_S,
                        settings={"statement_timeout": STATEMENT_TIMEOUT, **(settings or {})})
        db.identity = identity
        return prepare(db, create=create)
    except NoLedger as exc:
        raise NoLedger(f"the fleet database {urls.mask(url)} has no ledger yet: nothing was "
                       "pushed to it ('upgrade-ledger fleet push' creates it)") from exc
    except StorageError as exc:
        if isinstance(exc, FleetUnavailable):
            raise
        raise FleetUnavailable(str(exc).replace("--db", "--fleet", 1)) from exc
