"""The first ledger schema: upgrades, phases, components, rollback points, events,
and the reporting views.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STAMP = sa.String(32)
STATE = sa.String(16)
NAME = sa.String(128)


def _seconds(start: str, end: str) -> str:
    """SQL for the seconds between two ISO-8601 text timestamps, per dialect."""
    if op.get_bind().dialect.name == "postgresql":
        return (
            f"EXTRACT(EPOCH FROM (CAST({end} AS timestamptz) - CAST({start} AS timestamptz)))"
        )
    return f"ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)"


def _views() -> dict[str, str]:
    upgrade_duration = _seconds("u.started_at", "u.finished_at")
    component_duration = _seconds("c.started_at", "COALESCE(c.completed_at, c.failed_at)")
    phase_duration = _seconds("p.started_at", "COALESCE(p.completed_at, p.failed_at)")
    return {
        # One row per upgrade: how it ended, how long it took, what it touched.
        "upgrade_summary": f"""
            SELECT u.id AS upgrade_id, u.state, u.outcome, u.hostname, u.username,
                   u.started_at, u.finished_at, {upgrade_duration} AS duration_s,
                   u.superseded_by, u.error,
                   (SELECT COUNT(*) FROM phases p WHERE p.upgrade_id = u.id) AS phases,
                   (SELECT COUNT(*) FROM components c WHERE c.upgrade_id = u.id) AS components,
                   (SELECT COUNT(*) FROM components c
                     WHERE c.upgrade_id = u.id AND c.state = 'COMPLETED') AS components_completed,
                   (SELECT COUNT(*) FROM components c
                     WHERE c.upgrade_id = u.id AND c.state = 'FAILED') AS components_failed,
                   (SELECT COUNT(*) FROM components c
                     WHERE c.upgrade_id = u.id AND c.state = 'SKIPPED') AS components_skipped,
                   (SELECT COALESCE(SUM(c.attempts), 0) FROM components c
                     WHERE c.upgrade_id = u.id) AS attempts
              FROM upgrades u""",
        # One row per component run, with the upgrade's host and outcome beside it.
        "component_runs": f"""
            SELECT c.upgrade_id, u.hostname, c.phase, c.name AS component,
                   c.from_version, c.to_version, c.state, c.attempts,
                   c.started_at, c.completed_at, c.failed_at,
                   {component_duration} AS duration_s, c.last_error, c.backup_path,
                   u.outcome AS upgrade_outcome
              FROM components c JOIN upgrades u ON u.id = c.upgrade_id""",
        # One row per phase run.
        "phase_runs": f"""
            SELECT p.upgrade_id, u.hostname, p.position, p.name AS phase, p.state,
                   p.started_at, COALESCE(p.completed_at, p.failed_at) AS ended_at,
                   {phase_duration} AS duration_s, p.error
              FROM phases p JOIN upgrades u ON u.id = p.upgrade_id""",
        # Everything that went wrong, at any level, newest last.
        "failures": """
            SELECT 'component' AS level, c.upgrade_id, u.hostname, c.phase,
                   c.name AS component, c.to_version, c.failed_at AS at,
                   c.last_error AS error, c.attempts
              FROM components c JOIN upgrades u ON u.id = c.upgrade_id
             WHERE c.failed_at IS NOT NULL
            UNION ALL
            SELECT 'phase', p.upgrade_id, u.hostname, p.name, NULL, NULL,
                   p.failed_at, p.error, NULL
              FROM phases p JOIN upgrades u ON u.id = p.upgrade_id
             WHERE p.failed_at IS NOT NULL
            UNION ALL
            SELECT 'upgrade', u.id, u.hostname, NULL, NULL, NULL,
                   u.finished_at, u.error, NULL
              FROM upgrades u
             WHERE u.outcome IN ('FAILED', 'ROLLED_BACK')""",
    }


def upgrade() -> None:
    op.create_table(
        "ledger_meta",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_ledger_meta"),
    )
    op.create_table(
        "upgrades",
        sa.Column("id", NAME, nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("outcome", STATE),
        sa.Column("started_at", STAMP, nullable=False),
        sa.Column("updated_at", STAMP, nullable=False),
        sa.Column("finished_at", STAMP),
        sa.Column("current_phase", NAME),
        sa.Column("current_component", NAME),
        sa.Column("hostname", sa.String(255)),
        sa.Column("username", sa.String(255)),
        sa.Column("pid", sa.Integer()),
        sa.Column("error", sa.Text()),
        sa.Column("superseded_by", NAME),
        sa.Column("saved_at", STAMP),
        sa.PrimaryKeyConstraint("id", name="pk_upgrades"),
    )
    op.create_index("ix_upgrades_started_at", "upgrades", ["started_at"])
    op.create_index("ix_upgrades_state", "upgrades", ["state"])
    op.create_index("ix_upgrades_hostname_started_at", "upgrades", ["hostname", "started_at"])
    op.create_table(
        "phases",
        sa.Column("upgrade_id", NAME, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("started_at", STAMP),
        sa.Column("completed_at", STAMP),
        sa.Column("failed_at", STAMP),
        sa.Column("error", sa.Text()),
        sa.ForeignKeyConstraint(
            ["upgrade_id"], ["upgrades.id"],
            name="fk_phases_upgrade_id_upgrades", ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("upgrade_id", "name", name="pk_phases"),
    )
    op.create_table(
        "components",
        sa.Column("upgrade_id", NAME, nullable=False),
        sa.Column("phase", NAME, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", STATE, nullable=False),
        sa.Column("from_version", NAME),
        sa.Column("to_version", NAME),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text()),
        sa.Column("note", sa.Text()),
        sa.Column("started_at", STAMP),
        sa.Column("completed_at", STAMP),
        sa.Column("failed_at", STAMP),
        sa.Column("backup_path", sa.Text()),
        sa.ForeignKeyConstraint(
            ["upgrade_id", "phase"], ["phases.upgrade_id", "phases.name"],
            name="fk_components_phase_phases", ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("upgrade_id", "phase", "name", name="pk_components"),
    )
    op.create_index(
        "ix_components_name_state_completed_at", "components", ["name", "state", "completed_at"]
    )
    op.create_table(
        "rollback_points",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("upgrade_id", NAME, nullable=False),
        sa.Column("phase", NAME),
        sa.Column("component", NAME, nullable=False),
        sa.Column("backup_path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger()),
        sa.Column("sha256", sa.String(64)),
        sa.Column("created_at", STAMP, nullable=False),
        sa.Column("cleared_at", STAMP),
        sa.ForeignKeyConstraint(
            ["upgrade_id"], ["upgrades.id"],
            name="fk_rollback_points_upgrade_id_upgrades", ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rollback_points"),
    )
    op.create_index(
        "ix_rollback_points_upgrade_id_cleared_at", "rollback_points",
        ["upgrade_id", "cleared_at"],
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", STAMP, nullable=False),
        sa.Column("upgrade_id", NAME),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("subject", NAME),
        sa.Column("from_value", sa.Text()),
        sa.Column("to_value", sa.Text()),
        sa.Column("username", sa.String(255)),
        sa.Column("hostname", sa.String(255)),
        sa.Column("pid", sa.Integer()),
        sa.Column("detail", sa.Text()),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_upgrade_id_id", "events", ["upgrade_id", "id"])
    op.create_index("ix_events_kind_id", "events", ["kind", "id"])
    op.create_index("ix_events_at", "events", ["at"])

    # The lineage tells one ledger from another (and its views from a copy's).
    meta = sa.table("ledger_meta", sa.column("key"), sa.column("value"))
    op.bulk_insert(meta, [{"key": "lineage", "value": str(uuid.uuid4())}])

    for name, body in _views().items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in reversed(list(_views())):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table("events")
    op.drop_table("rollback_points")
    op.drop_table("components")
    op.drop_table("phases")
    op.drop_table("upgrades")
    op.drop_table("ledger_meta")
