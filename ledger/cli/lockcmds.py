"""Lock commands. The owner defaults to ``--pid`` (the calling shell), so a script can
hold the lock across many short ``upgrade-ledger`` calls."""

from __future__ import annotations

import click

from ledger.cli.app import TEXT, Config, NumberRange, pass_config
from ledger.cli.output import output_option, pick, render
from ledger.cli.steps import answer, verbose_option

owner_option = click.option(
    "--owner", "owner_pid", type=int, metavar="PID",
    help="Process that owns the lock [default: --pid, i.e. the calling process].")


@click.group()
def lock() -> None:
    """The exclusive upgrade lock: acquire, release, status, break."""


@lock.command("acquire")
@owner_option
@click.option("--wait", "wait_s", type=NumberRange(0, 86400), default=0.0,
              show_default=True, metavar="SECONDS",
              help="Wait this long (at most a day) for a live holder to let go.")
@click.option("--poll", "poll_s", type=NumberRange(0.001, 60), default=0.05,
              show_default=True, metavar="SECONDS", help="How often to retry while waiting.")
@pass_config
def lock_acquire(cfg: Config, owner_pid: int | None, wait_s: float, poll_s: float) -> None:
    """Take the lock (a stale one is taken over; the owner's own lock is re-entrant).

    Exits 4 with the holder's PID when another live process holds it.
    """
    cfg.ledger().acquire_lock(owner_pid, wait_s=wait_s, poll_s=poll_s)


@lock.command("release")
@owner_option
@pass_config
def lock_release(cfg: Config, owner_pid: int | None) -> None:
    """Release the lock; only its owner can (others exit 4, the lock stays)."""
    cfg.ledger().release_lock(owner_pid)


@lock.command("held")
@verbose_option
@pass_config
@click.pass_context
def lock_held(ctx: click.Context, cfg: Config, verbose: bool) -> None:
    """Exit 0 if a live process holds the lock, 1 if not (a stale lock is not held)."""
    answer(ctx, cfg.ledger(create=False).lock_held(), verbose)


@lock.command("status")
@output_option()
@pass_config
def lock_status(cfg: Config, fmt: str, as_json: bool) -> None:
    """Who holds the lock, since when, from which host, and whether it looks stale."""
    status = cfg.ledger(create=False).lock_status().as_dict()
    holder = status.pop("holder") or {}
    out = pick(fmt, as_json)
    render({**status, "holder": holder or None} if out == "json" else
           {**status, **{f"holder_{k}": v for k, v in holder.items()}}, out)


@lock.command("check-stale")
@pass_config
def lock_check_stale(cfg: Config) -> None:
    """Remove the lock if it is proven stale (recorded as a lock.break event)."""
    if cfg.ledger().check_stale_lock():
        click.echo("removed a stale lock", err=True)


@lock.command("break")
@click.option("--reason", type=TEXT, required=True,
              help="Why the lock is broken (kept in the ledger).")
@pass_config
def lock_break(cfg: Config, reason: str) -> None:
    """Forcibly remove the lock, even from a live holder. Use with care: see docs/lock.md."""
    holder = cfg.ledger().break_lock(reason)
    click.echo(f"lock broken (was held by PID {holder.pid})" if holder else
               "no lock was held", err=True)


COMMANDS = [lock]
