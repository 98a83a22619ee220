"""Delivery cursors for notifications: one row per subscriber.

Each row says how far a subscriber (configured in the home's notify.toml) has been
served: the last event id delivered to it (or passed over by its kind filter), and,
while deliveries fail, the attempts, the next try and the last error. The cursor moves
in a transaction only after a delivery succeeded, so a crash never loses or invents a
notification.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STAMP = sa.String(32)


def upgrade() -> None:
    op.create_table(
        "notify_cursors",
        sa.Column("subscriber", sa.String(128), nullable=False),
        sa.Column("last_event_id", sa.Integer(), server_default="0", nullable=False),
        sa.Column("delivered", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failing_event_id", sa.Integer()),
        sa.Column("next_try_at", STAMP),
        sa.Column("last_error", sa.Text()),
        sa.Column("last_attempt_at", STAMP),
        sa.Column("delivered_at", STAMP),
        sa.Column("created_at", STAMP, nullable=False),
        sa.PrimaryKeyConstraint("subscriber", name="pk_notify_cursors"),
    )


def downgrade() -> None:
    op.drop_table("notify_cursors")
