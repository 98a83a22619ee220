"""``upgrade-ledger fleet``: ship this host's ledger to the fleet database, and read
the fleet (status, history, show, sql). The library is ``ledger.fleet``."""

from __future__ import annotations

import os
import signal
from typing import Any

import click

from ledger.cli.app import MAX_SECONDS, Config, NumberRange, pass_config
from ledger.cli.output import echo_or_drop, output_option, pick, render, stream_rows
from ledger.cli.reports import (
    HISTORY_COLUMNS,
    history_options,
    parse_params,
    query_options,
    show_sections,
)
from ledger.errors import BadInput

STATUS_COLUMNS = ["host", "upgrade_id", "state", "progress_percent", "phase", "component",
                  "updated_at", "pushed_at", "silent", "slots"]


def _fleet_url(cfg: Config) -> str:
    if not cfg.fleet_url:
        raise BadInput("no fleet database is configured: give --fleet URL (or "
                       "LEDGER_FLEET_URL); docs/fleet.md")
    return cfg.fleet_url


def _open(cfg: Config) -> Any:
    """The fleet database, to read (``ledger.fleet.reports.Fleet``)."""
    from ledger.core.host import identity  # noqa: PLC0415
    from ledger.fleet.reports import Fleet  # noqa: PLC0415 (psycopg: only for fleet commands)

    return Fleet(_fleet_url(cfg), identity(os.environ, cfg.host_name))


@click.group()
def fleet() -> None:
    """Ship this host's ledger to the fleet database (PostgreSQL) and read every host
    there: push, status, history, show, sql. docs/fleet.md describes the model."""


@fleet.command()
@click.option("--follow", is_flag=True,
              help="Keep running: push as the ledger changes (and at least every minute), "
                   "until SIGTERM or Ctrl-C. For a service (examples/).")
@click.option("--exit-when-idle", "idle_s", type=NumberRange(0, MAX_SECONDS), default=None,
              metavar="SECONDS",
              help="With --follow: stop once nothing changed for this long and no script "
                   "holds the lock (what a step starts in the background).")
@click.option("--batch", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Events per batch (one PostgreSQL transaction each).")
@click.option("--quiet", is_flag=True, help="Print nothing (errors still go to stderr).")
@output_option()
@pass_config
def push(cfg: Config, *, follow: bool, idle_s: float | None, batch: int, quiet: bool,
         fmt: str, as_json: bool) -> None:
    """Send every row of this host's ledger that the fleet database lacks (upgrades,
    phases, components, rollback points, events), in batches; run again, it sends only
    what is new. Exit 16 when the fleet database cannot be reached (the failure is
    recorded: 'status' shows it)."""
    from ledger.fleet import pusher  # noqa: PLC0415

    ledger = cfg.ledger(create=False)
    if not follow:
        if idle_s is not None:
            raise click.UsageError("--exit-when-idle goes with --follow")
        done = pusher.push(ledger, batch=batch)
        if not quiet:
            data = {"events": done.events, "batches": done.batches, "upgrades": done.upgrades,
                    "shipped_event_id": done.shipped_event_id, "reset": done.reset}
            out = pick(fmt, as_json)
            if out in ("table", "plain"):
                echo_or_drop(f"pushed {done.events} event(s) and {done.upgrades} upgrade(s) "
                             f"in {done.batches} batch(es); the fleet has this host's ledger "
                             f"up to event {done.shipped_event_id}"
                             + (" (its copy was shipped anew)" if done.reset else ""))
            else:
                render(data, out)
        return
    worker = pusher.pusher_for(ledger, batch=batch)
    held = pusher.take_lock(ledger.home.root)
    if held is None:
        worker.close()
        if not quiet:
            from ledger.fleet.spawn import pusher_pid  # noqa: PLC0415

            echo_or_drop(f"a pusher runs for this home already (PID "
                         f"{pusher_pid(ledger.home.root)}); leaving it the work", err=True)
        return
    stopping = []
    previous = {sig: signal.signal(sig, lambda *_: stopping.append(True))
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        pusher.follow(worker, ledger.home, stop=lambda: bool(stopping), idle_exit_s=idle_s,
                      lock_fd=held)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        worker.close()


@fleet.command()
@click.option("--silent-after", "silent_after_s", type=NumberRange(0, MAX_SECONDS),
              default=600.0, show_default=True, metavar="SECONDS",
              help="Flag a host with an upgrade in progress that has not pushed for this long.")
@output_option()
@pass_config
def status(cfg: Config, silent_after_s: float, fmt: str, as_json: bool) -> None:
    """One line per host of the fleet: its current (or last) upgrade, state, progress,
    phase and component, last change, last push, whether it went silent, and the
    rolling-upgrade slots it holds."""
    with _open(cfg) as fleet_db:
        rows = fleet_db.status(silent_after_s=silent_after_s)
    out = pick(fmt, as_json)
    if out != "json":
        rows = [{**r, "silent": "SILENT" if r["silent"] else None,
                 "slots": ", ".join(f"{s['plan']}#{s['slot']} since {s['since']}"
                                    for s in r["slots"]) or None} for r in rows]
    render(rows, out, None if out == "json" else STATUS_COLUMNS, empty="no hosts")


@fleet.command()
@history_options(click.option("--host", metavar="NAME", help="Only this host's upgrades."))
@output_option()
@pass_config
def history(cfg: Config, *, limit: int, everything: bool, state: str | None,
            component: str | None, host: str | None, since: str | None, until: str | None,
            fmt: str, as_json: bool) -> None:
    """Upgrades of every host of the fleet (or of --host), newest first."""
    with _open(cfg) as fleet_db:
        rows = fleet_db.history(None if everything else limit, state=state, since=since,
                                until=until, component=component, host=host)
    out = pick(fmt, as_json)
    render(rows, out, None if out == "json" else ["host", *HISTORY_COLUMNS],
           empty="no upgrades match")


@fleet.command()
@click.argument("host")
@click.argument("upgrade_id", required=False)
@output_option()
@pass_config
def show(cfg: Config, host: str, upgrade_id: str | None, fmt: str, as_json: bool) -> None:
    """Everything about one upgrade of HOST in the fleet database (default: its current
    one): phases, components, rollback points and events, as 'show' prints them."""
    with _open(cfg) as fleet_db:
        data = fleet_db.show(host, upgrade_id)
    show_sections(data, pick(fmt, as_json))


@fleet.command()
@query_options
@output_option()
@pass_config
def sql(cfg: Config, query: str, params: tuple[str, ...], timeout_s: float, fmt: str,
        as_json: bool) -> None:
    """Run one read-only SQL query on the fleet database (writes are refused). The
    views of every ledger are there with a host column, plus host_status and
    plan_runs; docs/fleet.md has ready queries."""
    bound = parse_params(params)
    with _open(cfg) as fleet_db, \
            fleet_db.report(query, bound, timeout_s=timeout_s or None) as rows:
        stream_rows(rows.columns, rows, pick(fmt, as_json), empty="no rows")


COMMANDS: list[click.Command] = [fleet]
