#!/usr/bin/env bash
# Single-node SLURM on localhost for the `cluster` tests.
#
#   tests/cluster/slurm.sh up      install if missing, configure, start; wait until the node is idle
#   tests/cluster/slurm.sh status  print daemons, node and queue; exit 0 only when the node is usable
#   tests/cluster/slurm.sh down    cancel jobs, stop slurmd, slurmctld and munged by their pid files
#
# All three are idempotent. Needs root on Debian 12 without systemd. The node is called `localhost`
# (NodeAddr 127.0.0.1) so the machine's host name never matters; it offers two fake GPUs
# (character devices /dev/fakegpu0-1) so that `--gres=gpu:1` jobs get their own CUDA_VISIBLE_DEVICES.
# The torque wrappers (qsub/qdel from slurm-wlm-torque) let PBSCluster run on the same SLURM.
#
# Environment: SLURM_UP_TIMEOUT (seconds to wait for an idle node, default 60).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurm-wlm-torque)
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
GRES_CONF="$CONF_DIR/gres.conf"
MARKER="# written by everest tests/cluster/slurm.sh"
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
LOG_DIR=/var/log/slurm
N_FAKE_GPUS=2
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-60}

log() { printf 'slurm.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# A pid file names a live process: present, and not a zombie waiting for PID 1 to reap it.
alive() {
    local pidfile=$1 pid state
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/status ]] || return 1
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status")
    [[ $state != Z ]]
}

install_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "packages missing (${missing[*]}) and not root: cannot install"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_if_changed() {  # write stdin to $1; return 0 when the content changed
    local target=$1 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $target ]] && cmp -s "$tmp" "$target"; then
        rm -f "$tmp"
        return 1
    fi
    install -m 0644 "$tmp" "$target"
    rm -f "$tmp"
    return 0
}

configure() {  # prints "changed" when slurm.conf or gres.conf was (re)written
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite a site configuration"
    fi
    local i node changed=""
    for ((i = 0; i < N_FAKE_GPUS; i++)); do
        [[ -c /dev/fakegpu$i ]] || mknod -m 666 "/dev/fakegpu$i" c 1 3
    done
    # CPU and memory layout as slurmd sees it, under our node name.
    node=$(slurmd -C | head -n 1 | sed -E 's/^NodeName=[^ ]+ //')
    [[ $node == *CPUs=* ]] || die "unexpected 'slurmd -C' output: $node"
    write_if_changed "$CONF" <<EOF && changed=changed
$MARKER
ClusterName=everest-ci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default each job takes the whole node's memory and jobs run one at a time.
DefMemPerCPU=1000
DependencyParameters=kill_invalid_depend
ReturnToService=2
GresTypes=gpu
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 Gres=gpu:$N_FAKE_GPUS $node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    # A gpu GRES without File= makes the node INVALID; fake character devices satisfy it.
    write_if_changed "$GRES_CONF" <<EOF && changed=changed
$MARKER
AutoDetect=off
Name=gpu File=/dev/fakegpu[0-$((N_FAKE_GPUS - 1))]
EOF
    echo "$changed"
}

start_munge() {
    alive "$MUNGE_PID" && return 0
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge
    # munged refuses to run as root.
    runuser -u munge -- /usr/sbin/munged
}

node_state() { sinfo -h -n localhost -o %t 2>/dev/null | head -n 1 | tr -d '*~#$@+' || true; }

wait_idle() {
    local deadline=$((SECONDS + UP_TIMEOUT)) state
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in
            idle | mix | alloc) return 0 ;;
            drain | drng | down | inval) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    log "node not idle after ${UP_TIMEOUT}s (state '${state:-?}'); last log lines:"
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    return 1
}

stop_pidfile() {
    local pidfile=$1 pid i
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(<"$pidfile")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pidfile" || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

cmd_up() {
    local t0=$SECONDS changed
    install_packages
    changed=$(configure)
    start_munge
    if [[ -n $changed ]] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
        log "configuration changed: restarting the daemons"
        stop_pidfile "$SLURMD_PID"
        stop_pidfile "$CTLD_PID"
    fi
    # -c -i: clean state, so a node drained in an earlier run does not stay drained.
    alive "$CTLD_PID" || slurmctld -c -i
    alive "$SLURMD_PID" || slurmd -N localhost
    wait_idle
    log "up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %t %G')"
}

cmd_down() {
    if alive "$CTLD_PID"; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
    stop_pidfile "$MUNGE_PID"
    log "down"
}

cmd_status() {
    local d
    for d in "munged:$MUNGE_PID" "slurmctld:$CTLD_PID" "slurmd:$SLURMD_PID"; do
        if alive "${d#*:}"; then echo "${d%%:*}: running (pid $(<"${d#*:}"))"; else echo "${d%%:*}: stopped"; fi
    done
    alive "$CTLD_PID" || return 1
    sinfo -N -o '%N %t %c %m %G' || return 1
    squeue || true
    case $(node_state) in idle | mix | alloc) return 0 ;; *) return 1 ;; esac
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
