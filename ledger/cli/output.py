"""Output formats, once: table (tabulate), JSON, plain text and CSV.

Commands return data (a scalar, a mapping, or a list of mappings) and ``render``
prints it in the format chosen by the shared ``--format`` option. JSON output is
stable and documented in docs/cli.md: scripts parse it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import click

FORMATS = ("table", "json", "plain", "csv")
F = TypeVar("F", bound=Callable[..., Any])


def output_option(default: str = "table") -> Callable[[F], F]:
    """Add ``-f/--format`` (and ``--json``, its shortcut) to a command that prints data.

    Without ``-f`` the root's ``--format`` (or ``LEDGER_FORMAT``) applies, else
    *default*: a format chosen once for a whole script holds for every command.
    """

    def resolve(ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
        if value is not None:
            return value
        root = ctx.find_root().obj
        return getattr(root, "fmt", None) or default

    def decorate(func: F) -> F:
        func = click.option("--json", "as_json", is_flag=True,
                            help="Shortcut for --format json.")(func)
        return click.option(
            "-f", "--format", "fmt", type=click.Choice(FORMATS), default=None,
            callback=resolve, help=f"Output format [default: the root's --format, else "
                                   f"{default}].",
        )(func)

    return decorate


def pick(fmt: str, as_json: bool) -> str:
    """The format chosen by ``--format``/``--json``."""
    return "json" if as_json else fmt


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def render(data: Any, fmt: str, columns: Sequence[str] | None = None) -> None:
    """Print *data* in *fmt*. *columns* picks and orders the columns of records."""
    click.echo(format_data(data, fmt, columns), nl=False)


def format_data(data: Any, fmt: str,  # noqa: PLR0911 (one return per format)
                columns: Sequence[str] | None = None) -> str:
    """*data* as text in *fmt* (newline-terminated unless empty)."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if isinstance(data, Mapping):
        rows = [(k, data[k]) for k in (columns or list(data))]
        if fmt == "table":
            return _record_table([(k, _cell(v)) for k, v in rows])
        if fmt == "csv":
            return _csv([("key", "value"), *((k, _cell(v)) for k, v in rows)])
        return "".join(f"{k}: {_cell(v)}\n" for k, v in rows)
    if isinstance(data, list):
        cols = list(columns or (list(data[0]) if data and isinstance(data[0], Mapping) else []))
        records = [[_cell(r.get(c)) for c in cols] if isinstance(r, Mapping) else [_cell(r)]
                   for r in data]
        if fmt == "table":
            if not records:
                return ""
            from tabulate import tabulate  # noqa: PLC0415 (only tables pay for it)

            return tabulate(records, headers=cols or (), tablefmt="simple") + "\n"
        if fmt == "csv":
            return _csv([cols, *records] if cols else records)
        return "".join("\t".join(r) + "\n" for r in records)
    text = _cell(data)
    return text + "\n" if text else ""


def _record_table(rows: Sequence[tuple[str, str]]) -> str:
    """One record as aligned ``key  value`` lines.

    Done here rather than by tabulate: a record is two columns, and importing
    tabulate costs ~20 ms, which ``status`` (a per-step command) should not pay.
    """
    width = max((len(key) for key, _ in rows), default=0)
    indent = "\n" + " " * (width + 2)
    return "".join(f"{key.ljust(width)}  {value.replace(chr(10), indent)}".rstrip() + "\n"
                   for key, value in rows)


def _csv(rows: Sequence[Sequence[str]]) -> str:
    import csv  # noqa: PLC0415 (only CSV output pays for it)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue()
