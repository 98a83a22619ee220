"""Hostile input: refused whole, and nothing written through a planted symlink.

Property-based (Hypothesis, bounded: this module runs in well under 30 s):

- CLI arguments (names, ids, states, versions, paths, texts) that break the input
  rules: one line on stderr, exit 2 (usage) or 6 (bad input), the ledger unchanged
  (its events and its state.json bytes);
- imported documents with NaN/Infinity, duplicate keys, wrong types, unknown
  states, deep nesting, multi-megabyte strings, control characters, ids with
  ``../``, or that are not JSON at all: ``LedgerError`` from the API, exit 6 from
  ``import``, the ledger unchanged.

Then symlinks planted at state.json, in tmp/, at history files, at the snapshots
folder, at ledger.db and at lock.info: not a byte is written through them. And
with umask 000 every folder is 0700 and every file 0600.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sqlite3
import stat
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faultchild as fc
import pytest
from click.testing import CliRunner
from conftest import walk_to_upgrading
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.api import Ledger
from ledger.cli import cli as root
from ledger.core import states
from ledger.errors import LedgerError
from ledger.ops import snapshots

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED: Counter[str] = Counter()
REFUSED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def figures() -> Iterator[None]:
    yield
    print(f"\n[hostile] tried={sum(TRIED.values())} refused={sum(REFUSED.values())} "
          + " ".join(f"{k}={REFUSED[k]}/{TRIED[k]}" for k in sorted(TRIED)))


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home with an upgrade in UPGRADING, phase p1 current, c1 upgrading."""
    home = tmp_path_factory.mktemp("hostile") / "home"
    with Ledger(home) as led:
        walk_to_upgrading(led, "target")
        led.plan({"p1": [("c1", "1.0", "2.0"), ("c2", "1.0", "2.0")]})
        led.phase_start("p1")
        led.component_start("c1")
        led.mark_rollback_point("c1", "/backups/c1.tar")
    return home


def fingerprint(home: Path) -> tuple[int, str, bytes]:
    """What must not change: the events, the newest event, and the state.json bytes."""
    conn = sqlite3.connect(home / "ledger.db")
    try:
        count, last = conn.execute("SELECT COUNT(*), MAX(id) FROM events").fetchone()
        rows = conn.execute("SELECT * FROM components ORDER BY name").fetchall()
    finally:
        conn.close()
    return count, f"{last}:{hashlib.sha256(repr(rows).encode()).hexdigest()}", \
        (home / "state.json").read_bytes()


def invoke(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(root, ["--home", str(home), *args])
    return result.exit_code, result.stderr


# -- strategies: inputs that break the rules ----------------------------------------------

TEXT = st.text(max_size=12)
CONTROL = st.sampled_from([chr(c) for c in range(32)] + ["\x7f"])
TOO_LONG = st.integers(129, 5000).map(lambda n: "n" * n)
MEGA = st.sampled_from([2 * 1024 * 1024, 3 * 1024 * 1024 + 7]).map(lambda n: "m" * n)
# A lone surrogate: what Python makes of bytes in argv that are not UTF-8 (\udc80-\udcff),
# or what "\ud800" in JSON decodes to.
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
# Characters that change how a line is laid out or hide in it (see ledger/core/validate.py).
INVISIBLE = st.sampled_from(["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066",
                             "\u2067", "\u2068", "\u2069", "\u200e", "\u200f", "\u2028",
                             "\u2029", "\x85", "\u200b", "\ufeff", "\u00a0", "\u3000"])
WITH_SURROGATE = st.builds(lambda a, c, b: a + c + b, TEXT, SURROGATE, TEXT)
WITH_INVISIBLE = st.builds(lambda a, c, b: a + c + b, TEXT, INVISIBLE, TEXT)
TRAVERSAL = st.sampled_from(["..", ".", "../x", "../../etc/passwd", "a/../b", "a/b", "..\\x",
                             "/abs", "x/..", ""])

BAD_NAME = st.one_of(
    st.builds(lambda a, c, b: a + c + b, TEXT, CONTROL, TEXT),
    st.builds(lambda a, b: f"{a}/{b}", TEXT, TEXT),
    st.builds(lambda a, b: f"{a}\\{b}", TEXT, TEXT),
    st.builds(lambda a: "-" + a, TEXT),
    TRAVERSAL, TOO_LONG, MEGA, WITH_SURROGATE, WITH_INVISIBLE,
    st.sampled_from([" ", "  ", "a ", " a", "\u00a0"]),
)
BAD_ID = st.one_of(
    BAD_NAME,
    st.builds(lambda a, c, b: a + c + b, TEXT, st.sampled_from(" /:*?\"<>|é\u202e\ufeff"), TEXT),
    st.builds(lambda a: "." + a, TEXT),
    st.builds(lambda a, b: f"{a}..{b}", TEXT, TEXT),
)
# The command line takes state names in any case ("planning" is PLANNING).
BAD_STATE = st.one_of(
    TEXT, st.sampled_from(["COMPLETED ", " IDLE", "IN_PROGRESS", "in_progress", "PENDING",
                           "DONE", "UPGRADING\n", "ROLLED-BACK", "rolled back"]), CONTROL, MEGA,
).filter(lambda s: s.upper() not in states.UPGRADE_STATES)
BAD_VERSION = st.one_of(
    st.builds(lambda a, b: f"{a} {b}", TEXT, TEXT),
    st.builds(lambda a, c, b: a + c + b, TEXT, CONTROL, TEXT),
    TOO_LONG, st.just(""), MEGA, WITH_SURROGATE, WITH_INVISIBLE,
)
BAD_TEXT = st.one_of(
    st.builds(lambda a, c, b: a + c + b, TEXT,
              st.sampled_from([chr(c) for c in (*range(9), *range(11, 32), 127)]), TEXT),
    st.integers(64 * 1024 + 1, 70_000).map(lambda n: "t" * n),
    MEGA,
)
BAD_PATH = st.one_of(
    st.builds(lambda a, c, b: a + c + b, TEXT, CONTROL, TEXT),
    st.integers(4097, 9000).map(lambda n: "/" + "p" * n), st.just(""), MEGA, WITH_SURROGATE,
)
BAD_HOST = st.one_of(st.builds(lambda a, c, b: a + c + b, TEXT, CONTROL, TEXT), WITH_SURROGATE,
                     WITH_INVISIBLE)

# (command with the slot marked X, strategy for X)
CLI_CASES: dict[str, tuple[list[str], st.SearchStrategy[str]]] = {
    "init ID": (["init", "X"], BAD_ID),
    "state set STATE": (["state", "set", "X"], BAD_STATE),
    "phase start NAME": (["phase", "start", "X"], BAD_NAME),
    "component start NAME": (["component", "start", "X", "1.0", "2.0"], BAD_NAME),
    "component start FROM": (["component", "start", "c2", "X", "2.0"], BAD_VERSION),
    "component start TO": (["component", "start", "c2", "1.0", "X"], BAD_VERSION),
    "component status NAME": (["component", "status", "X"], BAD_NAME),
    "rollback mark PATH": (["rollback", "mark", "c1", "X"], BAD_PATH),
    "show ID": (["show", "X"], BAD_ID),
    "save-history ID": (["save-history", "X"], BAD_ID),
    "history --state": (["history", "--state", "X"], BAD_STATE),
    "history --component": (["history", "--component", "X"], BAD_NAME),
    "history --host": (["history", "--host", "X"], BAD_HOST),
    "events --upgrade": (["events", "--upgrade", "X"], BAD_ID),
    "events --component": (["events", "--component", "X"], BAD_NAME),
    "restore SNAPSHOT": (["restore", "X"], BAD_ID),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CLI_CASES))
def test_hostile_cli_arguments_are_refused_in_one_line(running: Path, case: str) -> None:
    template, strategy = CLI_CASES[case]
    before = fingerprint(running)

    @SETTINGS
    @given(value=strategy)
    def refuse(value: str) -> None:
        TRIED[case] += 1
        args = [value if part == "X" else part for part in template]
        code, err = invoke(running, *args)
        assert code in (2, 6), (case, value[:80], code, err[:300])
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("upgrade-ledger: error: "), err[:300]
        assert fingerprint(running) == before
        REFUSED[case] += 1

    refuse()


# -- texts: any bytes are recorded, and stay visible ------------------------------------------

# Bytes as a script passes them: Python hands what is not UTF-8 over as lone surrogates.
ARGV_TEXT = st.binary(max_size=300).map(lambda b: b.replace(b"\0", b"").decode(
    "utf-8", "surrogateescape"))


@pytest.mark.slow
def test_any_bytes_in_a_cli_text_are_recorded_and_stay_visible(running: Path,
                                                               tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(running, home, symlinks=True)

    @settings(SETTINGS, max_examples=60)
    @given(text=st.one_of(ARGV_TEXT, BAD_TEXT))
    def record(text: str) -> None:
        TRIED["component fail ERROR"] += 1
        assert invoke(home, "component", "start", "c1") == (0, "")
        code, err = invoke(home, "component", "fail", "--", "c1", text)
        assert (code, err) == (0, ""), (text[:80], code, err[:300])
        with Ledger(home) as led:
            kept = led.component_status("c1")["last_error"]
        assert len(kept) <= 64 * 1024
        kept.encode("utf-8")  # valid UTF-8, whatever came in
        # no control character but tab and newline (outputs escape the rest on display)
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", kept), repr(kept[:80])
        if len(text) < 1000 and text.isascii() and text.isprintable():
            assert kept == text  # plain text is kept as it is

    record()


# -- numbers and durations: past 64 bits, non-ASCII digits, NaN, huge ages ------------------

# Whole numbers out of every range an option takes, and text that looks like a number.
BIG = st.one_of(st.integers(min_value=2**53), st.integers(max_value=-1),
                st.sampled_from([2**63 - 1, 2**63, 2**64, 10**30, 10**400]))
DIGITS = st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6).filter(
    lambda s: not s.isascii())
NUMBERISH = st.one_of(BIG.map(str), DIGITS, WITH_SURROGATE,
                      st.sampled_from(["1e400", "-1e400", "inf", "-inf", "nan", "NaN", "0x10",
                                       "1_000", " 7", "7 ", "", "-0", "+5", "1.5"]))
REAL = st.one_of(NUMBERISH, st.floats(allow_nan=True, allow_infinity=True).map(repr),
                 BIG.map(lambda n: f"{n}.5"))
AGE = st.one_of(
    st.builds(lambda n, u: f"{n}{u}", st.integers(min_value=0, max_value=10**30),
              st.sampled_from("smhdw")),
    st.builds(lambda n, u: f"{n}{u}", DIGITS, st.sampled_from("smhdw")),
    WITH_SURROGATE,
    st.sampled_from(["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-23:59",
                     "\uff12\uff10\uff12\uff16-01-01", "99999-01-01", "1e400d"]),
)

# (command with the slot marked X, strategy for X): each either works or is refused in
# one line, never an internal error.
NUMBER_CASES: dict[str, tuple[list[str], st.SearchStrategy[str]]] = {
    "--pid": (["--pid", "X", "state", "get"], NUMBERISH),
    "--lock-timeout": (["--lock-timeout", "X", "lock", "status"], REAL),
    "history -n": (["history", "-n", "X"], NUMBERISH),
    "history --since": (["history", "--since", "X"], AGE),
    "history --until": (["history", "--until", "X"], AGE),
    "events --after": (["events", "--after", "X"], NUMBERISH),
    "events -n": (["events", "-n", "X"], NUMBERISH),
    "events --since": (["events", "--since", "X"], AGE),
    "status --stuck-after": (["status", "--stuck-after", "X"], REAL),
    "doctor --wal-warn": (["doctor", "--quick", "--wal-warn", "X"], REAL),
    "doctor --stuck-after": (["doctor", "--quick", "--stuck-after", "X"], REAL),
    "lock acquire --wait": (["lock", "acquire", "--owner", "1", "--wait", "X"], REAL),
    "lock acquire --owner": (["lock", "acquire", "--owner", "X"], NUMBERISH),
    "rollback mark --size": (["rollback", "mark", "c1", "/b/c1", "--size", "X"], NUMBERISH),
}


@pytest.mark.parametrize("case", list(NUMBER_CASES))
def test_numbers_and_durations_never_crash(running: Path, tmp_path: Path, case: str) -> None:
    template, strategy = NUMBER_CASES[case]
    home = tmp_path / "home"  # a copy: a value in range may take the lock or mark a point
    shutil.copytree(running, home, symlinks=True)

    @settings(SETTINGS, max_examples=60)
    @given(value=strategy)
    def answer(value: str) -> None:
        TRIED[case] += 1
        args = [value if part == "X" else part for part in template]
        before = fingerprint(home)
        code, err = invoke(home, *args)
        # 0: a value in range (such as "٣", which int() reads as 3); 1: doctor found
        # something; 2: usage; 6: bad input; 4: the lock of PID 1 is refused.
        assert code in (0, 1, 2, 4, 6), (case, value[:80], code, err[:300])
        if code in (2, 4, 6):
            lines = err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("upgrade-ledger: error: "), err
            assert fingerprint(home) == before
            REFUSED[case] += 1

    answer()


# -- documents ---------------------------------------------------------------------------


def base_document(home: Path) -> dict[str, Any]:
    with Ledger(home) as led:
        return led.document()


def dumps_pairs(node: Any) -> str:
    """JSON text where a dict may be a list of (key, value) pairs: duplicates allowed."""
    if isinstance(node, PairList):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps_pairs(v)}" for k, v in node) + "}"
    if isinstance(node, dict):
        return dumps_pairs(PairList(node.items()))
    if isinstance(node, list):
        return "[" + ", ".join(dumps_pairs(v) for v in node) + "]"
    return json.dumps(node, allow_nan=True)


class PairList(list):  # type: ignore[type-arg]
    """A JSON object as an ordered list of pairs."""


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value in a document."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths(v, (*prefix, i))
    return out


def set_at(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(doc))
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


# Fields whose wrong type the validator must refuse, and values of the wrong type.
TYPED = [("upgrade_id",), ("current_state",), ("started_at",), ("updated_at",),
         ("current_phase",), ("current_component",), ("phases",), ("rollback_available",),
         ("can_resume",), ("metadata",), ("metadata", "pid"), ("metadata", "hostname"),
         ("phases", "p1"), ("phases", "p1", "state"), ("phases", "p1", "components"),
         ("phases", "p1", "components", "c1"), ("phases", "p1", "components", "c1", "state"),
         ("phases", "p1", "components", "c1", "attempts"),
         ("phases", "p1", "components", "c1", "from_version")]
WRONG = st.one_of(st.integers(-10, 10).filter(lambda n: n != 0), st.just(True),
                  st.lists(st.integers(), max_size=2), st.just({"x": [1]}), st.just(1.5))


def _wrong_type_fits(path: tuple[Any, ...], value: Any) -> bool:
    """Exclude the few wrong-looking values a field legitimately takes."""
    if path[-1] == "attempts":  # a whole number >= 0 is right
        return not (isinstance(value, int) and not isinstance(value, bool) and value >= 0)
    if path[-1] in ("rollback_available", "can_resume"):  # true is right there
        return not isinstance(value, bool)
    return not (path[-1] == "from_version" and value is None)


@st.composite
def bad_documents(draw: st.DrawFn, base: dict[str, Any]) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["nan", "duplicate", "wrong-type", "unknown-state", "deep",
                                 "huge", "control", "traversal", "not-json", "big-number",
                                 "non-ascii-digits", "surrogate", "invisible"]))
    if kind == "big-number":  # past what the field (or SQLite, or JSON readers) can hold
        path = draw(st.sampled_from([("serial",), ("rollback_points", 0, "size_bytes"),
                                     ("phases", "p1", "components", "c1", "attempts")]))
        value = draw(st.one_of(BIG.filter(lambda n: n < 10**4000),
                               st.sampled_from([1e400, -1e400, 1e300, -0.5])))
        return kind, dumps_pairs(set_at(base, path, value)).encode()
    if kind == "non-ascii-digits":
        return kind, json.dumps(set_at(base, ("metadata", "pid"), draw(DIGITS))).encode()
    if kind == "surrogate":  # "\ud800" is valid JSON, but not text the ledger can keep
        strings = [p for p in paths(base) if isinstance(_get(base, p), str)]
        path = draw(st.sampled_from(strings))
        lone = draw(st.builds(lambda a, c, b: a + c + b, TEXT, SURROGATE, TEXT))
        if draw(st.booleans()):
            return kind, json.dumps(set_at(base, path, lone)).encode()
        doc = json.loads(json.dumps(base))
        doc["phases"]["p1"]["components"][lone] = {"state": "PENDING"}
        return kind, json.dumps(doc).encode()
    if kind == "invisible":
        path = draw(st.sampled_from([("current_phase",), ("current_component",),
                                     ("phases", "p1", "components", "c2", "to_version")]))
        return kind, json.dumps(set_at(base, path, draw(WITH_INVISIBLE))).encode()
    if kind == "nan":
        path = draw(st.sampled_from([p for p in paths(base) if p]))
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        return kind, dumps_pairs(set_at(base, path, value)).encode()
    if kind == "duplicate":
        dicts = [p for p in paths(base) if isinstance(_get(base, p), dict) and _get(base, p)]
        path = draw(st.sampled_from(dicts))
        node = _get(base, path)
        key = draw(st.sampled_from(sorted(node)))
        pairs = PairList([*node.items(), (key, draw(st.sampled_from([None, 0, "x"])))])
        return kind, dumps_pairs(set_at(base, path, pairs) if path else pairs).encode()
    if kind == "wrong-type":
        path = draw(st.sampled_from(TYPED))
        value = draw(WRONG.filter(lambda v: _wrong_type_fits(path, v)))
        return kind, json.dumps(set_at(base, path, value)).encode()
    if kind == "unknown-state":
        path = draw(st.sampled_from([("current_state",), ("phases", "p1", "state"),
                                     ("phases", "p1", "components", "c2", "state")]))
        name = draw(st.text(max_size=10).filter(
            lambda s: s not in (*states.UPGRADE_STATES, *states.PHASE_STATES,
                                *states.COMPONENT_STATES, "IN_PROGRESS")))
        return kind, json.dumps(set_at(base, path, name)).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([17, 40, 900, 5000, 200_000]))
        nested = "[" * depth + "]" * depth
        text = json.dumps(base)
        return kind, (text[:-1] + f', "extra": {nested}}}').encode()
    if kind == "huge":  # each just over its field's limit, or megabytes
        path, limit = draw(st.sampled_from([
            (("metadata", "hostname"), 255), (("current_phase",), 128), (("upgrade_id",), 128),
            (("phases", "p1", "components", "c1", "last_error"), 64 * 1024)]))
        size = draw(st.sampled_from([limit + 1, 2 * 1024 * 1024]))
        return kind, json.dumps(set_at(base, path, "h" * size)).encode()
    if kind == "control":
        path = draw(st.sampled_from([("upgrade_id",), ("current_phase",),
                                     ("metadata", "user"),
                                     ("phases", "p1", "components", "c1", "last_error")]))
        char = draw(st.sampled_from([chr(c) for c in (*range(9), *range(11, 32), 127)]))
        return kind, json.dumps(set_at(base, path, f"a{char}b")).encode()
    if kind == "traversal":
        which = draw(st.sampled_from(["upgrade_id", "current_phase", "phase", "component"]))
        bad = draw(st.sampled_from(["../x", "..", "a/../../b", "../../etc/cron.d/x"]))
        if which in ("upgrade_id", "current_phase"):
            return kind, json.dumps(set_at(base, (which,), bad)).encode()
        doc = json.loads(json.dumps(base))
        if which == "phase":
            doc["phases"][bad] = doc["phases"].pop("p1")
        else:
            doc["phases"]["p1"]["components"][bad] = doc["phases"]["p1"]["components"].pop("c1")
        return kind, json.dumps(doc).encode()
    raw = json.dumps(base).encode()
    return kind, draw(st.sampled_from([
        raw[: len(raw) // 2], b"\xff\xfe" + raw, b"[" + raw + b"]", b"null", b"42",
        b'"state.json"', b"", raw.replace(b"{", b"{{", 1), raw + b"}",
    ]))


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


@pytest.mark.slow
def test_hostile_documents_are_refused_by_the_api(running: Path) -> None:
    base = base_document(running)
    before = fingerprint(running)

    @SETTINGS
    @given(case=bad_documents(base))
    def refuse(case: tuple[str, bytes]) -> None:
        kind, data = case
        TRIED[f"import:{kind}"] += 1
        with Ledger(running) as led, pytest.raises(LedgerError):
            led.import_document(data)
        assert fingerprint(running) == before
        REFUSED[f"import:{kind}"] += 1

    refuse()


def test_hostile_documents_are_refused_by_the_cli(running: Path, tmp_path: Path) -> None:
    base = base_document(running)
    before = fingerprint(running)
    source = tmp_path / "doc.json"

    @settings(SETTINGS, max_examples=40)
    @given(case=bad_documents(base))
    def refuse(case: tuple[str, bytes]) -> None:
        kind, data = case
        TRIED[f"cli-import:{kind}"] += 1
        source.write_bytes(data)
        code, err = invoke(running, "import", str(source))
        assert code == 6, (kind, code, err[:300])
        assert len(err.splitlines()) == 1
        assert fingerprint(running) == before
        REFUSED[f"cli-import:{kind}"] += 1

    refuse()


def test_python_mappings_with_nan_or_non_json_values_are_refused(running: Path) -> None:
    base = base_document(running)
    before = fingerprint(running)
    for value in (math.nan, math.inf, object(), b"bytes", {1, 2}):
        TRIED["import:mapping"] += 1
        doc = dict(base, metadata=dict(base["metadata"], hostname=value))
        with Ledger(running) as led, pytest.raises(LedgerError):
            led.import_document(doc)
        assert fingerprint(running) == before
        REFUSED["import:mapping"] += 1


def test_a_document_over_the_size_limit_is_refused_before_parsing(running: Path) -> None:
    before = fingerprint(running)
    TRIED["import:33MB"] += 1
    with Ledger(running) as led, pytest.raises(LedgerError, match="at most"):
        led.import_document(b" " * (33 * 1024 * 1024))
    assert fingerprint(running) == before
    REFUSED["import:33MB"] += 1


# -- symlinks: nothing written through them ---------------------------------------------------


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(b"precious\n")
    return path


def test_symlink_at_state_json_is_replaced_not_followed(home: Path, victim: Path) -> None:
    with Ledger(home) as led:
        led.init("u1")
        (home / "state.json").unlink()
        (home / "state.json").symlink_to(victim)
        led.set_state("PLANNING")
        assert not (home / "state.json").is_symlink()
        assert json.loads((home / "state.json").read_bytes())["current_state"] == "PLANNING"
    assert victim.read_bytes() == b"precious\n"


def test_symlink_at_a_history_file_is_replaced_not_followed(home: Path, victim: Path) -> None:
    with Ledger(home) as led:
        led.init("u1")
        (home / "history" / "u1.json").symlink_to(victim)
        led.save_to_history()
        assert not (home / "history" / "u1.json").is_symlink()
        led.export_views()
    assert victim.read_bytes() == b"precious\n"


def test_symlinked_tmp_and_snapshots_folders_are_refused(home: Path, tmp_path: Path,
                                                         victim: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with Ledger(home) as led:
        led.init("u1")
    (home / "snapshots").symlink_to(elsewhere)
    code, err = invoke(home, "snapshot")
    assert code == 8 and "not a folder" in err
    (home / "snapshots").unlink()
    (home / "tmp").rmdir()
    (home / "tmp").symlink_to(elsewhere)
    code, err = invoke(home, "state", "set", "PLANNING")
    assert code == 8 and "not a folder" in err
    assert list(elsewhere.iterdir()) == []
    assert victim.read_bytes() == b"precious\n"


@pytest.mark.slow
def test_symlinks_at_predictable_snapshot_names_are_not_followed(home: Path,
                                                                 victim: Path) -> None:
    """Snapshot names are predictable (a millisecond stamp): a symlink planted at
    every name of the next seconds is never written through, nor taken over."""
    with Ledger(home) as led:
        led.init("u1")
        folder = home / "snapshots"
        folder.mkdir(mode=0o700, exist_ok=True)
        now = int(time.time())
        for second in range(now, now + 3):
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(second))
            for ms in range(1000):
                (folder / f"{stamp}{ms:03d}Z-u1.db").symlink_to(victim)
        snap = snapshots.take(led.home, led.db, "u1", keep=10_000, manual=True)
        assert snap is not None and not snap.path.is_symlink()
        assert snapshots.check_file(snap.path) is None
    assert victim.read_bytes() == b"precious\n"


def test_symlink_at_ledger_db_is_refused(home: Path, victim: Path) -> None:
    home.mkdir(mode=0o700)
    (home / "ledger.db").symlink_to(victim)
    code, err = invoke(home, "init")
    assert code == 8 and "ledger.db" in err
    assert victim.read_bytes() == b"precious\n"


def test_symlink_at_lock_info_is_not_written_through(home: Path, victim: Path) -> None:
    with Ledger(home):
        pass
    lock_dir = home / "upgrade.lock.d"
    lock_dir.mkdir(mode=0o700)
    (lock_dir / "lock.info").symlink_to(victim)
    os.utime(lock_dir, (1, 1), follow_symlinks=False)  # long past the creation grace
    code, err = invoke(home, "--pid", str(os.getpid()), "lock", "acquire")
    assert code == 0, err
    assert not (lock_dir / "lock.info").is_symlink()
    assert (lock_dir / "lock.info").read_text().startswith(f"{os.getpid()}|")
    assert victim.read_bytes() == b"precious\n"


# -- modes under umask 000 ---------------------------------------------------------------------


@pytest.mark.slow
def test_files_0600_and_folders_0700_under_umask_000(home: Path, tmp_path: Path) -> None:
    steps = [("init", "u1"), ("state", "set", "PLANNING"),
             ("component", "plan", "c1", "1", "2", "--phase", "p1"),
             ("state", "set", "BACKING_UP"), ("state", "set", "UPGRADING"),
             ("phase", "start", "p1"), ("component", "start", "c1"),
             ("rollback", "mark", "c1", "/backups/c1.tar"),
             ("component", "complete", "c1"), ("lock", "acquire"),
             ("save-history",), ("snapshot",), ("export",)]
    for args in steps:
        done = fc.cli(home, *args, umask=0)
        assert done.returncode == 0, (args, done.stderr)
    (home / "ledger.db").write_bytes(b"garbage" * 100)
    assert fc.cli(home, "restore", umask=0).returncode == 0
    wrong = []
    for path in [home, *home.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            wrong.append(f"{path.relative_to(home)}: {oct(mode)}")
    assert wrong == []
    assert {p.name for p in home.iterdir()} >= {"ledger.db", "state.json", "history",
                                                 "snapshots", "tmp", "upgrade.lock.d"}
