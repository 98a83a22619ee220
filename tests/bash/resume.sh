# The seed's "With Resume" usage example. With CRASH=1 the run dies (KILL) half-way
# through a component, as a crashed upgrade would; run again, it resumes.
set -euo pipefail
# shellcheck source=/dev/null
source "$LIB"

if upgrade_is_in_progress; then
    if upgrade_can_resume; then
        upgrade_resume
        # Continue from last checkpoint
        echo "resuming at $(upgrade_get_resume_point | tr -d ' \n')"
    else
        echo "Manual intervention required"
        upgrade_get_summary
        exit 1
    fi
else
    upgrade_state_init >/dev/null
    upgrade_state_set PLANNING
    upgrade_state_set BACKING_UP
    upgrade_state_set UPGRADING
fi
upgrade_lock_acquire
upgrade_phase_start exporters
for component in node_exporter blackbox_exporter; do
    if upgrade_component_is_upgraded "$component"; then
        echo "$component: already upgraded"
        continue
    fi
    upgrade_component_start "$component" 1.0.0 2.0.0
    if [[ ${CRASH:-} == 1 && $component == blackbox_exporter ]]; then
        kill -KILL "$BASHPID"
    fi
    upgrade_component_complete "$component"
    echo "$component: upgraded"
done
upgrade_phase_complete exporters
upgrade_state_set VALIDATING
upgrade_state_set COMPLETED
upgrade_cleanup
