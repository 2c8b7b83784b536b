#!/usr/bin/env bash
# A one-node SLURM on this machine for the integration suite (tests/cluster/).
#
#   tests/cluster/slurm.sh up      # install slurm-wlm + munge if missing, start munged, slurmctld, slurmd
#   export SLURM_CONF=/tmp/adashift-slurm/slurm.conf   # (printed by `up`) for sbatch/squeue/scontrol
#   tests/cluster/slurm.sh down    # stop the daemons (by their pid files)
#
# Everything lives in one folder ($ADASHIFT_SLURM_DIR, default /tmp/adashift-slurm): slurm.conf,
# the munge key and socket, state, spool, logs and pid files. Nothing under /etc is changed, and a
# munged or SLURM the machine already runs is left alone (own socket, own ports). Needs root (apt-get,
# munged as the munge user, slurmd). Settings make a requeued task start again within seconds
# (cred_expire=10, sched_interval=2) -- see the comments in slurm.conf below.
set -euo pipefail

DIR=${ADASHIFT_SLURM_DIR:-/tmp/adashift-slurm}
CTLD_PORT=${ADASHIFT_SLURM_CTLD_PORT:-6917}
SLURMD_PORT=${ADASHIFT_SLURM_SLURMD_PORT:-6918}
export SLURM_CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket

log() { echo "slurm.sh: $*" >&2; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out waiting for $what"
            return 1
        fi
        sleep 0.5
    done
}

stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM the pid in FILE, wait until it has exited
    local file=$1 name=$2 pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        if ! wait_for 30 "$name (pid $pid) to exit" bash -c "! kill -0 $pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$file"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
    cat > "$SLURM_CONF" <<CONF
# Written by tests/cluster/slurm.sh: a one-node cluster for the integration suite.
ClusterName=adashift-test
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
# cred_expire: a requeued task is held this long before it may run again (default 120 s)
AuthInfo=socket=$SOCKET,cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# new and requeued jobs are considered every 2 s instead of up to a minute
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
MailProg=/bin/true
# SIGTERM -> SIGKILL grace on cancel/time limit; finished jobs stay visible to scontrol for 5 min
KillWait=10
MinJobAge=300
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$host CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munged() {
    install -d -m 0755 -o munge -g munge "$DIR/munge"
    if [[ ! -f $DIR/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create --keyfile "$DIR/munge/munge.key"
    fi
    if [[ -f $DIR/munge/munged.pid ]] && kill -0 "$(cat "$DIR/munge/munged.pid")" 2>/dev/null; then
        return
    fi
    # munged refuses to run as root ("Logfile is insecure"): it runs as the munge user
    runuser -u munge -- /usr/sbin/munged --socket="$SOCKET" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for 20 "munged" bash -c "munge -n --socket='$SOCKET' | unmunge --socket='$SOCKET'"
}

up() {
    install_packages
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 0755 "$DIR"
    write_conf
    start_munged
    [[ -f $DIR/slurmctld.pid ]] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null || slurmctld
    [[ -f $DIR/slurmd.pid ]] && kill -0 "$(cat "$DIR/slurmd.pid")" 2>/dev/null || slurmd
    if ! wait_for 60 "the node to be idle" bash -c '[[ $(sinfo -h -o %T) == idle ]]'; then
        log "node state: $(sinfo -h -o '%T %E' 2>&1); see $DIR/log/"
        return 1
    fi
    log "up: node $(hostname -s) idle with $(nproc) CPUs"
    echo "export SLURM_CONF=$SLURM_CONF"
}

down() {
    stop_pidfile "$DIR/slurmd.pid" slurmd
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    stop_pidfile "$DIR/munge/munged.pid" munged
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
