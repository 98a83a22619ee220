"""Where each key of a TOML text is written: the line numbers ``tomllib`` does not give.

``tomllib`` reports line numbers for syntax errors only. To name the line of a bad
key, ``KeyLines`` scans the source text: a small lexer that follows table headers,
array-of-table counters and key/value lines, skipping the inside of strings and of
multi-line arrays and inline tables. It only has to be right for text that
``tomllib`` has already accepted. Keys are tuples of names and array indexes, as a
checker walks the parsed document: ``("phase", 1, "component", 0, "to")`` is the
``to`` of the first component of the second phase.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

Key = tuple[str | int, ...]


class KeyLines:
    """The line where each key (and table) of a TOML text is written."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Key, int] = {}
        arrays: dict[Key, int] = {}
        table: Key = ()
        for number, statement in _statements(text):
            if statement.startswith("[["):
                names = _key_names(statement[2:statement.index("]]")])
                parent = _resolve(names[:-1], arrays)
                array = (*parent, names[-1])
                arrays[array] = arrays.get(array, 0) + 1
                table = (*array, arrays[array] - 1)
                self.lines.setdefault(array, number)
            elif statement.startswith("["):
                table = _resolve(_key_names(statement[1:statement.index("]")]), arrays)
            else:
                names = _key_names(statement.split("=", 1)[0])
                for end in range(1, len(names) + 1):
                    self.lines.setdefault((*table, *names[:end]), number)
                continue
            self.lines.setdefault(table, number)

    def line_of(self, key: Key) -> int:
        """The line of *key*, else of the nearest enclosing table written, else 1."""
        for end in range(len(key), 0, -1):
            if key[:end] in self.lines:
                return self.lines[key[:end]]
        return 1


def _resolve(names: list[str], arrays: Mapping[Key, int]) -> Key:
    """A dotted table name as a key: each array of tables met is its latest element."""
    key: Key = ()
    for name in names:
        key = (*key, name)
        if key in arrays:
            key = (*key, arrays[key] - 1)
    return key


def _key_names(text: str) -> list[str]:
    """``a."b.c".d`` → ``["a", "b.c", "d"]`` (bare and quoted keys)."""
    names, i, text = [], 0, text.strip()
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            end = i + 1
            while text[end] != ch:
                end += 2 if ch == '"' and text[end] == "\\" else 1
            raw = text[i + 1:end]
            names.append(_unquote(raw) if ch == '"' else raw)
            i = end + 1
        elif ch in ". \t":
            i += 1
        else:
            end = i
            while end < len(text) and text[end] not in ". \t":
                end += 1
            names.append(text[i:end])
            i = end
    return names


def _unquote(raw: str) -> str:
    """The text of a basic-string key (its escapes are JSON's, bar \\UXXXXXXXX)."""
    try:
        return str(json.loads(f'"{raw}"'))
    except ValueError:
        return raw


def _statements(text: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of each line that starts a TOML statement.

    Lines inside multi-line strings and multi-line arrays or inline tables are not
    statements; the lexer tracks both across lines.
    """
    quote = ""  # the open multi-line string delimiter, if any
    depth = 0  # open brackets/braces of the current value
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not quote and depth == 0 and line and not line.startswith("#"):
            yield number, line
            if line.startswith("["):
                continue  # a header: nothing after it can open a string or a value
            line = line.split("=", 1)[1] if "=" in line else ""
        quote, depth = _scan(line, quote, depth)


def _scan(line: str, quote: str, depth: int) -> tuple[str, int]:
    """Follow strings and brackets through one line of a value."""
    i = 0
    while i < len(line):
        if quote:
            if line.startswith(quote, i):
                i += 3
                quote = ""
            else:
                i += 2 if quote == '"""' and line[i] == "\\" else 1
            continue
        ch = line[i]
        if line.startswith(('"""', "'''"), i):
            quote = line[i:i + 3]
            i += 3
        elif ch in "\"'":
            end = i + 1
            while end < len(line) and line[end] != ch:
                end += 2 if ch == '"' and line[end] == "\\" else 1
            i = end + 1
        elif ch == "#":
            break
        else:
            depth += ch in "[{"
            depth -= ch in "]}"
            i += 1
    return quote, depth


__all__ = ["Key", "KeyLines"]
