"""Plan files: a bad plan is refused with one line naming the file, the line and the
key; nothing runs and the ledger (indeed the whole home) is left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.api import Ledger
from ledger.apply import plan as plans
from ledger.apply.tomllines import KeyLines
from ledger.errors import BadInput
from tests.applyplans import tree

GOOD = """\
[upgrade]
name = "demo"
id_prefix = "demo"

[defaults]
timeout = 30
retries = 1
backoff = 0.5

[[phase]]
name = "exporters"
max_parallel = 2

[[phase.component]]
name = "node_exporter"
from = "1.7.0"
to = "1.9.1"
backup = "touch {marker}"
upgrade = "touch {marker}"
validate = {{ run = "touch {marker}", timeout = 5 }}
rollback = "touch {marker}"

[[phase]]
name = "core"

[[phase.component]]
name = "prometheus"
to = "2.55.1"
probe = '''
touch {marker}
echo 2.48.1
'''
backup = "touch {marker}"
upgrade = "touch {marker}"
validate = "touch {marker}"
rollback = "touch {marker}"
"""

# (what is wrong, text replaced, its replacement, the expected "line: key: problem").
BAD = [
    ("unknown top key", '[upgrade]\n', '[upgrad]\n', "1: upgrad: unknown key"),
    ("unknown component key", 'to = "1.9.1"\n', 'to = "1.9.1"\nupgarde = "x"\n',
     "18: phase[1].component[1].upgarde: unknown key (expected one of: name, from, to"),
    ("unknown command key", 'timeout = 5 }', 'timeout = 5, user = "root" }',
     "20: phase[1].component[1].validate.user: unknown key (expected one of: run, timeout)"),
    ("missing command", 'rollback = "touch {marker}"\n\n[[phase]]', '\n[[phase]]',
     "14: phase[1].component[1]: component 'node_exporter': missing command 'rollback'"),
    ("empty command", 'upgrade = "touch {marker}"\nvalidate = {',
     'upgrade = "   "\nvalidate = {', "19: phase[1].component[1].upgrade: the command is empty"),
    ("command missing run", '{ run = "touch {marker}", timeout = 5 }', '{ timeout = 5 }',
     "20: phase[1].component[1].validate: missing key 'run'"),
    ("missing to", 'to = "1.9.1"\n', '',
     "14: phase[1].component[1]: component 'node_exporter': missing key 'to'"),
    ("no from and no probe", 'from = "1.7.0"\n', '',
     "14: phase[1].component[1]: component 'node_exporter': missing key 'from' (or a 'probe'"),
    ("version with a space", 'to = "1.9.1"', 'to = "1.9 .1"',
     "17: phase[1].component[1].to: '1.9 .1' is not a version"),
    ("empty version", 'from = "1.7.0"', 'from = ""',
     "16: phase[1].component[1].from: '' is not a version"),
    ("long version", 'to = "2.55.1"', 'to = "' + "9" * 129 + '"',
     "28: phase[2].component[1].to: '" + "9" * 129 + "' is not a version"),
    ("version not a string", 'to = "1.9.1"', "to = 1.9",
     "17: phase[1].component[1].to: must be a string, not a number"),
    ("same from and to", 'to = "1.9.1"', 'to = "1.7.0"',
     "17: phase[1].component[1].to: component 'node_exporter' goes from 1.7.0 to the same"),
    ("duplicate component", 'rollback = "touch {marker}"\n\n[[phase]]',
     'rollback = "x"\n\n[[phase.component]]\nname = "node_exporter"\nfrom = "1"\nto = "2"\n'
     'backup = "x"\nupgrade = "x"\nvalidate = "x"\nrollback = "x"\n\n[[phase]]',
     "24: phase[1].component[2].name: duplicate component 'node_exporter' in phase "
     "'exporters'"),
    ("duplicate phase", 'name = "core"', 'name = "exporters"',
     "24: phase[2].name: duplicate phase name 'exporters'"),
    ("bad component name", 'name = "prometheus"', 'name = "../prometheus"',
     "27: phase[2].component[1].name: component name '../prometheus' is not allowed"),
    ("max_parallel zero", "max_parallel = 2", "max_parallel = 0",
     "12: phase[1].max_parallel: 0 is out of range (1 to 64)"),
    ("max_parallel a string", "max_parallel = 2", 'max_parallel = "2"',
     "12: phase[1].max_parallel: must be a whole number, not a string"),
    ("negative timeout", "timeout = 30", "timeout = -1",
     "6: defaults.timeout: -1 is out of range"),
    ("nan timeout", "timeout = 5 }", "timeout = nan }",
     "20: phase[1].component[1].validate.timeout: nan is out of range"),
    ("retries a float", "retries = 1", "retries = 1.5",
     "7: defaults.retries: must be a whole number, not a number"),
    ("retries a boolean", "retries = 1", "retries = true",
     "7: defaults.retries: must be a whole number, not a boolean"),
    ("bad id prefix", 'id_prefix = "demo"', 'id_prefix = "../x"',
     "3: upgrade.id_prefix: id_prefix '../x' is not allowed"),
    ("phase without components", 'validate = "touch {marker}"\nrollback = "touch {marker}"\n',
     'validate = "x"\nrollback = "x"\n\n[[phase]]\nname = "empty"\n',
     "38: phase[3]: phase 'empty' has no components"),
    ("unknown table", "[defaults]", "[default]", "5: default: unknown key"),
    ("invalid TOML", 'name = "demo"', 'name = "demo', "2: not valid TOML: "),
    ("duplicate key (TOML)", 'to = "1.9.1"', 'to = "1.9.1"\nto = "2"',
     "18: not valid TOML: Cannot overwrite a value"),
    ("stage does not chain", 'name = "core"\n', 'name = "core"\n\n[[phase.component]]\n'
     'name = "node_exporter"\nfrom = "1.8.0"\nto = "1.10.0"\nbackup = "x"\nupgrade = "x"\n'
     'validate = "x"\nrollback = "x"\n', "28: phase[2].component[1].from: '1.8.0', but the "
     "previous stage of 'node_exporter' (phase 'exporters') goes to '1.9.1'"),
    ("control character in a command", 'upgrade = "touch {marker}"',
     'upgrade = "touch \\u0007{marker}"', "19: phase[1].component[1].upgrade: the command is"),
]


def good_text(marker: Path) -> str:
    return GOOD.format(marker=marker)


def test_the_good_plan_is_read_with_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text(good_text(tmp_path / "ran"))
    plan = plans.load(path)
    assert [p.name for p in plan.phases] == ["exporters", "core"]
    node, prom = plan.phases[0].components[0], plan.phases[1].components[0]
    assert (plan.id_prefix, plan.phases[0].max_parallel, plan.phases[1].max_parallel) == \
        ("demo", 2, 1)
    assert (node.from_version, node.to_version, node.retries, node.backoff_s) == \
        ("1.7.0", "1.9.1", 1, 0.5)
    assert node.upgrade.timeout_s == 30.0 and node.validate.timeout_s == 5.0
    assert prom.from_version is None and prom.probe is not None
    assert "echo 2.48.1" in prom.probe.run
    assert len(plan.sha256) == 64


@pytest.mark.parametrize(("what", "old", "new", "expected"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_plan_is_one_line_and_changes_nothing(
        what: str, old: str, new: str, expected: str, tmp_path: Path, home: Path, cli) -> None:
    marker = tmp_path / "ran"
    text = good_text(marker)
    bad = old.replace("{marker}", str(marker))
    assert bad in text, what
    path = tmp_path / "plan.toml"
    path.write_text(text.replace(bad, new.replace("{marker}", str(marker)), 1))
    with Ledger(home) as led:  # an existing ledger, with an upgrade in it
        led.init("before")
    before = tree(home)
    with pytest.raises(BadInput) as info:
        plans.load(path)
    assert str(info.value) == str(info.value).strip() and "\n" not in str(info.value)

    result = cli("apply", str(path))

    assert result.code == 6, result
    assert result.out == ""
    assert result.err.count("\n") == 1, result.err
    assert f"{path}:{expected}" in result.err
    assert not marker.exists()  # nothing ran
    assert tree(home) == before  # ledger (and every other file) untouched
    assert cli("apply", "--dry-run", str(path)).code == 6


def test_a_plan_without_phases_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plan.toml"
    path.write_text('[upgrade]\nname = "nothing"\n')
    with pytest.raises(BadInput, match=r"plan.toml:1: phase: the plan has no phases"):
        plans.load(path)


def test_a_missing_plan_file_is_one_line(tmp_path: Path, cli) -> None:
    result = cli("apply", str(tmp_path / "nope.toml"))
    assert result.code == 6
    assert result.err == (f"upgrade-ledger: error: {tmp_path / 'nope.toml'}: cannot read the "
                          "plan (No such file or directory)\n")


def test_key_lines_skip_strings_and_multiline_values() -> None:
    text = '\n'.join([
        "[[phase]]",                       # 1
        'name = "a"',                      # 2
        "[[phase.component]]",             # 3
        'upgrade = """',                   # 4
        "to = 1",                          # 5: inside a string, not a key
        "[[phase]]",                       # 6: inside a string, not a header
        '"""',                             # 7
        "list = [",                        # 8
        "  [1, 2],",                       # 9: inside an array, not a header
        "]",                               # 10
        "'quoted.key' = 1",                # 11
        "to = '2' # comment [x]",          # 12
        "[[phase.component]]",             # 13
        "[[phase]]",                       # 14
        "[[phase.component]]",             # 15
        "dotted.key = 3",                  # 16
    ])
    lines = KeyLines(text)
    assert lines.line_of(("phase", 0, "component", 0, "upgrade")) == 4
    assert lines.line_of(("phase", 0, "component", 0, "to")) == 12
    assert lines.line_of(("phase", 0, "component", 0, "quoted.key")) == 11
    assert lines.line_of(("phase", 0, "component", 1)) == 13
    assert lines.line_of(("phase", 0, "component", 1, "missing")) == 13
    assert lines.line_of(("phase", 1)) == 14
    assert lines.line_of(("phase", 1, "component", 0, "dotted", "key")) == 16
    assert lines.line_of(("phase", 2)) == 1  # not written: the array's first line
    assert plans.key_name(("phase", 1, "component", 0, "to")) == "phase[2].component[1].to"
