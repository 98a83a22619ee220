"""Plans for the ``apply`` tests, and the shell script their commands run.

Every command calls ``t.sh`` in a work folder W. The script leaves evidence there
(one line per finished upgrade in ``<phase>.<component>.upgrades``, start/end
stamps, rollback order) and obeys control files the tests drop in W:

- ``fail-upgrade-C`` (a count): the next N upgrades of C fail;
- ``fail-validate-C``: every validation of C fails;
- ``validate-passes-C`` (a count): only the first N validations of C pass;
- ``fail-rollback-C``: the rollback of C fails;
- ``tamper-C``: the upgrade of C changes C's backup afterwards;
- ``barrier-P`` (a count): upgrades in phase P wait until that many have started;
- ``block-before-C`` / ``block-after-C``: the upgrade of C hangs before / after its
  work (it writes ``C.blocked`` first), until it is killed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SCRIPT = r"""#!/bin/sh
set -eu
W=$(dirname "$0")
C=$LEDGER_COMPONENT
P=$LEDGER_PHASE
K="$P.$C"
hang() {
    echo "$$" > "$W/$C.pid"
    touch "$W/$C.blocked"
    n=0
    while [ $n -lt 3000 ]; do sleep 0.02; n=$((n+1)); done
}
case $1 in
probe)
    if [ -f "$W/$C.installed" ]; then cat "$W/$C.installed"; else echo "$LEDGER_FROM_VERSION"; fi
    ;;
backup)
    echo "$K" >> "$W/backups"
    echo "$C $(cat "$W/$C.installed" 2>/dev/null || echo initial)" > "$LEDGER_BACKUP_DIR/state"
    ;;
upgrade)
    echo "start $K $(date +%s%N)" >> "$W/stamps"
    if [ -f "$W/barrier-$P" ]; then
        n=0
        while [ "$(grep -c "^start $P\." "$W/stamps")" -lt "$(cat "$W/barrier-$P")" ] \
                && [ $n -lt 3000 ]; do
            sleep 0.01; n=$((n+1))
        done
    fi
    if [ -f "$W/fail-upgrade-$C" ] && [ "$(cat "$W/fail-upgrade-$C")" -gt 0 ]; then
        echo $(( $(cat "$W/fail-upgrade-$C") - 1 )) > "$W/fail-upgrade-$C"
        echo "end $K $(date +%s%N)" >> "$W/stamps"
        echo "upgrade of $C fails on purpose" >&2
        exit 1
    fi
    if [ -f "$W/block-before-$C" ]; then hang; fi
    echo "$LEDGER_TO_VERSION" >> "$W/$K.upgrades"
    echo "$LEDGER_TO_VERSION" > "$W/$C.installed"
    if [ -f "$W/tamper-$C" ]; then echo tampered >> "$LEDGER_BACKUP_DIR/state"; fi
    if [ -f "$W/block-after-$C" ]; then hang; fi
    echo "end $K $(date +%s%N)" >> "$W/stamps"
    echo "upgraded $C to $LEDGER_TO_VERSION"
    ;;
validate)
    if [ -f "$W/fail-validate-$C" ]; then echo "$C is unhealthy" >&2; exit 1; fi
    if [ -f "$W/validate-passes-$C" ]; then
        left=$(cat "$W/validate-passes-$C")
        if [ "$left" -le 0 ]; then echo "$C is unhealthy now" >&2; exit 1; fi
        echo $((left - 1)) > "$W/validate-passes-$C"
    fi
    [ "$(tail -n 1 "$W/$K.upgrades" 2>/dev/null)" = "$LEDGER_TO_VERSION" ]
    ;;
rollback)
    if [ -f "$W/fail-rollback-$C" ]; then echo "cannot restore $C" >&2; exit 3; fi
    echo "$K" >> "$W/rollbacks"
    ;;
esac
"""


def component(name: str, frm: str = "1.0", to: str = "2.0", *, probe: bool = False,
              **extra: Any) -> dict[str, Any]:
    """A component whose commands all run t.sh (override any with *extra*)."""
    comp: dict[str, Any] = {"name": name, "from": frm, "to": to}
    if probe:
        comp["probe"] = "sh {W}/t.sh probe"
    for step in ("backup", "upgrade", "validate", "rollback"):
        comp[step] = f"sh {{W}}/t.sh {step}"
    comp.update(extra)
    return comp


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _in(work: Path, value: Any) -> Any:
    """*value* with ``{W}`` (in a string, or in a command table) replaced by *work*."""
    if isinstance(value, str):
        return value.replace("{W}", str(work))
    if isinstance(value, dict):
        return {k: _in(work, v) for k, v in value.items()}
    return value


def write_plan(work: Path, phases: Sequence[tuple[str, int, Sequence[Mapping[str, Any]]]],
               *, defaults: Mapping[str, Any] | None = None, prefix: str = "t") -> Path:
    """Write t.sh and plan.toml into *work*; phases are (name, max_parallel, components)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "t.sh").write_text(SCRIPT)
    lines = ["[upgrade]", f'id_prefix = "{prefix}"', "", "[defaults]"]
    for key, value in {"timeout": 60, "retries": 0, "backoff": 0.01, **(defaults or {})}.items():
        lines.append(f"{key} = {toml_value(value)}")
    for name, max_parallel, comps in phases:
        lines += ["", "[[phase]]", f'name = "{name}"', f"max_parallel = {max_parallel}"]
        for comp in comps:
            lines += ["", "[[phase.component]]"]
            for key, value in comp.items():
                lines.append(f"{key} = {toml_value(_in(work, value))}")
    plan = work / "plan.toml"
    plan.write_text("\n".join(lines) + "\n")
    return plan


def upgrades(work: Path, phase: str, name: str) -> list[str]:
    """The versions a component was upgraded to, one per finished upgrade command."""
    path = work / f"{phase}.{name}.upgrades"
    return path.read_text().split() if path.exists() else []


def lines(work: Path, name: str) -> list[str]:
    path = work / name
    return path.read_text().splitlines() if path.exists() else []


def max_overlap(work: Path, phase: str) -> int:
    """The most upgrade commands of *phase* that ran at the same moment, from the
    start/end stamps they wrote (an end sorts before a start at the same stamp)."""
    marks = []
    for line in lines(work, "stamps"):
        what, key, stamp = line.split()
        if key.startswith(phase + "."):
            marks.append((int(stamp), 0 if what == "end" else 1))
    running = most = 0
    for _, kind in sorted(marks):
        running += 1 if kind else -1
        most = max(most, running)
    return most


def wait_for(path: Path, timeout_s: float = 60.0) -> None:
    """Wait until *path* exists (a barrier, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.01)


def process_gone(pid: int, timeout_s: float = 30.0) -> bool:
    """True once *pid* no longer runs (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                state = fh.read().rpartition(b")")[2].split()[0]
        except OSError:
            return True
        if state in (b"Z", b"X"):
            return True
        time.sleep(0.02)
    return False


def tree(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under *home* with its size and mtime: a snapshot to compare."""
    out = {}
    if home.exists():
        for root, _, files in os.walk(home):
            for name in files:
                st = (Path(root) / name).stat()
                out[str(Path(root) / name)] = (st.st_size, st.st_mtime_ns)
    return out
