"""Drive a whole simulated upgrade through the Python API and print what the ledger saw.

    python examples/simulated_upgrade.py [HOME]

Nothing is installed or changed outside HOME (default: ./demo): the "upgrades" are
ledger entries and small backup files. One component fails once and is retried; the
script prints that attempt as it happens and the component's trail as the ledger
recorded it, then the summary and the history. It can be run again on the same HOME.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ledger import Ledger

PLAN = {
    "exporters": [("node_exporter", "1.7.0", "1.9.1"), ("nginx_exporter", "1.1.0", "1.5.1"),
                  ("mysqld_exporter", "0.15.1", "0.18.0")],
    "core": [("prometheus", "2.48.1", "2.55.1")],
    "logging": [("loki", "2.9.3", "3.6.3"), ("promtail", "2.9.3", "3.6.3")],
}

#: The component whose first attempt fails, so that the ledger has a retry to show.
FLAKY = "prometheus"


def main(home: Path) -> None:
    with Ledger(home) as ledger:
        ledger.acquire_lock()
        upgrade_id = ledger.init(supersede=True)
        ledger.set_state("PLANNING")
        ledger.plan(PLAN)
        ledger.set_state("BACKING_UP")
        for components in PLAN.values():
            for name, version, _ in components:
                backup = ledger.home.backups_dir / f"{name}-{version}.tar.gz"
                backup.write_bytes(f"{name} {version}\n".encode())
                ledger.mark_rollback_point(name, backup, size_bytes=backup.stat().st_size)
        ledger.set_state("UPGRADING")
        while (phase := ledger.next_phase()) is not None:
            ledger.phase_start(phase)
            for name, old, new in PLAN[phase]:
                if ledger.is_upgraded(name):
                    continue
                ledger.component_start(name, old, new)
                if name == FLAKY:  # its first attempt fails; the retry works
                    ledger.component_fail(name, "config check failed")
                    print(f"{name}: attempt 1 failed (config check failed), retrying")
                    ledger.component_start(name, old, new)
                ledger.component_complete(name)
            ledger.phase_complete(phase)
        ledger.set_state("VALIDATING")
        ledger.set_state("COMPLETED")
        print("\nWhat the ledger recorded of the components that failed first:")
        failed = {e["subject"] for e in ledger.events(upgrade_id=upgrade_id,
                                                      kind="component.failed", limit=None)}
        for name in sorted(failed):
            print(f"  {trail(ledger, upgrade_id, name)}")
        print()
        print(ledger.summary())
        ledger.cleanup()
        print(f"\nstate.json: {ledger.home.state_file}")
        print(f"history:    {ledger.home.history_file(upgrade_id)}\n")
        print("Recent upgrades:")
        for row in ledger.history(limit=5):
            print(f"  {row['id']} | {row['outcome'] or row['state']} | "
                  f"{row['started_at']} -> {row['finished_at']} | "
                  f"{row['completed']}/{row['components']} components")


def trail(ledger: Ledger, upgrade_id: str, name: str) -> str:
    """A component's moves in this upgrade, from its events: A -> FAILED (why) -> B."""
    steps = []
    for event in ledger.events(upgrade_id=upgrade_id, component=name, limit=None):
        why = (event["detail"] or {}).get("text") if event["to"] == "FAILED" else None
        steps.append(event["to"] + (f" ({why})" if why else ""))
    return f"{name}: " + " -> ".join(steps)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo").absolute())
