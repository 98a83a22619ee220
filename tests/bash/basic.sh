# The seed's "Basic Upgrade" usage example, verbatim apart from the source line.
set -euo pipefail
# shellcheck source=/dev/null
source "$LIB"

# Initialize
upgrade_id=$(upgrade_state_init)
upgrade_lock_acquire || exit 1
trap 'upgrade_cleanup' EXIT

# Execute upgrade
upgrade_state_set "PLANNING"
upgrade_state_set "BACKING_UP"
upgrade_state_set "UPGRADING"

upgrade_phase_start "exporters"
upgrade_component_start "node_exporter" "1.7.0" "1.9.1"
# ... perform upgrade ...
upgrade_component_complete "node_exporter"
upgrade_phase_complete "exporters"

upgrade_state_set "VALIDATING"
upgrade_state_set "COMPLETED"
echo "$upgrade_id"
