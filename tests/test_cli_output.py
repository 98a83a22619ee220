"""Output across commands: every command that prints data takes -f/--json; a command
that prints one value keeps its bare text unless asked; predicates print nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator

import click
import pytest

from ledger.cli import cli as root

#: Answer with their exit code only (-v prints yes or no).
PREDICATES = {"state check", "in-progress", "can-resume", "component is-upgraded",
              "lock held"}
#: Print nothing on stdout (at most a note on stderr).
SILENT = {"state set", "phase start", "phase complete", "phase fail", "phase skip",
          "component plan", "component start", "component complete", "component fail",
          "component skip", "rollback mark", "rollback clear", "lock acquire",
          "lock release", "lock check-stale", "lock break", "cleanup", "subscribers add",
          "subscribers remove"}
#: Print a format of their own: a state document, the Prometheus text format, the
#: session's frames (docs/cli.md), and what the command a session retry runs prints.
OWN_FORMAT = {"export", "metrics", "session", "session retry"}


def commands() -> Iterator[tuple[str, click.Command]]:
    """Every command, subcommands included, by its full name ('lock status')."""
    root.load_all()

    def walk(group: click.Group, prefix: str) -> Iterator[tuple[str, click.Command]]:
        for name, command in sorted(group.commands.items()):
            full = f"{prefix}{name}"
            if isinstance(command, click.Group):
                if command.invoke_without_command:
                    yield full, command
                yield from walk(command, full + " ")
            else:
                yield full, command

    return walk(root, "")


def options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in param.opts}


def test_every_command_that_prints_data_takes_format_and_json() -> None:
    # The legacy commands are the drop-in's contract: their output is the old library's.
    every = {name: command for name, command in commands() if not name.startswith("legacy")}
    assert set(every) >= PREDICATES | SILENT | OWN_FORMAT  # the lists name real commands
    missing = [name for name, command in every.items()
               if name not in PREDICATES | SILENT | OWN_FORMAT
               and not {"-f", "--format", "--json"} <= options(command)]
    assert missing == []
    talkative = [name for name in PREDICATES if {"-f", "--json"} & options(every[name])]
    assert talkative == []


def ok(cli, *args: str, env: dict[str, str] | None = None, input: str | None = None) -> str:
    result = cli(*args, env=env, input=input)
    assert (result.code, result.err) == (0, ""), (args, result)
    return result.out


@pytest.fixture
def running(cli) -> None:
    """An upgrade in UPGRADING: phase 'a' done, 'b' pending, 'c' with x completed and
    y left mid-upgrade."""
    ok(cli, "init", "u1")
    ok(cli, "state", "set", "PLANNING")
    for phase, name in (("a", "w"), ("b", "v"), ("c", "x"), ("c", "y")):
        ok(cli, "component", "plan", name, "1.0", "2.0", "--phase", phase)
    ok(cli, "state", "set", "BACKING_UP")
    ok(cli, "state", "set", "UPGRADING")
    ok(cli, "phase", "start", "c")
    for name in ("x", "y"):
        ok(cli, "component", "start", name)
    ok(cli, "component", "complete", "x")


@pytest.mark.parametrize(("args", "text", "record"), [
    (["state", "get"], "UPGRADING\n", {"state": "UPGRADING"}),
    (["phase", "next"], "a\n", {"phase": "a"}),
    (["progress"], "25\n", {"progress_percent": 25}),
    (["component", "version", "x"], "2.0\n", {"component": "x", "version": "2.0"}),
    (["component", "version", "y"], None, {"component": "y", "version": None}),
])
def test_one_value_commands_print_it_bare_or_as_a_record(cli, running, args, text,
                                                         record) -> None:
    result = cli(*args)
    if text is None:  # component version: nothing and exit 1 when never completed
        assert (result.code, result.out) == (1, "")
    else:
        assert (result.code, result.out) == (0, text)
    as_json = cli(*args, "--json")
    assert (as_json.code, json.loads(as_json.out)) == (result.code, record)
    assert cli(*args, "-f", "csv").out == "key,value\n" + "".join(
        f"{k},{'' if v is None else v}\n" for k, v in record.items())
    # LEDGER_FORMAT is for tables and records: $(upgrade-ledger state get) stays a word.
    assert cli(*args, env={"LEDGER_FORMAT": "json"}).out == result.out


def test_init_save_history_and_import_take_json(cli, home) -> None:
    assert json.loads(ok(cli, "init", "u1", "--json")) == {"upgrade_id": "u1"}
    assert ok(cli, "init", "u2", "--supersede", env={"LEDGER_FORMAT": "json"}) == "u2\n"
    saved = json.loads(ok(cli, "save-history", "u1", "--json"))
    assert saved == {"upgrade_id": "u1", "path": str(home / "history" / "u1.json")}
    doc = (home / "history" / "u1.json").read_text()
    assert json.loads(ok(cli, "import", "--no-current", "-", "--json", input=doc)) == \
        {"upgrade_id": "u1"}
    assert ok(cli, "import", "--no-current", "-", input=doc) == "u1\n"


def test_summary_text_and_record(cli, running) -> None:
    text = ok(cli, "summary")
    assert text.startswith("Upgrade:   u1\nState:     UPGRADING\n")
    assert "Progress:  25% (1/4 components, 2 pending, 1 upgrading)" in text
    data = json.loads(ok(cli, "summary", "--json"))
    assert list(data) == ["upgrade_id", "state", "outcome", "started_at", "updated_at",
                          "phase", "component", "progress_percent", "done", "total",
                          "components", "rollback_points", "phases", "error"]
    assert (data["state"], data["progress_percent"], data["done"], data["total"]) == \
        ("UPGRADING", 25, 1, 4)
    assert data["components"] == {"COMPLETED": 1, "PENDING": 2, "UPGRADING": 1}
    assert data["phases"] == [{"name": "a", "state": "PENDING"},
                              {"name": "b", "state": "PENDING"},
                              {"name": "c", "state": "IN_PROGRESS"}]
    plain = ok(cli, "summary", "-f", "plain").splitlines()
    assert "state: UPGRADING" in plain and "progress_percent: 25" in plain


def test_resume_lists_what_it_found_as_data_when_asked(cli, running) -> None:
    quiet = cli("resume")
    assert (quiet.code, quiet.out) == (0, "")
    assert quiet.err == "component y (phase c) was left mid-upgrade to 2.0: validate it\n"
    data = json.loads(ok(cli, "resume", "--json"))
    assert [(c["phase"], c["name"], c["state"]) for c in data] == [("c", "y", "UPGRADING")]
    rows = ok(cli, "resume", "-f", "csv").splitlines()
    assert rows[0].startswith("phase,name,state,") and rows[1].startswith("c,y,UPGRADING,")


@pytest.mark.parametrize(("args", "noun"), [
    (["history", "--state", "failed"], "no upgrades match"),
    (["events", "--kind", "lock.break"], "no events match"),
    (["sql", "SELECT id FROM upgrades WHERE id = 'none'"], "no rows"),
    (["rollback", "info", "-f", "table"], "no live rollback points"),
    (["snapshots"], "no snapshots"),
    (["subscribers", "list"], "no subscribers (add one with 'upgrade-ledger subscribers add')"),
])
def test_an_empty_table_prints_its_header_and_says_so(cli, args, noun) -> None:
    ok(cli, "init", "u1")
    result = cli(*args)
    assert result.code == 0
    lines = result.out.splitlines()
    assert len(lines) == 2 and set(lines[1]) <= {"-", " "}  # the header, and its rule
    assert result.err == f"{noun}\n"
    bare = [a for a in args if a not in ("-f", "table")]
    assert cli(*bare, "--json").err == ""  # JSON stays quiet: [] (or the document) says it
    plain = cli(*bare, "-f", "plain")
    assert (plain.out, plain.err) == ("", "")  # scripts reading plain text get nothing


# -- fitting the terminal ---------------------------------------------------------------

STAMP_MS = re.compile(r"\d{2}:\d{2}:\d{2}\.\d{3}Z")


@pytest.fixture
def troubled(cli, home) -> None:
    """A run left UPGRADING by a holder that died: doctor has long details and hints,
    and show has a long event trail."""
    ok(cli, "init", "upgrade-20261127-103000")
    ok(cli, "state", "set", "PLANNING")
    ok(cli, "component", "plan", "node_exporter", "1.7.0", "1.9.1", "--phase", "exporters")
    ok(cli, "state", "set", "BACKING_UP")
    ok(cli, "rollback", "mark", "node_exporter",
       str(home / "backups" / "upgrade-20261127-103000" / "exporters" / "node_exporter"),
       "--size", "4096", "--sha256", "ab" * 32)
    ok(cli, "state", "set", "UPGRADING")
    ok(cli, "phase", "start", "exporters")
    ok(cli, "component", "start", "node_exporter")
    gone = subprocess.Popen(["true"])
    gone.wait()
    ok(cli, "lock", "acquire", "--owner", str(os.getpid()))
    info = home / "upgrade.lock.d" / "lock.info"
    info.write_text("|".join([str(gone.pid), *info.read_text().split("|")[1:]]))


def test_doctor_fits_the_terminal_with_hints_under_their_row(cli, troubled) -> None:
    wide = cli("doctor", env={"COLUMNS": "300"})
    hints = {f["check"]: f["hint"] for f in json.loads(cli("doctor", "--json").out)
             if f["hint"]}
    assert {"lock", "stuck"} <= set(hints)
    assert wide.out.splitlines()[0].split() == ["check", "status", "detail"]
    for width in (80, 100):
        out = cli("doctor", env={"COLUMNS": str(width)}).out
        lines = out.splitlines()
        assert max(map(len, lines)) <= width, out
        assert lines[0].split() == ["check", "status", "detail"]
        for check, hint in hints.items():
            # The hint follows its row, indented, wrapped to the width.
            start = next(i for i, line in enumerate(lines) if line.startswith(check + " "))
            after = lines[start + 1:]
            block = " ".join(line.strip() for line in after if line.startswith("  "))
            assert " ".join(hint.split()) in block.replace("→ ", "")


def test_show_fits_the_terminal(cli, troubled) -> None:
    for width in (80, 120):
        out = cli("show", env={"COLUMNS": str(width)}).out
        too_wide = [line for line in out.splitlines() if len(line) > width]
        assert too_wide == [], out
    events = cli("show", env={"COLUMNS": "200"}).out.split("\nEvents:\n")[1].splitlines()
    # The upgrade's own id is not repeated on each event; user and pid are left to events.
    assert events[0].split() == ["id", "at", "kind", "subject", "from", "to", "detail"]


def test_piped_output_is_not_cut_to_a_width(cli, troubled) -> None:
    out = cli("doctor", env={"COLUMNS": None}).out  # not a terminal, no COLUMNS
    assert max(map(len, out.splitlines())) > 100


@pytest.mark.parametrize("args", [["history"], ["status"], ["show"], ["events"],
                                  ["summary"], ["history", "--json"], ["status", "--json"],
                                  ["show", "--json"], ["events", "-f", "csv"],
                                  ["events", "-f", "plain"]])
def test_timestamps_are_whole_seconds_in_every_report(cli, troubled, args) -> None:
    out = ok(cli, *args, env={"COLUMNS": "250"})
    if args == ["show", "--json"]:
        data = json.loads(out)
        assert all(STAMP_MS.search(e["at"]) for e in data.pop("events"))  # JSON events:
        out = json.dumps(data)  # the stored milliseconds, as notifications carry them
    assert re.search(r"T\d{2}:\d{2}:\d{2}Z", out)
    assert not STAMP_MS.search(out), out


def test_versions_in_a_table_are_shown_as_written(cli) -> None:
    """A version is text: 1.10 is not 1.1 and 10.0 is not 10, in any column."""
    for args in (("init", "u1"), ("state", "set", "PLANNING"), ("state", "set", "BACKING_UP"),
                 ("state", "set", "UPGRADING"), ("phase", "start", "p"),
                 ("component", "start", "nginx", "1.10", "10.0")):
        assert cli(*args).code == 0
    shown = cli("show", "-f", "table").out
    row = next(line for line in shown.splitlines() if line.startswith("p ") and "nginx" in line)
    assert row.split()[3:5] == ["1.10", "10.0"], row
    runs = cli("sql", "SELECT component, from_version, to_version, attempts FROM "
               "component_runs", "-f", "table").out.splitlines()
    assert runs[2].split() == ["nginx", "1.10", "10.0", "1"], runs
