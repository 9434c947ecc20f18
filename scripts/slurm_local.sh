#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests marked `slurm` and for trying jobs by hand.
#
#   scripts/slurm_local.sh start     install slurm-wlm and munge if missing (apt, as root), write the
#                                    config, start munged, slurmctld and slurmd, wait for the node
#   scripts/slurm_local.sh status    the daemons' pids and `sinfo`
#   scripts/slurm_local.sh stop      stop the daemons this script started (by their pid files)
#   scripts/slurm_local.sh env       the line to source in a shell: export SLURM_CONF=...
#
# Everything lives in $SOLVER_SLURM_DIR (default /tmp/solver-slurm): slurm.conf, the state and
# spool folders, logs and pid files. Slurm's commands find this cluster through SLURM_CONF, which
# `start` prints; the tests set it themselves. The node is this host with its real CPU count and
# memory; no cgroups (proctrack/linuxproc, task/none) and no accounting (sacct fails; solver.slurm
# reads job states from squeue instead). One partition, `debug`, the default.
set -euo pipefail

DIR="${SOLVER_SLURM_DIR:-/tmp/solver-slurm}"
CONF="$DIR/slurm.conf"
MUNGE_PID=/run/munge/munged.pid
export SLURM_CONF="$CONF"

say() { echo "slurm_local: $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        say "slurm-wlm and munge are not installed and this is not root: apt-get install -y slurm-wlm munge"
        exit 1
    fi
    say "installing slurm-wlm and munge (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc --all)
    # Slurm's own reading of the node (what slurmd would register), less 256 MB for the daemons.
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem > 512 ? mem - 256 : mem))
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    chown slurm:slurm "$DIR/state" "$DIR/log"
    cat > "$CONF" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster on $host.
ClusterName=solver-local
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# A finished job stays known to squeue/scontrol for an hour (no accounting to ask after that).
MinJobAge=3600
# Time between the signal of a stop (requeue, scancel) and SIGKILL: time for the save in flight.
KillWait=30
SchedulerType=sched/backfill
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

running() {  # running PIDFILE: true if the pid in PIDFILE is alive
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_idle() {
    local host i
    host=$(hostname -s)
    for i in $(seq 1 60); do
        if sinfo -h -n "$host" -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            return 0
        fi
        sleep 0.5
    done
    say "the node did not become idle in 30 s; sinfo says: $(sinfo -h -o '%t %E' 2>&1 || true)"
    say "logs: $DIR/log/slurmctld.log, $DIR/log/slurmd.log"
    return 1
}

start() {
    install
    write_conf
    if ! running "$MUNGE_PID"; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        [ -f /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
        runuser -u munge -- /usr/sbin/munged
        touch "$DIR/munged.ours"  # stop() stops munged only if this script started it
    fi
    running "$DIR/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF"
    running "$DIR/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"
    wait_idle
    # A node restarted after a crash may come back drained; this one is ours to resume.
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    say "up: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %t')"
    echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, then SIGKILL after 10 s
    local pid i
    running "$2" || return 0
    pid=$(cat "$2")
    kill "$pid"
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { say "stopped $1 ($pid)"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    say "killed $1 ($pid)"
}

stop() {
    stop_pid slurmd "$DIR/slurmd.pid"
    stop_pid slurmctld "$DIR/slurmctld.pid"
    if [ -f "$DIR/munged.ours" ]; then
        stop_pid munged "$MUNGE_PID"
        rm -f "$DIR/munged.ours"
    fi
}

status() {
    local name file
    for name in munged slurmctld slurmd; do
        file="$DIR/$name.pid"
        [ "$name" = munged ] && file=$MUNGE_PID
        if running "$file"; then echo "$name: running ($(cat "$file"))"; else echo "$name: stopped"; fi
    done
    if running "$DIR/slurmctld.pid"; then sinfo 2>&1 || true; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
