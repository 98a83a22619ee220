"""Components rolled back are a state of their own: upgrade_summary counts them.

A component that an automatic rollback restored from its backup reads ROLLED_BACK
(it used to keep the state it reached, COMPLETED or FAILED). The ``upgrade_summary``
view gains ``components_rolled_back`` beside the other counts; it is recreated, as a
view cannot be altered. No table changes: ``components.state`` is text.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _seconds(start: str, end: str) -> str:
    """SQL for the seconds between two ISO-8601 text timestamps, rounded to the
    millisecond on every dialect (as revision 0004 has it)."""
    if op.get_bind().dialect.name == "postgresql":
        return ("ROUND(CAST(EXTRACT(EPOCH FROM (CAST(" + end + " AS timestamptz) - CAST("
                + start + " AS timestamptz))) AS numeric), 3)")
    return f"ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)"


def _count(state: str, column: str) -> str:
    return (f"(SELECT COUNT(*) FROM components c WHERE c.upgrade_id = u.id "
            f"AND c.host = u.host AND c.state = '{state}') AS {column}")


def _upgrade_summary(*, rolled_back: bool) -> str:
    return f"""
        SELECT u.host, u.id AS upgrade_id, u.state, u.outcome, u.hostname, u.username,
               u.started_at, u.finished_at, {_seconds("u.started_at", "u.finished_at")}
                   AS duration_s,
               u.superseded_by, u.error,
               (SELECT COUNT(*) FROM phases p WHERE p.upgrade_id = u.id
                 AND p.host = u.host) AS phases,
               (SELECT COUNT(*) FROM components c WHERE c.upgrade_id = u.id
                 AND c.host = u.host) AS components,
               {_count("COMPLETED", "components_completed")},
               {_count("FAILED", "components_failed")},
               {_count("SKIPPED", "components_skipped")},
               {_count("ROLLED_BACK", "components_rolled_back") + "," if rolled_back else ""}
               (SELECT COALESCE(SUM(c.attempts), 0) FROM components c
                 WHERE c.upgrade_id = u.id AND c.host = u.host) AS attempts
          FROM upgrades u"""


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS upgrade_summary")
    op.execute(f"CREATE VIEW upgrade_summary AS {_upgrade_summary(rolled_back=True)}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS upgrade_summary")
    op.execute(f"CREATE VIEW upgrade_summary AS {_upgrade_summary(rolled_back=False)}")
