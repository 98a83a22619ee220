"""Refusals at the command line: one line on stderr (no traceback), the documented
exit code, and the ledger exactly as it was. Help text everywhere, and the exit codes
of docs/cli.md equal to ``EXIT_CODES``."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import walk_to_upgrading

from ledger.api import Ledger
from ledger.cli import cli as root
from ledger.cli.app import EXIT_CODES, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run mid-upgrade (phase p current, component a upgrading), saved to history."""
    home = tmp_path_factory.mktemp("errors") / "home"
    with Ledger(home) as led:
        walk_to_upgrading(led, "u1")
        led.phase_start("p")
        led.component_start("a", "1", "2")
        led.save_to_history()
    return home


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def fingerprint(home: Path) -> dict[str, object]:
    """What a refused command must leave as it was: every file's bytes (the database's
    write-ahead log and the lock guard aside) and the number of events."""
    files = {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*"))
             if p.is_file() and not p.name.endswith(("-wal", "-shm", ".guard"))}
    events = None
    try:
        conn = sqlite3.connect(f"file:{home / 'ledger.db'}?mode=ro", uri=True)
        try:
            events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        pass  # a corrupt ledger: its bytes are compared above
    return {"files": files, "events": events}


def corrupt(home: Path) -> None:
    (home / "ledger.db").write_bytes(b"\x00\xffnot a database\x13" * 512)


def db_is_a_folder(home: Path) -> None:
    (home / "ledger.db").unlink()
    (home / "ledger.db").mkdir(mode=0o700)


def empty_home(home: Path) -> None:
    shutil.rmtree(home)
    home.mkdir(mode=0o700)


USAGE = EXIT_USAGE
CASES = [
    # unknown commands and options
    ("unknown-command", ["bogus"], USAGE, "No such command 'bogus'"),
    ("unknown-subcommand", ["state", "frob"], USAGE, "No such command 'frob'"),
    ("unknown-option", ["status", "--bogus"], USAGE, "No such option '--bogus'"),
    ("unknown-global-option", ["--bogus", "status"], USAGE, "No such option '--bogus'"),
    ("unknown-format", ["history", "-f", "xml"], USAGE, "'xml' is not one of"),
    ("missing-argument", ["phase", "start"], USAGE, "Missing argument 'NAME'"),
    ("bad-global-pid", ["--pid", "0", "status"], USAGE, "must be a positive process id"),
    ("negative-lock-timeout", ["--lock-timeout", "-1", "status"], USAGE,
     "must be a number of seconds from 0"),
    ("nan-lock-timeout", ["--lock-timeout", "nan", "status"], USAGE,
     "must be a number of seconds from 0"),
    # unknown states
    ("unknown-state", ["state", "set", "DONE"], 6, "unknown upgrade state 'DONE'"),
    ("unknown-from-state", ["state", "check", "NOPE", "IDLE"], 6, "unknown upgrade state"),
    ("unknown-to-state", ["state", "check", "IDLE", "NOPE"], 6, "unknown upgrade state"),
    ("unknown-history-state", ["history", "--state", "done"], 6, "unknown upgrade state"),
    # bad ids and names
    ("empty-id", ["init", "", "--supersede"], 6, "upgrade id must be a non-empty string"),
    ("long-id", ["init", "u" * 129, "--supersede"], 6, "129 characters long"),
    ("escaping-id", ["init", "../x", "--supersede"], 6, "upgrade id '../x' is not allowed"),
    ("control-id", ["init", "a\x01b", "--supersede"], 6, "is not allowed"),
    ("escaping-show", ["show", "../x"], 6, "upgrade id '../x' is not allowed"),
    ("escaping-export", ["export", "--upgrade", "../../etc/passwd", "-o", "-"], 6,
     "is not allowed"),
    ("escaping-save", ["save-history", "../x"], 6, "is not allowed"),
    ("empty-phase", ["phase", "start", ""], 6, "phase name must be a non-empty string"),
    ("long-phase", ["phase", "start", "p" * 129], 6, "129 characters long"),
    ("control-phase", ["phase", "start", "a\tb"], 6, "contains control characters"),
    ("escaping-phase", ["phase", "start", "../x"], 6, "phase name '../x' is not allowed"),
    ("empty-component", ["component", "start", ""], 6, "must be a non-empty string"),
    ("long-component", ["component", "complete", "c" * 200], 6, "200 characters long"),
    ("control-component", ["component", "status", "a\nb"], 6, "control characters"),
    ("escaping-component", ["component", "start", "../x"], 6, "is not allowed"),
    ("escaping-rollback", ["rollback", "mark", "../x", "/b"], 6, "is not allowed"),
    ("escaping-history", ["history", "--component", "../x"], 6, "is not allowed"),
    ("bad-version", ["component", "start", "b", "1 0", "2"], 6, "is not a version"),
    ("unknown-upgrade", ["show", "nope"], 5, "no upgrade 'nope' in this ledger"),
    # an unreadable, corrupt or missing ledger; a home that cannot be written
    ("corrupt-ledger", ["status"], 7, "is corrupt or not a ledger", corrupt),
    ("corrupt-ledger-step", ["state", "set", "VALIDATING"], 7, "is corrupt", corrupt),
    ("corrupt-ledger-sql", ["sql", "SELECT 1"], 7, "is corrupt", corrupt),
    ("unreadable-ledger", ["state", "get"], 8, "not a regular file", db_is_a_folder),
    ("missing-ledger", ["show"], 5, "there is no ledger at", empty_home),
    ("no-upgrade-yet", ["summary"], 5, "no upgrade in this ledger yet", empty_home),
    ("home-under-a-file", ["--home", "{file}/home", "init"], 8,
     "cannot create ledger folder"),
    ("home-under-a-file-read", ["--home", "{file}/home", "status"], 5,
     "there is no ledger at"),
    ("missing-db-folder", ["--db", "sqlite:////nonexistent-folder/x/ledger.db", "status"], 8,
     "cannot connect"),
    ("bad-db-url", ["--db", "nope://x", "status"], 6, "--db: cannot use"),
    # writes through sql
    ("sql-insert", ["sql", "INSERT INTO events (at, kind) VALUES ('x', 'y')"], 6,
     "only read-only queries are allowed"),
    ("sql-update", ["sql", "UPDATE upgrades SET state = 'COMPLETED'"], 6, "read-only"),
    ("sql-delete", ["sql", "DELETE FROM events"], 6, "read-only"),
    ("sql-cte-delete", ["sql", "WITH x AS (SELECT 1) DELETE FROM events"], 6, "read-only"),
    ("sql-drop", ["sql", "DROP TABLE events"], 6, "read-only"),
    ("sql-create", ["sql", "CREATE TABLE t (x)"], 6, "read-only"),
    ("sql-attach", ["sql", "ATTACH DATABASE '/tmp/x.db' AS x"], 6, "read-only"),
    ("sql-pragma-write", ["sql", "PRAGMA user_version = 7"], 6, "read-only"),
    ("sql-pragma-journal", ["sql", "PRAGMA journal_mode = DELETE"], 6, "read-only"),
    ("sql-pragma-page-size", ["sql", "PRAGMA page_size = 1024"], 6, "read-only"),
    ("sql-surrogate", ["sql", "SELECT 'caf\udce9'"], 6, "sql: the query is not valid UTF-8"),
    ("sql-param-surrogate", ["sql", "SELECT :a", "-p", "a=\udce9"], 6,
     "sql: parameter a is not valid UTF-8"),
    ("sql-huge-cell", ["sql", "SELECT zeroblob(100000000)"], 6, "too big"),
    ("sql-vacuum", ["sql", "VACUUM"], 6, "read-only"),
    ("sql-two-statements", ["sql", "SELECT 1; DELETE FROM events"], 6, "one statement"),
    ("sql-empty", ["sql", "  "], 6, "the query is empty"),
    ("sql-syntax", ["sql", "SELEC 1"], 6, "syntax error"),
    # bad --param, --since, --owner, --wait
    ("param-without-value", ["sql", "SELECT :a", "-p", "a"], USAGE, "is not NAME=VALUE"),
    ("param-bad-name", ["sql", "SELECT :a", "-p", "1a=3"], USAGE, "is not NAME=VALUE"),
    ("param-missing", ["sql", "SELECT :a"], 6, "sql: "),
    ("since-words", ["history", "--since", "yesterday"], 6, "cannot read the time"),
    ("since-bad-date", ["events", "--since", "2026-13-45"], 6, "cannot read the time"),
    ("owner-zero", ["lock", "acquire", "--owner", "0"], 6, "owner PID must be between"),
    ("owner-negative", ["lock", "acquire", "--owner", "-3"], 6, "owner PID must be between"),
    ("owner-huge", ["lock", "release", "--owner", "99999999"], 6, "owner PID must be"),
    ("owner-text", ["lock", "acquire", "--owner", "me"], USAGE, "is not a valid integer"),
    ("owner-dead", ["lock", "acquire", "--owner", "{dead}"], 6, "names no running process"),
    ("wait-negative", ["lock", "acquire", "--wait", "-1"], USAGE, "not in the range"),
    ("break-without-reason", ["lock", "break", "--reason", " "], 6, "needs a reason"),
    # other option values and documents
    ("size-negative", ["rollback", "mark", "a", "/b", "--size", "-1"], USAGE,
     "not in the range"),
    ("import-missing-file", ["import", "/nonexistent/state.json"], USAGE,
     "No such file or directory"),
    ("import-not-json", ["import", "-"], 6, "not valid JSON"),
    ("stuck-after-negative", ["doctor", "--stuck-after", "-1"], USAGE, "not in the range"),
    # numbers past 64 bits, digits that are not ASCII, ages that reach before the year 1
    ("since-huge-age", ["history", "--since", "999999w"], 6,
     "cannot read the time '999999w': that age reaches back before the year 1"),
    ("since-arabic-digits", ["events", "--since", "\u0663d"], 6, "cannot read the time"),
    ("after-past-64-bits", ["events", "--after", "99999999999999999999"], USAGE,
     "not in the range"),
    ("wal-warn-overflow", ["doctor", "--wal-warn", "1e400"], USAGE, "not in the range"),
    ("wal-warn-nan", ["doctor", "--wal-warn", "nan"], USAGE, "not in the range"),
    ("stuck-after-infinite", ["status", "--stuck-after", "1e400"], USAGE, "not in the range"),
    ("size-past-64-bits", ["rollback", "mark", "a", "/b", "--size", str(10**30)], USAGE,
     "not in the range"),
    ("lock-timeout-overflow", ["--lock-timeout", "1e400", "status"], USAGE,
     "must be a number of seconds from 0"),
    ("wait-overflow", ["lock", "acquire", "--wait", "1e400"], USAGE, "not in the range"),
    ("limit-past-64-bits", ["history", "-n", str(2**64)], USAGE, "not in the range"),
    ("transition", ["state", "set", "COMPLETED"], 3,
     "invalid upgrade transition UPGRADING -> COMPLETED"),
    ("resume-point-before-any", ["resume", "point"], 5, "no upgrade in this ledger yet",
     empty_home),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_its_exit_code_and_no_change(
        case, cli, home: Path, template: Path, tmp_path: Path) -> None:
    _name, args, code, message, *prepare = case
    shutil.copytree(template, home, symlinks=True)
    for step in prepare:
        step(home)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [a.replace("{file}", str(blocker)) for a in args]
    if "{dead}" in args:
        args[args.index("{dead}")] = str(dead_pid())
    before = fingerprint(home)
    result = cli(*args, input="this is not JSON")
    assert result.code == code, result
    assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("upgrade-ledger: error: ")
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.err
    after = fingerprint(home)
    if before["events"] is None and after["events"] == 0:
        # A home without a ledger gets an empty one, as any command would make it:
        # still no upgrade, no event, no view.
        assert sorted(after["files"]) == ["ledger.db"]
    else:
        assert after == before
    assert not (tmp_path / "x.db").exists()


IMPORTS = [
    ("pid-superscript-digit", lambda d: d["metadata"].__setitem__("pid", "\u00b2"),
     "metadata.pid must be a decimal process id"),
    ("size-past-64-bits", lambda d: d["rollback_points"].append(
        {"component": "a", "backup_path": "/b", "size_bytes": 10**30}),
     "size_bytes must be a whole number from 0 to 9007199254740991"),
    ("lone-surrogate", lambda d: d["metadata"].__setitem__("hostname", "\ud800"),
     "not valid Unicode (a lone surrogate) at metadata.hostname"),
    ("serial-2-64", lambda d: d.__setitem__("serial", 2**64), "serial must be a whole number"),
]


@pytest.mark.parametrize("case", IMPORTS, ids=[c[0] for c in IMPORTS])
def test_a_document_with_numbers_or_text_out_of_range_is_one_line(
        case, cli, home: Path, template: Path, tmp_path: Path) -> None:
    _name, spoil, message = case
    shutil.copytree(template, home, symlinks=True)
    with Ledger(home) as led:
        doc = led.document()
    spoil(doc)
    source = tmp_path / "doc.json"
    source.write_text(json.dumps(doc))  # ensure_ascii: a lone surrogate is written as \ud800
    before = fingerprint(home)
    result = cli("import", str(source))
    assert result.code == 6, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and message in lines[0], result.err
    assert fingerprint(home) == before


@pytest.mark.parametrize("command", [["import"], ["legacy", "save"]])
def test_a_document_is_read_up_to_the_documented_maximum(cli, home: Path, template: Path,
                                                         command: list[str]) -> None:
    """/dev/zero never ends: import (and the drop-in's save) read the limit and one byte
    more, then refuse."""
    shutil.copytree(template, home, symlinks=True)
    before = fingerprint(home)
    result = cli(*command, "/dev/zero")
    assert result.code == 6, result
    assert result.err.splitlines() == [
        f"upgrade-ledger: error: document is more than {32 * 1024 * 1024} bytes; at most "
        f"{32 * 1024 * 1024} allowed"]
    assert fingerprint(home) == before


def test_the_fingerprint_sees_a_change(cli, home: Path, template: Path) -> None:
    """The 'ledger unchanged' check above is not blind."""
    shutil.copytree(template, home, symlinks=True)
    before = fingerprint(home)
    assert cli("component", "complete", "a").code == 0
    after = fingerprint(home)
    assert after["events"] == before["events"] + 1
    assert after["files"]["state.json"] != before["files"]["state.json"]


def test_traceback_on_request(cli, home: Path, template: Path) -> None:
    shutil.copytree(template, home, symlinks=True)
    corrupt(home)
    with pytest.raises(Exception, match="corrupt or not a ledger"):
        cli("--traceback", "status")


def test_traceback_on_request_in_a_real_process(run_cli, home: Path, template: Path) -> None:
    shutil.copytree(template, home, symlinks=True)
    done = run_cli("--traceback", "show", "nope")
    assert done.returncode == 1  # Python's own exit code for an uncaught exception
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("ledger.errors.NotFound: no upgrade 'nope' in this "
                                          "ledger")


# -- help everywhere --------------------------------------------------------------------

def walk(command: click.Command, path: tuple[str, ...] = ()):
    """Every command under *command*, through click's own listing (lazy groups load)."""
    yield path, command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            assert sub is not None, name
            yield from walk(sub, (*path, name))


ALL = [path for path, _ in walk(root)]


def test_every_command_and_option_has_help() -> None:
    assert len(ALL) > 40
    for path, command in walk(root):
        assert (command.help or "").strip(), f"{' '.join(path)} has no help"
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert (param.help or "").strip(), f"{' '.join(path)} {param.opts} has no help"


@pytest.mark.parametrize("path", ALL, ids=[" ".join(p) or "root" for p in ALL])
def test_dash_h_works_everywhere(cli, path) -> None:
    result = cli(*path, "-h")
    assert result.code == 0
    words = "".join(f" {re.escape(word)}" for word in path)
    assert re.match(rf"Usage: \S+{words} \[OPTIONS\]", result.out), result.out
    assert "-h, --help" in result.out


# -- the documented exit codes ------------------------------------------------------------

def test_docs_exit_code_table_is_exit_codes() -> None:
    text = (REPO / "docs" / "cli.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `?(\d+)`? \| (.+?) \|", section, re.MULTILINE)
    documented = {int(code): what for code, what in rows}
    for cls, code in EXIT_CODES:
        assert code in documented, (cls, code)
        assert cls.__name__ in documented[code], (cls, documented[code])
    for code in (0, 1, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED):
        assert code in documented
    assert set(documented) == {0, 1, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED,
                               *(code for _, code in EXIT_CODES)}


def test_shell_completion_as_documented() -> None:
    """The script from _UPGRADE_LEDGER_COMPLETE=bash_source asks the command itself
    (bash_complete) for the words that fit: the root group must answer."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "COMP_CWORD": "2",
           "COMP_WORDS": "upgrade-ledger component s", "_UPGRADE_LEDGER_COMPLETE": "bash_complete"}
    done = subprocess.run([sys.executable, "-c", "from ledger.cli import main; main()"],
                          capture_output=True, text=True, check=False, timeout=120, env=env)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == ["plain,skip", "plain,start", "plain,status"]
