"""Alembic environment for the ledger.

upgrade-ledger configures Alembic from code (``ledger.store.migrate``) and hands over a
live connection in ``config.attributes["connection"]``; running ``alembic`` by hand
with a ``sqlalchemy.url`` works too.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from ledger.store.schema import metadata

config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        _run(conn)
