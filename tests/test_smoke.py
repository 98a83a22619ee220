"""A whole upgrade through the API and the CLI: the shortest proof the product works."""

from __future__ import annotations

import json

from conftest import walk_to_upgrading

from ledger.api import Ledger


def test_a_whole_upgrade_through_the_api(ledger: Ledger) -> None:
    uid = walk_to_upgrading(ledger)
    ledger.phase_start("exporters")
    ledger.component_start("node_exporter", "1.7.0", "1.9.1")
    ledger.component_complete("node_exporter")
    ledger.phase_complete("exporters")
    ledger.set_state("VALIDATING")
    ledger.set_state("COMPLETED")
    doc = json.loads(ledger.home.state_file.read_text())
    assert doc["upgrade_id"] == uid
    assert doc["current_state"] == "COMPLETED"
    assert doc["phases"]["exporters"]["components"]["node_exporter"]["state"] == "COMPLETED"
    assert ledger.installed_version("node_exporter") == "1.9.1"


def test_the_cli_answers_predicates_by_exit_code(cli) -> None:
    assert cli("init").code == 0
    assert cli("state", "set", "PLANNING").code == 0
    assert cli("in-progress").code == 0
    assert cli("state", "set", "FAILED").code == 0
    assert cli("in-progress").code == 1
