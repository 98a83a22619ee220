"""The fleet: a host's ledger shipped to one PostgreSQL database, and rolling upgrades.

A host keeps its ledger local and ships its rows to a fleet database that has this
same schema. Shipped events and rollback points get the fleet's own ids and keep
their host's in ``local_id`` (unique per host; NULL in a host's own ledger).
``fleet_cursors`` (in the fleet) says, per host, how far its ledger was shipped: the
push moves it in the transaction that ships the rows. ``fleet_push`` (in the host's
ledger) is how the last pushes went, for ``status`` and ``doctor``. ``fleet_slots``
(in the fleet) names who holds each rolling-upgrade slot, the slot itself being a
PostgreSQL advisory lock. Two views: ``plan_runs`` (each upgrade ``apply`` ran, with
its plan's name and sha256) and ``host_status`` (one row per host, its current
upgrade and its last push).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

STAMP = sa.String(32)
NAME = sa.String(128)
HOST = sa.String(255)


def _detail(key: str) -> str:
    """SQL for one key of an event's JSON ``detail``, as text."""
    if op.get_bind().dialect.name == "postgresql":
        return f"(CAST(e.detail AS json) ->> '{key}')"
    return f"json_extract(e.detail, '$.{key}')"


def _views() -> dict[str, str]:
    done = "SUM(CASE WHEN c.state IN ('COMPLETED', 'SKIPPED') THEN 1 ELSE 0 END)"
    of_upgrade = "FROM components c WHERE c.host = u.host AND c.upgrade_id = u.id"
    return {
        "plan_runs": f"""
            SELECT u.host, u.id AS upgrade_id, {_detail("name")} AS plan_name,
                   {_detail("sha256")} AS plan_sha256, {_detail("path")} AS plan_path,
                   u.state, u.outcome, u.started_at, u.finished_at
              FROM upgrades u
              JOIN events e ON e.host = u.host AND e.upgrade_id = u.id
             WHERE e.id = (SELECT MAX(p.id) FROM events p WHERE p.host = u.host
                            AND p.upgrade_id = u.id AND p.kind = 'apply.plan')""",
        "host_status": f"""
            SELECT h.name AS host, h.machine_id, u.id AS upgrade_id,
                   COALESCE(u.state, 'IDLE') AS state, u.outcome,
                   u.current_phase AS phase, u.current_component AS component,
                   CASE WHEN u.id IS NULL THEN 0
                        WHEN (SELECT COUNT(*) {of_upgrade}) = 0 THEN
                            CASE WHEN COALESCE(u.outcome, u.state) = 'COMPLETED'
                                 THEN 100 ELSE 0 END
                        ELSE (SELECT {done} * 100 / COUNT(*) {of_upgrade}) END
                       AS progress_percent,
                   u.started_at, u.updated_at, f.pushed_at, f.shipped_event_id
              FROM hosts h
              LEFT JOIN upgrades u ON u.host = h.name AND u.id = h.current_upgrade
              LEFT JOIN fleet_cursors f ON f.host = h.name""",
    }


def upgrade() -> None:
    op.create_table(
        "fleet_push",
        sa.Column("host", HOST, nullable=False),
        sa.Column("fleet", sa.Text()),
        sa.Column("shipped_event_id", sa.Integer(), server_default="0", nullable=False),
        sa.Column("pushed_at", STAMP),
        sa.Column("attempted_at", STAMP),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_try_at", STAMP),
        sa.Column("last_error", sa.Text()),
        sa.Column("last_error_at", STAMP),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], name="fk_fleet_push_host_hosts"),
        sa.PrimaryKeyConstraint("host", name="pk_fleet_push"),
    )
    op.create_table(
        "fleet_cursors",
        sa.Column("host", HOST, nullable=False),
        sa.Column("lineage", sa.String(64)),
        sa.Column("shipped_event_id", sa.Integer(), server_default="0", nullable=False),
        sa.Column("shipped_mark", sa.Text()),
        sa.Column("pushed_at", STAMP, nullable=False),
        sa.Column("first_pushed_at", STAMP, nullable=False),
        sa.Column("resets", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], name="fk_fleet_cursors_host_hosts"),
        sa.PrimaryKeyConstraint("host", name="pk_fleet_cursors"),
    )
    op.create_table(
        "fleet_slots",
        sa.Column("plan", sa.Text(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("host", HOST, nullable=False),
        sa.Column("pid", sa.Integer()),
        sa.Column("backend_pid", sa.Integer(), nullable=False),
        sa.Column("plan_sha256", sa.String(64)),
        sa.Column("taken_at", STAMP, nullable=False),
        sa.PrimaryKeyConstraint("plan", "slot", name="pk_fleet_slots"),
    )
    for table in ("events", "rollback_points"):
        with op.batch_alter_table(table) as b:
            b.add_column(sa.Column("local_id", sa.Integer()))
            b.create_index(f"uq_{table}_host_local_id", ["host", "local_id"], unique=True)
    for name, body in _views().items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in _views():
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for table in ("rollback_points", "events"):
        with op.batch_alter_table(table) as b:
            b.drop_index(f"uq_{table}_host_local_id")
            b.drop_column("local_id")
    op.drop_table("fleet_slots")
    op.drop_table("fleet_cursors")
    op.drop_table("fleet_push")
