#!/bin/sh
# A simulated service for examples/observability-stack.toml: "installing" a version
# writes files under $LEDGER_HOME/sim/<component>/, nothing else. No network, no
# root, nothing outside the ledger home.
#
#   sh sim/service.sh version|backup|install|check|restore
#
# It reads the variables `upgrade-ledger apply` gives every command
# (LEDGER_HOME, LEDGER_COMPONENT, LEDGER_TO_VERSION, LEDGER_BACKUP_DIR, ...).
# The host's versions before any upgrade are listed in sim/host.txt.
# SIM_FAIL=name[,name...] makes those components fail their health check, to
# watch an automatic rollback; SIM_DELAY=seconds slows every install down.
set -eu
# Everything in the ledger home is private (folders 0700, files 0600): doctor checks it.
umask 077

action=${1:?usage: service.sh version|backup|install|check|restore}
name=${LEDGER_COMPONENT:?run me from upgrade-ledger apply}
here=$(dirname "$0")
dir="$LEDGER_HOME/sim/$name"

installed() {
    if [ -f "$dir/VERSION" ]; then
        cat "$dir/VERSION"
    else
        awk -v n="$name" '$1 == n { print $2 }' "$here/host.txt"
    fi
}

# What a real install leaves behind: the binary, its version, its config.
lay_down() {  # lay_down FOLDER VERSION
    mkdir -p "$1/bin"
    printf '#!/bin/sh\necho "%s version %s"\n' "$name" "$2" > "$1/bin/$name"
    echo "$2" > "$1/VERSION"
    [ -f "$1/config.yml" ] || printf '# %s configuration\nlisten: 127.0.0.1\n' "$name" > "$1/config.yml"
}

case $action in
version)
    installed
    ;;
backup)
    # Save the installation as it is now into the folder the ledger checksums.
    if [ -d "$dir" ]; then
        cp -R "$dir/." "$LEDGER_BACKUP_DIR/"
    else
        lay_down "$LEDGER_BACKUP_DIR" "$(installed)"
    fi
    ;;
install)
    from=$(installed)
    sleep "${SIM_DELAY:-0.02}"  # "downloading"
    [ -d "$dir" ] || lay_down "$dir" "$from"
    lay_down "$dir" "$LEDGER_TO_VERSION"
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $name $from -> $LEDGER_TO_VERSION" >> "$LEDGER_HOME/sim/changes.log"
    echo "installed $name $LEDGER_TO_VERSION (was $from)"
    ;;
check)
    case ",${SIM_FAIL:-}," in
    *",$name,"*) echo "$name: health check failed (SIM_FAIL)" >&2; exit 1 ;;
    esac
    got=$(sh "$dir/bin/$name")
    [ "$got" = "$name version $LEDGER_TO_VERSION" ] || {
        echo "$name: expected version $LEDGER_TO_VERSION, binary says: $got" >&2
        exit 1
    }
    echo "$got: healthy"
    ;;
restore)
    rm -rf "$dir"
    mkdir -p "$dir"
    cp -R "$LEDGER_BACKUP_DIR/." "$dir/"
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $name restored $(cat "$dir/VERSION")" >> "$LEDGER_HOME/sim/changes.log"
    echo "restored $name $(cat "$dir/VERSION")"
    ;;
*)
    echo "unknown action $action" >&2
    exit 2
    ;;
esac
