"""Output formats, once: table (tabulate), JSON, plain text and CSV.

Commands return data (a scalar, a mapping, or a list of mappings) and ``render``
prints it in the format chosen by the shared ``--format`` option. JSON output is
stable and documented in docs/cli.md: scripts parse it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import click

from ledger.errors import BadInput

FORMATS = ("table", "json", "plain", "csv")
#: A table aligns its columns over every row, so it must hold them all: at most this
#: many (the other formats stream any number).
TABLE_MAX_ROWS = 10_000
#: Streamed output is written in pieces of about this many characters.
_CHUNK = 64 * 1024
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
    if isinstance(value, bytes):
        return _blob(value)
    return str(value)


def _blob(value: bytes) -> str:
    """A BLOB (only ``sql`` meets one) as SQL writes it: ``X'00FF'``."""
    return f"X'{value.hex().upper()}'"


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return _blob(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def visible(text: str, *, plain: bool = True) -> str:
    """*text* with every character that is not printable escaped as Python writes it
    (``\\t``, ``\\n``, ``\\u202e`` ...), so that a field is one field on one line and
    looks like what it holds: a text cannot fake a row or reorder one.

    *plain* (``-f plain``, read by scripts) also escapes the backslash, so that the
    escaping can be undone; tables (read by people) keep their line breaks, which a
    table shows as continuation lines.
    """
    if text.isprintable() and not (plain and "\\" in text):
        return text
    out = []
    for char in text:
        if char == "\\" and plain:
            out.append("\\\\")
        elif char.isprintable() or (char == "\n" and not plain):
            out.append(char)
        elif char in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[char])
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def render(data: Any, fmt: str, columns: Sequence[str] | None = None) -> None:
    """Print *data* in *fmt*. *columns* picks and orders the columns of records."""
    click.echo(format_data(data, fmt, columns), nl=False)


def format_data(data: Any, fmt: str,  # noqa: PLR0911 (one return per format)
                columns: Sequence[str] | None = None) -> str:
    """*data* as text in *fmt* (newline-terminated unless empty)."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False, default=_json_value) + "\n"
    if isinstance(data, Mapping):
        rows = [(k, data[k]) for k in (columns or list(data))]
        if fmt == "table":
            return _record_table([(visible(k, plain=False), visible(_cell(v), plain=False))
                                  for k, v in rows])
        if fmt == "csv":
            return _csv([("key", "value"), *((k, _cell(v)) for k, v in rows)])
        return "".join(f"{visible(k)}: {visible(_cell(v))}\n" for k, v in rows)
    if isinstance(data, list):
        cols = list(columns or (list(data[0]) if data and isinstance(data[0], Mapping) else []))
        records = [[_cell(r.get(c)) for c in cols] if isinstance(r, Mapping) else [_cell(r)]
                   for r in data]
        if fmt == "table":
            if not records:
                return ""
            from tabulate import tabulate  # noqa: PLC0415 (only tables pay for it)

            shown = [[visible(cell, plain=False) for cell in r] for r in records]
            return tabulate(shown, headers=[visible(c, plain=False) for c in cols] or (),
                            tablefmt="simple") + "\n"
        if fmt == "csv":
            return _csv([cols, *records] if cols else records)
        return "".join("\t".join(visible(cell) for cell in r) + "\n" for r in records)
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


def stream_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str) -> None:
    """Print the rows of a query in *fmt* as they come, holding none of them but a
    table's (which needs them all to align, so it takes at most ``TABLE_MAX_ROWS``).
    Gives the same text as ``render`` of the rows as records."""
    if fmt == "table":
        records: list[dict[str, Any]] = []
        for row in rows:
            if len(records) == TABLE_MAX_ROWS:
                raise BadInput(f"more than {TABLE_MAX_ROWS} rows do not fit a table; use "
                               "-f csv, plain or json, which stream any number of rows")
            records.append(dict(zip(columns, row, strict=True)))
        render(records, fmt, columns)
        return
    pieces: list[str] = []
    size = 0
    for piece in _pieces(columns, rows, fmt):
        pieces.append(piece)
        size += len(piece)
        if size >= _CHUNK:
            click.echo("".join(pieces), nl=False)
            pieces, size = [], 0
    click.echo("".join(pieces), nl=False)


def _pieces(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str,
            ) -> Iterable[str]:
    if fmt == "json":  # exactly json.dumps(list_of_records, indent=2), one row at a time
        first = True
        for row in rows:
            record = json.dumps(dict(zip(columns, row, strict=True)), indent=2,
                                ensure_ascii=False, default=_json_value)
            yield ("[\n  " if first else ",\n  ") + record.replace("\n", "\n  ")
            first = False
        yield "[]\n" if first else "\n]\n"
    elif fmt == "csv":
        yield _csv([list(columns)])
        for row in rows:
            yield _csv([[_cell(value) for value in row]])
    else:
        for row in rows:
            yield "\t".join(visible(_cell(value)) for value in row) + "\n"
