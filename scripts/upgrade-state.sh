# shellcheck shell=bash
#
# upgrade-state.sh: drop-in replacement for the old bash+jq upgrade state library.
#
# Scripts that `source` the old library source this file instead and run unchanged:
# the 35 functions keep their names, arguments, standard output, exit statuses and
# one-line `ERROR:` messages, but the work is done by `upgrade-ledger`, whose SQLite
# ledger (inside UPGRADE_STATE_DIR) is the truth. state.json, history/<id>.json and
# upgrade.lock.d/lock.info stay where scripts expect them. See docs/bash.md.
#
# How it is built, and why:
# - Each function makes at most ONE `upgrade-ledger` call, sent to the shell's session
#   (one `upgrade-ledger session` per shell, started at its first call) or run as its
#   own process; everything else is bash builtins: no jq, no date, no mkdir, no
#   subshell pipelines. A call through the session costs a few milliseconds, a
#   process tens of milliseconds (see "the session" below, and docs/bash.md).
# - The calling shell ($BASHPID) is the process every change is attributed to and
#   the owner of the lock, so a lock taken in a background subshell belongs to it.
# - Nothing leaks into the caller: no `set`/`shopt` changes, only the documented
#   UPGRADE_* variables, the functions below, internal names starting with
#   `_upgrade_state` / `_UPGRADE_STATE`, and (as the old library had) an EXIT trap
#   that releases the lock, installed when the file is sourced. It works under
#   `set -euo pipefail`, with USER and HOSTNAME unset, and when sourced twice.

if [ -z "${BASH_VERSION:-}" ]; then
    echo "ERROR: upgrade-state.sh needs bash" >&2
    # shellcheck disable=SC2317
    return 1 2>/dev/null || exit 1
fi

# -- environment (read when the file is sourced; defaults as in the old library) -------

: "${UPGRADE_STATE_DIR:=/var/lib/observability-upgrades}"
: "${UPGRADE_HISTORY_DIR:=$UPGRADE_STATE_DIR/history}"
: "${UPGRADE_BACKUPS_DIR:=$UPGRADE_STATE_DIR/backups}"
: "${UPGRADE_STATE_FILE:=$UPGRADE_STATE_DIR/state.json}"
: "${UPGRADE_LOCK_FILE:=$UPGRADE_STATE_DIR/upgrade.lock}"
: "${UPGRADE_TEMP_DIR:=$UPGRADE_STATE_DIR/tmp}"

# -- plumbing (internal) -------------------------------------------------------------

# Find the upgrade-ledger command: UPGRADE_LEDGER_BIN, else PATH. Sets the caller's
# local `_ul_bin` (bash's dynamic scoping); a builtin-only PATH walk, no `command -v`
# in a subshell and no dependence on the caller's `hash` setting.
_upgrade_state_find_bin() {
    local _ul_dir _ul_dirs
    if [[ -n ${UPGRADE_LEDGER_BIN:-} ]]; then
        if [[ -f $UPGRADE_LEDGER_BIN && -x $UPGRADE_LEDGER_BIN ]]; then
            _ul_bin=$UPGRADE_LEDGER_BIN
            return 0
        fi
        printf 'ERROR: UPGRADE_LEDGER_BIN=%s is not an executable file; point it at the upgrade-ledger command\n' \
            "$UPGRADE_LEDGER_BIN" >&2
        return 1
    fi
    IFS=: read -r -a _ul_dirs <<<"${PATH:-}"
    for _ul_dir in "${_ul_dirs[@]}"; do
        if [[ -n $_ul_dir && -f $_ul_dir/upgrade-ledger && -x $_ul_dir/upgrade-ledger ]]; then
            _ul_bin=$_ul_dir/upgrade-ledger
            return 0
        fi
    done
    echo "ERROR: the upgrade-ledger command was not found; put it on PATH or set UPGRADE_LEDGER_BIN to its path" >&2
    return 1
}

# _upgrade_state_call MODE PID ARG...: run `upgrade-ledger ARG...` once, for PID:
# through this shell's session when it has one (below), else as its own process.
# Its stdout goes straight to ours; its stderr is rewritten so that a failure is one
# line starting `ERROR:` (MODE 0), `WARNING:` (MODE 2) or nothing at all (MODE 1);
# MODE 3 is MODE 0 except that "not found" (exit 5: no upgrade yet) is silent. A
# caller's local `_ul_input`, when set, is the command's standard input (plus a
# newline, as `<<<` gives it). Returns the command's own exit status (callers map it).
_upgrade_state_call() {
    local _ul_mode=$1 _ul_pid=$2 _ul_bin= _ul_err= _ul_rc=0 _ul_line _ul_tag
    shift 2
    _upgrade_state_keep_armed
    if [[ -z ${_ul_adopting:-} ]]; then _upgrade_state_adopt || return 1; fi
    if ! _upgrade_state_session_call "$_ul_pid" "$@"; then
        _upgrade_state_process "$_ul_pid" "$@" || return 1
    fi
    if [[ $_ul_mode == 3 && $_ul_rc == 5 ]]; then _ul_mode=1; fi
    if [[ -n $_ul_err && $_ul_mode != 1 ]]; then
        _ul_tag=ERROR
        if [[ $_ul_mode == 2 ]]; then _ul_tag=WARNING; fi
        while IFS= read -r _ul_line; do
            case $_ul_line in
                "upgrade-ledger: error: "*) _ul_line="$_ul_tag: ${_ul_line#upgrade-ledger: error: }" ;;
                "upgrade-ledger: "*) _ul_line="$_ul_tag: ${_ul_line#upgrade-ledger: }" ;;
            esac
            printf '%s\n' "$_ul_line" >&2
        done <<<"$_ul_err"
    fi
    return "$_ul_rc"
}

# _upgrade_state_process PID ARG...: `upgrade-ledger ARG...` as its own process; sets
# the caller's `_ul_rc` and `_ul_err` (its stderr, trailing newlines removed). 1 (after
# one ERROR: line) when the command cannot be found.
_upgrade_state_process() {
    if [[ -z $_ul_bin ]]; then _upgrade_state_find_bin || return 1; fi
    if [[ -n ${_ul_input+set} ]]; then
        _upgrade_state_exec "$@" <<<"$_ul_input"
    else
        _upgrade_state_exec "$@"
    fi
}

_upgrade_state_exec() {
    local _ul_for=$1
    shift
    # fd 3 carries our stdout past the command substitution, which captures only the
    # command's stderr. The UPGRADE_* paths go to the command as one-off environment
    # assignments: the caller's environment is left as it was. --home and --pid are
    # explicit so that LEDGER_HOME or LEDGER_PID in the environment cannot redirect us.
    {
        _ul_err=$(UPGRADE_STATE_DIR=$UPGRADE_STATE_DIR \
            UPGRADE_HISTORY_DIR=$UPGRADE_HISTORY_DIR \
            UPGRADE_BACKUPS_DIR=$UPGRADE_BACKUPS_DIR \
            UPGRADE_STATE_FILE=$UPGRADE_STATE_FILE \
            UPGRADE_LOCK_FILE=$UPGRADE_LOCK_FILE \
            UPGRADE_TEMP_DIR=$UPGRADE_TEMP_DIR \
            "$_ul_bin" --home "$UPGRADE_STATE_DIR" --pid "$_ul_for" "$@" 2>&1 1>&3 3>&-)
    } 3>&1 || _ul_rc=$?
}

# A host switching over from the old library has its files but no ledger yet: load
# them (history/*.json, then state.json) before the first command, which would
# otherwise overwrite state.json. One extra process, once per host; afterwards the
# check is a single stat.
_upgrade_state_adopt() {
    if [[ -n ${LEDGER_DB_URL:-} || -e $UPGRADE_STATE_DIR/ledger.db ]]; then return 0; fi
    if [[ ! -e $UPGRADE_STATE_FILE && ! -d $UPGRADE_HISTORY_DIR ]]; then return 0; fi
    local _ul_adopting=1 _ul_input
    unset _ul_input
    _upgrade_state_call 0 "$BASHPID" legacy adopt
}

# -- the session -----------------------------------------------------------------------
#
# A call is nearly all Python start-up, so each shell keeps one `upgrade-ledger
# session` (a coprocess) and sends its calls there: the same commands, answered in a
# few milliseconds (docs/bash.md, "The session", has the protocol and the reasons).
# - The top-level shell starts it at its first call; a subshell with none of its own
#   at its second, so that `x=$(upgrade_...)` alone does not pay for one. Subshells
#   (command substitutions, pipelines, background jobs) use the session they inherit.
# - Calls from several shells take turns: a one-byte token in a pipe (T: free, X: the
#   session is gone). A shell that waits too long for it, or finds it X, stops using
#   that session; the call then runs as its own process.
# - The session ends when this shell ends (end of its input and the parent-death
#   signal) or after ten idle minutes; the next call starts a new one.
# - If it dies during a call, the call is run again as its own process with
#   `session retry`, which makes only the changes the ledger does not show as made.
# - UPGRADE_LEDGER_SESSION=0 turns it off: one process per call.
#
# _UPGRADE_STATE_SESSION: (OWNER PID W R KEEP TOKEN MAX) of the session this shell
# uses: the shell that started it, its PID, the descriptors on which requests are
# written and answers read, one that keeps the request pipe open for reading (so that
# a write to a session that died never raises SIGPIPE), the token pipe, and the
# largest request in bytes. _UPGRADE_STATE_SESSION_SEEN: the subshell that made a call
# without one (-PID: a shell where a session cannot start). _UPGRADE_STATE_SESSION_BUSY:
# the shell in the middle of a call (a trap that calls the library then runs its call
# as a process).

# _upgrade_state_session_call PID ARG...: run the call through the session; 1 when
# there is no session to use (the caller runs it as a process).
_upgrade_state_session_call() {
    local _ul_for=$1 _ul_opened= _ul_name _ul_status=0
    local -a _ul_s _ul_req
    shift
    # As a process: when turned off, while adopting, in a folder the session cannot
    # enter ($PWD gone, or not the folder we are in), and from a trap that runs while
    # this shell (or, for $(...) in a trap, its parent) is in the middle of a call.
    if [[ ${UPGRADE_LEDGER_SESSION:-} == 0 || -n ${_ul_adopting:-} || -z ${PWD:-} ||
        -n ${_UPGRADE_STATE_SESSION_BUSY:-} ]] || ! [[ $PWD -ef . ]]; then
        return 1
    fi
    if [[ -n ${_UPGRADE_STATE_SESSION[1]:-} ]] && ! kill -0 "${_UPGRADE_STATE_SESSION[1]}" 2>/dev/null
    then
        _upgrade_state_session_drop  # ended between two calls (idle, or killed)
    fi
    if [[ -z ${_UPGRADE_STATE_SESSION[0]:-} ]]; then
        if ((BASHPID != $$)) && [[ ${_UPGRADE_STATE_SESSION_SEEN:-} != "$BASHPID" ]]; then
            _UPGRADE_STATE_SESSION_SEEN=$BASHPID
            return 1
        fi
        _upgrade_state_session_start || return 1
    fi
    _ul_s=("${_UPGRADE_STATE_SESSION[@]}")
    _ul_req=(upgrade-ledger-1 "$_ul_for" "$PWD" 6
        "UPGRADE_STATE_DIR=$UPGRADE_STATE_DIR" "UPGRADE_HISTORY_DIR=$UPGRADE_HISTORY_DIR"
        "UPGRADE_BACKUPS_DIR=$UPGRADE_BACKUPS_DIR" "UPGRADE_STATE_FILE=$UPGRADE_STATE_FILE"
        "UPGRADE_LOCK_FILE=$UPGRADE_LOCK_FILE" "UPGRADE_TEMP_DIR=$UPGRADE_TEMP_DIR")
    for _ul_name in "${!LEDGER_@}" "${!UPGRADE_@}"; do
        case $_ul_name in
            UPGRADE_STATE_DIR | UPGRADE_HISTORY_DIR | UPGRADE_BACKUPS_DIR | UPGRADE_STATE_FILE | \
                UPGRADE_LOCK_FILE | UPGRADE_TEMP_DIR) ;;
            *) if [[ ${!_ul_name@a} == *x* ]]; then
                _ul_req+=("$_ul_name=${!_ul_name}")
                _ul_req[3]=$((_ul_req[3] + 1))
            fi ;;
        esac
    done
    _ul_req+=($(($# + 4)) --home "$UPGRADE_STATE_DIR" --pid "$_ul_for" "$@"
        "${_ul_input+$_ul_input$'\n'}")
    _upgrade_state_session_exchange || _ul_status=$?
    case $_ul_status in
        0) return 0 ;;
        1) return 1 ;;  # too big for the pipe: a process
        2) _upgrade_state_session_drop; return 1 ;;  # no turn, or gone: a process
    esac
    # The session died during the call: tell the other shells, and answer the call
    # with a process of its own. Without the `o` frame the command never opened the
    # ledger, so nothing was changed: run it again. With it, `session retry` makes
    # only the changes that the ledger does not show as made since then.
    _upgrade_state_session_drop
    _ul_rc=0
    _ul_err=
    if [[ -z $_ul_opened ]]; then
        _upgrade_state_process "$_ul_for" "$@" || _ul_rc=1
    else
        _upgrade_state_process "$_ul_for" session retry --after "$_ul_opened" -- \
            --home "$UPGRADE_STATE_DIR" --pid "$_ul_for" "$@" || _ul_rc=1
    fi
    return 0
}

# _upgrade_state_session_exchange: send the caller's `_ul_req` to the session `_ul_s`
# and read the answer: sets the caller's `_ul_opened` (the `o` frame), `_ul_rc` and
# `_ul_err`, and prints the command's stdout (a NUL byte put back between two of its
# pieces). 0: answered; 1: too big to send; 2: no turn (or the session is gone);
# 3: sent, but the session died before the whole answer (nothing printed then).
# Byte counts need the C locale, in which `read -N` and `${#...}` then count.
_upgrade_state_session_exchange() {
    local LC_ALL=C
    local IFS=' ' _ul_all="${_ul_req[*]}" _ul_token= _ul_head _ul_len _ul_tag= _ul_body
    local _ul_piece _ul_i _ul_n _ul_at _ul_text=
    local -a _ul_words _ul_out
    if ((${#_ul_all} + ${#_ul_req[@]} >= _ul_s[6])); then return 1; fi
    if ! read -r -N 1 -t 5 -u "${_ul_s[5]}" _ul_token || [[ $_ul_token != T ]]; then
        if [[ $_ul_token == X ]]; then printf X >&"${_ul_s[5]}"; fi
        return 2
    fi
    _UPGRADE_STATE_SESSION_BUSY=$BASHPID
    printf '%s\0' "${_ul_req[@]}" >&"${_ul_s[2]}"
    while [[ $_ul_tag != = ]]; do
        if ! read -r -N 9 -u "${_ul_s[3]}" _ul_head || [[ ${#_ul_head} != 9 ]] ||
            [[ ${_ul_head:1} == *[!0-9]* ]]; then
            _ul_tag=
            break
        fi
        _ul_tag=${_ul_head:0:1}
        _ul_len=$((10#${_ul_head:1}))
        _ul_body=
        if ((_ul_len > 0)) && ! read -r -N "$_ul_len" -u "${_ul_s[3]}" _ul_body ||
            ((${#_ul_body} != _ul_len)); then
            _ul_tag=
            break
        fi
        case $_ul_tag in
            o) _ul_opened=$_ul_body ;;
            =) ;;
            *) _ul_tag= ; break ;;
        esac
    done
    if [[ $_ul_tag == = && -n $_ul_body && $_ul_body != *[!0-9\ ]* ]]; then
        _ul_words=($_ul_body)  # digits and spaces only: nothing to glob
        _ul_at=1
        for _ul_n in out err; do
            for ((_ul_i = ${_ul_words[_ul_at]:-0}; _ul_i > 0; _ul_i--)); do
                _ul_at=$((_ul_at + 1))
                _ul_piece=
                if ((${_ul_words[_ul_at]:-0} > 0)) &&
                    ! read -r -N "${_ul_words[_ul_at]}" -u "${_ul_s[3]}" _ul_piece; then
                    _ul_tag=
                    break 2
                fi
                if [[ $_ul_n == out ]]; then _ul_out+=("$_ul_piece"); else _ul_text+=$_ul_piece; fi
            done
            _ul_at=$((_ul_at + 1))
        done
    else
        _ul_tag=
    fi
    if [[ $_ul_tag != = ]]; then
        printf X >&"${_ul_s[5]}"
        unset _UPGRADE_STATE_SESSION_BUSY
        return 3
    fi
    printf T >&"${_ul_s[5]}"
    unset _UPGRADE_STATE_SESSION_BUSY
    _ul_rc=${_ul_words[0]}
    while [[ $_ul_text == *$'\n' ]]; do _ul_text=${_ul_text%$'\n'}; done
    _ul_err=$_ul_text
    if ((${#_ul_out[@]} < 2)) && [[ -z ${_ul_out[0]-} ]]; then
        :  # nothing to print
    elif [[ -p /dev/stdout || -S /dev/stdout ]]; then
        # A reader that goes away (`| head`, `| grep -q`) ends a process's output
        # quietly, exit 0; bash's printf would die of SIGPIPE: print from a subshell
        # that ignores it.
        (
            trap '' PIPE
            _upgrade_state_session_print
        ) 2>/dev/null || :
    else
        _upgrade_state_session_print
    fi
    return 0
}

# _upgrade_state_session_print: the caller's `_ul_out` (the output's pieces between
# NUL bytes) on stdout.
_upgrade_state_session_print() {
    local _ul_i
    printf '%s' "${_ul_out[0]-}"
    for ((_ul_i = 1; _ul_i < ${#_ul_out[@]}; _ul_i++)); do
        printf '\0%s' "${_ul_out[_ul_i]}"
    done
}

# _upgrade_state_session_frame FD: read one frame into the caller's `_ul_tag` and
# `_ul_body` (the hello); 1 at the end of input or on anything that is not a frame.
_upgrade_state_session_frame() {
    local LC_ALL=C _ul_head _ul_len
    if ! read -r -N 9 -u "$1" _ul_head || [[ ${#_ul_head} != 9 || ${_ul_head:1} == *[!0-9]* ]]
    then
        return 1
    fi
    _ul_tag=${_ul_head:0:1}
    _ul_len=$((10#${_ul_head:1}))
    _ul_body=
    if ((_ul_len > 0)) && ! read -r -N "$_ul_len" -u "$1" _ul_body; then return 1; fi
    ((${#_ul_body} == _ul_len))
}

# Start a session for this shell: a coprocess, its pipes moved to descriptors of our
# own (bash closes a coprocess's when it ends), disowned (a script's `wait` must not
# wait for it), then its hello frame. 1 (and no session) if anything fails.
_upgrade_state_session_start() {
    local _ul_pid _ul_w _ul_r _ul_keep= _ul_tok= _ul_tag= _ul_body=
    if [[ ${_UPGRADE_STATE_SESSION_SEEN:-} == "-$BASHPID" ]]; then return 1; fi
    if [[ -z $_ul_bin ]]; then _upgrade_state_find_bin 2>/dev/null || return 1; fi
    # The LEDGER_* settings travel with each request: a bad one fails its call, not the
    # start of the session. stderr: the session has nothing to say there, and bash's
    # warning when the script runs a coprocess of its own ("still exists") goes too.
    {
        coproc _UPGRADE_STATE_COPROC {
            LEDGER_HOME='' UPGRADE_STATE_DIR='' LEDGER_DB_URL='' LEDGER_PID='' \
                LEDGER_STRICT='' LEDGER_LOCK_TIMEOUT='' LEDGER_FORMAT='' LEDGER_TRACEBACK='' \
                exec "$_ul_bin" session
        }
    } 2>/dev/null
    _ul_pid=$_UPGRADE_STATE_COPROC_PID
    exec {_ul_w}>&"${_UPGRADE_STATE_COPROC[1]}" {_ul_r}<&"${_UPGRADE_STATE_COPROC[0]}"
    exec {_UPGRADE_STATE_COPROC[1]}>&- {_UPGRADE_STATE_COPROC[0]}<&-
    unset _UPGRADE_STATE_COPROC _UPGRADE_STATE_COPROC_PID
    disown "$_ul_pid" 2>/dev/null || :
    if ! { exec {_ul_keep}<"/proc/$BASHPID/fd/$_ul_w" && exec {_ul_tok}<> <(:); } 2>/dev/null
    then
        # No /proc here: this shell runs its calls as processes from now on.
        _UPGRADE_STATE_SESSION_SEEN=-$BASHPID
    elif _upgrade_state_session_frame "$_ul_r" && [[ $_ul_tag == h ]] &&
        [[ $_ul_body == "upgrade-ledger-session 1 "* && ${_ul_body##* } != *[!0-9]* ]]; then
        printf T >&"$_ul_tok"
        _UPGRADE_STATE_SESSION=("$BASHPID" "$_ul_pid" "$_ul_w" "$_ul_r" "$_ul_keep" "$_ul_tok"
            "${_ul_body##* }")
        return 0
    fi
    # No session this time (it did not start, or not as one): the call runs as a process.
    kill "$_ul_pid" 2>/dev/null || :
    exec {_ul_w}>&- {_ul_r}<&-
    if [[ -n $_ul_keep ]]; then exec {_ul_keep}<&-; fi
    if [[ -n $_ul_tok ]]; then exec {_ul_tok}<&-; fi
    return 1
}

# Stop using this shell's session (its descriptors closed here; the other shells that
# share it find out for themselves).
_upgrade_state_session_drop() {
    local -a _ul_s=("${_UPGRADE_STATE_SESSION[@]}")
    unset _UPGRADE_STATE_SESSION
    exec {_ul_s[2]}>&- {_ul_s[3]}<&- {_ul_s[4]}<&- {_ul_s[5]}<&-
    if ((BASHPID != $$)); then _UPGRADE_STATE_SESSION_SEEN=$BASHPID; fi
}

# _upgrade_state_do PID ARG...: one command; 0 on success, 1 (after one ERROR: line)
# on any failure, which is the legacy functions' "0/1".
_upgrade_state_do() {
    if _upgrade_state_call 0 "$@"; then return 0; fi
    return 1
}

# _upgrade_state_ask PID ARG...: a yes/no question (0 yes, 1 no). A home with no
# ledger yet (exit 5) answers "no" without a word, as the old library did when it
# had no state file; the question creates nothing.
_upgrade_state_ask() {
    if _upgrade_state_call 3 "$@"; then return 0; fi
    return 1
}

# _upgrade_state_usage MIN USAGE "$@": refuse a call with fewer than MIN arguments.
_upgrade_state_usage() {
    local _ul_min=$1 _ul_usage=$2
    shift 2
    if (($# >= _ul_min)); then return 0; fi
    printf 'ERROR: usage: %s\n' "$_ul_usage" >&2
    return 1
}

# -- releasing the lock when the shell ends --------------------------------------------
#
# As with the old library, sourcing this file installs the release of the lock on
# EXIT; bash also runs the EXIT trap when TERM or INT end the shell. The release is
# chained after whatever EXIT trap the shell already has (that command runs first and
# keeps its `$?`), and does nothing unless this shell holds the lock. The script
# stays in charge of its traps; at each library call while it holds the lock (and
# at upgrade_lock_acquire) the drop-in looks at the EXIT trap again:
# - the release is there: nothing to do;
# - the script replaced the trap with its own command: the release is chained again
#   after it;
# - the script removed the trap (`trap - EXIT`, as a test simulating a crash does):
#   that is the script's choice, as it was with the old library. The lock stays when
#   the shell exits, like a crashed holder's, and the drop-in never installs the
#   release in this shell (or its subshells) again.
# A subshell runs none of its parent's traps. Until it changes a trap, bash still
# *shows* it the parent's; so when a subshell takes the lock, the traps it shows say
# what the script chose: the release (or a command of the script's own) gets the
# release installed in the subshell, and no EXIT trap at all counts as removed.
# A shell killed with KILL runs nothing: its lock is stale, and the next acquirer
# takes it over (the lock records the holder's PID and start time).

# _UPGRADE_STATE_LOCK_PID: the shell that (may) hold the lock; set before asking for
# it, so that a shell killed mid-acquire still releases on exit.
# _UPGRADE_STATE_TRAPS_PID: the shell whose EXIT trap carries our release.
# _UPGRADE_STATE_TRAP_REMOVED: set once the script was seen to remove the release.

_upgrade_state_on_exit() {
    if [[ ${_UPGRADE_STATE_LOCK_PID:-} == "$BASHPID" ]]; then
        unset _UPGRADE_STATE_LOCK_PID
        _upgrade_state_call 1 "$BASHPID" lock release --owner "$BASHPID" >/dev/null || :
    fi
    return 0
}

# _upgrade_state_arm_exit_trap [install]: make sure this shell's EXIT trap carries
# the release, unless the script removed it; `install` (when the file is sourced)
# puts it in place whatever happened before, as sourcing the old library did.
_upgrade_state_arm_exit_trap() {
    local _ul_cur _ul_sig _ul_nl=$'\n'
    local -a _ul_words
    if [[ ${1:-} == install ]]; then
        unset _UPGRADE_STATE_TRAP_REMOVED
    elif [[ -n ${_UPGRADE_STATE_TRAP_REMOVED:-} ]]; then
        return 0
    fi
    _ul_cur=$(trap -p EXIT)
    if [[ $_ul_cur == *_upgrade_state_on_exit* && ${_UPGRADE_STATE_TRAPS_PID:-} == "$BASHPID" ]]
    then
        return 0
    fi
    if [[ -z ${1:-} && -z $_ul_cur && -n ${_UPGRADE_STATE_TRAPS_PID:-} ]]; then
        # Installed here (or in the parent whose traps a subshell still shows) and gone
        # now: removed by the script.
        _UPGRADE_STATE_TRAP_REMOVED=1
        return 0
    fi
    if [[ ${_UPGRADE_STATE_TRAPS_PID:-} != "$BASHPID" ]] && ((BASHPID != $$)); then
        # A subshell: reset a trap that is unused, so that what `trap -p` shows next
        # is what this shell will really run.
        for _ul_sig in RETURN XFSZ VTALRM PROF; do
            if [[ -z $(trap -p "$_ul_sig") ]]; then
                trap - "$_ul_sig"
                break
            fi
        done
        _ul_cur=$(trap -p EXIT)
    fi
    if [[ $_ul_cur != *_upgrade_state_on_exit* ]]; then
        _ul_words=(trap -- '' EXIT)
        if [[ -n $_ul_cur ]]; then
            eval "_ul_words=($_ul_cur)"  # trap -- 'COMMAND' EXIT, quoted by bash itself
        fi
        if [[ -z ${_ul_words[2]} ]]; then
            trap -- '_upgrade_state_on_exit' EXIT
        else
            # `|| :` so that a failing command at the end of the script's own trap
            # (under set -e) cannot skip the release.
            trap -- "{ ${_ul_words[2]}${_ul_nl}} || :${_ul_nl}_upgrade_state_on_exit" EXIT
        fi
    fi
    _UPGRADE_STATE_TRAPS_PID=$BASHPID
}

# Called before every command (in _upgrade_state_call): keep the release armed while
# this shell holds the lock. One `trap -p` subshell (a fork, no exec) per call, and
# only while the lock is held.
_upgrade_state_keep_armed() {
    if [[ ${_UPGRADE_STATE_LOCK_PID:-} == "$BASHPID" ]]; then _upgrade_state_arm_exit_trap; fi
    return 0
}

# -- state --------------------------------------------------------------------------

# Create the state folders (0700) and the ledger database if they do not exist.
upgrade_state_init_dirs() {
    _upgrade_state_do "$BASHPID" state get >/dev/null
}

# Print the current UTC time as YYYY-MM-DDTHH:MM:SSZ (bash builtin, no process).
upgrade_get_timestamp() {
    TZ=UTC0 printf '%(%Y-%m-%dT%H:%M:%SZ)T\n' -1
}

# Print a new upgrade id, upgrade-YYYYMMDD-HHMMSS (UTC; bash builtin, no process).
upgrade_generate_id() {
    TZ=UTC0 printf 'upgrade-%(%Y%m%d-%H%M%S)T\n' -1
}

# Start a new upgrade (IDLE) and print its id. An upgrade still in progress is
# superseded: it ends FAILED, stays in the ledger, and one WARNING: line says so.
upgrade_state_init() {
    _upgrade_state_do "$BASHPID" legacy init -- ${1:+"$1"}
}

# Print the current upgrade's state document (exit 1 when there is none).
upgrade_state_load() {
    _upgrade_state_do "$BASHPID" export -o -
}

# Save a state document into the current upgrade: the known fields it has are
# validated and applied, the others are left as they are, and keys the ledger does not
# know are kept in state.json and the history file. Invalid JSON (or an invalid field)
# changes nothing and exits 1.
upgrade_state_save() {
    _upgrade_state_usage 1 "upgrade_state_save JSON" "$@" || return 1
    local _ul_input=$1
    _upgrade_state_do "$BASHPID" legacy save - >/dev/null
}

# Same as upgrade_state_save: every write of the ledger is atomic.
upgrade_state_write_atomic() {
    _upgrade_state_usage 1 "upgrade_state_write_atomic JSON" "$@" || return 1
    local _ul_input=$1
    _upgrade_state_do "$BASHPID" legacy save - >/dev/null
}

# Print the current state (IDLE when no upgrade was ever started).
upgrade_state_get_current() {
    _upgrade_state_do "$BASHPID" state get
}

# Exit 0 if FROM -> TO is allowed (the same state again counts as allowed), 1 if not.
upgrade_state_validate_transition() {
    _upgrade_state_usage 2 "upgrade_state_validate_transition FROM TO" "$@" || return 1
    _upgrade_state_do "$BASHPID" state check -- "$1" "$2"
}

# Move the upgrade to STATE; the same state again is 0, an invalid transition is 1
# (with an ERROR: line naming the allowed targets) and changes nothing.
upgrade_state_set() {
    _upgrade_state_usage 1 "upgrade_state_set STATE" "$@" || return 1
    _upgrade_state_do "$BASHPID" state set -- "$1"
}

# -- phases ---------------------------------------------------------------------------

upgrade_phase_start() {
    _upgrade_state_usage 1 "upgrade_phase_start PHASE" "$@" || return 1
    _upgrade_state_do "$BASHPID" phase start -- "$1"
}

upgrade_phase_complete() {
    _upgrade_state_usage 1 "upgrade_phase_complete PHASE" "$@" || return 1
    _upgrade_state_do "$BASHPID" phase complete -- "$1"
}

upgrade_phase_fail() {
    _upgrade_state_usage 1 "upgrade_phase_fail PHASE [ERROR]" "$@" || return 1
    _upgrade_state_do "$BASHPID" phase fail -- "$1" ${2+"$2"}
}

# Print the first PENDING phase, or nothing (also when there is no upgrade yet).
upgrade_phase_get_next() {
    local _ul_rc=0
    _upgrade_state_call 3 "$BASHPID" phase next || _ul_rc=$?
    # 5 is "not found": no upgrade, so no next phase either.
    if ((_ul_rc == 0 || _ul_rc == 5)); then return 0; fi
    return 1
}

# -- components ----------------------------------------------------------------------

# Start upgrading COMPONENT from FROM to TO in the current phase ("" = unknown
# version); exit 1 when no phase is current.
upgrade_component_start() {
    _upgrade_state_usage 1 "upgrade_component_start COMPONENT FROM TO" "$@" || return 1
    _upgrade_state_do "$BASHPID" legacy component-start -- "$1" "${2-}" "${3-}"
}

upgrade_component_complete() {
    _upgrade_state_usage 1 "upgrade_component_complete COMPONENT" "$@" || return 1
    _upgrade_state_do "$BASHPID" component complete -- "$1"
}

# Mark COMPONENT failed: attempts + 1, last_error set.
upgrade_component_fail() {
    _upgrade_state_usage 1 "upgrade_component_fail COMPONENT [ERROR]" "$@" || return 1
    _upgrade_state_do "$BASHPID" component fail -- "$1" ${2+"$2"}
}

# Exit 0 if COMPONENT is COMPLETED in the current upgrade, 1 if not.
upgrade_component_is_upgraded() {
    _upgrade_state_usage 1 "upgrade_component_is_upgraded COMPONENT" "$@" || return 1
    _upgrade_state_ask "$BASHPID" component is-upgraded -- "$1"
}

# Print COMPONENT's JSON object ({} when unknown).
upgrade_component_get_status() {
    _upgrade_state_usage 1 "upgrade_component_get_status COMPONENT" "$@" || return 1
    _upgrade_state_do "$BASHPID" component status --format json -- "$1"
}

# -- resume --------------------------------------------------------------------------

# Exit 0 if the current upgrade stopped mid-run and can be resumed, 1 if not.
upgrade_can_resume() {
    _upgrade_state_ask "$BASHPID" can-resume
}

# Print {state, phase, component, can_resume} as JSON.
upgrade_get_resume_point() {
    _upgrade_state_do "$BASHPID" resume point --format json
}

# Record a resume; a note on stderr names each component left mid-upgrade.
upgrade_resume() {
    _upgrade_state_do "$BASHPID" resume
}

# -- rollback points -----------------------------------------------------------------

upgrade_mark_rollback_point() {
    _upgrade_state_usage 2 "upgrade_mark_rollback_point COMPONENT BACKUP_PATH" "$@" || return 1
    _upgrade_state_do "$BASHPID" rollback mark -- "$1" "$2"
}

# Print {rollback_available, components: [{name, backup_path, from_version, to_version}]}.
upgrade_get_rollback_info() {
    _upgrade_state_do "$BASHPID" rollback info --format json
}

# Clear the rollback points (the ledger keeps them, marked cleared).
upgrade_clear_rollback_point() {
    _upgrade_state_do "$BASHPID" rollback clear
}

# -- utilities -----------------------------------------------------------------------

# Exit 0 while an upgrade runs (PLANNING, BACKING_UP, UPGRADING, VALIDATING,
# ROLLING_BACK), 1 if not.
upgrade_is_in_progress() {
    _upgrade_state_ask "$BASHPID" in-progress
}

# Print the progress as an integer 0..100.
upgrade_get_progress_percent() {
    _upgrade_state_do "$BASHPID" progress
}

upgrade_get_summary() {
    _upgrade_state_do "$BASHPID" summary
}

# Print one line per upgrade, newest first: ID | STATE | STARTED → UPDATED.
# Every upgrade in the ledger is listed (a superseded one too); an upgrade that
# finished and was reset to IDLE shows how it ended.
upgrade_list_history() {
    local _ul_limit=${1:-10} _ul_rows _ul_id _ul_state _ul_started _ul_updated
    if [[ $_ul_limit == *[!0-9]* || ${#_ul_limit} -gt 7 ]] || ((10#$_ul_limit < 1)); then
        printf 'ERROR: upgrade_list_history: the limit must be a whole number from 1, not %s\n' \
            "$_ul_limit" >&2
        return 1
    fi
    _upgrade_state_keep_armed  # (the call below runs in a command substitution)
    # One read-only reporting query (portable SQL); the lines are formatted here.
    _ul_rows=$(_upgrade_state_call 0 "$BASHPID" sql --format plain \
        "SELECT id, CASE WHEN state = 'IDLE' AND outcome IS NOT NULL THEN outcome
                ELSE state END AS state,
                substr(started_at, 1, 19) || 'Z' AS started,
                substr(updated_at, 1, 19) || 'Z' AS updated
         FROM upgrades ORDER BY started_at DESC, id DESC LIMIT $((10#$_ul_limit))") || return 1
    if [[ -z $_ul_rows ]]; then return 0; fi
    while IFS=$'\t' read -r _ul_id _ul_state _ul_started _ul_updated; do
        printf '%s | %s | %s → %s\n' "$_ul_id" "$_ul_state" "$_ul_started" "$_ul_updated"
    done <<<"$_ul_rows"
}

# Write history/<id>.json for the current upgrade.
upgrade_save_to_history() {
    _upgrade_state_do "$BASHPID" save-history >/dev/null
}

# -- the lock ------------------------------------------------------------------------

# Take the exclusive lock for this shell ($BASHPID). A stale lock (its holder is
# gone) is taken over; one held by another live process gives
# `ERROR: lock held by PID N ...` and exit 1.
upgrade_lock_acquire() {
    _UPGRADE_STATE_LOCK_PID=$BASHPID  # the call arms the EXIT trap for this shell
    if _upgrade_state_do "$BASHPID" lock acquire --owner "$BASHPID"; then return 0; fi
    unset _UPGRADE_STATE_LOCK_PID
    return 1
}

# Release the lock if this shell holds it; another holder's lock stays (exit 0 with
# a WARNING: line).
upgrade_lock_release() {
    local _ul_rc=0
    _upgrade_state_call 2 "$BASHPID" lock release --owner "$BASHPID" || _ul_rc=$?
    if [[ ${_UPGRADE_STATE_LOCK_PID:-} == "$BASHPID" ]]; then unset _UPGRADE_STATE_LOCK_PID; fi
    # 4: the lock belongs to another process; it stays, as the contract says.
    if ((_ul_rc == 0 || _ul_rc == 4)); then return 0; fi
    return 1
}

# Exit 0 if a live process holds the lock, 1 if not (a stale lock is not held).
upgrade_lock_is_held() {
    _upgrade_state_ask "$BASHPID" lock held
}

# Remove the lock if its holder is proven gone (a note on stderr when it does).
upgrade_lock_check_stale() {
    _upgrade_state_do "$BASHPID" lock check-stale
}

# -- cleanup -------------------------------------------------------------------------

# Save the current upgrade to history, release this shell's lock, and reset a
# finished upgrade to IDLE (one still in progress stays resumable).
upgrade_cleanup() {
    local _ul_rc=0
    _upgrade_state_do "$BASHPID" cleanup --owner "$BASHPID" || _ul_rc=$?
    if [[ ${_UPGRADE_STATE_LOCK_PID:-} == "$BASHPID" ]]; then unset _UPGRADE_STATE_LOCK_PID; fi
    return "$_ul_rc"
}

# As the old library did when it was sourced: the lock is released when this shell
# exits (see "releasing the lock when the shell ends" above).
_upgrade_state_arm_exit_trap install
