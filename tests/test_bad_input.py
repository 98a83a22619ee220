"""Bad input is refused before anything changes.

Each refusal is its own ``LedgerError`` subclass with a message that says what was
wrong and what is allowed, and the ledger is left exactly as it was: the same events,
the same rows in every table, the same state.json and history files, byte for byte.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_states import EXPECTED_TRANSITIONS, drive_to

from ledger.api import Ledger
from ledger.core import states
from ledger.errors import (
    BadInput,
    InvalidDocument,
    InvalidTransition,
    LedgerError,
    NoCurrentPhase,
    NotFound,
    UnknownState,
)

Snapshot = dict[str, Any]


def snapshot(led: Ledger) -> Snapshot:
    """Everything a refused call must leave as it was."""
    uri = f"file:{led.home.db_path}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        rows = {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                for t in tables}
    conn.close()
    files = {p.relative_to(led.home.root): p.read_bytes()
             for p in sorted(led.home.root.rglob("*.json"))}
    return {"events": len(rows["events"]), "rows": rows, "files": files}


def assert_refused(led: Ledger, call: Callable[[Ledger], Any], error: type[LedgerError],
                   message: str) -> LedgerError:
    """*call* raises exactly *error* (matching *message*) and changes nothing."""
    before = snapshot(led)
    with pytest.raises(LedgerError) as caught:
        call(led)
    assert type(caught.value) is error, repr(caught.value)
    assert caught.value.args and "\n" not in str(caught.value)
    assert re.search(message, str(caught.value)), str(caught.value)
    after = snapshot(led)
    assert after["events"] == before["events"]
    assert after["files"] == before["files"]
    assert after["rows"] == before["rows"]
    return caught.value


def setup_running(led: Ledger) -> None:
    """An upgrade mid-run: phase p current, component a upgrading, b failed, q planned."""
    led.init()
    led.set_state("PLANNING")
    led.plan({"p": [("a", "1.0", "2.0"), ("b", "1", "2")], "q": [("c", None, "3")]})
    led.set_state("BACKING_UP")
    led.mark_rollback_point("a", "/backups/a.tgz")
    led.set_state("UPGRADING")
    led.phase_start("p")
    led.component_start("b")
    led.component_fail("b", "boom")
    led.component_start("a")
    led.save_to_history()


def setup_phaseless(led: Ledger) -> None:
    """A new upgrade: no phase is current yet."""
    led.init()
    led.set_state("PLANNING")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Homes built once per module and copied per test: durable commits are the
    expensive part of these tests, and a copy is a faithful starting point."""
    cache: dict[str, Path] = {}

    def build(name: str, setup: Callable[[Ledger], Any]) -> Path:
        if name not in cache:
            home = tmp_path_factory.mktemp("template") / "home"
            with Ledger(home) as led:
                setup(led)
            cache[name] = home
        return cache[name]

    return build


@contextmanager
def clone(source: Path, home: Path) -> Iterator[Ledger]:
    shutil.copytree(source, home, symlinks=True)
    with Ledger(home) as led:
        yield led


@pytest.fixture
def running(template: Callable[..., Path], home: Path) -> Iterator[Ledger]:
    with clone(template("running", setup_running), home) as led:
        yield led


@pytest.fixture
def phaseless(template: Callable[..., Path], home: Path) -> Iterator[Ledger]:
    with clone(template("phaseless", setup_phaseless), home) as led:
        yield led


def init_as(upgrade_id: str) -> Callable[[Ledger], Any]:
    return lambda led: led.init(upgrade_id, supersede=True)


ALLOWED_STATES = "expected one of: IDLE, PLANNING, BACKING_UP"

CALLS: list[tuple[str, Callable[[Ledger], Any], type[LedgerError], str]] = [
    # unknown state names
    ("state-unknown", lambda led: led.set_state("DONE"), UnknownState,
     f"unknown upgrade state 'DONE'; {ALLOWED_STATES}"),
    ("state-lowercase", lambda led: led.set_state("completed"), UnknownState,
     "unknown upgrade state 'completed'"),
    ("state-empty", lambda led: led.set_state(""), UnknownState, "unknown upgrade state ''"),
    ("state-not-a-string", lambda led: led.set_state(3), UnknownState,  # type: ignore[arg-type]
     "unknown upgrade state '3'"),
    ("check-unknown-from", lambda led: led.validate_transition("NOPE", "IDLE"), UnknownState,
     "unknown upgrade state 'NOPE'"),
    ("check-unknown-to", lambda led: led.validate_transition("IDLE", "NOPE"), UnknownState,
     "unknown upgrade state 'NOPE'"),
    ("history-unknown-state", lambda led: led.history(state="FINISHED"), UnknownState,
     "unknown upgrade state 'FINISHED'"),
    # invalid transitions of phases and components
    ("phase-complete-pending", lambda led: led.phase_complete("q"), InvalidTransition,
     "invalid phase transition PENDING -> COMPLETED; allowed from PENDING: IN_PROGRESS, "
     "SKIPPED"),
    ("component-complete-failed", lambda led: led.component_complete("b"), InvalidTransition,
     "invalid component transition FAILED -> COMPLETED; allowed from FAILED: UPGRADING, "
     "SKIPPED"),
    ("state-skip-ahead", lambda led: led.set_state("COMPLETED"), InvalidTransition,
     "invalid upgrade transition UPGRADING -> COMPLETED; allowed from UPGRADING: "
     "VALIDATING, ROLLING_BACK, FAILED"),
    # empty, long and control-character names
    ("phase-empty", lambda led: led.phase_start(""), BadInput,
     "phase name must be a non-empty string"),
    ("phase-long", lambda led: led.phase_start("p" * 129), BadInput,
     "phase name is 129 characters long; at most 128 allowed"),
    ("phase-newline", lambda led: led.phase_start("p\nq"), BadInput,
     "phase name 'p\\\\nq' contains control characters"),
    ("phase-slash", lambda led: led.phase_start("a/b"), BadInput, r"no '/'"),
    ("phase-dotdot", lambda led: led.phase_start(".."), BadInput, r"'\.' or '\.\.'"),
    ("component-empty", lambda led: led.component_start(""), BadInput,
     "component name must be a non-empty string"),
    ("component-long", lambda led: led.component_complete("c" * 200), BadInput,
     "component name is 200 characters long; at most 128 allowed"),
    ("component-nul", lambda led: led.component_fail("a\x00", "x"), BadInput,
     "contains control characters"),
    ("component-escape", lambda led: led.component_start("a\x1b[31m"), BadInput,
     "contains control characters"),
    ("component-del", lambda led: led.component_status("a\x7f"), BadInput,
     "contains control characters"),
    # "printable" means str.isprintable(): no format, layout or invisible characters
    ("component-bidi-override", lambda led: led.component_start("a\u202eb"), BadInput,
     r"component name 'a\\u202eb' contains the invisible or layout character U\+202E"),
    ("component-bidi-isolate", lambda led: led.component_complete("a\u2066b"), BadInput,
     "invisible or layout character U\\+2066"),
    ("component-lrm", lambda led: led.component_status("a\u200e"), BadInput,
     "invisible or layout character U\\+200E"),
    ("phase-line-separator", lambda led: led.phase_start("p\u2028q"), BadInput,
     "invisible or layout character U\\+2028"),
    ("phase-paragraph-separator", lambda led: led.phase_start("p\u2029"), BadInput,
     "invisible or layout character U\\+2029"),
    ("component-next-line", lambda led: led.component_fail("a\x85", "x"), BadInput,
     "contains control characters"),
    ("component-lone-space", lambda led: led.component_start(" "), BadInput,
     "component name ' ' is blank"),
    ("phase-whitespace-only", lambda led: led.phase_start("  "), BadInput,
     "phase name '  ' is blank"),
    ("component-trailing-space", lambda led: led.component_start("a "), BadInput,
     "component name 'a ' starts or ends with a space"),
    ("component-no-break-space", lambda led: led.component_start("a\u00a0b"), BadInput,
     "invisible or layout character U\\+00A0"),
    ("version-bidi", lambda led: led.component_start("a", "1.0\u202e", "2"), BadInput,
     "from version .* is not a version"),
    ("version-lone-space", lambda led: led.component_start("a", " ", "2"), BadInput,
     "from version ' ' is not a version"),
    ("version-zero-width", lambda led: led.component_start("a", "1", "2\u200b"), BadInput,
     "to version .* is not a version"),
    ("version-line-separator", lambda led: led.component_start("a", "1\u2028", "2"), BadInput,
     "from version .* is not a version"),
    ("plan-bad-component", lambda led: led.plan({"p": [("ok", None, None), ("", None, None)]}),
     BadInput, "component name must be a non-empty string"),
    ("plan-long-phase", lambda led: led.plan({"x" * 129: []}), BadInput,
     "phase name is 129 characters long"),
    ("version-with-space", lambda led: led.component_start("a", "1.0 beta", "2"), BadInput,
     r"from version '1.0 beta' is not a version \(1-128 printable characters, no spaces\)"),
    ("version-long", lambda led: led.component_start("a", "1", "9" * 129), BadInput,
     "to version .* is not a version"),
    ("error-control", lambda led: led.component_fail("a", "bad\x07bell"), BadInput,
     "error contains control characters"),
    ("state-error-control", lambda led: led.set_state("FAILED", error="\x00"), BadInput,
     "error contains control characters"),
    ("error-lone-surrogate", lambda led: led.component_fail("a", "caf\udce9"), BadInput,
     r"error is not valid UTF-8 text"),
    ("backup-path-empty", lambda led: led.mark_rollback_point("a", ""), BadInput,
     "backup path must be a non-empty string"),
    ("backup-path-control", lambda led: led.mark_rollback_point("a", "/b/\n"), BadInput,
     "backup path is too long or contains control characters"),
    ("backup-sha-bad", lambda led: led.mark_rollback_point("a", "/b", sha256="XYZ"), BadInput,
     "sha256 must be 64 lower-case hex digits"),
    ("backup-size-negative", lambda led: led.mark_rollback_point("a", "/b", size_bytes=-1),
     BadInput, "backup size must be a whole number of bytes from 0"),
    ("history-limit-zero", lambda led: led.history(limit=0), BadInput,
     "limit must be a whole number from 1 to 1000000"),
    ("history-since-garbage", lambda led: led.history(since="yesterday-ish"), BadInput,
     r"cannot read the time 'yesterday-ish'; use a date"),
    # ids that are not [A-Za-z0-9._-] or contain '..'
    *[(f"id-{label}", init_as(bad), BadInput,
       "upgrade id .* is not allowed; use letters, digits, '.', '_' and '-'")
      for label, bad in [("escape", "../x"), ("slash", "a/b"), ("space", "a b"),
                         ("dotdot", "a..b"), ("dash-first", "-rf"), ("dot-first", ".hidden"),
                         ("unicode", "upgrade-\u00e9"), ("newline", "a\nb"), ("nul", "a\x00"),
                         ("glob", "up*")]],
    ("id-empty", lambda led: led.init("", supersede=True), BadInput,
     "upgrade id must be a non-empty string"),
    ("id-long", lambda led: led.init("u" * 129, supersede=True), BadInput,
     "upgrade id is 129 characters long; at most 128 allowed"),
    ("id-document", lambda led: led.document("../../etc/passwd"), BadInput,
     "upgrade id '../../etc/passwd' is not allowed"),
    ("id-history", lambda led: led.save_to_history("../state"), BadInput,
     "upgrade id '../state' is not allowed"),
    ("id-show", lambda led: led.show("a b"), BadInput, "upgrade id 'a b' is not allowed"),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in CALLS],
                         ids=[c[0] for c in CALLS])
def test_bad_arguments_are_refused_and_change_nothing(
        running: Ledger, call: Callable[[Ledger], Any], error: type[LedgerError],
        message: str) -> None:
    assert_refused(running, call, error, message)


NO_PHASE = [
    ("start", lambda led: led.component_start("a", "1", "2")),
    ("complete", lambda led: led.component_complete("a")),
    ("fail", lambda led: led.component_fail("a", "boom")),
    ("skip", lambda led: led.component_skip("a", "why")),
]


@pytest.mark.parametrize("call", [c[1] for c in NO_PHASE], ids=[c[0] for c in NO_PHASE])
def test_component_calls_without_a_current_phase_are_refused(
        phaseless: Ledger, call: Callable[[Ledger], Any]) -> None:
    assert_refused(phaseless, call, NoCurrentPhase,
                   r"component 'a': no phase is current.*upgrade-ledger phase start NAME")


INVALID = sorted((a, b) for a in states.UPGRADE_STATES for b in states.UPGRADE_STATES
                 if a != b and (a, b) not in EXPECTED_TRANSITIONS)


@pytest.mark.parametrize(("current", "target"), INVALID)
def test_every_invalid_upgrade_transition_is_refused(
        template: Callable[..., Path], home: Path, current: str, target: str) -> None:
    source = template(current, lambda led: (led.init(), drive_to(led, current)))
    with clone(source, home) as ledger:
        assert ledger.state() == current
        check_invalid_transition(ledger, current, target)


def check_invalid_transition(ledger: Ledger, current: str, target: str) -> None:
    allowed = ", ".join(states.UPGRADE_TRANSITIONS[current])
    err = assert_refused(
        ledger, lambda led: led.set_state(target), InvalidTransition,
        f"^invalid upgrade transition {current} -> {target}; allowed from {current}: "
        f"{allowed}$")
    assert isinstance(err, InvalidTransition)
    assert err.allowed == states.UPGRADE_TRANSITIONS[current]
    assert not Ledger.validate_transition(current, target)


def test_there_are_as_many_invalid_transitions_as_the_table_implies() -> None:
    assert len(INVALID) == 9 * 8 - len(EXPECTED_TRANSITIONS)


# -- documents -----------------------------------------------------------------------

def good_document(led: Ledger) -> dict[str, Any]:
    return json.loads(led.export_document())


def mutated(change: Callable[[dict[str, Any]], Any]) -> Callable[[Ledger], Any]:
    """Import the running upgrade's own document after *change* spoilt it."""

    def call(led: Ledger) -> Any:
        doc = good_document(led)
        change(doc)
        return led.import_document(json.dumps(doc))

    return call


def comp(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["phases"]["p"]["components"]["a"]


DOCUMENTS: list[tuple[str, Callable[[Ledger], Any], str]] = [
    ("not-json", lambda led: led.import_document("{not json"), "document is not valid JSON"),
    ("empty", lambda led: led.import_document(""), "document is not valid JSON"),
    ("not-utf8", lambda led: led.import_document(b"\xff\xfe{}"), "document is not valid JSON"),
    ("array", lambda led: led.import_document("[]"), "document must be a JSON object"),
    ("nan", lambda led: led.import_document(
        led.export_document().replace(b'"attempts": 0', b'"attempts": NaN', 1)),
     "document contains NaN, which is not JSON"),
    ("infinity", lambda led: led.import_document(
        led.export_document().replace(b'"attempts": 0', b'"attempts": -Infinity', 1)),
     "document contains -Infinity, which is not JSON"),
    ("nan-mapping", lambda led: led.import_document(
        {**good_document(led), "serial": float("nan")}),
     r"document is not JSON data \(Out of range float values.*\); use strings, numbers"),
    ("set-mapping", lambda led: led.import_document({**good_document(led), "x": {1}}),
     "document is not JSON data"),
    ("duplicate-key", lambda led: led.import_document(
        led.export_document().replace(b'{\n', b'{\n  "current_state": "IDLE",\n', 1)),
     "document has the key 'current_state' twice"),
    ("deep", lambda led: led.import_document("[" * 100_000 + "]" * 100_000),
     "document is nested too deeply"),
    ("deep-but-parsable", mutated(lambda d: d.__setitem__(
        "extra", json.loads("[" * 40 + "]" * 40))), "document is nested deeper than 16 levels"),
    ("huge", lambda led: led.import_document(
        b'{"pad": "' + b"x" * (32 * 1024 * 1024) + b'"}'),
     r"document is 33554443 bytes; at most 33554432 allowed"),
    ("missing-keys", mutated(lambda d: (d.pop("phases"), d.pop("metadata"))),
     "document lacks phases, metadata"),
    ("unknown-state", mutated(lambda d: d.__setitem__("current_state", "DONE")),
     f"unknown upgrade state 'DONE'; {ALLOWED_STATES}"),
    ("unknown-phase-state", mutated(lambda d: d["phases"]["p"].__setitem__("state", "RUNNING")),
     "unknown phase state 'RUNNING'; expected one of: PENDING, IN_PROGRESS"),
    ("unknown-component-state", mutated(lambda d: comp(d).__setitem__("state", "DONE")),
     "unknown component state 'DONE'; expected one of: PENDING, UPGRADING"),
    ("bool-as-string", mutated(lambda d: d.__setitem__("rollback_available", "yes")),
     "rollback_available must be true or false"),
    ("phases-list", mutated(lambda d: d.__setitem__("phases", [])), "phases must be an object"),
    ("attempts-negative", mutated(lambda d: comp(d).__setitem__("attempts", -1)),
     "phases.p.components.a.attempts must be a whole number from 0"),
    ("attempts-float", mutated(lambda d: comp(d).__setitem__("attempts", 1.5)),
     "attempts must be a whole number from 0"),
    ("attempts-bool", mutated(lambda d: comp(d).__setitem__("attempts", True)),
     "attempts must be a whole number from 0"),
    ("stamp-local-time", mutated(lambda d: d.__setitem__("started_at", "2026-11-27 10:30:00")),
     "started_at must be a UTC timestamp like 2025-12-27T10:30:00Z"),
    ("stamp-impossible", mutated(lambda d: d.__setitem__("updated_at", "2026-13-45T10:30:00Z")),
     "updated_at must be a UTC timestamp"),
    ("pid-number", mutated(lambda d: d["metadata"].__setitem__("pid", 123)),
     "metadata.pid must be a decimal process id as a string, or null"),
    ("metadata-missing-user", mutated(lambda d: d["metadata"].pop("user")),
     "metadata must be an object with hostname, user and pid"),
    ("id-escape", mutated(lambda d: d.__setitem__("upgrade_id", "../../x")),
     "upgrade id '../../x' is not allowed"),
    ("component-name-control", mutated(lambda d: d["phases"]["p"]["components"].__setitem__(
        "bad\tname", {"state": "PENDING"})), "component name 'bad\\\\tname' contains control"),
    ("component-name-bidi", mutated(lambda d: d["phases"]["p"]["components"].__setitem__(
        "evil\u202e", {"state": "PENDING"})), "invisible or layout character U\\+202E"),
    ("phase-name-blank", mutated(lambda d: d["phases"].__setitem__(" ", {"state": "PENDING"})),
     "phase name ' ' is blank"),
    ("version-separator", mutated(lambda d: comp(d).__setitem__("to_version", "2\u2029")),
     "to_version .* is not a version"),
    ("version-type", mutated(lambda d: comp(d).__setitem__("to_version", 2)),
     "to_version 2 is not a version"),
    ("outcome-not-terminal", mutated(lambda d: d.__setitem__("outcome", "UPGRADING")),
     "outcome 'UPGRADING' is not allowed; expected null or one of: COMPLETED, FAILED, "
     "ROLLED_BACK"),
    ("rollback-points-type", mutated(lambda d: d.__setitem__("rollback_points", {})),
     "rollback_points must be a list"),
    ("rollback-point-sha", mutated(lambda d: d["rollback_points"][0].__setitem__(
        "sha256", "abc")), r"rollback_points\[0\].sha256 must be 64 lower-case hex digits"),
    ("serial-negative", mutated(lambda d: d.__setitem__("serial", -5)),
     "serial must be a whole number from 0"),
    ("superseded-by-escape", mutated(lambda d: d.__setitem__("superseded_by", "../x")),
     "superseded_by '../x' is not allowed"),
    # numbers past 64 bits, digits that are not ASCII, text that is not Unicode
    ("pid-superscript-digit", mutated(lambda d: d["metadata"].__setitem__("pid", "\u00b2")),
     "metadata.pid must be a decimal process id as a string, or null"),
    ("pid-arabic-digits", mutated(lambda d: d["metadata"].__setitem__("pid", "\u0663\u0664")),
     "metadata.pid must be a decimal process id"),
    ("size-past-64-bits", mutated(lambda d: d["rollback_points"][0].__setitem__(
        "size_bytes", 10**30)),
     r"rollback_points\[0\].size_bytes must be a whole number from 0 to 9007199254740991"),
    ("serial-2-64", mutated(lambda d: d.__setitem__("serial", 2**64)),
     "serial must be a whole number from 0 to 9007199254740991"),
    ("serial-2-63-minus-2", mutated(lambda d: d.__setitem__("serial", 2**63 - 2)),
     "serial must be a whole number from 0 to 9007199254740991"),
    ("lone-surrogate-value", mutated(lambda d: d["metadata"].__setitem__("user", "\ud800")),
     r"document holds text that is not valid Unicode \(a lone surrogate\) at metadata.user"),
    ("lone-surrogate-key", mutated(lambda d: d.__setitem__("x\udc80", 1)),
     "document holds text that is not valid Unicode"),
    ("lone-surrogate-error", mutated(lambda d: comp(d).__setitem__("last_error", "a\udcffb")),
     r"not valid Unicode \(a lone surrogate\) at phases.p.components.a.last_error"),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in DOCUMENTS],
                         ids=[c[0] for c in DOCUMENTS])
def test_bad_documents_are_refused_and_change_nothing(
        running: Ledger, call: Callable[[Ledger], Any], message: str) -> None:
    assert_refused(running, call, InvalidDocument, message)


SAVED: list[tuple[str, Callable[[Ledger], Any], str]] = [
    ("not-json", lambda led: led.save_document('{"test": "data", '), "not valid JSON"),
    ("array", lambda led: led.save_document("[1, 2]"), "document must be a JSON object"),
    ("kept-too-big", lambda led: led.save_document({"blob": "x" * 70_000}),
     r"would take 700\d\d bytes; at most 65536 are kept per upgrade"),
    ("kept-too-big-inside", lambda led: led.save_document(
        {**good_document(led), "phases": {"p": {"state": "IN_PROGRESS", "components": {
            f"c{n}": {"state": "PENDING", "pad": "x" * 1000} for n in range(70)}}}}),
     "at most 65536 are kept per upgrade"),
    ("number-overflow", lambda led: led.save_document('{"n": 1e400}'),
     "document contains the number 1e400, which is out of range"),
    ("lone-surrogate", lambda led: led.save_document('{"s": "\\ud800"}'),
     r"not valid Unicode \(a lone surrogate\) at s$"),
    ("unknown-state", lambda led: led.save_document({"current_state": "DONE", "x": 1}),
     "unknown upgrade state 'DONE'"),
    ("current-phase-unknown", lambda led: led.save_document({"current_phase": "nope"}),
     "current_phase 'nope' is not one of upgrade .*'s phases"),
    ("phases-without-the-current", lambda led: led.save_document({"phases": {}}),
     "current_phase 'p' is not one of the document's phases"),
    ("new-id-partial", lambda led: led.save_document({"upgrade_id": "other", "x": 1}),
     "document lacks current_state, started_at"),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in SAVED],
                         ids=[c[0] for c in SAVED])
def test_bad_saves_are_refused_and_change_nothing(
        running: Ledger, call: Callable[[Ledger], Any], message: str) -> None:
    assert_refused(running, call, InvalidDocument, message)


def test_the_kept_size_counts_what_the_upgrade_keeps_already(running: Ledger) -> None:
    doc = good_document(running)
    for n, comp_ in enumerate(doc["phases"]["p"]["components"].values()):
        comp_["pad"] = str(n) * 30_000
    running.save_document(doc)  # 60,000 bytes and a little: kept
    assert_refused(running, lambda led: led.save_document({"more": "y" * 6_000}),
                   InvalidDocument, "at most 65536 are kept per upgrade")
    running.save_document({"more": "y" * 5_000})  # fits beside them


def test_a_save_with_no_upgrade_yet_is_refused(ledger: Ledger) -> None:
    assert_refused(ledger, lambda led: led.save_document({"test": "data"}), NotFound,
                   "no upgrade to save the document into")


def test_the_running_document_itself_imports(running: Ledger) -> None:
    """The documents above are spoilt copies of one that imports: each refusal is down
    to its one change."""
    assert running.import_document(running.export_document()) == running.current_id()


# -- the CLI: one line, a documented exit code, nothing changed ------------------------

CLI_CALLS = [
    ("unknown-state", ["state", "set", "DONE"], 6, "unknown upgrade state 'DONE'"),
    ("invalid-transition", ["state", "set", "COMPLETED"], 3,
     "invalid upgrade transition UPGRADING -> COMPLETED"),
    ("bad-id", ["init", "../x", "--supersede"], 6, "upgrade id '../x' is not allowed"),
    ("long-phase", ["phase", "start", "p" * 129], 6, "129 characters long"),
    ("bad-document", ["import", "-"], 6, "document has the key 'a' twice"),
    ("bad-save", ["legacy", "save", "-"], 6, "document has the key 'a' twice"),
]


@pytest.mark.parametrize(("args", "code", "message"), [c[1:] for c in CLI_CALLS],
                         ids=[c[0] for c in CLI_CALLS])
def test_the_cli_refuses_in_one_line_with_its_exit_code(
        running: Ledger, cli: Callable[..., Any], args: list[str], code: int,
        message: str) -> None:
    before = snapshot(running)
    result = cli(*args, input='{"a": 1, "a": 2}')
    assert result.code == code
    lines = result.err.splitlines()
    assert len(lines) == 1 and message in lines[0], result.err
    assert "Traceback" not in result.err
    assert snapshot(running) == before


def test_snapshot_sees_a_change(running: Ledger, tmp_path: Path) -> None:
    """The 'nothing changed' check above is not blind."""
    before = snapshot(running)
    running.component_complete("a")
    after = snapshot(running)
    assert after["events"] == before["events"] + 1
    assert after["rows"]["components"] != before["rows"]["components"]
    assert after["files"] != before["files"]


@pytest.mark.parametrize("size", [64 * 1024 + 1, 70_000, 3 * 1024 * 1024])
def test_an_error_text_over_64_kib_is_cut_with_a_marker_not_refused(running: Ledger,
                                                                    size: int) -> None:
    text = "head " + "x" * (size - 10) + " tail"
    assert running.component_fail("a", text)
    kept = running.component_status("a")["last_error"]
    assert len(kept) <= 64 * 1024
    assert kept.startswith("head xxx") and kept.endswith("xxx tail")
    cut = size - len(kept) + len(re.search(r"\n\[\.\.\. (\d+) characters cut[^\]]*\]\n",
                                           kept)[0])
    assert f"[... {cut} characters cut" in kept
    running.phase_fail("p", text)
    running.set_state("FAILED", error=text)
    assert len(running.show()["phases"][0]["error"]) <= 64 * 1024
    assert len(running.show()["error"]) <= 64 * 1024
