"""The root of ``upgrade-ledger``: global options, the context object, exit codes.

Configuration flows one way: option, then environment variable, then default,
resolved once here into a ``Config`` that every subcommand receives. Errors become
exit codes in one place (``EXIT_CODES``) and one line on stderr; ``--traceback``
(or ``LEDGER_TRACEBACK=1``) shows the whole trace.
"""

from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ledger import errors as e
from ledger.cli.lazy import LazyGroup
from ledger.cli.output import FORMATS, echo_or_drop
from ledger.core.validate import escape_text
from ledger.core.version import __version__
from ledger.lock.record import PID_LIMIT

if TYPE_CHECKING:
    from collections.abc import Callable

    from ledger.api import Ledger

#: Exit codes, documented in docs/cli.md. Predicates answer 0 (yes) or 1 (no).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (e.InvalidTransition, 3),
    (e.NoSlot, 14),
    (e.BrakeEngaged, 15),
    (e.FleetUnavailable, 16),
    (e.LockError, 4),
    (e.NotFound, 5),
    (e.BadInput, 6),
    (e.CorruptLedger, 7),
    (e.StorageError, 8),
    (e.Conflict, 9),
    (e.SchemaTooNew, 10),
    (e.LedgerError, 1),
)
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def exit_code(exc: BaseException) -> int:
    """The documented exit code of a ledger error."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_INTERNAL


class Config:
    """Global settings, resolved once; opens the ledger on first use.

    *opener*, when given, opens the ledger instead of ``Ledger(...)`` and owns it
    afterwards (the command-line session keeps ledgers open between calls, and reruns
    an interrupted call on a ``Replay``); see ``cli.main``'s ``obj`` in ``cli``.
    A plain class, not a dataclass: the per-step path does not import ``dataclasses``.
    """

    __slots__ = ("_ledger", "db_url", "fleet_url", "fmt", "home", "host_name",
                 "lock_timeout_s", "opener", "pid", "strict", "traceback")

    def __init__(self, *, home: str | None, db_url: str | None, pid: int, strict: bool,
                 lock_timeout_s: float, traceback: bool, fmt: str | None = None,
                 host_name: str | None = None, fleet_url: str | None = None,
                 opener: Callable[[Config, bool], Ledger] | None = None) -> None:
        self.home = home
        self.db_url = db_url
        self.pid = pid
        self.strict = strict
        self.lock_timeout_s = lock_timeout_s
        self.traceback = traceback
        self.fmt = fmt  # the root's --format: the default of every command's -f
        self.host_name = host_name  # --host-name / LEDGER_HOST: whose rows (default: uname)
        self.fleet_url = fleet_url  # --fleet / LEDGER_FLEET_URL: where this host ships to
        self.opener = opener
        self._ledger: Ledger | None = None

    def __repr__(self) -> str:
        return (f"Config(home={self.home!r}, db_url={self.db_url!r}, pid={self.pid}, "
                f"strict={self.strict}, lock_timeout_s={self.lock_timeout_s}, "
                f"traceback={self.traceback}, fmt={self.fmt!r}, host_name={self.host_name!r})")

    def ledger(self, *, create: bool = True) -> Ledger:
        """The ledger, opened (and created or migrated if needed) on first use. A
        command that only reads passes *create* False: a home without a ledger is then
        one line (``NoLedger``, exit 5) and nothing is made (a typo in --home, or no
        --home at all, must not leave a new home behind)."""
        if self._ledger is None:
            if self.opener is not None:
                self._ledger = self.opener(self, create)
            else:
                # Imported on first use, so that --help and completion stay quick.
                from ledger.api import Ledger  # noqa: PLC0415

                self._ledger = Ledger(self.home, db_url=self.db_url, pid=self.pid,
                                      strict=self.strict, lock_timeout_s=self.lock_timeout_s,
                                      host_name=self.host_name, create=create,
                                      fleet_url=self.fleet_url)
        return self._ledger

    def close(self) -> None:
        """Close the ledger this command opened (one an opener gave stays its own)."""
        if self._ledger is not None and self.opener is None:
            self._ledger.close()
        self._ledger = None


pass_config = click.make_pass_decorator(Config)




def fail(message: str, code: int) -> NoReturn:
    """Print one line on stderr and exit with *code* (the code stands even when
    nobody reads stderr any more)."""
    echo_or_drop(f"upgrade-ledger: {message}", err=True)
    sys.exit(code)


def _wants_traceback(args: list[str] | None) -> bool:
    return os.environ.get("LEDGER_TRACEBACK", "") not in ("", "0") or \
        "--traceback" in (args if args is not None else sys.argv[1:])


class _Interrupted(Exception):
    """Ctrl-C, carried past click, which would print an empty line for it."""


class LedgerGroup(LazyGroup):
    """The root group: commands loaded lazily; every failure becomes one line on stderr
    and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted from None

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        argv = list(args) if args is not None else None
        show_trace = _wants_traceback(argv)
        try:
            code = super().main(argv, prog_name or "upgrade-ledger", complete_var,
                                standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except (click.Abort, _Interrupted):
            fail("interrupted", EXIT_INTERRUPTED)
        except click.ClickException as exc:
            if show_trace:
                raise
            hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
            fail(f"error: {exc.format_message()}{hint}".replace("\n", " "), exc.exit_code)
        except e.LedgerError as exc:
            if show_trace:
                raise
            fail(f"error: {exc}".replace("\n", " "), exit_code(exc))
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            sys.stderr.close()  # the reader went away (e.g. `| head`): not an error
            sys.exit(0)
        except Exception as exc:
            if show_trace:
                raise
            fail(f"internal error: {type(exc).__name__}: {exc} (run with --traceback for "
                 "details)".replace("\n", " "), EXIT_INTERNAL)
        # Without standalone mode click returns ctx.exit()'s code (predicates: 0 or 1).
        sys.exit(code if isinstance(code, int) else 0)


class NumberRange(click.FloatRange):
    """click's FloatRange, refusing NaN as well: NaN compares false with every bound,
    so a plain FloatRange lets it through. Give every use a maximum (or 1e400, read as
    infinity, passes too)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value} is not in the range {self._describe_range()}.", param, ctx)
        return number


class FreeText(click.ParamType[Any, Any]):
    """A free text (an error, a reason) as a script passes it: any bytes are taken, those
    that are not UTF-8 and control characters kept visible as ``\\xNN`` (see
    ``ledger.core.validate.escape_text``), so that a failure is never lost for its text."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        return escape_text(value) if isinstance(value, str) else value


TEXT = FreeText()

#: The longest duration an option of seconds takes where nothing else bounds it.
MAX_SECONDS = 10 * 365 * 86400.0


def _seconds_in_range(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    # Refused here, before the home is opened (or created), like every usage error.
    if not 0 <= value <= 30 * 86400:  # also false for NaN
        raise click.BadParameter("must be a number of seconds from 0 to 2592000 (30 days)")
    return value


def _positive_pid(_ctx: click.Context, _param: click.Parameter, value: Any) -> int | None:
    if value is None:
        return None
    if not 0 < value < PID_LIMIT:
        raise click.BadParameter(f"must be a positive process id (at most {PID_LIMIT - 1})")
    return int(value)


@click.group(cls=LedgerGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--home", metavar="DIR", envvar=["LEDGER_HOME", "UPGRADE_STATE_DIR"],
              show_envvar=True,
              help="Ledger home folder. [default: /var/lib/observability-upgrades]")
@click.option("--db", "db_url", metavar="URL", envvar="LEDGER_DB_URL", show_envvar=True,
              help="URL of a shared ledger instead of DIR/ledger.db: postgresql://... "
                   "(docs/postgres.md) or any SQLAlchemy URL.")
@click.option("--fleet", "fleet_url", metavar="URL", envvar="LEDGER_FLEET_URL",
              show_envvar=True,
              help="The fleet database this host's ledger is shipped to: postgresql://... "
                   "(docs/fleet.md). Steps never wait for it.")
@click.option("--host-name", metavar="NAME", envvar="LEDGER_HOST", show_envvar=True,
              help="The host whose upgrades this is (its rows in a shared ledger) "
                   "[default: the kernel's node name].")
@click.option("--pid", type=int, envvar="LEDGER_PID", show_envvar=True,
              callback=_positive_pid, metavar="PID",
              help="Process the changes are attributed to and that owns the lock "
                   "[default: the calling process, i.e. the parent of this command].")
@click.option("--strict", is_flag=True, envvar="LEDGER_STRICT", show_envvar=True,
              help="Refuse changes unless --pid holds the lock.")
@click.option("--lock-timeout", "lock_timeout_s", type=float, default=4 * 3600.0,
              callback=_seconds_in_range,
              envvar="LEDGER_LOCK_TIMEOUT", show_envvar=True, show_default=True,
              metavar="SECONDS",
              help="Age after which a lock whose holder cannot be checked counts as stale.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), envvar="LEDGER_FORMAT",
              show_envvar=True,
              help="Output format of every command that prints tables or records (each "
                   "command's -f overrides it; commands that print one value, such as "
                   "state get, keep their bare text) [default: table; JSON for component "
                   "status, rollback info and resume point].")
@click.option("--traceback", is_flag=True, envvar="LEDGER_TRACEBACK", show_envvar=True,
              help="Show the full Python traceback on errors.")
@click.version_option(__version__, "-V", "--version", prog_name="upgrade-ledger")
@click.pass_context
def cli(ctx: click.Context, *, home: str | None, db_url: str | None, fleet_url: str | None,
        host_name: str | None, pid: int | None, strict: bool, lock_timeout_s: float,
        fmt: str | None, traceback: bool) -> None:
    """Track an upgrade of many components on a host: resumable after a crash,
    never run twice, reported on afterwards.

    Run 'upgrade-ledger COMMAND -h' for help on a command; docs/cli.md has the
    full reference and the exit codes.
    """
    # A program that runs commands in its own process (the session) passes obj= to
    # cli.main: the PID of the process it runs them for (what os.getppid() is to a
    # command run on its own) and how to open the ledger.
    runner = ctx.obj
    caller = getattr(runner, "caller_pid", None) or os.getppid()
    ctx.obj = Config(home=home, db_url=db_url, pid=pid or caller, strict=strict,
                     lock_timeout_s=lock_timeout_s, traceback=traceback, fmt=fmt,
                     host_name=host_name, fleet_url=fleet_url,
                     opener=getattr(runner, "open_ledger", None))
    ctx.call_on_close(ctx.obj.close)
