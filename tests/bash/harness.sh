# shellcheck shell=bash
# Test harness: source the drop-in, then record calls for pytest to check.
#
#   check NAME FUNCTION [ARG...]
#
# runs FUNCTION in this very shell (so $BASHPID and the lock stay this shell's) and
# writes $HARNESS_OUT/NAME.rc, NAME.out and NAME.err, plus NAME.state: a copy of
# state.json as it is right after the call (none while there is no state.json).
# HARNESS_OUT and LIB (the path of scripts/upgrade-state.sh) come from the test.

# shellcheck source=/dev/null
source "$LIB"

check() {
    local name=$1 rc=0
    shift
    "$@" >"$HARNESS_OUT/$name.out" 2>"$HARNESS_OUT/$name.err" || rc=$?
    printf '%s\n' "$rc" >"$HARNESS_OUT/$name.rc"
    if [[ -f $UPGRADE_STATE_FILE ]]; then cp "$UPGRADE_STATE_FILE" "$HARNESS_OUT/$name.state"; fi
}
