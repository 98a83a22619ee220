"""Every row belongs to a host: many hosts share one ledger database.

A ``hosts`` table names each host (and the machine that claimed it) and holds its
current upgrade, which used to be one ``ledger_meta`` row for everyone. Upgrades,
phases, components, rollback points, events and notification cursors gain a ``host``
column and upgrade ids are unique per host, so two hosts may use the same id.

Existing rows move over with nothing lost: an upgrade belongs to the host recorded
in its ``hostname`` (else to the host migrating the ledger), its phases, components,
rollback points and events follow it; events of no upgrade belong to the host that
wrote them; notification cursors belong to the migrating host. Each host's current
upgrade is the old current upgrade if it is that host's, else its latest. The
reporting views gain a ``host`` column.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STAMP = sa.String(32)
NAME = sa.String(128)
HOST = sa.String(255)


def _migrating_host() -> str:
    """The host migrating the ledger (upgrade-ledger passes its name in the config)."""
    name = context.config.attributes.get("host")
    return str(name) if name else os.uname().nodename


def _seconds(start: str, end: str) -> str:
    """SQL for the seconds between two ISO-8601 text timestamps, rounded to the
    millisecond on every dialect (numeric on PostgreSQL, so ROUND(x, n) works)."""
    if op.get_bind().dialect.name == "postgresql":
        return ("ROUND(CAST(EXTRACT(EPOCH FROM (CAST(" + end + " AS timestamptz) - CAST("
                + start + " AS timestamptz))) AS numeric), 3)")
    return f"ROUND((julianday({end}) - julianday({start})) * 86400.0, 3)"


def _views(with_host: bool) -> dict[str, str]:
    """The reporting views after this revision (*with_host*) or before it."""
    if not with_host and op.get_bind().dialect.name == "postgresql":
        def seconds(start: str, end: str) -> str:
            return (f"EXTRACT(EPOCH FROM (CAST({end} AS timestamptz) - "
                    f"CAST({start} AS timestamptz)))")
    else:
        seconds = _seconds
    h = "u.host, " if with_host else ""
    same_c = " AND c.host = u.host" if with_host else ""
    same_p = " AND p.host = u.host" if with_host else ""
    join_c = "u.host = c.host AND " if with_host else ""
    join_p = "u.host = p.host AND " if with_host else ""
    upgrade_duration = seconds("u.started_at", "u.finished_at")
    component_duration = seconds("c.started_at", "COALESCE(c.completed_at, c.failed_at)")
    phase_duration = seconds("p.started_at", "COALESCE(p.completed_at, p.failed_at)")

    def count(where: str = "") -> str:
        return (f"(SELECT COUNT(*) FROM components c WHERE c.upgrade_id = u.id{same_c}"
                f"{where})")

    return {
        "upgrade_summary": f"""
            SELECT {h}u.id AS upgrade_id, u.state, u.outcome, u.hostname, u.username,
                   u.started_at, u.finished_at, {upgrade_duration} AS duration_s,
                   u.superseded_by, u.error,
                   (SELECT COUNT(*) FROM phases p WHERE p.upgrade_id = u.id{same_p})
                       AS phases,
                   {count()} AS components,
                   {count(" AND c.state = 'COMPLETED'")} AS components_completed,
                   {count(" AND c.state = 'FAILED'")} AS components_failed,
                   {count(" AND c.state = 'SKIPPED'")} AS components_skipped,
                   (SELECT COALESCE(SUM(c.attempts), 0) FROM components c
                     WHERE c.upgrade_id = u.id{same_c}) AS attempts
              FROM upgrades u""",
        "component_runs": f"""
            SELECT {h}c.upgrade_id, u.hostname, c.phase, c.name AS component,
                   c.from_version, c.to_version, c.state, c.attempts,
                   c.started_at, c.completed_at, c.failed_at,
                   {component_duration} AS duration_s, c.last_error, c.backup_path,
                   u.outcome AS upgrade_outcome
              FROM components c JOIN upgrades u ON {join_c}u.id = c.upgrade_id""",
        "phase_runs": f"""
            SELECT {h}p.upgrade_id, u.hostname, p.position, p.name AS phase, p.state,
                   p.started_at, COALESCE(p.completed_at, p.failed_at) AS ended_at,
                   {phase_duration} AS duration_s, p.error
              FROM phases p JOIN upgrades u ON {join_p}u.id = p.upgrade_id""",
        "failures": f"""
            SELECT 'component' AS level, {h}c.upgrade_id, u.hostname, c.phase,
                   c.name AS component, c.to_version, c.failed_at AS at,
                   c.last_error AS error, c.attempts
              FROM components c JOIN upgrades u ON {join_c}u.id = c.upgrade_id
             WHERE c.failed_at IS NOT NULL
            UNION ALL
            SELECT 'phase', {h}p.upgrade_id, u.hostname, p.name, NULL, NULL,
                   p.failed_at, p.error, NULL
              FROM phases p JOIN upgrades u ON {join_p}u.id = p.upgrade_id
             WHERE p.failed_at IS NOT NULL
            UNION ALL
            SELECT 'upgrade', {h}u.id, u.hostname, NULL, NULL, NULL,
                   u.finished_at, u.error, NULL
              FROM upgrades u
             WHERE u.outcome IN ('FAILED', 'ROLLED_BACK')""",
    }


def _drop_views() -> None:
    for name in ("failures", "phase_runs", "component_runs", "upgrade_summary"):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def _create_views(with_host: bool) -> None:
    for name, body in _views(with_host).items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def upgrade() -> None:  # noqa: PLR0915 (one migration: every table re-keyed in order)
    _drop_views()
    op.create_table(
        "hosts",
        sa.Column("name", HOST, nullable=False),
        sa.Column("machine_id", sa.String(64)),
        sa.Column("current_upgrade", NAME),
        sa.Column("created_at", STAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_hosts"),
    )
    for table in ("upgrades", "phases", "components", "rollback_points", "events",
                  "notify_cursors"):
        op.add_column(table, sa.Column("host", HOST))
    here = {"here": _migrating_host()}
    op.execute(sa.text("UPDATE upgrades SET host = COALESCE(NULLIF(hostname, ''), :here)")
               .bindparams(**here))
    for table in ("phases", "components", "rollback_points"):
        op.execute(f"UPDATE {table} SET host = (SELECT u.host FROM upgrades u "
                   f"WHERE u.id = {table}.upgrade_id)")
    op.execute(sa.text(
        "UPDATE events SET host = COALESCE((SELECT u.host FROM upgrades u WHERE "
        "u.id = events.upgrade_id), NULLIF(hostname, ''), :here)").bindparams(**here))
    op.execute(sa.text("UPDATE notify_cursors SET host = :here").bindparams(**here))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    op.execute(sa.text(
        "INSERT INTO hosts (name, created_at) SELECT host, :now FROM ("
        "SELECT host FROM upgrades UNION SELECT host FROM events "
        "UNION SELECT host FROM notify_cursors) AS seen").bindparams(now=now))
    op.execute(
        "UPDATE hosts SET current_upgrade = (SELECT u.id FROM upgrades u "
        "WHERE u.host = hosts.name ORDER BY CASE WHEN u.id = (SELECT value FROM ledger_meta "
        "WHERE key = 'current_upgrade') THEN 0 ELSE 1 END, u.started_at DESC, u.id DESC "
        "LIMIT 1)")
    op.execute("DELETE FROM ledger_meta WHERE key = 'current_upgrade'")

    # Keys: drop the references first, then re-key each table with its host.
    with op.batch_alter_table("components") as b:
        b.drop_constraint("fk_components_phase_phases", type_="foreignkey")
    with op.batch_alter_table("phases") as b:
        b.drop_constraint("fk_phases_upgrade_id_upgrades", type_="foreignkey")
    with op.batch_alter_table("rollback_points") as b:
        b.drop_constraint("fk_rollback_points_upgrade_id_upgrades", type_="foreignkey")
        b.drop_index("ix_rollback_points_upgrade_id_cleared_at")
        b.alter_column("host", existing_type=HOST, nullable=False)
        b.create_index("ix_rollback_points_host_upgrade_id_cleared_at",
                       ["host", "upgrade_id", "cleared_at"])
    with op.batch_alter_table("upgrades") as b:
        b.drop_constraint("pk_upgrades", type_="primary")
        b.drop_index("ix_upgrades_hostname_started_at")
        b.alter_column("host", existing_type=HOST, nullable=False)
        b.create_primary_key("pk_upgrades", ["host", "id"])
        b.create_foreign_key("fk_upgrades_host_hosts", "hosts", ["host"], ["name"])
        b.create_index("ix_upgrades_host_started_at", ["host", "started_at"])
    with op.batch_alter_table("phases") as b:
        b.drop_constraint("pk_phases", type_="primary")
        b.alter_column("host", existing_type=HOST, nullable=False)
        b.create_primary_key("pk_phases", ["host", "upgrade_id", "name"])
        b.create_foreign_key("fk_phases_upgrade_upgrades", "upgrades",
                             ["host", "upgrade_id"], ["host", "id"], ondelete="CASCADE")
    with op.batch_alter_table("components") as b:
        b.drop_constraint("pk_components", type_="primary")
        b.alter_column("host", existing_type=HOST, nullable=False)
        b.create_primary_key("pk_components", ["host", "upgrade_id", "phase", "name"])
        b.create_foreign_key("fk_components_phase_phases", "phases",
                             ["host", "upgrade_id", "phase"], ["host", "upgrade_id", "name"],
                             ondelete="CASCADE")
    with op.batch_alter_table("rollback_points") as b:
        b.create_foreign_key("fk_rollback_points_upgrade_upgrades", "upgrades",
                             ["host", "upgrade_id"], ["host", "id"], ondelete="CASCADE")
    with op.batch_alter_table("events") as b:
        b.drop_index("ix_events_upgrade_id_id")
        b.alter_column("host", existing_type=HOST, nullable=False)
        b.create_foreign_key("fk_events_host_hosts", "hosts", ["host"], ["name"])
        b.create_index("ix_events_host_upgrade_id_id", ["host", "upgrade_id", "id"])
    with op.batch_alter_table("notify_cursors") as b:
        b.drop_constraint("pk_notify_cursors", type_="primary")
        b.alter_column("host", existing_type=HOST, nullable=False)
        b.create_primary_key("pk_notify_cursors", ["host", "subscriber"])
        b.create_foreign_key("fk_notify_cursors_host_hosts", "hosts", ["host"], ["name"])
    _create_views(with_host=True)


def downgrade() -> None:
    """Back to one host per ledger: refused when two hosts share an upgrade id (one
    of them would be lost); the migrating host's current upgrade stays current."""
    bind = op.get_bind()
    shared = bind.execute(sa.text(
        "SELECT id FROM upgrades GROUP BY id HAVING COUNT(*) > 1 ORDER BY id")).scalars().all()
    if shared:
        raise RuntimeError(
            f"cannot go below revision 0004: upgrade ids used by several hosts "
            f"({', '.join(shared[:5])}); export and delete one host's upgrades first")
    _drop_views()
    current = bind.execute(sa.text(
        "SELECT current_upgrade FROM hosts WHERE current_upgrade IS NOT NULL "
        "ORDER BY CASE WHEN name = :here THEN 0 ELSE 1 END, name LIMIT 1"),
        {"here": _migrating_host()}).scalar()
    if current is not None:
        op.execute(sa.text("INSERT INTO ledger_meta (key, value) VALUES "
                           "('current_upgrade', :id)").bindparams(id=current))
    with op.batch_alter_table("notify_cursors") as b:
        b.drop_constraint("fk_notify_cursors_host_hosts", type_="foreignkey")
        b.drop_constraint("pk_notify_cursors", type_="primary")
        b.drop_column("host")
        b.create_primary_key("pk_notify_cursors", ["subscriber"])
    with op.batch_alter_table("events") as b:
        b.drop_constraint("fk_events_host_hosts", type_="foreignkey")
        b.drop_index("ix_events_host_upgrade_id_id")
        b.drop_column("host")
        b.create_index("ix_events_upgrade_id_id", ["upgrade_id", "id"])
    with op.batch_alter_table("rollback_points") as b:
        b.drop_constraint("fk_rollback_points_upgrade_upgrades", type_="foreignkey")
        b.drop_index("ix_rollback_points_host_upgrade_id_cleared_at")
    with op.batch_alter_table("components") as b:
        b.drop_constraint("fk_components_phase_phases", type_="foreignkey")
        b.drop_constraint("pk_components", type_="primary")
    with op.batch_alter_table("phases") as b:
        b.drop_constraint("fk_phases_upgrade_upgrades", type_="foreignkey")
        b.drop_constraint("pk_phases", type_="primary")
    with op.batch_alter_table("upgrades") as b:
        b.drop_constraint("fk_upgrades_host_hosts", type_="foreignkey")
        b.drop_constraint("pk_upgrades", type_="primary")
        b.drop_index("ix_upgrades_host_started_at")
        b.drop_column("host")
        b.create_primary_key("pk_upgrades", ["id"])
        b.create_index("ix_upgrades_hostname_started_at", ["hostname", "started_at"])
    with op.batch_alter_table("phases") as b:
        b.drop_column("host")
        b.create_primary_key("pk_phases", ["upgrade_id", "name"])
        b.create_foreign_key("fk_phases_upgrade_id_upgrades", "upgrades", ["upgrade_id"],
                             ["id"], ondelete="CASCADE")
    with op.batch_alter_table("components") as b:
        b.drop_column("host")
        b.create_primary_key("pk_components", ["upgrade_id", "phase", "name"])
        b.create_foreign_key("fk_components_phase_phases", "phases", ["upgrade_id", "phase"],
                             ["upgrade_id", "name"], ondelete="CASCADE")
    with op.batch_alter_table("rollback_points") as b:
        b.drop_column("host")
        b.create_foreign_key("fk_rollback_points_upgrade_id_upgrades", "upgrades",
                             ["upgrade_id"], ["id"], ondelete="CASCADE")
        b.create_index("ix_rollback_points_upgrade_id_cleared_at",
                       ["upgrade_id", "cleared_at"])
    op.drop_table("hosts")
    _create_views(with_host=False)
