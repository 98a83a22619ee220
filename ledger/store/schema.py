"""The ledger's tables, declared once as SQLAlchemy Core metadata.

Only Alembic (migrations/) and the tests import this module: the per-step path runs
on the stdlib ``sqlite3`` driver and never loads SQLAlchemy. A test proves that the
migrations build exactly these tables (no drift).

Every row belongs to a host (``host``, a ``hosts`` row naming the machine that owns
it): upgrade ids, phases, components, the current-upgrade pointer and notification
cursors are per host, so many hosts can share one database.

Timestamps are UTC ISO-8601 text with millisecond precision
(``2026-11-27T05:19:35.123Z``): readable in plain SQL, ordered as text, and parsed by
``julianday()`` in the reporting views.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

NAME = 128  # longest phase, component or upgrade id accepted
STAMP = 32  # an ISO-8601 timestamp
STATE = 16  # the longest state name is ROLLING_BACK
HOST = 255  # a host name (the kernel's node name is at most 64; DNS names at most 253)
MACHINE = 64  # a machine id (/etc/machine-id holds 32 hex digits)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: Key/value facts about the ledger itself: its lineage id.
ledger_meta = Table(
    "ledger_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

#: The hosts whose upgrades the ledger holds: each name is claimed by one machine
#: (``machine_id``; NULL until a machine that has one writes), and holds that host's
#: current upgrade.
hosts = Table(
    "hosts",
    metadata,
    Column("name", String(HOST), primary_key=True),
    Column("machine_id", String(MACHINE)),
    Column("current_upgrade", String(NAME)),
    Column("created_at", String(STAMP), nullable=False),
)

upgrades = Table(
    "upgrades",
    metadata,
    Column("host", ForeignKey("hosts.name"), primary_key=True),
    Column("id", String(NAME), primary_key=True),
    Column("state", String(STATE), nullable=False),
    # The first terminal state reached (COMPLETED, ROLLED_BACK, FAILED); it survives
    # the reset to IDLE so reports can tell how a run ended.
    Column("outcome", String(STATE)),
    Column("started_at", String(STAMP), nullable=False),
    Column("updated_at", String(STAMP), nullable=False),
    Column("finished_at", String(STAMP)),
    Column("current_phase", String(NAME)),
    Column("current_component", String(NAME)),
    Column("hostname", String(255)),
    Column("username", String(255)),
    Column("pid", Integer),
    Column("error", Text),
    Column("superseded_by", String(NAME)),
    Column("saved_at", String(STAMP)),
    # Keys of a saved or imported document that the ledger does not know, kept
    # verbatim for the views (a JSON object as text; NULL when none): at the top level
    # and inside metadata. phases and components have their own.
    Column("extra", Text),
    Column("metadata_extra", Text),
    Index(None, "started_at"),
    Index(None, "state"),
    Index(None, "host", "started_at"),
)

phases = Table(
    "phases",
    metadata,
    Column("host", String(HOST), primary_key=True),
    Column("upgrade_id", String(NAME), primary_key=True),
    Column("name", String(NAME), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("state", String(STATE), nullable=False),
    Column("started_at", String(STAMP)),
    Column("completed_at", String(STAMP)),
    Column("failed_at", String(STAMP)),
    Column("error", Text),
    Column("extra", Text),  # the phase's kept keys (see upgrades.extra)
    ForeignKeyConstraint(
        ["host", "upgrade_id"],
        ["upgrades.host", "upgrades.id"],
        ondelete="CASCADE",
        name="fk_phases_upgrade_upgrades",
    ),
)

components = Table(
    "components",
    metadata,
    Column("host", String(HOST), primary_key=True),
    Column("upgrade_id", String(NAME), primary_key=True),
    Column("phase", String(NAME), primary_key=True),
    Column("name", String(NAME), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("state", String(STATE), nullable=False),
    Column("from_version", String(NAME)),
    Column("to_version", String(NAME)),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    Column("note", Text),
    Column("started_at", String(STAMP)),
    Column("completed_at", String(STAMP)),
    Column("failed_at", String(STAMP)),
    Column("backup_path", Text),
    Column("extra", Text),  # the component's kept keys (see upgrades.extra)
    ForeignKeyConstraint(
        ["host", "upgrade_id", "phase"],
        ["phases.host", "phases.upgrade_id", "phases.name"],
        ondelete="CASCADE",
        name="fk_components_phase_phases",
    ),
    Index(None, "name", "state", "completed_at"),
)

rollback_points = Table(
    "rollback_points",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("host", String(HOST), nullable=False),
    Column("upgrade_id", String(NAME), nullable=False),
    Column("phase", String(NAME)),
    Column("component", String(NAME), nullable=False),
    Column("backup_path", Text, nullable=False),
    Column("size_bytes", BigInteger),
    Column("sha256", String(64)),
    Column("created_at", String(STAMP), nullable=False),
    Column("cleared_at", String(STAMP)),
    # In a fleet database: the point's id in its host's own ledger (NULL there).
    Column("local_id", Integer),
    ForeignKeyConstraint(
        ["host", "upgrade_id"],
        ["upgrades.host", "upgrades.id"],
        ondelete="CASCADE",
        name="fk_rollback_points_upgrade_upgrades",
    ),
    Index(None, "host", "upgrade_id", "cleared_at"),
    Index("uq_rollback_points_host_local_id", "host", "local_id", unique=True),
)

#: The audit trail: append-only, one row per change, written in the change's transaction.
#: ``host`` is whose trail it is; ``hostname`` where the process that wrote it ran.
events = Table(
    "events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("host", ForeignKey("hosts.name"), nullable=False),
    Column("at", String(STAMP), nullable=False),
    Column("upgrade_id", String(NAME)),
    Column("kind", String(32), nullable=False),
    Column("subject", String(NAME)),
    Column("from_value", Text),
    Column("to_value", Text),
    Column("username", String(255)),
    Column("hostname", String(255)),
    Column("pid", Integer),
    Column("detail", Text),
    # In a fleet database: the event's id in its host's own ledger (NULL there).
    Column("local_id", Integer),
    Index(None, "host", "upgrade_id", "id"),
    Index("uq_events_host_local_id", "host", "local_id", unique=True),
    Index(None, "kind", "id"),
    Index(None, "at"),
)

#: Notification delivery state, one row per host and subscriber (subscribers themselves
#: are configured in each host's notify.toml, and are served that host's events).
#: ``last_event_id`` moves only after a successful delivery; ``attempts``,
#: ``next_try_at`` and ``last_error`` describe the failing delivery while there is one;
#: ``delivered`` and ``failures`` only grow.
notify_cursors = Table(
    "notify_cursors",
    metadata,
    Column("host", ForeignKey("hosts.name"), primary_key=True),
    Column("subscriber", String(NAME), primary_key=True),
    Column("last_event_id", Integer, nullable=False, server_default="0"),
    Column("delivered", Integer, nullable=False, server_default="0"),
    Column("failures", Integer, nullable=False, server_default="0"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("failing_event_id", Integer),
    Column("next_try_at", String(STAMP)),
    Column("last_error", Text),
    Column("last_attempt_at", String(STAMP)),
    Column("delivered_at", String(STAMP)),
    Column("created_at", String(STAMP), nullable=False),
)

#: How this host's pushes to the fleet database went (``ledger.fleet``): the event it
#: last shipped as the fleet confirmed it, the last push, and while pushes fail, how
#: many failed in a row, the next try and the last error. Only in a host's own ledger.
fleet_push = Table(
    "fleet_push",
    metadata,
    Column("host", ForeignKey("hosts.name"), primary_key=True),
    Column("fleet", Text),  # the fleet database's URL, its password masked
    Column("shipped_event_id", Integer, nullable=False, server_default="0"),
    Column("pushed_at", String(STAMP)),
    Column("attempted_at", String(STAMP)),
    Column("failures", Integer, nullable=False, server_default="0"),
    Column("next_try_at", String(STAMP)),
    Column("last_error", Text),
    Column("last_error_at", String(STAMP)),
)

#: In a fleet database: how far each host's ledger was shipped. ``lineage`` is the
#: host ledger's, ``shipped_mark`` a fingerprint of the last event shipped: a host
#: ledger that no longer has that event (restored, replaced) is shipped anew.
#: ``pushed_at`` is the server's time of the host's last push.
fleet_cursors = Table(
    "fleet_cursors",
    metadata,
    Column("host", ForeignKey("hosts.name"), primary_key=True),
    Column("lineage", String(64)),
    Column("shipped_event_id", Integer, nullable=False, server_default="0"),
    Column("shipped_mark", Text),
    Column("pushed_at", String(STAMP), nullable=False),
    Column("first_pushed_at", String(STAMP), nullable=False),
    Column("resets", Integer, nullable=False, server_default="0"),
)

#: In a fleet database: who took each rolling-upgrade slot of a plan, and when. The
#: slot itself is a session advisory lock of ``backend_pid``: a row whose backend no
#: longer holds the lock is a dead holder's, and is not believed.
fleet_slots = Table(
    "fleet_slots",
    metadata,
    Column("plan", Text, primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("host", String(HOST), nullable=False),
    Column("pid", Integer),
    Column("backend_pid", Integer, nullable=False),
    Column("plan_sha256", String(64)),
    Column("taken_at", String(STAMP), nullable=False),
)
