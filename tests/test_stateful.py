"""A Hypothesis state machine drives the API against a model of the ledger.

The model is a few dictionaries that follow DESIGN.md's rules (the transition
tables, phases in planned order, components with attempts, the current phase and
component, one event per change). After every step the ledger, the model and
state.json must agree; a refused step must leave state.json and the events as they
were. One rule exports the current upgrade and imports it back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger.api import Ledger
from ledger.core import states
from ledger.errors import (
    InvalidTransition,
    LedgerError,
    NoCurrentPhase,
    NotFound,
    UpgradeInProgress,
)
from ledger.views import document

SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "ledger" /
                     "state.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

PHASE_NAMES = ["backup", "exporters", "server"]
COMPONENT_NAMES = ["node_exporter", "prometheus", "grafana"]
PHASES = st.sampled_from(PHASE_NAMES)
COMPONENTS = st.sampled_from(COMPONENT_NAMES)
#: (prefer a name the step is likely to work on, an index)
NAMES = st.tuples(st.booleans(), st.integers(0, 11))
VERSIONS = st.sampled_from([None, "1.0", "2.0"])

#: Where this run's ledgers go (the test's tmp_path) and the migrated template.
_ROOT: list[Path] = []
_TEMPLATE: list[Path] = []


def choose(pick: tuple[bool, int], likely: list[str], every: list[str]) -> str:
    """A name from *likely* (the ones a step would succeed on) when asked and there are
    any, else from *every* name, so that both successes and refusals are explored."""
    prefer, index = pick
    pool = likely if prefer and likely else every
    return pool[index % len(pool)]


def new_home() -> Path:
    """A fresh, migrated ledger home (a copy of one made once: migrating is the slow part)."""
    if not _TEMPLATE:
        template = _ROOT[0] / "template"
        Ledger(template).close()
        _TEMPLATE.append(template)
    home = Path(tempfile.mkdtemp(prefix="machine-", dir=_ROOT[0])) / "home"
    shutil.copytree(_TEMPLATE[0], home)
    return home


@dataclass
class Comp:
    state: str
    position: int
    from_version: str | None
    to_version: str | None
    attempts: int = 0


@dataclass
class Model:
    """What the ledger should hold for the current upgrade."""

    uid: str | None = None
    state: str = states.IDLE
    outcome: str | None = None
    phases: dict[str, str] = field(default_factory=dict)
    comps: dict[tuple[str, str], Comp] = field(default_factory=dict)
    current_phase: str | None = None
    current_component: str | None = None
    events: int = 0
    positions: int = 0

    def add_component(self, phase: str, name: str, state: str, frm: str | None,
                      to: str | None) -> Comp:
        self.positions += 1
        comp = self.comps[(phase, name)] = Comp(state, self.positions, frm, to)
        return comp

    def find(self, name: str) -> tuple[str, Comp] | None:
        """As the ledger looks a component up: in the current phase, else its latest."""
        if self.current_phase is not None and (self.current_phase, name) in self.comps:
            return self.current_phase, self.comps[(self.current_phase, name)]
        found = [(p, c) for (p, n), c in self.comps.items() if n == name]
        return max(found, key=lambda pc: pc[1].position) if found else None

    def progress(self) -> int:
        total = len(self.comps)
        if not total:
            return 100 if (self.outcome or self.state) == states.COMPLETED else 0
        done = sum(c.state in (states.COMPLETED, states.SKIPPED) for c in self.comps.values())
        return done * 100 // total


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.home = new_home()
        self.ledger = Ledger(self.home)
        self.model = Model()
        self.steps = 0  # since the last init
        self.since_trip = 0  # since the last export/import round trip

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.home.parent, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------

    def view(self) -> bytes | None:
        path = self.ledger.home.state_file
        return path.read_bytes() if path.exists() else None

    def refused(self, error: type[LedgerError], call: Any, *args: Any, **kwargs: Any) -> None:
        """*call* must raise *error* and change neither the view nor the events."""
        before = self.view()
        with pytest.raises(error):
            call(*args, **kwargs)
        assert self.view() == before
        assert len(self.ledger.events(limit=None)) == self.model.events

    # -- rules ---------------------------------------------------------------------

    @initialize(start=st.sampled_from(["nothing", "new", "running"]),
                plan=st.lists(st.tuples(PHASES, st.lists(COMPONENTS, unique=True, max_size=3)),
                              min_size=1, max_size=3, unique_by=lambda pc: pc[0]))
    def first_upgrade(self, start: str, plan: list[tuple[str, list[str]]]) -> None:
        """Start from an empty ledger, a new upgrade, or one mid-run with planned work,
        so that the steps that follow reach the interesting states."""
        if start == "nothing":
            return
        self.init(supersede=False)
        if start == "running":
            self.plan({phase: [(c, "1.0", "2.0") for c in comps] for phase, comps in plan})
            for _ in range(3):  # PLANNING, BACKING_UP, UPGRADING
                self.set_state(legal=True, pick=0)
            self.phase_start(plan[0][0])

    # A new upgrade throws the model's work away; give each one a few steps first.
    @precondition(lambda self: self.model.uid is None or self.steps >= 6)
    @rule(supersede=st.booleans())
    def init(self, supersede: bool) -> None:
        self.steps = 0
        m = self.model
        running = m.uid is not None and states.is_in_progress(m.state)
        if running and not supersede:
            self.refused(UpgradeInProgress, self.ledger.init)
            return
        old = m.uid
        uid = self.ledger.init(supersede=supersede)
        assert uid != old
        if running:
            assert old is not None
            superseded = self.ledger.document(old)
            assert superseded["current_state"] == states.FAILED
            assert superseded["superseded_by"] == uid
        self.model = Model(uid=uid, events=m.events + (2 if running else 1))

    @rule(legal=st.booleans(), pick=st.integers(0, len(states.UPGRADE_STATES) - 1))
    def set_state(self, legal: bool, pick: int) -> None:
        """Half the time a move the table allows (so runs get somewhere), else any."""
        m = self.model
        allowed = states.UPGRADE_TRANSITIONS[m.state]
        goal = allowed[pick % len(allowed)] if legal else states.UPGRADE_STATES[pick]
        if m.uid is None:
            self.refused(NotFound, self.ledger.set_state, goal)
        elif goal == m.state:
            before = self.view()
            assert self.ledger.set_state(goal) is False
            assert self.view() == before
        elif goal in states.UPGRADE_TRANSITIONS[m.state]:
            assert self.ledger.set_state(goal) is True
            m.state = goal
            if goal in states.TERMINAL_STATES and m.outcome is None:
                m.outcome = goal
            m.events += 1
        else:
            self.refused(InvalidTransition, self.ledger.set_state, goal)

    @precondition(lambda self: self.model.uid is not None)
    @rule(plan=st.dictionaries(PHASES, st.lists(st.tuples(COMPONENTS, VERSIONS, VERSIONS),
                                                max_size=3, unique_by=lambda c: c[0]),
                               max_size=3))
    def plan(self, plan: dict[str, list[tuple[str, str | None, str | None]]]) -> None:
        self.ledger.plan(plan)
        m = self.model
        for phase, comps in plan.items():
            m.phases.setdefault(phase, states.PENDING)
            for name, frm, to in comps:
                if (phase, name) not in m.comps:
                    m.add_component(phase, name, states.PENDING, frm, to)
        m.events += 1

    @rule(name=PHASES)
    def phase_start(self, name: str) -> None:
        self.move_phase(name, states.IN_PROGRESS)

    @rule(pick=NAMES, goal=st.sampled_from([states.COMPLETED, states.FAILED, states.SKIPPED]))
    def phase_end(self, pick: tuple[bool, int], goal: str) -> None:
        self.move_phase(choose(pick, list(self.model.phases), PHASE_NAMES), goal)

    def move_phase(self, name: str, target: str) -> None:
        m = self.model
        call = {states.IN_PROGRESS: self.ledger.phase_start,
                states.COMPLETED: self.ledger.phase_complete,
                states.FAILED: lambda n: self.ledger.phase_fail(n, "phase broke"),
                states.SKIPPED: lambda n: self.ledger.phase_skip(n, "not needed")}[target]
        if m.uid is None:
            self.refused(NotFound, call, name)
            return
        current = m.phases.get(name, states.PENDING if target == states.IN_PROGRESS else None)
        if current is None:
            self.refused(NotFound, call, name)
            return
        if target != current and target not in states.PHASE_TRANSITIONS[current]:
            self.refused(InvalidTransition, call, name)
            return
        changed = call(name)
        assert changed is (target != current)
        m.phases[name] = target
        new_current = name if target == states.IN_PROGRESS else m.current_phase
        if target != current or new_current != m.current_phase:
            m.events += 1
        m.current_phase = new_current

    @rule(pick=NAMES, frm=VERSIONS, to=VERSIONS)
    def component_start(self, pick: tuple[bool, int], frm: str | None, to: str | None) -> None:
        m = self.model
        name = choose(pick, [n for (p, n), c in m.comps.items()
                             if p == m.current_phase and c.state != states.UPGRADING],
                      COMPONENT_NAMES)
        if m.uid is None:
            self.refused(NotFound, self.ledger.component_start, name, frm, to)
            return
        if m.current_phase is None:
            self.refused(NoCurrentPhase, self.ledger.component_start, name, frm, to)
            return
        comp = m.comps.get((m.current_phase, name))
        changed = self.ledger.component_start(name, frm, to)
        assert changed is (comp is None or comp.state != states.UPGRADING)
        if comp is None:
            comp = m.add_component(m.current_phase, name, states.UPGRADING, frm, to)
        comp.state = states.UPGRADING
        comp.attempts = max(comp.attempts, 1)  # the first start is attempt 1; a retry keeps it
        comp.from_version = frm or comp.from_version
        comp.to_version = to or comp.to_version
        m.current_component = name
        m.events += 1

    @rule(pick=NAMES, goal=st.sampled_from([states.COMPLETED, states.FAILED, states.SKIPPED]))
    def component_end(self, pick: tuple[bool, int], goal: str) -> None:
        known = [n for (p, n), c in self.model.comps.items()
                 if p == self.model.current_phase and c.state == states.UPGRADING]
        name, target = choose(pick, known, COMPONENT_NAMES), goal
        m = self.model
        call = {states.COMPLETED: self.ledger.component_complete,
                states.FAILED: lambda n: self.ledger.component_fail(n, "it broke"),
                states.SKIPPED: lambda n: self.ledger.component_skip(n, "already there")}[target]
        if m.uid is None:
            self.refused(NotFound, call, name)
            return
        found = m.find(name)
        if found is None:
            self.refused(NotFound if m.current_phase else NoCurrentPhase, call, name)
            return
        _, comp = found
        if comp.state == target:
            assert call(name) is False
            return
        if target not in states.COMPONENT_TRANSITIONS[comp.state]:
            self.refused(InvalidTransition, call, name)
            return
        assert call(name) is True
        comp.state = target
        if target == states.FAILED:
            comp.attempts += 1  # the next attempt
        if m.current_component == name:
            m.current_component = None
        m.events += 1

    # A round trip is worth it only after something changed since the last one.
    @precondition(lambda self: self.model.uid is not None and self.since_trip >= 3)
    @rule()
    def export_import_round_trip(self) -> None:
        self.since_trip = 0
        exported = self.ledger.export_document()
        assert self.ledger.import_document(exported) == self.model.uid
        self.model.events += 1
        before, after = json.loads(exported), self.ledger.document()
        assert after["serial"] > before["serial"]
        assert {**after, "serial": 0} == {**before, "serial": 0}
        # The document's order becomes the ledger's order.
        ordered = sorted(self.model.comps.values(),
                         key=lambda c: (list(self.model.phases).index(
                             next(p for (p, _), v in self.model.comps.items() if v is c)),
                             c.position))
        for n, comp in enumerate(ordered, start=1):
            comp.position = n

    @rule()
    def reopen(self) -> None:
        """A new process would see the same ledger."""
        self.ledger.close()
        self.ledger = Ledger(self.home)

    # -- what must always hold -----------------------------------------------------

    @invariant()
    def ledger_model_and_view_agree(self) -> None:
        self.steps += 1
        self.since_trip += 1
        m, led = self.model, self.ledger
        assert led.state() == m.state
        assert led.current_id() == m.uid
        assert len(led.events(limit=None)) == m.events
        if m.uid is None:
            assert self.view() is None
            return
        doc = led.document()
        assert doc["upgrade_id"] == m.uid
        assert doc["current_state"] == m.state
        assert doc["outcome"] == m.outcome
        assert doc["current_phase"] == m.current_phase
        assert doc["current_component"] == m.current_component
        assert doc["can_resume"] is states.is_in_progress(m.state)
        assert {name: p["state"] for name, p in doc["phases"].items()} == m.phases
        assert list(doc["phases"]) == list(m.phases)
        for phase, body in doc["phases"].items():
            expected = sorted(((n, c) for (p, n), c in m.comps.items() if p == phase),
                              key=lambda nc: nc[1].position)
            got = body["components"]
            assert list(got) == [n for n, _ in expected]
            for name, comp in expected:
                assert (got[name]["state"], got[name]["attempts"],
                        got[name]["from_version"], got[name]["to_version"]) == \
                    (comp.state, comp.attempts, comp.from_version, comp.to_version)
        assert led.progress_percent() == m.progress()
        assert led.in_progress() is states.is_in_progress(m.state)
        data = led.home.state_file.read_bytes()
        assert data == document.dumps(doc)  # byte for byte, whether patched or rebuilt
        VALIDATOR.validate(json.loads(data))


@pytest.mark.slow
def test_the_ledger_follows_its_model(tmp_path: Path) -> None:
    _ROOT[:], _TEMPLATE[:] = [tmp_path], []
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=30, stateful_step_count=25, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
