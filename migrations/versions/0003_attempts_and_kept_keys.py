"""Attempts count as the old bash library counted them; keys a document carries that
the ledger does not know are kept.

``components.attempts`` counted a component's failures (0 while its first try ran).
From this revision on it is the attempt in progress or the next one: 1 at the first
start, + 1 at each failure (a retry's start keeps it). Every component that has
started (it has a start or failure time, it has failed, or its state says it ran)
gets one more; one that never started (PENDING, or SKIPPED without a start) keeps 0.
The downgrade gives the failure counts back.

``extra`` columns keep, verbatim, the keys of a saved or imported state document
that the ledger does not know: at the top level (``upgrades.extra``), inside
``metadata`` (``upgrades.metadata_extra``), a phase (``phases.extra``) and a
component (``components.extra``). Each is a JSON object as text, or NULL when there
is none. The downgrade drops them, and the keys with them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

#: (table, column) of the kept keys.
EXTRA = (("upgrades", "extra"), ("upgrades", "metadata_extra"), ("phases", "extra"),
         ("components", "extra"))


def upgrade() -> None:
    op.execute(
        "UPDATE components SET attempts = attempts + 1 WHERE attempts > 0 "
        "OR started_at IS NOT NULL OR failed_at IS NOT NULL "
        "OR state NOT IN ('PENDING', 'SKIPPED')"
    )
    for table, column in EXTRA:
        op.add_column(table, sa.Column(column, sa.Text()))


def downgrade() -> None:
    for table, column in reversed(EXTRA):
        op.drop_column(table, column)
    op.execute("UPDATE components SET attempts = attempts - 1 WHERE attempts > 0")
