"""Operator commands: status, history, show, events, sql, export, import, save-history,
cleanup."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import click

from ledger.cli.app import MAX_SECONDS, Config, NumberRange, pass_config
from ledger.cli.output import (
    F,
    brief,
    output_option,
    pick,
    render,
    render_value,
    stream_rows,
    value_option,
)
from ledger.cli.params import UPGRADE_STATE
from ledger.core.validate import MAX_ROW_ID
from ledger.errors import BadInput
from ledger.store.database import REPORT_TIMEOUT_S
from ledger.views.document import second

HISTORY_COLUMNS = ["id", "state", "outcome", "hostname", "started_at", "finished_at",
                   "duration_s", "components", "completed", "failed"]
COMPONENT_COLUMNS = ["phase", "name", "state", "from_version", "to_version", "attempts",
                     "duration_s", "last_error"]
EVENT_COLUMNS = ["id", "at", "upgrade_id", "kind", "subject", "from", "to", "user", "pid"]
HOSTS_COLUMNS = ["host", "upgrade_id", "state", "outcome", "phase", "component",
                 "progress_percent", "updated_at"]


def host_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--host NAME`` and ``--all-hosts``: whose *what* a command reads (default: this
    host's, as named by --host-name / LEDGER_HOST or the kernel)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option("--all-hosts", is_flag=True,
                            help=f"The {what} of every host of the ledger.")(func)
        return click.option("--host", metavar="NAME",
                            help=f"The {what} of host NAME instead of this host's.")(func)

    return decorate


#: The events of ``show``: all of one upgrade, so its id is not repeated on each, and
#: who made each change is left to ``events`` and JSON, to keep the table narrow.
SHOW_EVENT_COLUMNS = [c for c in EVENT_COLUMNS if c not in ("upgrade_id", "user", "pid")]


def event_columns(fmt: str, columns: list[str] = EVENT_COLUMNS) -> list[str]:
    """The columns of events: the table adds each event's detail, in brief."""
    return [*columns, "detail"] if fmt == "table" else columns


def event_rows(rows: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """Events as a format shows them. JSON: as stored (the same object as in
    notifications). Text: whole seconds, like every other time a report prints; in a
    table, the detail in a few words."""
    if fmt == "json":
        return rows
    return [{**row, "at": second(row["at"]),
             **({"detail": brief(row["detail"])} if fmt == "table" else {})} for row in rows]


@click.command()
@click.option("--stuck-after", "stuck_after_s", type=NumberRange(0, MAX_SECONDS), default=3600.0,
              show_default=True, metavar="SECONDS",
              help="A component upgrading for longer than this is reported as stuck.")
@host_options("current upgrade")
@output_option()
@pass_config
def status(cfg: Config, stuck_after_s: float, host: str | None, all_hosts: bool, fmt: str,
           as_json: bool) -> None:
    """The current upgrade at a glance: state, phase, component, progress, lock,
    rollback points and stuck components (--all-hosts: one line per host)."""
    out = pick(fmt, as_json)
    if all_hosts:
        if host is not None:
            raise BadInput("name one host or every host, not both (--host, --all-hosts)")
        rows = cfg.ledger(create=False).hosts()
        render(rows, out, None if out == "json" else HOSTS_COLUMNS)
        return
    data = cfg.ledger(create=False).status(stuck_after_s=stuck_after_s, host=host)
    if out == "json":
        render(data, out)
        return
    lock = data["lock"]
    flat = {k: v for k, v in data.items()
            if k not in ("lock", "stuck", "components", "notify", "fleet")}
    flat["components"] = ", ".join(f"{n} {s.lower().replace('_', ' ')}"
                                   for s, n in data["components"].items())
    flat["lock"] = "not visible from this host" if lock is None else lock_line(lock)
    flat["lock_reason"] = None if lock is None else lock["reason"]
    flat["stuck"] = ", ".join(f"{s['name']} ({s['why']})" for s in data["stuck"]) or None
    if "notify" in data:
        from ledger.cli.observe import notify_line  # noqa: PLC0415

        flat["notify"] = notify_line(data["notify"])
    if "fleet" in data:
        from ledger.fleet.status import line  # noqa: PLC0415

        flat["fleet"] = line(data["fleet"])
    render(flat, out)


def lock_line(lock: dict[str, Any]) -> str:
    """The lock in words, with the verdict of ``lock held``: a stale lock is not held."""
    pid = lock["holder"]["pid"] if lock["holder"] else "?"
    if lock["held"]:
        return f"held by PID {pid}" + (" (suspect)" if lock["suspect"] else "")
    return f"not held (stale lock of PID {pid})" if lock["stale"] else "free"


def history_options(host_option: Callable[[F], F]) -> Callable[[F], F]:
    """The filters of ``history`` and ``fleet history``: -n/--all, --state,
    --component, *host_option* (which hosts), --since, --until."""
    def decorate(func: F) -> F:
        for option in (
            click.option("--until", metavar="WHEN", help="Started before WHEN."),
            click.option("--since", metavar="WHEN", help="Started at or after WHEN (date, "
                         "time or age such as 7d)."),
            host_option,
            click.option("--component", help="Only upgrades that touched this component."),
            click.option("--state", type=UPGRADE_STATE,
                         help="Only upgrades in (or that ended in) this state (any case)."),
            click.option("--all", "everything", is_flag=True, help="No limit."),
            click.option("-n", "--limit", type=click.IntRange(1, 1_000_000), default=10,
                         show_default=True, help="At most this many upgrades."),
        ):
            func = option(func)
        return func
    return decorate


@click.command()
@history_options(host_options("upgrades"))
@output_option()
@pass_config
def history(cfg: Config, *, limit: int, everything: bool, state: str | None,
            component: str | None, host: str | None, all_hosts: bool, since: str | None,
            until: str | None, fmt: str, as_json: bool) -> None:
    """List this host's upgrades (or another's, or every host's), newest first."""
    rows = cfg.ledger(create=False).history(None if everything else limit, state=state,
                                            since=since, until=until, component=component,
                                            host=host, all_hosts=all_hosts)
    out = pick(fmt, as_json)
    columns = ["host", *HISTORY_COLUMNS] if all_hosts else HISTORY_COLUMNS
    render(rows, out, None if out == "json" else columns, empty="no upgrades match")


@click.command()
@click.argument("upgrade_id", required=False)
@host_options("upgrade")
@output_option()
@pass_config
def show(cfg: Config, upgrade_id: str | None, host: str | None, all_hosts: bool, fmt: str,
         as_json: bool) -> None:
    """Everything about one upgrade (default: the current one): phases, components with
    versions, attempts, errors and durations, rollback points and the event trail.
    --host reads another host's upgrade; --all-hosts finds UPGRADE_ID on any host."""
    data = cfg.ledger(create=False).show(upgrade_id, host=host, all_hosts=all_hosts)
    show_sections(data, pick(fmt, as_json))


def show_sections(data: dict[str, Any], out: str) -> None:
    """Print what ``show`` has of one upgrade: its head, then phases, components,
    rollback points and events, each under its title (JSON: one object)."""
    if out == "json":
        render(data, out)
        return
    head = {k: v for k, v in data.items()
            if k not in ("phases", "components", "rollback_points", "events")}
    sections = [("", head, None), ("Phases", data["phases"], None),
                ("Components", data["components"], COMPONENT_COLUMNS),
                ("Rollback points", [{**p, "sha256": (p["sha256"] or "")[:12] or None}
                                     for p in data["rollback_points"]]
                 if out == "table" else data["rollback_points"], None),
                ("Events", event_rows(data["events"], out),
                 event_columns(out, SHOW_EVENT_COLUMNS))]
    for title, section, columns in sections:
        if title:
            if not section:
                continue
            click.echo(f"\n{title}:" if out == "table" else f"# {title}")
        render(section, out, columns)


@click.command()
@click.option("--upgrade", "upgrade_id", help="Only this upgrade's events.")
@click.option("--component", help="Only this component's events.")
@click.option("--kind", help="Only this kind (or prefix ending in '.', e.g. 'component.').")
@click.option("--since", metavar="WHEN", help="At or after WHEN (date, time or age).")
@click.option("--after", "after_id", type=click.IntRange(0, MAX_ROW_ID), default=0,
              help="Only events with a larger id.")
@click.option("-n", "--limit", type=click.IntRange(1, MAX_ROW_ID), default=1000,
              show_default=True,
              help="The newest N matching events, printed oldest first (like tail -n); "
                   "with --after, the N right after that id (paging on).")
@click.option("--follow", is_flag=True,
              help="Keep running: after the matching events (no --limit), print new ones as "
                   "they are recorded; JSON is one object per line. Stop with Ctrl-C/SIGTERM.")
@click.option("--interval", "interval_s", type=NumberRange(0.05, 60.0),
              default=0.5, show_default=True, metavar="SECONDS",
              help="With --follow: how often to look for new events.")
@host_options("events")
@output_option(default="table")
@pass_config
def events(cfg: Config, *, upgrade_id: str | None, component: str | None, kind: str | None,
           since: str | None, after_id: int, limit: int, follow: bool, interval_s: float,
           host: str | None, all_hosts: bool, fmt: str, as_json: bool) -> None:
    """The audit trail, oldest first (with --follow, as it grows, like tail -f)."""
    if follow:
        from ledger.cli.observe import follow_events  # noqa: PLC0415

        follow_events(cfg, fmt=pick(fmt, as_json), interval_s=interval_s,
                      upgrade_id=upgrade_id, component=component, kind=kind, since=since,
                      after_id=after_id,
                      scope=cfg.ledger(create=False).read_scope(host, all_hosts))
        return
    rows = cfg.ledger(create=False).events(upgrade_id=upgrade_id, component=component,
                                           kind=kind, since=since, after_id=after_id,
                                           limit=limit, host=host, all_hosts=all_hosts,
                                           newest=not after_id)
    out = pick(fmt, as_json)
    columns = event_columns(out, ["host", *EVENT_COLUMNS] if all_hosts else EVENT_COLUMNS)
    render(event_rows(rows, out), out, None if out == "json" else columns,
           empty="no events match")


def query_options(func: F) -> F:
    """QUERY, ``-p NAME=VALUE`` and ``--timeout``: the arguments of a read-only query
    (``sql``, ``fleet sql``)."""
    for option in (
        click.option("--timeout", "timeout_s", type=NumberRange(0, 86400),
                     default=REPORT_TIMEOUT_S, show_default=True, metavar="SECONDS",
                     help="Stop the query after this long, output included (0: no limit)."),
        click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
                     help="A named parameter (:NAME in the query)."),
        click.argument("query"),
    ):
        func = option(func)
    return func


@click.command()
@query_options
@output_option()
@pass_config
def sql(cfg: Config, query: str, params: tuple[str, ...], timeout_s: float, fmt: str,
        as_json: bool) -> None:
    """Run one read-only SQL query (writes and settings are refused before they run).

    Rows are printed as they are read (a table holds at most 10000); Ctrl-C stops the
    query. The reporting views are upgrade_summary, component_runs, phase_runs and
    failures; docs/sql-reporting.md has ready queries.
    """
    bound = parse_params(params)
    with cfg.ledger(create=False).report(query, bound, timeout_s=timeout_s or None) as rows:
        stream_rows(rows.columns, rows, pick(fmt, as_json), empty="no rows")


def parse_params(params: tuple[str, ...]) -> dict[str, str]:
    """``--param NAME=VALUE`` options as a mapping (a usage error for anything else)."""
    bound = {}
    for item in params:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--param")
        bound[name] = value
    return bound


@click.command()
@click.option("--upgrade", "upgrade_id", help="Export this upgrade (default: the current one).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the document here ('-' for stdout) instead of rewriting the views.")
@pass_config
def export(cfg: Config, upgrade_id: str | None, output: str | None) -> None:
    """Rewrite state.json and the history files from the ledger, or write one
    upgrade's document to a path or stdout."""
    ledger = cfg.ledger(create=False)
    if output is None and upgrade_id is None:
        written = ledger.export_views()
        click.echo(f"wrote {len(written)} file(s)", err=True)
        return
    data = ledger.export_document(upgrade_id)
    if output in (None, "-"):
        sys.stdout.buffer.write(data)
    else:
        ledger.home.write_atomic(Path(output).absolute(), data)


@click.command("import")
@click.argument("source", type=click.File("rb"))
@click.option("--current/--no-current", default=True, show_default=True,
              help="Make the imported upgrade the current one (use --no-current for "
                   "history files).")
@value_option()
@pass_config
def import_(cfg: Config, source: BinaryIO, current: bool, fmt: str | None,
            as_json: bool) -> None:
    """Load a legacy state.json or history file (SOURCE, '-' for stdin) into the ledger
    and print its upgrade id.

    The document is validated first; a bad one is refused and changes nothing.
    """
    from ledger.views.document import read  # noqa: PLC0415 (only import needs it)

    upgrade_id = cfg.ledger().import_document(read(source), make_current=current)
    render_value({"upgrade_id": upgrade_id}, pick(fmt, as_json), upgrade_id)


@click.command("save-history")
@click.argument("upgrade_id", required=False)
@value_option()
@pass_config
def save_history(cfg: Config, upgrade_id: str | None, fmt: str | None,
                 as_json: bool) -> None:
    """Write history/<id>.json for an upgrade (default: the current one) and print its
    path."""
    path = cfg.ledger().save_to_history(upgrade_id)
    render_value({"upgrade_id": path.stem, "path": str(path)}, pick(fmt, as_json), str(path))


@click.command()
@click.option("--owner", "owner_pid", type=int, metavar="PID",
              help="Release the lock held by this process [default: --pid].")
@pass_config
def cleanup(cfg: Config, owner_pid: int | None) -> None:
    """Save the current upgrade to history, release the lock, and reset a finished
    upgrade to IDLE (a run still in progress stays resumable)."""
    cfg.ledger().cleanup(owner_pid)


COMMANDS = [status, history, show, events, sql, export, import_, save_history, cleanup]
