"""Facts about this host: the machine is its machine id and its boot id, not its name."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.core import host


def _first_machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text().strip().lower()
        except OSError:
            continue
        if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
            return text
    return None


@pytest.mark.skipif(_first_machine_id() is None, reason="this system keeps no machine id")
def test_the_machine_id_is_the_systems() -> None:
    assert host.machine_id() == _first_machine_id()
    assert host.machine_id() == host.machine_id()  # read once, the same every time
    assert host.machine_id() != (host.boot_id() or "").replace("-", "")


def test_the_boot_id_names_this_boot() -> None:
    boot = host.boot_id()
    assert boot is None or boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
