"""Attempts count as the old bash library counted them.

``components.attempts`` counted a component's failures (0 while its first try ran).
From this revision on it is the attempt in progress or the next one: 1 at the first
start, + 1 at each failure (a retry's start keeps it). Every component that has
started (it has a start or failure time, it has failed, or its state says it ran)
gets one more; one that never started (PENDING, or SKIPPED without a start) keeps 0.
The downgrade gives the failure counts back.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "UPDATE components SET attempts = attempts + 1 WHERE attempts > 0 "
        "OR started_at IS NOT NULL OR failed_at IS NOT NULL "
        "OR state NOT IN ('PENDING', 'SKIPPED')"
    )


def downgrade() -> None:
    op.execute("UPDATE components SET attempts = attempts - 1 WHERE attempts > 0")
