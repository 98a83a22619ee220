"""Output formats, once: table (tabulate), JSON, plain text and CSV.

Commands return data (a scalar, a mapping, or a list of mappings) and ``render``
prints it in the format chosen by the shared ``--format`` option. JSON output is
stable and documented in docs/cli.md: scripts parse it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
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


#: Standard streams found closed by their reader ("out", "err").
_gone: set[str] = set()


def echo_or_drop(text: str, *, err: bool = False, nl: bool = True) -> bool:
    """``click.echo``, except that output nobody can read any more is dropped.

    When the reader of a stream went away (``| head``: EPIPE) or its terminal hung up
    (a dropped ssh session: EIO), the stream is pointed at /dev/null (so that the
    interpreter's last flush stays quiet) and every later line for it is dropped.
    Returns whether the text was written. Used where a command must finish its work
    whoever reads its output (``apply``).
    """
    name = "err" if err else "out"
    if name in _gone:
        return False
    try:
        click.echo(text, err=err, nl=nl)
        return True
    except (OSError, ValueError):  # ValueError: the stream was closed
        _gone.add(name)
        stream = sys.stderr if err else sys.stdout
        devnull = os.open(os.devnull, os.O_WRONLY)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(devnull, stream.fileno())
        os.close(devnull)
        return False


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


#: Widest ``brief`` text, so that a detail stays a short column.
BRIEF_WIDTH = 60
_CHECKSUM = re.compile(r"[0-9a-f]{32,}")
#: A cell of a time, a number or a version: wrapped only when nothing else helps.
_ATOM = re.compile(r"[0-9.:TZ+-]*")


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
           empty: str | None = None, note: str | None = None) -> None:
    """Print *data* in *fmt*. *columns* picks and orders the columns of records.

    An empty list in a table still prints its header, and *empty* ("no upgrades
    match") on stderr, so that a person sees the query ran and found nothing; JSON
    prints ``[]`` and plain text and CSV nothing, for scripts. In a table, the column
    *note* (doctor's hint) is printed under its row rather than beside it, and the
    table is fitted to ``terminal_width()``.
    """
    click.echo(format_data(data, fmt, columns, note=note,
                           width=terminal_width() if fmt == "table" else None), nl=False)
    if empty and fmt == "table" and isinstance(data, list) and not data:
        click.echo(empty, err=True)


def terminal_width() -> int | None:
    """How wide a table may be: ``COLUMNS``, else the terminal's width when stdout is a
    terminal; None when output goes to a pipe or a file, where nothing is wrapped."""
    value = os.environ.get("COLUMNS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        if sys.stdout.isatty():
            return os.get_terminal_size(sys.stdout.fileno()).columns
    except (AttributeError, OSError, ValueError):
        pass
    return None


def format_data(data: Any, fmt: str,  # noqa: PLR0911 (one return per format)
                columns: Sequence[str] | None = None, *, note: str | None = None,
                width: int | None = None) -> str:
    """*data* as text in *fmt* (newline-terminated unless empty); a table no wider than
    *width* when that can be done by wrapping cells."""
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False, default=_json_value) + "\n"
    if isinstance(data, Mapping):
        rows = [(k, data[k]) for k in (columns or list(data))]
        if fmt == "table":
            return _record_table([(visible(k, plain=False), visible(_cell(v), plain=False))
                                  for k, v in rows], width)
        if fmt == "csv":
            return _csv([("key", "value"), *((k, _cell(v)) for k, v in rows)])
        return "".join(f"{visible(k)}: {visible(_cell(v))}\n" for k, v in rows)
    if isinstance(data, list):
        cols = list(columns or (list(data[0]) if data and isinstance(data[0], Mapping) else []))
        if fmt == "table" and note is not None and note in cols:
            notes = [visible(_cell(r.get(note)), plain=False) if isinstance(r, Mapping) else ""
                     for r in data]
            cols.remove(note)
            return _table(_shown(_records(data, cols)), _shown([cols])[0], width, notes,
                          label=note, numeric=_numeric_columns(data, cols))
        records = _records(data, cols)
        if fmt == "table":
            if not records and not cols:
                return ""
            return _table(_shown(records), _shown([cols])[0], width,
                          numeric=_numeric_columns(data, cols))
        if fmt == "csv":
            return _csv([cols, *records] if cols else records)
        return "".join("\t".join(visible(cell) for cell in r) + "\n" for r in records)
    text = _cell(data)
    return text + "\n" if text else ""


def _shown(records: list[list[str]]) -> list[list[str]]:
    """Table cells as ``visible`` shows them to people (line breaks kept)."""
    return [[visible(cell, plain=False) for cell in row] for row in records]


def _records(data: list[Any], cols: list[str]) -> list[list[str]]:
    return [[_cell(r.get(c)) for c in cols] if isinstance(r, Mapping) else [_cell(r)]
            for r in data]


def _numeric_columns(data: list[Any], cols: list[str]) -> set[int]:
    """The columns whose values are all numbers (or empty): only those are aligned as
    numbers. A version such as ``10.0`` or ``1.10`` is text and stays as written."""
    rows = [r for r in data if isinstance(r, Mapping)]
    return {i for i, col in enumerate(cols)
            if all(r.get(col) is None or (isinstance(r.get(col), int | float)
                                          and not isinstance(r.get(col), bool))
                   for r in rows)}


def _table(records: list[list[str]], cols: list[str], width: int | None,
           notes: list[str] | None = None, label: str = "",
           numeric: set[int] | None = None) -> str:
    """Aligned columns (tabulate), cells wrapped to fit *width*; each of *notes* on
    its own lines under its row, as ``label: text``. Only the *numeric* columns are
    read as numbers (right-aligned); every other cell is shown as it is."""
    from tabulate import tabulate  # noqa: PLC0415 (only tables pay for it)

    headers = cols
    if width is not None and records:
        records, headers = _fit(records, cols, width)
    as_text = [i for i in range(len(cols)) if i not in (numeric or set())]
    lines = tabulate(records, headers=headers, tablefmt="simple",
                     disable_numparse=as_text or False).split("\n")
    if not notes:
        return "\n".join(lines) + "\n"
    at = max((h.count("\n") for h in headers), default=0) + 2  # the header and its rule
    out = lines[:at]
    for row, text in zip(records, notes, strict=True):
        height = max((cell.count("\n") for cell in row), default=0) + 1
        out += lines[at:at + height]
        at += height
        if text:
            out += _wrap(text, width, f"  {label}: ")
    return "\n".join(out) + "\n"


def _fit(records: list[list[str]], cols: list[str], width: int,
         ) -> tuple[list[list[str]], list[str]]:
    """*records* and headers with cells wrapped so that the table fits *width*.

    What gives way, in order, until the table fits: headers wider than their column's
    cells (a header wraps after an underscore: ``from_`` over ``version``); columns of
    prose (a cell with a space or a path: errors, details, hints); columns of words
    (names, kinds); and last the columns of times and numbers. Within each group the
    widest columns give way first, down to a common level, and no column gets
    narrower than its header's longest part.
    """
    parts = [re.split(r"(?<=_)", c) for c in cols]
    # tabulate pads a header by two and puts two spaces between columns.
    floors = [max(map(len, p)) + 2 for p in parts]
    cells = [[line for row in records for line in row[i].split("\n")] for i in range(len(cols))]
    caps = [max([len(c) + 2, *map(len, cells[i])]) for i, c in enumerate(cols)]
    room = width - 2 * (len(cols) - 1)
    for i, column in enumerate(cells):  # headers first: that wraps no value
        if sum(caps) > room:
            caps[i] = max(floors[i], caps[i] - (sum(caps) - room), *map(len, column))
    prose = [i for i, column in enumerate(cells) if any(" " in c or "/" in c for c in column)]
    words = [i for i, column in enumerate(cells) if not all(_ATOM.fullmatch(c) for c in column)]
    for group in (prose, words, list(range(len(cols)))):
        if sum(caps) <= room:
            break
        fixed = sum(caps[i] for i in range(len(cols)) if i not in group)
        level = max(caps)
        while level > 1 and fixed + sum(min(caps[i], max(level, floors[i]))
                                         for i in group) > room:
            level -= 1
        for i in group:
            caps[i] = min(caps[i], max(level, floors[i]))
    headers = [c if len(c) + 2 <= cap else _join_parts(p, cap - 2)
               for c, p, cap in zip(cols, parts, caps, strict=True)]
    return [[_wrap_cell(cell, cap) for cell, cap in zip(row, caps, strict=True)]
            for row in records], headers


def _join_parts(parts: list[str], width: int) -> str:
    """Header *parts* on as few lines of *width* characters as they fit."""
    lines = [""]
    for part in parts:
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def _wrap_cell(cell: str, width: int) -> str:
    """*cell* with each of its lines wrapped to *width* characters."""
    if len(cell) <= width:
        return cell
    return "\n".join(line for part in cell.split("\n") for line in _wrap(part, width) or [""])


def _wrap(text: str, width: int | None, prefix: str = "") -> list[str]:
    """*text* as lines of at most *width* characters (one line when *width* is None),
    the first starting with *prefix* and the others indented under it."""
    if width is None:
        return [prefix + text]
    import textwrap  # noqa: PLC0415 (only wrapped output pays for it)

    room = max(width, len(prefix) + 10) if prefix else max(width, 1)
    return textwrap.wrap(text, room, initial_indent=prefix,
                         subsequent_indent=" " * len(prefix), break_on_hyphens=False)


def _record_table(rows: Sequence[tuple[str, str]], width: int | None = None) -> str:
    """One record as aligned ``key  value`` lines, long values wrapped to *width*.

    Done here rather than by tabulate: a record is two columns, and importing
    tabulate costs ~20 ms, which ``status`` (a per-step command) should not pay.
    """
    keys = max((len(key) for key, _ in rows), default=0)
    room = None if width is None else width - keys - 2
    indent = "\n" + " " * (keys + 2)
    out = []
    for key, value in rows:
        text = value if room is None else _wrap_cell(value, room)
        out.append(f"{key.ljust(keys)}  {text.replace(chr(10), indent)}".rstrip() + "\n")
    return "".join(out)


def _csv(rows: Sequence[Sequence[str]]) -> str:
    import csv  # noqa: PLC0415 (only CSV output pays for it)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue()


def stream_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str, *,
                empty: str | None = None) -> None:
    """Print the rows of a query in *fmt* as they come, holding none of them but a
    table's (which needs them all to align, so it takes at most ``TABLE_MAX_ROWS``).
    Gives the same text as ``render`` of the rows as records (*empty* as there)."""
    if fmt == "table":
        records: list[dict[str, Any]] = []
        for row in rows:
            if len(records) == TABLE_MAX_ROWS:
                raise BadInput(f"more than {TABLE_MAX_ROWS} rows do not fit a table; use "
                               "-f csv, plain or json, which stream any number of rows")
            records.append(dict(zip(columns, row, strict=True)))
        render(records, fmt, columns, empty=empty)
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
