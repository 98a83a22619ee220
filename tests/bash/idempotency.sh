# The seed's "With Idempotency" usage example: the same component asked for twice
# in one upgrade is upgraded once. perform_actual_upgrade counts its runs in a file.
set -euo pipefail
# shellcheck source=/dev/null
source "$LIB"

perform_actual_upgrade() {
    echo "$1" >>"$UPGRADE_STATE_DIR/performed"
}

upgrade_component_safe() {
    local component="$1"

    if upgrade_component_is_upgraded "$component"; then
        echo "Already upgraded, skipping"
        return 0
    fi

    upgrade_component_start "$component" "1.0.0" "2.0.0"
    perform_actual_upgrade "$component"
    upgrade_component_complete "$component"
}

upgrade_state_init >/dev/null
upgrade_state_set PLANNING
upgrade_state_set BACKING_UP
upgrade_state_set UPGRADING
upgrade_phase_start exporters
upgrade_component_safe node_exporter
upgrade_component_safe node_exporter
