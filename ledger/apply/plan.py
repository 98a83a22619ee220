"""Upgrade plans: a TOML file, read with the standard library and checked whole
before anything runs.

A plan is ordered phases; each phase lists components with their from/to versions
(or a ``probe`` command that prints the installed version) and the shell commands
that back up, upgrade, validate and roll back each one. docs/apply.md describes the
format key by key.

Every refusal is one ``BadInput`` line naming the file, the line and the key::

    plan.toml:14: phase[2].component[1].to: '3.8 .1' is not a version (...)

``tomllib`` reports line numbers for syntax errors only, not for keys; the line of a
key is found by scanning the source text (``ledger.tomllines``).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.apply.tomllines import Key, KeyLines
from ledger.core.validate import MAX_NAME, check_id, check_name, check_version
from ledger.errors import BadInput

#: The commands every component must have, in the order they run.
STEPS = ("backup", "upgrade", "validate", "rollback")
MAX_PLAN_BYTES = 1024 * 1024
MAX_COMMAND = 64 * 1024
MAX_PREFIX = 96  # leaves room for "-YYYYMMDD-HHMMSS-N" within a 128-character id

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_RETRIES = 0
DEFAULT_BACKOFF_S = 5.0
LIMITS: dict[str, tuple[float, float]] = {
    "timeout": (0.001, 7 * 86400.0), "retries": (0, 100), "backoff": (0.0, 3600.0),
    "max_parallel": (1, 64), "max_hosts": (1, 100_000), "halt_after_failures": (1, 100_000)}

TOP_KEYS = ("upgrade", "defaults", "fleet", "phase")
#: A rolling upgrade across the fleet (docs/fleet.md): at most max_hosts hosts at once;
#: no host starts once halt_after_failures hosts ended the plan FAILED or ROLLED_BACK.
FLEET_KEYS = ("max_hosts", "halt_after_failures")
UPGRADE_KEYS = ("name", "description", "id_prefix")
DEFAULT_KEYS = ("timeout", "retries", "backoff")
PHASE_KEYS = ("name", "max_parallel", "component")
COMPONENT_KEYS = ("name", "from", "to", "probe", *STEPS, "timeout", "retries", "backoff")
COMMAND_KEYS = ("run", "timeout")

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


@dataclass(frozen=True)
class Command:
    """One shell command (run with ``/bin/sh -c``) and its timeout in seconds."""

    run: str
    timeout_s: float


@dataclass(frozen=True)
class Component:
    """One component of a phase: versions, commands, retries."""

    phase: str
    name: str
    from_version: str | None
    to_version: str
    probe: Command | None
    backup: Command
    upgrade: Command
    validate: Command
    rollback: Command
    retries: int
    backoff_s: float

    @property
    def key(self) -> tuple[str, str]:
        """(phase, name): how the ledger tells two stages of one component apart."""
        return (self.phase, self.name)

    def command(self, step: str) -> Command:
        """The command of *step* (probe, backup, upgrade, validate or rollback)."""
        command = getattr(self, step)
        if not isinstance(command, Command):
            raise KeyError(step)
        return command


@dataclass(frozen=True)
class Phase:
    """A phase: components that may run together, at most ``max_parallel`` at once."""

    name: str
    max_parallel: int
    components: tuple[Component, ...]


@dataclass(frozen=True)
class Plan:
    """A checked plan. ``sha256`` (of the file's bytes) is how a resumed run knows it
    is being given the same plan again. ``max_hosts`` and ``halt_after_failures`` are
    its ``[fleet]`` limits (None when not set)."""

    path: Path
    sha256: str
    name: str
    description: str | None
    id_prefix: str
    phases: tuple[Phase, ...]
    max_hosts: int | None = None
    halt_after_failures: int | None = None

    @property
    def base_dir(self) -> Path:
        """The plan file's folder: the working directory of its commands."""
        return self.path.parent

    def components(self) -> Iterator[Component]:
        """Every component in plan order (phase by phase)."""
        for phase in self.phases:
            yield from phase.components

    def ledger_plan(self) -> dict[str, list[tuple[str, str | None, str | None]]]:
        """The plan as ``Ledger.plan`` takes it."""
        return {p.name: [(c.name, c.from_version, c.to_version) for c in p.components]
                for p in self.phases}

    def targets_from(self, component: Component) -> list[str]:
        """The target of *component* and of the later stages of the same component: a
        probe reporting one of these means this stage has nothing left to do."""
        stages = [c for c in self.components() if c.name == component.name]
        return [c.to_version for c in stages[stages.index(component):]]


def load(path: str | Path) -> Plan:
    """Read and check the plan at *path*; ``BadInput`` (one line) when it is refused."""
    source = str(path)
    try:
        # Without blocking: a FIFO (or a device) is refused, never waited on.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BadInput(f"{source}: cannot read the plan ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadInput(f"{source}: cannot read the plan (not a regular file)")
        try:
            data = fh.read(MAX_PLAN_BYTES + 1)
        except OSError as exc:
            raise BadInput(f"{source}: cannot read the plan ({exc.strerror or exc})") from None
    if len(data) > MAX_PLAN_BYTES:
        raise BadInput(f"{source}: the plan is larger than {MAX_PLAN_BYTES} bytes")
    return parse(data, Path(path).absolute(), source)


def parse(data: bytes, path: Path, source: str | None = None) -> Plan:
    """Check the plan text *data* (the file at *path*, named *source* in messages)."""
    source = source or str(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{source}: the plan is not UTF-8 text (byte {exc.start})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        where = _TOML_LINE.search(message)
        line = f":{where.group(1)}" if where else ""
        raise BadInput(f"{source}{line}: not valid TOML: "
                       f"{_TOML_LINE.sub('', message).strip()}") from None
    checker = _Checker(source, KeyLines(text))
    return checker.plan(doc, path, hashlib.sha256(data).hexdigest())


# -- checking the document -----------------------------------------------------------


def key_name(key: Key) -> str:
    """``("phase", 1, "component", 0, "to")`` → ``phase[2].component[1].to`` (1-based)."""
    out = ""
    for part in key:
        out += f"[{part + 1}]" if isinstance(part, int) else ("." if out else "") + part
    return out


class _Checker:
    """Walks the parsed document; the first problem found is raised as one line."""

    def __init__(self, source: str, lines: KeyLines) -> None:
        self.source = source
        self.lines = lines

    def fail(self, key: Key, problem: str) -> BadInput:
        return BadInput(f"{self.source}:{self.lines.line_of(key)}: "
                        f"{key_name(key) or 'plan'}: {problem}")

    def table(self, value: Any, key: Key, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, not {_kind(value)}")
        for name in value:
            if name not in allowed:
                raise self.fail((*key, name), "unknown key (expected one of: "
                                f"{', '.join(allowed)})")
        return value

    def string(self, value: Any, key: Key) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {_kind(value)}")
        return value

    def number(self, table: Mapping[str, Any], name: str, key: Key, default: Any,
               *, integer: bool = False) -> Any:
        if name not in table:
            return default
        value = table[name]
        low, high = LIMITS[name]
        kinds: tuple[type[int] | type[float], ...] = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.fail((*key, name), f"must be {'a whole number' if integer else 'a number'}"
                            f", not {_kind(value)}")
        if not low <= float(value) <= high:  # NaN and inf fail too
            raise self.fail((*key, name), f"{value!r} is out of range ({low:g} to {high:g})")
        return value

    def name(self, table: Mapping[str, Any], key: Key, what: str) -> str:
        if "name" not in table:
            raise self.fail(key, "missing key 'name'")
        value = self.string(table["name"], (*key, "name"))
        try:
            check_name(value, what)
        except BadInput as exc:
            raise self.fail((*key, "name"), str(exc)) from None
        return value

    def version(self, value: Any, key: Key) -> str:
        text = self.string(value, key)
        try:
            check_version(text)
        except BadInput:
            raise self.fail(key, f"{text!r} is not a version (1-{MAX_NAME} printable "
                            "characters, no spaces)") from None
        return text

    def command(self, value: Any, key: Key, timeout: float) -> Command:
        if isinstance(value, dict):
            table = self.table(value, key, COMMAND_KEYS)
            if "run" not in table:
                raise self.fail(key, "missing key 'run' (the command line)")
            timeout = self.number(table, "timeout", key, timeout)
            value, key = table["run"], (*key, "run")
        elif not isinstance(value, str):
            raise self.fail(key, f"must be a command string or a table {{run, timeout}}, "
                            f"not {_kind(value)}")
        if not value.strip():
            raise self.fail(key, "the command is empty")
        if len(value) > MAX_COMMAND or _CONTROL.search(value):
            raise self.fail(key, f"the command is longer than {MAX_COMMAND} characters or "
                            "contains control characters")
        return Command(value, float(timeout))

    def plan(self, doc: dict[str, Any], path: Path, sha256: str) -> Plan:
        self.table(doc, (), TOP_KEYS)
        head = self.table(doc.get("upgrade", {}), ("upgrade",), UPGRADE_KEYS)
        defaults = self.table(doc.get("defaults", {}), ("defaults",), DEFAULT_KEYS)
        fleet = self.table(doc.get("fleet", {}), ("fleet",), FLEET_KEYS)
        settings = {
            "timeout": self.number(defaults, "timeout", ("defaults",), DEFAULT_TIMEOUT_S),
            "retries": self.number(defaults, "retries", ("defaults",), DEFAULT_RETRIES,
                                   integer=True),
            "backoff": self.number(defaults, "backoff", ("defaults",), DEFAULT_BACKOFF_S),
        }
        name = self.string(head.get("name", path.stem), ("upgrade", "name"))
        description = head.get("description")
        if description is not None:
            self.string(description, ("upgrade", "description"))
        prefix = self.string(head.get("id_prefix", "upgrade"), ("upgrade", "id_prefix"))
        try:
            check_id(prefix, "id_prefix")
        except BadInput as exc:
            raise self.fail(("upgrade", "id_prefix"), str(exc)) from None
        if len(prefix) > MAX_PREFIX:
            raise self.fail(("upgrade", "id_prefix"), f"longer than {MAX_PREFIX} characters")
        raw_phases = doc.get("phase")
        if raw_phases is None:
            raise self.fail(("phase",), "the plan has no phases (add [[phase]] tables)")
        if not isinstance(raw_phases, list):
            raise self.fail(("phase",), "must be an array of tables ([[phase]])")
        phases = []
        seen: set[str] = set()
        for index, raw in enumerate(raw_phases):
            phase = self.phase(raw, ("phase", index), settings)
            if phase.name in seen:
                raise self.fail(("phase", index, "name"), f"duplicate phase name {phase.name!r}")
            seen.add(phase.name)
            phases.append(phase)
        plan = Plan(path=path, sha256=sha256, name=name, description=description,
                    id_prefix=prefix, phases=tuple(phases),
                    max_hosts=self.number(fleet, "max_hosts", ("fleet",), None, integer=True),
                    halt_after_failures=self.number(fleet, "halt_after_failures", ("fleet",),
                                                    None, integer=True))
        self.stages(plan)
        return plan

    def phase(self, raw: Any, key: Key, settings: Mapping[str, Any]) -> Phase:
        table = self.table(raw, key, PHASE_KEYS)
        name = self.name(table, key, "phase")
        max_parallel = self.number(table, "max_parallel", key, 1, integer=True)
        raw_components = table.get("component")
        if not raw_components:
            raise self.fail(key, f"phase {name!r} has no components "
                            "(add [[phase.component]] tables)")
        if not isinstance(raw_components, list):
            raise self.fail((*key, "component"), "must be an array of tables "
                            "([[phase.component]])")
        components = []
        seen: set[str] = set()
        for index, item in enumerate(raw_components):
            ckey = (*key, "component", index)
            component = self.component(item, ckey, name, settings)
            if component.name in seen:
                raise self.fail((*ckey, "name"), f"duplicate component {component.name!r} "
                                f"in phase {name!r}")
            seen.add(component.name)
            components.append(component)
        return Phase(name, max_parallel, tuple(components))

    def component(self, raw: Any, key: Key, phase: str,
                  settings: Mapping[str, Any]) -> Component:
        table = self.table(raw, key, COMPONENT_KEYS)
        name = self.name(table, key, "component")
        timeout = self.number(table, "timeout", key, settings["timeout"])
        retries = self.number(table, "retries", key, settings["retries"], integer=True)
        backoff = self.number(table, "backoff", key, settings["backoff"])
        if "to" not in table:
            raise self.fail(key, f"component {name!r}: missing key 'to' (the target version)")
        to_version = self.version(table["to"], (*key, "to"))
        from_version = None
        if "from" in table:
            from_version = self.version(table["from"], (*key, "from"))
            if from_version == to_version:
                raise self.fail((*key, "to"), f"component {name!r} goes from {from_version} "
                                "to the same version")
        elif "probe" not in table:
            raise self.fail(key, f"component {name!r}: missing key 'from' (or a 'probe' "
                            "command that prints the installed version)")
        for step in STEPS:
            if step not in table:
                raise self.fail(key, f"component {name!r}: missing command {step!r}")
        probe = self.command(table["probe"], (*key, "probe"), timeout) \
            if "probe" in table else None
        commands = {step: self.command(table[step], (*key, step), timeout) for step in STEPS}
        return Component(phase=phase, name=name, from_version=from_version,
                         to_version=to_version, probe=probe, retries=retries,
                         backoff_s=float(backoff), **commands)

    def stages(self, plan: Plan) -> None:
        """A component planned in several phases is upgraded in stages: each stage must
        start where the previous one ended."""
        last: dict[str, Component] = {}
        for p_index, phase in enumerate(plan.phases):
            for c_index, component in enumerate(phase.components):
                before = last.get(component.name)
                if before is not None and component.from_version is not None and \
                        component.from_version != before.to_version:
                    raise self.fail(
                        ("phase", p_index, "component", c_index, "from"),
                        f"{component.from_version!r}, but the previous stage of "
                        f"{component.name!r} (phase {before.phase!r}) goes to "
                        f"{before.to_version!r}")
                last[component.name] = component


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


__all__ = ["STEPS", "Command", "Component", "Phase", "Plan", "key_name", "load",
           "parse"]
