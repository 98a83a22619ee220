"""The package layout is the architecture: imports flow one way, and never in a circle.

Every module under ``ledger/`` is parsed (imports inside functions and under
``TYPE_CHECKING`` included) and each import of another ledger module is checked
against the direction documented in docs/architecture.md:

    core <- store <- lock <- views <- api <- {apply, observe, fleet} <- ops <- wiring <- cli

A part may import its own modules and any part below it. ``ops`` (doctor) sits above
``observe`` and ``fleet`` because it reports on their health.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ledger"

#: Each part and the parts it may import (its own modules always allowed).
BELOW: dict[str, set[str]] = {
    "core": set(),
    "store": {"core"},
    "lock": {"core", "store"},
    "views": {"core", "store", "lock"},
    "api": {"core", "store", "lock", "views"},
    "apply": {"core", "store", "lock", "views", "api"},
    "observe": {"core", "store", "lock", "views", "api"},
    "fleet": {"core", "store", "lock", "views", "api"},
    "ops": {"core", "store", "lock", "views", "api", "observe", "fleet"},
    "wiring": {"core", "store", "lock", "views", "api", "apply", "observe", "fleet", "ops"},
    "cli": {"core", "store", "lock", "views", "api", "apply", "observe", "fleet", "ops",
            "wiring"},
    # The package's front: `from ledger import Ledger` and `python -m ledger`.
    "front": {"core", "api", "wiring", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    parts = module.split(".")
    if module == "ledger.errors":
        return "core"  # the exception hierarchy, at the public path every traceback names
    if len(parts) == 1 or parts[1] == "__main__":
        return "front"
    if parts[1] in ("api", "queries"):
        return "api"
    if parts[1] == "migrations":
        return "store"
    return parts[1]


def ledger_imports(path: Path) -> set[str]:
    """Every ledger module *path* imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ledger")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "ledger":
            for alias in node.names:
                # `from ledger.views import document` imports the module ledger.views.document
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py")
                          .exists() or (PACKAGE.parent / Path(*sub.split("."))).is_dir()
                          else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in ledger_imports(path) if m != name} for name, path in
            modules.items()}


def test_every_part_is_known() -> None:
    unknown = {part_of(m) for m in graph()} - set(BELOW)
    assert not unknown, f"modules outside the documented parts: {unknown}"


def test_imports_flow_one_way() -> None:
    against = sorted(
        f"{module} ({part_of(module)}) imports {target} ({part_of(target)})"
        for module, targets in graph().items() for target in targets
        if part_of(target) != part_of(module) and part_of(target) not in BELOW[part_of(module)]
    )
    assert not against, "imports against the layering:\n" + "\n".join(against)


def test_no_import_cycle() -> None:
    edges = graph()
    # A package's __init__ is not an import of its modules' users: `import
    # ledger.lock.record` runs ledger/lock/__init__.py, which imports dirlock, which
    # imports record; that is Python's package loading, not a dependency of record.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ledger.cli import app\n    import ledger.api\n")
    assert ledger_imports(source) == {"ledger.cli.app", "ledger.api"}
    assert part_of("ledger.cli.app") not in BELOW["api"]
