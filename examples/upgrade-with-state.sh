#!/usr/bin/env bash
#
# An upgrade of five exporters, written against the legacy bash library's functions
# and run by upgrade-ledger through scripts/upgrade-state.sh:
#
#   UPGRADE_STATE_DIR=./demo-bash bash examples/upgrade-with-state.sh
#
# It needs `upgrade-ledger` on PATH (or UPGRADE_LEDGER_BIN set to it), and touches
# nothing outside UPGRADE_STATE_DIR (default ./demo-bash): the "host" is the folder
# host/ in there, where each exporter is a folder holding a VERSION file.
#
# What it shows:
#   - backups as rollback points: each exporter is saved to backups/NAME-VERSION.tar.gz
#     and the path recorded before anything changes;
#   - a failure and a retry: postgres_exporter's first download is corrupt; the
#     failure is recorded (attempts, last error) and the second attempt succeeds;
#   - resume after an interruption: the first run is killed (KILL, so no cleanup runs)
#     in the middle of redis_exporter. The same script, started again, finds the
#     upgrade in progress, takes over the dead run's lock, resumes, skips what was
#     done and redoes the exporter that was left half-way.
#
# Afterwards: `upgrade-ledger --home DIR show` (or `history`, `events`) tells the story.

set -euo pipefail

: "${UPGRADE_STATE_DIR:=./demo-bash}"
mkdir -p "$UPGRADE_STATE_DIR"
UPGRADE_STATE_DIR=$(cd "$UPGRADE_STATE_DIR" && pwd -P)  # absolute backup paths
case ${BASH_SOURCE[0]} in
    */*) here=${BASH_SOURCE[0]%/*} ;;
    *) here=. ;;
esac
# shellcheck source=../scripts/upgrade-state.sh
source "$here/../scripts/upgrade-state.sh"
# The ledger first: the simulated host below lives in the same folder, and a folder
# that holds other things but no ledger is not taken for a ledger home.
upgrade_state_init_dirs

# name:installed version:target version
EXPORTERS=(
    node_exporter:1.7.0:1.9.1
    blackbox_exporter:0.24.0:0.27.0
    postgres_exporter:0.15.0:0.17.1
    redis_exporter:1.58.0:1.74.0
    nginx_exporter:1.1.0:1.5.1
)
HOST=$UPGRADE_STATE_DIR/host

say() { printf '==> %s\n' "$*"; }

# -- the simulated host ------------------------------------------------------------

reset_host() {  # every exporter at its old version, as before the upgrade
    local spec name from
    for spec in "${EXPORTERS[@]}"; do
        IFS=: read -r name from _ <<<"$spec"
        mkdir -p "$HOST/$name"
        printf '%s\n' "$from" >"$HOST/$name/VERSION"
    done
}

installed() {  # the version of exporter $1 on the host
    local version
    read -r version <"$HOST/$1/VERSION"
    printf '%s\n' "$version"
}

backup() {  # save exporter $1 (at version $2) and record the backup as its rollback point
    local path="$UPGRADE_BACKUPS_DIR/$1-$2.tar.gz"
    tar -czf "$path" -C "$HOST" "$1"
    upgrade_mark_rollback_point "$1" "$path"
    say "$1: backed up to ${path#"$UPGRADE_STATE_DIR"/}"
}

install() {  # put version $2 of exporter $1 in place; attempt $3 (1, 2, ...)
    if [[ $1 == postgres_exporter && $3 == 1 ]]; then
        echo "sha256 mismatch in postgres_exporter-$2.linux-amd64.tar.gz"
        return 1
    fi
    printf '%s\n' "$2" >"$HOST/$1/VERSION"
}

# -- the upgrade -------------------------------------------------------------------

upgrade_exporter() {  # name from to
    local name=$1 from=$2 to=$3 attempt error
    if upgrade_component_is_upgraded "$name"; then
        say "$name: already upgraded to $to, skipping"
        return 0
    fi
    for attempt in 1 2 3; do
        upgrade_component_start "$name" "$from" "$to"
        if [[ $name == "${DEMO_INTERRUPT_AT:-}" ]]; then
            say "$name: the machine \"crashes\" half-way (kill -KILL: no cleanup runs)"
            kill -KILL "$BASHPID"
        fi
        if error=$(install "$name" "$to" "$attempt") && [[ $(installed "$name") == "$to" ]]; then
            upgrade_component_complete "$name"
            say "$name: $from -> $to (attempt $attempt)"
            return 0
        fi
        upgrade_component_fail "$name" "$error"
        say "$name: attempt $attempt failed ($error); retrying"
    done
    return 1
}

run_upgrade() {
    local spec name from to upgrade_id
    if upgrade_is_in_progress; then
        if ! upgrade_can_resume; then
            echo "Manual intervention required"
            upgrade_get_summary
            return 1
        fi
        say "an upgrade is in progress but its run is gone: resuming"
        upgrade_lock_acquire  # the dead run's lock is stale: taken over (and recorded)
        trap 'upgrade_cleanup' EXIT
        upgrade_resume  # names, on stderr, the exporter that was left half-way
        say "resume point: $(upgrade_get_resume_point | tr -d ' \n')"
    else
        reset_host
        upgrade_id=$(upgrade_state_init)
        upgrade_lock_acquire || return 1
        trap 'upgrade_cleanup' EXIT
        say "upgrade $upgrade_id started"
        upgrade_state_set PLANNING
        upgrade_state_set BACKING_UP
        for spec in "${EXPORTERS[@]}"; do
            IFS=: read -r name from _ <<<"$spec"
            backup "$name" "$from"
        done
        upgrade_state_set UPGRADING
    fi
    upgrade_phase_start exporters
    for spec in "${EXPORTERS[@]}"; do
        IFS=: read -r name from to <<<"$spec"
        upgrade_exporter "$name" "$from" "$to"
    done
    upgrade_phase_complete exporters
    upgrade_state_set VALIDATING
    for spec in "${EXPORTERS[@]}"; do
        IFS=: read -r name _ to <<<"$spec"
        [[ $(installed "$name") == "$to" ]]
    done
    upgrade_state_set COMPLETED
    say "upgrade completed ($(upgrade_get_progress_percent)% of the exporters)"
    upgrade_get_summary
}

say "first run: it will be interrupted in the middle of redis_exporter"
(
    DEMO_INTERRUPT_AT=redis_exporter
    run_upgrade
) &
rc=0
{ wait "$!"; } 2>/dev/null || rc=$?  # (without bash's own "Killed" notice)
say "first run died (exit $rc); the lock, the state and the half-done redis_exporter are left behind"
echo
say "second run: the same script, started again"
run_upgrade
echo
say "history (upgrade-ledger --home $UPGRADE_STATE_DIR history / show / events for more):"
upgrade_list_history 5
