"""Observability commands: ``metrics``, ``notify`` and ``subscribers``; and the
streaming half of ``events --follow`` (the option is on ``events``, in reports.py).

Heavy or rarely needed modules (prometheus-client, urllib) are imported inside the
commands, so this module costs the per-step commands nothing at start-up.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import select
import signal
import sys
from collections.abc import Iterator
from typing import Any

import click

from ledger.cli.app import Config, fail, pass_config
from ledger.cli.output import brief, output_option, pick, render
from ledger.views.document import second

OUTCOME_COLUMNS = ["subscriber", "state", "delivered", "cursor", "attempts", "next_try_at",
                   "error"]
SUBSCRIBER_COLUMNS = ["name", "type", "target", "kinds", "cursor", "behind", "delivered",
                      "failures", "attempts", "next_try_at", "last_error"]
STREAM_COLUMNS = ["id", "at", "upgrade_id", "kind", "subject", "from", "to", "user", "pid"]


# -- metrics -------------------------------------------------------------------------


@click.command()
@click.option("--textfile", metavar="PATH",
              help="Write the metrics to PATH atomically (for node_exporter's textfile "
                   "collector: a file ending in .prom in its directory) instead of stdout.")
@pass_config
def metrics(cfg: Config, textfile: str | None) -> None:
    """Print the ledger's Prometheus metrics (text format): the current upgrade's state
    and progress, components by state, attempts and failures, durations, the lock, the
    audit trail and notifications. docs/observability.md lists every metric."""
    from ledger.observe import metrics as exporter  # noqa: PLC0415 (keeps start-up light)

    if textfile is None:
        sys.stdout.buffer.write(exporter.exposition(cfg.ledger()))
        sys.stdout.flush()
        return
    exporter.check_textfile(textfile)  # a missing folder is refused before anything else
    exporter.write_textfile(cfg.ledger(), textfile)


# -- notifications -------------------------------------------------------------------


@click.command()
@click.option("--force", is_flag=True,
              help="Retry failing subscribers now instead of waiting out their backoff.")
@click.option("--subscriber", "only", metavar="NAME", help="Only this subscriber.")
@click.option("--budget", "budget_s", type=click.FloatRange(min=0.1, max=86400.0),
              default=60.0, show_default=True, metavar="SECONDS",
              help="Start no delivery after this long; what is left waits for the next run.")
@output_option()
@pass_config
def notify(cfg: Config, *, force: bool, only: str | None, budget_s: float, fmt: str,
           as_json: bool) -> None:
    """Deliver pending events to the notification subscribers (HOME/notify.toml) now.

    Exit status 0 when every subscriber is caught up (or the time budget ran out),
    1 when one is failing: the failure is recorded and retried with backoff.
    """
    from ledger.observe import notify as delivery  # noqa: PLC0415

    report = delivery.deliver(cfg.ledger(), budget_s, force=force, only=only)
    out = pick(fmt, as_json)
    if out == "json":
        render(report.as_dict(), out)
    elif report.outcomes:
        render([vars(o) for o in report.outcomes], out, OUTCOME_COLUMNS)
    if report.busy:
        click.echo("upgrade-ledger: another process is delivering notifications now; "
                   "it delivers these too", err=True)
    elif not report.outcomes:
        click.echo("upgrade-ledger: no subscribers (add one with 'upgrade-ledger subscribers "
                   "add', or in HOME/notify.toml)", err=True)
    troubled = [o for o in report.outcomes if o.state in ("failing", "waiting")]
    if troubled:
        first = troubled[0]
        how = "failed" if first.state == "failing" else "is waiting to retry"
        fail(f"notify: {len(troubled)} subscriber(s) not caught up; {first.subscriber} {how} "
             f"at event {first.event_id} ({first.error}); next try at {first.next_try_at} "
             "(or now with --force)", 1)


@click.group()
def subscribers() -> None:
    """List, add and remove notification subscribers (HOME/notify.toml)."""


@subscribers.command("list")
@output_option()
@pass_config
def subscribers_list(cfg: Config, fmt: str, as_json: bool) -> None:
    """Every subscriber with its delivery state: cursor (last event served), events
    behind, deliveries, failures, and the current error and next try if failing."""
    from ledger.observe import notify as delivery  # noqa: PLC0415

    rows = delivery.cursors(cfg.ledger())
    out = pick(fmt, as_json)
    render(rows, out, None if out == "json" else SUBSCRIBER_COLUMNS,
           empty="no subscribers (add one with 'upgrade-ledger subscribers add')")


@subscribers.command("add")
@click.argument("name")
@click.option("--url", help="Webhook: POST each event as JSON to this http(s) URL.")
@click.option("--hook", metavar="PATH",
              help="Hook: run this executable (absolute path) with the event JSON on stdin.")
@click.option("--kind", "kinds", multiple=True, metavar="KIND",
              help="Only events of this kind, or prefix ending in '.' (repeatable; "
                   "default: every kind).")
@click.option("--header", "headers", multiple=True, metavar="NAME=VALUE",
              help="An HTTP header sent with each webhook request (repeatable).")
@click.option("--timeout", "timeout_s", type=float, metavar="SECONDS",
              help="Longest a delivery may take [default: 5].")
@click.option("--retry-initial", "retry_initial_s", type=float, metavar="SECONDS",
              help="Wait after a first failure; doubles with each failure [default: 5].")
@click.option("--retry-max", "retry_max_s", type=float, metavar="SECONDS",
              help="Longest wait between retries [default: 900].")
@click.option("--start", type=click.Choice(["new", "all"]), default="new", show_default=True,
              help="new: events recorded from now on; all: the whole trail first.")
@pass_config
def subscribers_add(cfg: Config, *, name: str, url: str | None, hook: str | None,
                    kinds: tuple[str, ...], headers: tuple[str, ...], timeout_s: float | None,
                    retry_initial_s: float | None, retry_max_s: float | None,
                    start: str) -> None:
    """Add subscriber NAME: a webhook (--url) or a hook (--hook)."""
    from ledger.errors import BadInput  # noqa: PLC0415
    from ledger.observe import notify as delivery  # noqa: PLC0415
    from ledger.observe.subscribers import check  # noqa: PLC0415

    body: dict[str, Any] = {"kinds": list(kinds), "start": start}
    for key, value in (("url", url), ("hook", hook), ("timeout_s", timeout_s),
                       ("retry_initial_s", retry_initial_s), ("retry_max_s", retry_max_s)):
        if value is not None:
            body[key] = value
    if headers:
        body["headers"] = {}
        for item in headers:
            key, sep, value = item.partition("=")
            if not sep:
                raise BadInput(f"--header {item[:80]!r} is not NAME=VALUE")
            body["headers"][key.strip()] = value.strip()
    sub = check(name, body, where=None)  # refused before anything is touched
    cursor = delivery.add_subscriber(cfg.ledger(), sub)
    click.echo(f"subscriber {sub.name} added ({sub.kind} {sub.target}); it is sent the "
               f"events after #{cursor}", err=True)


@subscribers.command("remove")
@click.argument("name")
@pass_config
def subscribers_remove(cfg: Config, name: str) -> None:
    """Remove subscriber NAME and forget its delivery cursor."""
    from ledger.observe import notify as delivery  # noqa: PLC0415

    delivery.remove_subscriber(cfg.ledger(), name)
    click.echo(f"subscriber {name} removed", err=True)


# -- events --follow -----------------------------------------------------------------


def follow_events(cfg: Config, *, fmt: str, interval_s: float, upgrade_id: str | None,
                  component: str | None, kind: str | None, since: str | None,
                  after_id: int, scope: str | None = None) -> None:
    """Print matching events, then new ones as other processes record them, until
    SIGINT or SIGTERM (a clean stop: exit status 0) or until stdout is closed."""
    from ledger.observe.follow import follow  # noqa: PLC0415

    ledger = cfg.ledger()
    stopping: list[int] = []
    with _stop_on_signals(stopping):
        stream = follow(ledger, stop=lambda: bool(stopping), interval_s=interval_s,
                        upgrade_id=upgrade_id, component=component, kind=kind,
                        since=since, after_id=after_id, host=scope)
        try:
            if fmt == "csv":
                _write(_csv_line(STREAM_COLUMNS))
            for batch in stream:
                if batch:
                    _write("".join(_line(event, fmt) for event in batch))
                elif _stdout_gone():
                    break
        except BrokenPipeError:
            pass  # the reader went away: as `tail -f | head` does, stop quietly
        finally:
            stream.close()
    if _stdout_gone():
        # Nothing can be written any more; keep the interpreter's last flush quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


@contextlib.contextmanager
def _stop_on_signals(stopping: list[int]) -> Iterator[None]:
    def on_signal(signum: int, _frame: Any) -> None:
        stopping.append(signum)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _stdout_gone() -> bool:
    """True when stdout is a pipe whose reader has closed it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # not a real file (e.g. captured in-process): never "gone"
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def _line(event: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(event, ensure_ascii=False) + "\n"
    shown = {**event, "at": second(event["at"])}  # whole seconds, as in `events`
    cells = ["" if shown.get(c) is None else str(shown[c]) for c in STREAM_COLUMNS]
    if fmt == "csv":
        return _csv_line(cells)
    if fmt == "plain":
        return "\t".join(cells) + "\n"
    ident, at, upgrade, kind, subject, old, new, user, pid = cells
    change = f"{old or '-'} -> {new or '-'}" if old or new else ""
    detail = brief(event.get("detail"))
    return (f"{ident:>6}  {at}  {upgrade or '-'}  {kind:<20}  {subject or '-'}  {change}  "
            f"{user} pid {pid}{'  ' + detail if detail else ''}\n")


def _csv_line(cells: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()



def notify_line(summary: dict[str, Any]) -> str | None:
    """The ``notify`` field of ``status`` in words, for the table and plain formats."""
    if summary.get("error"):
        return f"broken: {summary['error']}"
    if not summary.get("subscribers"):
        return None
    text = f"{summary['subscribers']} subscriber(s), {summary['pending_events']} event(s) " \
           "not yet delivered"
    failing = summary.get("failing") or []
    if failing:
        text += "; failing: " + ", ".join(
            f"{f['name']} ({f['attempts']} attempt(s): {f['last_error']})" for f in failing)
    return text


COMMANDS = [metrics, notify, subscribers]
