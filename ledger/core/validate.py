"""Input rules shared by every way into the ledger: ids, names, versions, texts, paths.

The API, the importer and the plan loader refuse bad input with these before
anything changes, each with one line that says what is wrong.

*Printable* (names and versions) means what ``str.isprintable()`` accepts: letters,
digits, punctuation, symbols and the plain space U+0020, and nothing that changes
how a line is laid out or hides in it: no control characters (C0, DEL, and C1 such as
U+0085), no format characters (the bidi controls U+200E/200F, U+202A-202E,
U+2066-2069, zero-width characters, U+FEFF), no line or paragraph separators
(U+2028, U+2029), no other spaces (U+00A0, U+3000 ...), no surrogates (bytes that
were not UTF-8), private-use or unassigned code points. So a name shows as what it
is, and one name cannot pass for another in a table.
"""

from __future__ import annotations

import re
from typing import TypeVar

from ledger.errors import BadInput

T = TypeVar("T")

MAX_NAME = 128
MAX_TEXT = 64 * 1024
MAX_PATH = 4096
#: The largest whole number a document or an option may carry (sizes, serials):
#: 2**53 - 1, the largest every JSON reader holds exactly, and far below SQLite's
#: 64-bit limit, so that an event id one above a serial never runs out of room.
MAX_NUMBER = 2**53 - 1
#: The largest id SQLite gives a row (an event id): signed 64-bit.
MAX_ROW_ID = 2**63 - 1

_ID = re.compile(r"[A-Za-z0-9._-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_WHITESPACE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def unprintable(value: str) -> str | None:
    """Why *value* is not printable text (see the module docstring), or None if it is."""
    if value.isprintable():  # one C call on the per-step path
        return None
    char = next(ch for ch in value if not ch.isprintable())
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        return "is not valid UTF-8 text (it holds bytes that do not decode)"
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return "contains control characters"
    return f"contains the invisible or layout character U+{code:04X}"


def check_id(value: object, what: str = "upgrade id") -> str:
    """An id that is safe as a file name: ``[A-Za-z0-9._-]``, no ``..``, 1-128 chars."""
    if not isinstance(value, str) or not value:
        raise BadInput(f"{what} must be a non-empty string")
    if len(value) > MAX_NAME:
        raise BadInput(f"{what} is {len(value)} characters long; at most {MAX_NAME} allowed")
    if not _ID.fullmatch(value) or ".." in value or value.startswith(("-", ".")):
        raise BadInput(
            f"{what} {value!r} is not allowed; use letters, digits, '.', '_' and '-' "
            "(not starting with '-' or '.', no '..')"
        )
    return value


def check_name(value: object, what: str) -> str:
    """A phase or component name: 1-128 printable characters, not blank and without
    a space at either end, no '/' or '\\', not '.'/'..', not starting with '-'."""
    if not isinstance(value, str) or not value:
        raise BadInput(f"{what} name must be a non-empty string")
    if len(value) > MAX_NAME:
        raise BadInput(f"{what} name is {len(value)} characters long; at most {MAX_NAME} allowed")
    problem = unprintable(value)
    if problem:
        raise BadInput(f"{what} name {value!r} {problem}")
    if not value.strip(" "):
        raise BadInput(f"{what} name {value!r} is blank")
    if value[0] == " " or value[-1] == " ":
        raise BadInput(f"{what} name {value!r} starts or ends with a space")
    if "/" in value or "\\" in value or value in {".", ".."} or value.startswith("-"):
        raise BadInput(
            f"{what} name {value!r} is not allowed (no '/', '\\', leading '-', '.' or '..')"
        )
    return value


def check_version(value: object, what: str = "version") -> str | None:
    """A version string (or None): 1-128 printable characters, no spaces."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or \
            not value.isprintable() or " " in value:
        raise BadInput(f"{what} {value!r} is not a version (1-{MAX_NAME} printable "
                       "characters, no spaces)")
    return value


_UNSTORABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")
_CUT = "\n[... {} characters cut: a text is kept to its first and last characters ...]\n"


def escape_text(value: str) -> str:
    """Free text as a script passed it, made storable with its meaning kept visible.

    Bytes that were not UTF-8 (Python hands them over as the lone surrogates
    U+DC80-U+DCFF) and control characters other than tab and newline become
    ``\\xNN`` (``caf\\xe9``, ``\\x1b[31m``); any other lone surrogate ``\\uNNNN``. So
    whatever bytes a failing command printed, its failure is recorded.
    """
    def escaped(match: re.Match[str]) -> str:
        code = ord(match[0])
        if code < 0x100 or 0xDC80 <= code <= 0xDCFF:
            return f"\\x{code & 0xFF:02x}"
        return f"\\u{code:04x}"

    return _UNSTORABLE.sub(escaped, value)


def clip_text(value: T, limit: int = MAX_TEXT) -> T:
    """Free text of at most *limit* characters: a longer one keeps its start (which
    names what ran) and its end (where it failed) around a marker saying how much was
    cut. Anything that is not a string is returned as it is, for ``check_text``."""
    if not isinstance(value, str) or len(value) <= limit:
        return value
    head = limit // 4
    tail = limit - head - len(_CUT.format(len(value)))  # the marker at its longest
    cut = len(value) - head - tail
    return value[:head] + _CUT.format(cut) + value[len(value) - tail:]  # type: ignore[return-value]


def check_text(value: object, what: str, limit: int = MAX_TEXT) -> str | None:
    """Free text (an error message, a reason): newlines and tabs allowed, other controls not."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput(f"{what} must be a string")
    if len(value) > limit:
        raise BadInput(f"{what} is {len(value)} characters long; at most {limit} allowed")
    if _CONTROL_BUT_WHITESPACE.search(value):
        raise BadInput(f"{what} contains control characters")
    if _SURROGATE.search(value):
        raise BadInput(f"{what} is not valid UTF-8 text (it holds bytes that do not decode)")
    return value


def check_path(value: object, what: str = "path") -> str:
    """A file path: non-empty, at most 4096 characters, no control characters."""
    if not isinstance(value, str) or not value:
        raise BadInput(f"{what} must be a non-empty string")
    if len(value) > MAX_PATH or _CONTROL.search(value):
        raise BadInput(f"{what} is too long or contains control characters")
    if _SURROGATE.search(value):
        raise BadInput(f"{what} is not valid UTF-8 text (it holds bytes that do not decode)")
    return value
