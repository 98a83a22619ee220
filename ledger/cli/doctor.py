"""``upgrade-ledger doctor``: check a ledger home, and apply the safe fixes on request.

The checks live in ``ledger.doctor`` (usable from Python); this module only parses
options, renders one line per check and turns the verdict into the exit code:
0 when no check failed (warnings allowed, unless ``--fail-on-warn``), 1 otherwise.
"""

from __future__ import annotations

import click

from ledger.cli.app import MAX_SECONDS, Config, NumberRange, pass_config
from ledger.cli.output import output_option, pick, render

#: Exit code of doctor when a check failed (or warned, with --fail-on-warn).
EXIT_UNHEALTHY = 1
COLUMNS = ["check", "status", "detail", "hint"]


@click.command()
@click.option("--repair", is_flag=True,
              help="Apply the safe fixes (rewrite views, fix modes, clear a proven-stale "
                   "lock, remove dead temp files, checkpoint the WAL), then check again.")
@click.option("--stuck-after", "stuck_after_s", type=NumberRange(0, MAX_SECONDS), default=3600.0,
              show_default=True, metavar="SECONDS",
              help="A component upgrading for longer than this is reported as stuck.")
@click.option("--wal-warn", "wal_warn_mib", type=NumberRange(0, 1024 * 1024), default=64.0,
              show_default=True, metavar="MIB",
              help="Warn when the write-ahead log is larger than this many MiB.")
@click.option("--quick", is_flag=True,
              help="Run SQLite's quick_check instead of the full integrity_check.")
@click.option("--fail-on-warn", is_flag=True,
              help="Exit 1 on warnings too, not only on failures.")
@output_option()
@pass_config
@click.pass_context
def doctor(ctx: click.Context, cfg: Config, *, repair: bool, stuck_after_s: float,
           wal_warn_mib: float, quick: bool, fail_on_warn: bool, fmt: str,
           as_json: bool) -> None:
    """Check the ledger: integrity, schema revision, lock, permissions, views
    (state.json and history files), WAL size, stuck components, leftover temp files,
    notifications, snapshots and the pushes to the fleet database.

    One line per check: ok, warn, fail or skip. Exits 0 when no check failed, 1 when
    one did. Checking changes nothing; --repair applies only the safe fixes.
    """
    # Imported here: the per-step commands never pay for the checks.
    from ledger.ops import doctor as checks  # noqa: PLC0415

    findings = checks.run_checks(cfg.home, db_url=cfg.db_url, pid=cfg.pid,
                                 lock_timeout_s=cfg.lock_timeout_s, stuck_after_s=stuck_after_s,
                                 wal_warn_bytes=int(wal_warn_mib * 1024 * 1024), quick=quick,
                                 repair=repair, host_name=cfg.host_name,
                                 fleet_url=cfg.fleet_url)
    out = pick(fmt, as_json)
    rows = [f.as_dict() for f in findings]
    render(rows, out, None if out == "json" else COLUMNS + (["repaired"] if repair else []),
           note="hint")  # in a table, each hint goes under its row
    if not checks.healthy(findings, strict=fail_on_warn):
        ctx.exit(EXIT_UNHEALTHY)


COMMANDS: list[click.Command] = [doctor]
