"""Output formats, once: table (tabulate), JSON, plain text and CSV.

Commands return data (a scalar, a mapping, or a list of mappings) and ``render``
prints it in the format chosen by the shared ``--format`` option. JSON output is
stable and documented in docs/cli.md: scripts parse it.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import click

FORMATS = ("table", "json", "plain", "csv")
F = TypeVar("F", bound=Callable[..., Any])
S = TypeVar("S", str, str | None)


def output_option(default: str | None = "table", *, inherit: bool = True,
                  ) -> Callable[[F], F]:
    """Add ``-f/--format`` (and ``--json``, its shortcut) to a command that prints data.

    Without ``-f`` the root's ``--format`` (or ``LEDGER_FORMAT``) applies, else
    *default*: a format chosen once for a whole script holds for every command.
    With *inherit* false only the command's own ``-f``/``--json`` count (see
    ``value_option``).
    """

    def resolve(ctx: click.Context, _param: click.Parameter, value: str | None,
                ) -> str | None:
        if value is not None or not inherit:
            return value or default
        root = ctx.find_root().obj
        return getattr(root, "fmt", None) or default

    def decorate(func: F) -> F:
        func = click.option("--json", "as_json", is_flag=True,
                            help="Shortcut for --format json.")(func)
        default_help = (f"the root's --format, else {default}" if inherit else
                        "the bare text, whatever the root's --format says")
        return click.option(
            "-f", "--format", "fmt", type=click.Choice(FORMATS), default=None,
            callback=resolve, help=f"Output format [default: {default_help}].",
        )(func)

    return decorate


def value_option() -> Callable[[F], F]:
    """``-f``/``--json`` for a command that prints one value or a text for people
    (``state get``, ``progress``, ``summary``...): without them it prints that text as
    it always has, whatever ``--format``/``LEDGER_FORMAT`` says, so that
    ``$(upgrade-ledger state get)`` stays one word in every script; with them, the
    value as a record in the format asked for."""
    return output_option(default=None, inherit=False)


def pick(fmt: S, as_json: bool) -> S | str:
    """The format chosen by ``--format``/``--json``."""
    return "json" if as_json else fmt


def render_value(record: Mapping[str, Any], fmt: str | None, text: str | None) -> None:
    """Print *text* (nothing when it is None or empty) when no format was asked for,
    else *record* in *fmt*: the output of a ``value_option`` command."""
    if fmt is None:
        if text:
            click.echo(text)
        return
    render(dict(record), fmt)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


#: Widest ``brief`` text, so that a detail stays a short column.
BRIEF_WIDTH = 60
_CHECKSUM = re.compile(r"[0-9a-f]{32,}")


def brief(detail: Mapping[str, Any] | None, width: int = BRIEF_WIDTH) -> str:
    """An event's detail in a few words for a table cell: ``key=value`` pairs, nulls
    left out, checksums cut to 12 digits, the whole cut to *width* characters."""
    if not detail:
        return ""
    words = []
    for key, value in detail.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"),
                                                               ensure_ascii=False)
        if _CHECKSUM.fullmatch(text):
            text = text[:12]
        words.append(f"{key}={text}")
    line = " ".join(words).replace("\n", " ").replace("\t", " ")
    return line if len(line) <= width else line[:width - 1] + "…"


def render(data: Any, fmt: str, columns: Sequence[str] | None = None, *,
           empty: str | None = None) -> None:
    """Print *data* in *fmt*. *columns* picks and orders the columns of records.

    An empty list in a table still prints its header, and *empty* ("no upgrades
    match") on stderr, so that a person sees the query ran and found nothing; JSON
    prints ``[]`` and plain text and CSV nothing, for scripts.
    """
    click.echo(format_data(data, fmt, columns), nl=False)
    if empty and fmt == "table" and isinstance(data, list) and not data:
        click.echo(empty, err=True)


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
            if not records and not cols:
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
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue()
